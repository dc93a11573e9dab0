"""``qkv layers``: every number against Hugging Face transformers on the same weights (tiny random Llamas
written as HF directories, and SmolLM2's weights in a transformers model), computed here by hand in float64:
the logit lens is transformers' ``output_hidden_states`` through the final RMSNorm and the unembedding; the
stream, the attention and MLP updates are transformers' hidden states and its sublayers' outputs (forward
hooks on its modules); the RMSNorm scales and the SwiGLU gate are recomputed from them. The update sum
x_out = x_in + attn + mlp, the last layer's lens = the model's own logits, the layout, the PNG, and bad input
as one line with exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qkv.cli.main import main
from tests.models.conftest import VARIANTS, random_llama, tiny_tokenizer, write_hf_dir

TEXT = "The quick brown fox jumps over the lazy dog"


def _hf_trace(model, ids: list[int]) -> SimpleNamespace:
    """transformers' forward with hidden states, and per layer its attention output, MLP input and output."""
    attn, mlp_in, mlp_out = {}, {}, {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.register_forward_hook(
            lambda m, a, o, i=i: attn.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0].detach())))

        def mlp_hook(m, a, o, i=i):
            mlp_in[i], mlp_out[i] = a[0][0].detach(), o[0].detach()
        handles.append(layer.mlp.register_forward_hook(mlp_hook))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    n = len(model.model.layers)
    pre_norm_last = out.hidden_states[n - 1][0] + attn[n - 1] + mlp_out[n - 1]  # HF's last entry is normed
    return SimpleNamespace(hs=[h[0] for h in out.hidden_states], logits=out.logits[0], attn=attn, mlp_in=mlp_in,
                           mlp_out=mlp_out, n=n, last=pre_norm_last)


def _stream_after(ref: SimpleNamespace, layer: int) -> torch.Tensor:
    """The residual stream (T, C) leaving ``layer``, before any final norm."""
    return ref.hs[layer + 1] if layer < ref.n - 1 else ref.last


@torch.no_grad()
def _lens64(model, h: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm and unembedding by hand, float64: (…, C) -> (…, V)."""
    norm = model.model.norm
    eps = norm.variance_epsilon
    h = h.double()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()
    return normed @ model.lm_head.weight.double().T


@pytest.fixture(scope="module", params=["base", "untied_bias"])
def tiny(request, tmp_path_factory) -> SimpleNamespace:
    tok = tiny_tokenizer()
    model = random_llama(tok, seed=11, **{**VARIANTS[request.param], "num_hidden_layers": 3})
    path = write_hf_dir(tmp_path_factory.mktemp("layers") / "hf", model, tok)
    ids = tok.encode(TEXT).ids
    return SimpleNamespace(path=path, tok=tok, model=model, ids=ids, ref=_hf_trace(model, ids),
                           vocab=model.config.vocab_size, eps=model.config.rms_norm_eps)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["layers", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv: str) -> dict:
    code, out, err = _run(capsys, *argv, "--format", "json", "--device", "cpu")
    assert code == 0 and err == "", err
    return json.loads(out)


def test_logit_lens_equals_final_norm_and_unembedding_of_transformers_hidden_states(capsys, tiny):
    d = _json(capsys, TEXT, "--model", str(tiny.path), "--token", "the", "--top", str(tiny.vocab))
    p = d["position"]
    assert d["ids"] == tiny.ids and d["tokens"][p] == "Ġthe".replace("Ġ", " ")
    assert p == tiny.tok.encode(TEXT).tokens.index("Ġthe")
    own = tiny.ref.logits[p].double()
    final = int(own.argmax())
    assert d["final"]["id"] == final
    assert abs(d["final"]["probability"] - float(torch.softmax(own, -1)[final])) < 1e-5
    assert len(d["layers"]) == tiny.ref.n
    for layer, row in enumerate(d["layers"]):
        want = _lens64(tiny.model, _stream_after(tiny.ref, layer)[p])  # (V,)
        probs = torch.softmax(want, -1)
        got_ids = [x["id"] for x in row["lens"]]
        got_p = torch.tensor([x["probability"] for x in row["lens"]], dtype=torch.float64)
        got_logit = torch.tensor([x["logit"] for x in row["lens"]], dtype=torch.float64)
        assert sorted(got_ids) == list(range(tiny.vocab))  # --top V lists every token once
        torch.testing.assert_close(got_p, probs[got_ids], rtol=0, atol=1e-5)
        torch.testing.assert_close(got_logit, want[got_ids], rtol=1e-4, atol=1e-4)
        assert got_p.tolist() == sorted(got_p.tolist(), reverse=True)
        assert abs(row["final_token_probability"] - float(probs[final])) < 1e-5
        assert row["final_token_rank"] == int((want > want[final]).sum()) + 1
    # the last layer's lens is the model's own prediction (transformers' logits)
    last = d["layers"][-1]["lens"]
    torch.testing.assert_close(torch.tensor([x["logit"] for x in last], dtype=torch.float64),
                               own[[x["id"] for x in last]], rtol=1e-4, atol=1e-4)


def test_stream_updates_norms_and_gate_equal_transformers(tiny):
    import qkv
    from qkv.explain.lens import GATE_THRESHOLD, layer_lens

    loaded = qkv.load(str(tiny.path), device="cpu")
    lens = layer_lens(loaded, TEXT, word="fox", top=3)
    p = lens.position
    assert lens.tokens[p] == "x" and p == tiny.tok.encode(TEXT).tokens.index("x")  # a word's last token
    ref, close = tiny.ref, dict(rtol=1e-4, atol=1e-5)
    # the update sum: what the two sublayers returned, added to the stream, is the stream leaving the layer
    total = lens.stream_in.double() + lens.attn_update.double() + lens.mlp_update.double()
    rel = (total - lens.stream_out.double()).norm(dim=-1) / lens.stream_out.double().norm(dim=-1)
    assert float(rel.max()) < 1e-5
    torch.testing.assert_close(lens.stream_in[1:], lens.stream_out[:-1], rtol=0, atol=0)
    for layer, s in enumerate(lens.steps):
        x_in, x_out = ref.hs[layer][p], _stream_after(ref, layer)[p]
        a, m = ref.attn[layer][p], ref.mlp_out[layer][p]
        torch.testing.assert_close(lens.stream_in[layer], x_in, **close)
        torch.testing.assert_close(lens.stream_out[layer], x_out, **close)
        torch.testing.assert_close(lens.attn_update[layer], a, **close)
        torch.testing.assert_close(lens.mlp_update[layer], m, **close)
        h = (x_in + a).double()
        for got, want in [(s.norm_in, x_in.double().norm()), (s.norm_out, x_out.double().norm()),
                          (s.attn_share, a.double().norm() / x_in.double().norm()),
                          (s.mlp_share, m.double().norm() / h.norm()),
                          (s.input_scale, torch.rsqrt(x_in.double().pow(2).mean() + tiny.eps)),
                          (s.post_attention_scale, torch.rsqrt(h.pow(2).mean() + tiny.eps))]:
            assert abs(got - float(want)) <= 1e-4 * abs(float(want)) + 1e-6
        mlp = tiny.model.model.layers[layer].mlp  # transformers' own projections on its own MLP input
        u = ref.mlp_in[layer][p].double()
        with torch.no_grad():
            gate, up = (F.linear(u, proj.weight.double(), None if proj.bias is None else proj.bias.double())
                        for proj in (mlp.gate_proj, mlp.up_proj))
            act = F.silu(gate)
        assert abs(s.gate_active - float((act.abs() > GATE_THRESHOLD).double().mean())) <= 1 / act.numel()
        assert abs(s.glu_mean_abs - float((act * up).abs().mean())) < 1e-4 * float((act * up).abs().mean()) + 1e-6
    # the last layer's lens, through qkv's own final norm and head, is qkv's own logits
    torch.testing.assert_close(lens.lens_logits[-1], lens.final_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lens.final_logits.double(), ref.logits[p].double(), rtol=1e-4, atol=1e-4)


def test_default_position_is_the_last_token(capsys, tiny):
    d = _json(capsys, TEXT, "--model", str(tiny.path), "--top", "2")
    assert d["position"] == len(tiny.ids) - 1 and d["word"] is None
    assert all(len(row["lens"]) == 2 for row in d["layers"])


def test_smollm2_lens_equals_transformers_on_its_weights(smollm2):
    """SmolLM2's weights (as qkv read them from the GGUF) in a transformers LlamaForCausalLM: its hidden
    states through the final norm and unembedding by hand equal qkv's lens at every layer."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from qkv.explain.lens import layer_lens

    c = smollm2.config
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    hf.load_state_dict(smollm2.model.state_dict(), strict=True, assign=True)
    hf.model.rotary_emb = LlamaRotaryEmbedding(cfg)  # its buffers were made on the meta device
    hf.tie_weights()
    hf.eval()
    text = "The capital of France is"
    lens = layer_lens(smollm2, text, top=5)
    ref = _hf_trace(hf, list(lens.ids))
    p = lens.position
    for layer in range(ref.n):
        want = _lens64(hf, _stream_after(ref, layer)[p])
        torch.testing.assert_close(lens.lens_logits[layer].double(), want, rtol=1e-4, atol=2e-3)
        probs = torch.softmax(want, -1)
        step = lens.steps[layer]
        torch.testing.assert_close(torch.tensor(step.lens_probs, dtype=torch.float64), probs[list(step.lens_ids)],
                                   rtol=0, atol=1e-4)
    torch.testing.assert_close(lens.lens_logits[-1], lens.final_logits, rtol=1e-5, atol=1e-4)
    assert lens.final_id == int(ref.logits[p].argmax())
    rel = ((lens.stream_in + lens.attn_update + lens.mlp_update) - lens.stream_out).norm(dim=-1) \
        / lens.stream_out.norm(dim=-1)
    assert float(rel.max()) < 1e-5


def test_text_layout_and_png(capsys, tiny, tmp_path):
    code, out, err = _run(capsys, TEXT, "--model", str(tiny.path), "--device", "cpu", "--token", "the", "--top", "3",
                          "--png", str(tmp_path))
    assert code == 0 and "wrote" in err
    lines = out.splitlines()
    n = tiny.ref.n
    assert lines[0].startswith("hf — what each layer does to '␣the' (position 23 of")
    assert lines[1].startswith("the model's next token there:")
    assert lines[4].split()[:3] == ["layer", "‖x‖", "in"]
    rows = lines[5:5 + n]
    assert [r.split()[0] for r in rows] == [str(i) for i in range(n)]
    assert lines[5 + n] == "" and lines[6 + n].startswith("logit lens")
    lens_rows = lines[8 + n:]
    assert [r.split()[0] for r in lens_rows] == [str(i) for i in range(n)]
    (png,) = tmp_path.glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize("argv,needle", [
    (["x", "--top", "0"], "--top must be an integer >= 1"),
    (["x", "--gate-threshold", "-1"], "--gate-threshold must be a finite number >= 0"),
    (["x", "--occurrence", "0"], "--occurrence must be >= 1"),
    (["   "], "empty"),
    (["x", "--model", "no-such-model"], "no model 'no-such-model'"),
    (["x", "--model", "minilm"], "is an encoder"),
])
def test_user_errors_are_one_line(capsys, argv, needle):
    code, out, err = _run(capsys, *argv, "--device", "cpu")
    assert code == 2 and out == ""
    assert err.startswith("qkv: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert needle in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--token", "cat"], "'cat' is not a word of the text"),
    (["--token", "the", "--occurrence", "5"], "occurs 1 time(s)"),
])
def test_word_errors_are_one_line(capsys, tiny, argv, needle):
    code, out, err = _run(capsys, TEXT, "--model", str(tiny.path), "--device", "cpu", *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and needle in err, err


def test_real_process_exit_code():
    p = subprocess.run([sys.executable, "-m", "qkv", "layers", "x", "--top", "0"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("qkv: error:") and p.stderr.count("\n") == 1, p.stderr
