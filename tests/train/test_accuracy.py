"""A transformer trained here, on this CPU, through the public API — and its cross-attention aligning."""

from __future__ import annotations

import json

import torch

import qkv
from qkv.explain.capture import capture_cross
from qkv.explain.render_html import explorer_html
from qkv.explain.render_png import heatmap_png
from qkv.train.evaluate import evaluate_run
from qkv.train.tasks import BOS, EOS


def test_reversal_reaches_99_percent_on_held_out_test_split(trained_reverse):
    cfg, result = trained_reverse
    assert result["eval"]["exact_match"] >= 0.99  # validation, during training
    test = evaluate_run(cfg.out, split="test")  # never seen: other strings than train and val
    assert test["examples"] == 1000 and test["exact_match"] >= 0.99, test


def test_beam_search_evaluation_agrees(trained_reverse):
    cfg, _ = trained_reverse
    beam = evaluate_run(cfg.out, split="test", limit=200, beam_size=3)
    greedy = evaluate_run(cfg.out, split="test", limit=200)
    assert beam["decoding"] == "beam 3" and greedy["decoding"] == "greedy"
    assert beam["exact_match"] >= 0.99 and abs(beam["exact_match"] - greedy["exact_match"]) <= 0.01


def test_trained_run_loads_back_and_decodes(trained_reverse):
    cfg, _ = trained_reverse
    loaded = qkv.load(cfg.out)
    assert loaded.format == "qkv-run" and loaded.info["checkpoint"] == "step-00000450"
    vocab = loaded.tokenizer
    words = ["softmax", "qkv", "heads", "z"]  # trained on 1..8 letters
    src = [vocab.encode(w) + [EOS] for w in words]
    width = max(map(len, src))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in src])
    mask = ids != 0
    greedy = loaded.model.greedy(ids, bos=BOS, eos=EOS, max_new_tokens=12, src_mask=mask)
    beam = loaded.model.beam_search(ids, bos=BOS, eos=EOS, max_new_tokens=12, beam_size=3, src_mask=mask)
    assert [vocab.decode(g) for g in greedy] == [w[::-1] for w in words]
    assert beam == greedy


def test_cross_attention_aligns_output_with_input(trained_reverse, tmp_path):
    """Reversal: output character i copies input character n-1-i; the last layer's cross-attention,
    averaged over heads, puts its largest weight there for most output characters."""
    cfg, _ = trained_reverse
    loaded = qkv.load(cfg.out)
    word = "softmax"
    output, rec = capture_cross(loaded, word)
    assert output == word[::-1] and rec.kind == "cross"
    assert rec.key_tokens == list(word) + ["<eos>"] and rec.query_tokens == list(word[::-1]) + ["<eos>"]
    torch.testing.assert_close(rec.weights.sum(-1), torch.ones(rec.weights.shape[:3]))
    mean = rec.weights[-1].mean(0)  # (Q, S) last layer, mean of heads
    n = len(word)
    aligned = sum(int(mean[i].argmax()) == n - 1 - i for i in range(n))
    assert aligned >= n - 2, mean
    png = heatmap_png(rec, tmp_path / "cross.png", words=False)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = explorer_html(rec, title="cross")
    payload = json.loads(html.split('id="qkv-data">', 1)[1].split("</script>", 1)[0])
    assert payload["kind"] == "cross" and payload["key_tokens"][:3] == ["s", "o", "f"]


def test_cross_capture_equals_a_reference_softmax(trained_reverse):
    """The captured rows are softmax(q·kᵀ/√d) of the cross-attention's own q and k, recomputed here."""
    cfg, _ = trained_reverse
    loaded = qkv.load(cfg.out)
    model, vocab = loaded.model, loaded.tokenizer
    word = "kv"
    _, rec = capture_cross(loaded, word)
    src = torch.tensor([vocab.encode(word) + [EOS]])
    memory = model.encode(src)
    tgt = torch.tensor([[BOS] + vocab.encode(word[::-1])])
    seen = {}

    def grab(layer):
        def hook(attn, args, kwargs, out):
            x, context = args[0], args[1]  # the normed decoder stream, the encoder's memory
            h, d = attn.n_heads, attn.head_dim
            q = attn.q_proj(x).view(1, -1, h, d).transpose(1, 2)  # (1, H, T, D)
            k = attn.k_proj(context).view(1, -1, h, d).transpose(1, 2)  # (1, H, S, D)
            seen[layer] = torch.softmax(q.double() @ k.double().transpose(-1, -2) / d ** 0.5, -1)[0]
        return hook

    handles = [layer.cross_attn.register_forward_hook(grab(i), with_kwargs=True)
               for i, layer in enumerate(model.decoder)]
    with torch.no_grad():
        model.decode(tgt, memory)
    for h in handles:
        h.remove()
    for li in range(len(model.decoder)):
        torch.testing.assert_close(rec.weights[li].double(), seen[li], rtol=1e-4, atol=1e-6)
