"""Faithfulness measures (qkv.explain.measures) against independent references.

* float64 loops written from the papers and transformers' own modules (tests/reference/measures_loop.py)
  on tiny random Llamas with grouped-query heads, with and without biases;
* the exactness identities on the real models: ALTI's token vectors sum to the layer's actual output
  (SmolLM2's pre-RMSNorm blocks, MiniLM's post-LayerNorm blocks), logit contributions + remainder equal the
  logit difference of the model's own logits;
* sinks, the record's views, and `qkv explain --measure` with its bad inputs.
"""

from __future__ import annotations

import json

import pytest
import torch

import qkv
from qkv.cli.main import main
from qkv.errors import InputError
from qkv.explain import measures as M
from qkv.explain.capture import capture
from qkv.explain.record import find_sinks
from qkv.nn.observer import AttentionObserver
from tests.models.conftest import random_llama, tiny_tokenizer, write_hf_dir
from tests.reference.measures_loop import llama_measures

ALL = ["weights", "norms", "mixing", "rollout", "logit", "alti-logit"]
TEXT = "He sat on the river's bank"
TOL = dict(rtol=1e-4, atol=2e-5)  # fp32 against float64 (R2), shares and contributions of size <= ~10


# --- tiny random Llamas: every measure equals the float64 loops ----------------------------------------

@pytest.fixture(scope="module", params=["base", "untied_bias"])
def tiny_pair(request, tmp_path_factory):
    tok = tiny_tokenizer()
    extra = {} if request.param == "base" else dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    hf = random_llama(tok, seed=3, **extra)
    path = write_hf_dir(tmp_path_factory.mktemp(f"measures_{request.param}"), hf, tok)
    return hf, qkv.load(str(path), dtype="float32", device="cpu")


def test_every_measure_equals_the_float64_loops(tiny_pair):
    hf, ours = tiny_pair
    text = "the cat sat on the mat and the dog sat on the log"
    ids = ours.tokenizer.encode(text)
    target, foil = ids[3], ids[5]
    ref = llama_measures(hf, ids, target, foil)
    rec = capture(ours, text, measures=ALL, target=target, foil=foil)
    n_layers = len(ref["weights"])
    for li in range(n_layers):
        torch.testing.assert_close(rec.weights[li].double(), ref["weights"][li], **TOL)
        torch.testing.assert_close(rec.measures["norms"].heads[li].double(), ref["head_norms"][li], **TOL)
        torch.testing.assert_close(rec.values("norms", layer=li).double(), ref["layer_norms"][li], **TOL)
        torch.testing.assert_close(rec.values("mixing", layer=li).double(), ref["alti"][li], **TOL)
        torch.testing.assert_close(rec.values("rollout", layer=li).double(), ref["rollout"][li], **TOL)
    torch.testing.assert_close(rec.values("mixing").double(), ref["alti_composed"][-1], **TOL)
    torch.testing.assert_close(rec.values("rollout").double(), ref["rollout"][-1], **TOL)
    for name, key in (("logit", "logit"), ("alti-logit", "alti_logit")):
        logit = rec.measures[name]
        torch.testing.assert_close(logit.layers[:, 0].double(), ref[f"{key}_layers"], **TOL)
        torch.testing.assert_close(logit.model[0].double(), ref[f"{key}_model"], **TOL)
        assert logit.info["remainder"] == pytest.approx(ref["remainder"], rel=1e-4, abs=1e-4)
        assert logit.info["logit_difference"] == pytest.approx(ref["logit_difference"], rel=1e-4, abs=1e-4)


def test_the_loops_can_disagree(tiny_pair):
    """The comparison above is not vacuous: another target gives other contributions, and the per-head
    norms are not the weights."""
    hf, ours = tiny_pair
    text = "the cat sat on the mat"
    ids = ours.tokenizer.encode(text)
    ref = llama_measures(hf, ids, ids[1], ids[2])
    rec = capture(ours, text, measures=["norms", "logit", "alti-logit"], target=ids[2], foil=ids[1])
    assert not torch.allclose(rec.measures["logit"].model[0].double(), ref["logit_model"], **TOL)
    assert not torch.allclose(rec.measures["alti-logit"].model[0].double(), ref["alti_logit_model"], **TOL)
    assert not torch.allclose(rec.measures["logit"].model[0], rec.measures["alti-logit"].model[0], **TOL)
    assert not torch.allclose(rec.measures["norms"].heads[0], rec.weights[0], **TOL)


# --- the identities on the real models --------------------------------------------------------------------

class KeepLayers(AttentionObserver):
    """Keeps what each layer hands over: q, k, v, the output projection, x, z, the post-norm, the output."""

    def __init__(self):
        self.seen = {}

    def __call__(self, q, k, *, v=None, mask=None, causal=False, out_proj=None):
        self.seen[self.layer] = dict(q=q[0], k=k[0], v=v[0], causal=causal, mask=mask, out_proj=out_proj)

    def residual(self, x, z, *, norm=None, out=None):
        self.seen[self.layer].update(x=x[0], z=z[0], norm=norm, out=out[0])


@torch.no_grad()
def _sum_error(loaded, ids, **kw) -> float:
    """Worst relative error of Σ_j T_i(x_j) + b_i against the layer's actual output, over layers and rows."""
    from qkv.nn.attention import weight_rows

    keep = KeepLayers()
    with torch.inference_mode():
        loaded.model(torch.tensor([ids]), observer=keep, **kw)
    worst = 0.0
    for s in keep.seen.values():
        h = s["q"].shape[0]
        wo = M.head_projections(s["out_proj"].weight, h)
        f = M.head_vectors(M.expand_heads(s["v"], h), wo)
        rows = torch.arange(len(ids))
        alpha = weight_rows(s["q"][None], s["k"][None], None, mask=s["mask"], causal=s["causal"])[0]
        t = M.token_vectors(alpha, f, s["x"], rows, norm=s["norm"], z=s["z"])
        bias = M.output_bias(s["out_proj"].bias, s["z"], rows, s["x"].shape[-1], norm=s["norm"])
        y = s["norm"](s["z"]) if s["norm"] is not None else s["z"]
        err = (t.sum(1) + bias - y).norm(dim=-1) / y.norm(dim=-1)
        worst = max(worst, float(err.max()))
    return worst


def test_mixing_vectors_sum_to_smollm2_layer_outputs(smollm2):
    ids = smollm2.tokenizer.encode("The keys to the old cabinet are on the table, she said.")
    err = _sum_error(smollm2, ids)
    print(f"SmolLM2: worst relative error of the ALTI sum {err:.2e}")
    assert err <= 1e-5


def test_mixing_vectors_sum_to_minilm_post_norm_outputs():
    minilm = qkv.load("minilm", dtype="float32", device="cpu")
    ids = minilm.tokenizer.encode(TEXT)
    err = _sum_error(minilm, ids)
    print(f"MiniLM: worst relative error of the ALTI sum {err:.2e}")
    assert err <= 1e-5
    rec = capture(minilm, TEXT, measures=["norms", "mixing", "rollout"])
    for name in ("norms", "mixing", "rollout"):
        torch.testing.assert_close(rec.values(name).sum(-1), torch.ones(len(ids)), rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="encoder with no language-model head"):
        capture(minilm, TEXT, measures=["logit"])


@pytest.mark.parametrize("measure", ["logit", "alti-logit"])
def test_logit_contributions_and_remainder_are_the_logit_difference(smollm2, measure):
    text = "The keys to the old cabinet"
    rec = capture(smollm2, text, measures=[measure], target=" are", foil=" is")
    info = rec.measures[measure].info
    with torch.inference_mode():
        logits = smollm2.model(torch.tensor([smollm2.tokenizer.encode(text)]))[0, -1]
    ids = [smollm2.tokenizer.encode(w)[0] for w in (" are", " is")]
    actual = float(logits[ids[0]] - logits[ids[1]])
    total = float(rec.measures[measure].model.sum()) + info["remainder"]
    print(f"logit difference {actual:.5f}, contributions + remainder {total:.5f}")
    assert info["logit_difference"] == pytest.approx(actual, rel=1e-5, abs=1e-5)
    assert total == pytest.approx(actual, rel=1e-5, abs=1e-4)
    assert (info["target"], info["foil"]) == (" are", " is")


def test_norms_equal_materialised_head_outputs_on_smollm2(smollm2):
    """Per-head norms against each head's output vectors built one by one on the eager (reference) path."""
    from qkv.nn.attention import attention

    ids = smollm2.tokenizer.encode(TEXT)
    keep = KeepLayers()
    with torch.inference_mode():
        smollm2.model(torch.tensor([ids]), observer=keep)
    rec = capture(smollm2, TEXT, measures=["norms"], layers=[0, 17, 29])
    for n, layer in enumerate([0, 17, 29]):
        s = keep.seen[layer]
        q, k, v = s["q"][None].double(), s["k"][None].double(), s["v"][None].double()
        _, w = attention(q, k, v, causal=True, return_weights=True, impl="reference")  # (1, H, T, T)
        h, d = q.shape[1], q.shape[-1]
        wo = s["out_proj"].weight.double()
        vv = v[0].repeat_interleave(h // v.shape[1], dim=0)  # (H, T, D)
        moved = torch.stack([w[0, i, :, :, None] * (vv[i] @ wo[:, i * d:(i + 1) * d].T)[None] for i in range(h)])
        ref = M.shares(moved.norm(dim=-1))  # (H, T, T)
        torch.testing.assert_close(rec.measures["norms"].heads[n].double(), ref, rtol=1e-4, atol=1e-5)


def test_capture_of_early_layers_runs_only_those_layers_and_changes_no_number(smollm2):
    """Weights and norms of layers=[3] run layers 0..3 and no more (a long text's first layers cost a
    fraction of its forward), with the numbers of a capture through every layer to the bit; mixing (composed
    through the layers) and the logit measures still run them all."""
    ran = []
    hooks = [layer.register_forward_hook(lambda *_, i=i: ran.append(i))
             for i, layer in enumerate(smollm2.model.model.layers)]
    try:
        part = capture(smollm2, TEXT, measures=["norms"], layers=[3])
        assert ran == [0, 1, 2, 3]
        ran.clear()
        whole = capture(smollm2, TEXT, measures=["norms"], layers=[3, 29])
        assert ran == list(range(30))
        for measure in ("mixing", "logit"):
            ran.clear()
            through = capture(smollm2, TEXT, measures=[measure], layers=[3])
            assert ran == list(range(30)), measure
            assert torch.equal(part.weights, through.weights), measure
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(part.weights[0], whole.weights[0])
    assert torch.equal(part.measures["norms"].heads[0], whole.measures["norms"].heads[0])
    assert torch.equal(part.measures["norms"].layers[0], whole.measures["norms"].layers[0])


# --- sinks, views, memory ------------------------------------------------------------------------------------

def test_sink_detection_on_the_flagship_sentence(smollm2):
    rec = capture(smollm2, TEXT, queries=[6], measures=["norms"])
    assert [s["token"] for s in rec.sinks] == ["He"]
    assert rec.sinks[0]["weight"] > 0.4 and rec.sinks[0]["size"] < 0.5
    # the faithful view does not rank the sink first in the word view: "river's" does
    words = rec.word_labels("key")
    row = rec.word_row(words.index("bank"), measure="norms")
    assert words[int(row.argmax())] == "river's"
    assert rec.without_sink().sinks == []


def test_find_sinks_needs_both_weight_and_small_values():
    w = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(2, 3, 1, 4)  # (L, H, Q, K)
    small = torch.tensor([0.1, 1.0, 1.0, 1.0]).expand(2, 3, 4)
    tokens = ["a", "b", "c", "d"]
    assert [s["position"] for s in find_sinks(w, small, [3], tokens, causal=True)] == [0]
    assert find_sinks(w, torch.ones(2, 3, 4), [3], tokens, causal=True) == []  # normal size: no sink
    spread = torch.full((2, 3, 1, 4), 0.25)
    assert find_sinks(spread, small, [3], tokens, causal=True) == []  # small but not singled out


def test_one_row_keeps_one_row_per_layer_and_head(smollm2):
    rec = capture(smollm2, TEXT, queries=[6], measures=["norms"])
    assert rec.measures["norms"].heads.shape == (30, 9, 1, 7) and rec.measures["norms"].layers.shape == (30, 1, 7)
    full = capture(smollm2, TEXT, measures=["norms"])
    torch.testing.assert_close(rec.values("norms")[0], full.values("norms")[6], rtol=0, atol=1e-6)


def test_views_refuse_what_a_measure_does_not_have(smollm2):
    rec = capture(smollm2, TEXT, measures=["mixing", "logit"])
    with pytest.raises(InputError, match="per layer, not per head"):
        rec.values("mixing", head=0)
    with pytest.raises(InputError, match="not captured"):
        rec.values("norms")
    with pytest.raises(InputError, match="at position 6 only"):
        rec.row(2, measure="logit")


def test_capture_refuses_bad_measures_and_tokens(smollm2):
    with pytest.raises(InputError, match="unknown measure 'attention'"):
        capture(smollm2, TEXT, measures=["attention"])
    with pytest.raises(InputError, match=r"' riverbank' is not one token: it tokenizes as \["):
        capture(smollm2, TEXT, measures=["logit"], target=" riverbank")
    with pytest.raises(InputError, match="same token"):
        capture(smollm2, TEXT, measures=["logit"], target=" is", foil=" is")
    with pytest.raises(InputError, match="outside the vocabulary"):
        capture(smollm2, TEXT, measures=["logit"], target=10**7)


def test_auto_model_captures_the_exact_float32_numbers(smollm2):
    """A dtype="auto" model has compact int4 copies that would serve a text of <= 8 tokens; capture must not
    use them (qkv explain shows what the exact model computes)."""
    auto = qkv.load("smollm2", device="cpu")
    a = capture(auto, TEXT, measures=["norms"])
    b = capture(smollm2, TEXT, measures=["norms"])
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=1e-6)
    assert all(m.small_m > 0 for m in auto.model.modules() if hasattr(m, "small_m"))  # restored afterwards


# --- the CLI ----------------------------------------------------------------------------------------------

def run_cli(capsys, *argv):
    code = main(["explain", *argv, "--threads", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_default_is_norms_with_the_sink_marked(capsys):
    code, out, err = run_cli(capsys, TEXT, "--token", "bank")
    assert code == 0, err
    assert out.startswith("'bank' draws on — smollm2, norms ‖α·W_O v‖ as shares")
    assert "He " in out.splitlines()[1] and "◀ sink" in out.splitlines()[1]
    assert "sink: He takes 46% of the attention weight" in out


def test_explain_json_carries_every_measure_with_its_definition(capsys):
    code, out, err = run_cli(capsys, TEXT, "--token", "bank", "--measure", "all", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["measure"] == "norms" and set(d["measures"]) == set(ALL)
    for name, entry in d["measures"].items():
        assert entry["definition"] == M.DEFINITIONS[name] and len(entry["values"]) == len(d["keys"])
    assert abs(sum(d["measures"]["mixing"]["values"]) - 1) < 1e-4
    for name in ("logit", "alti-logit"):
        logit = d["measures"][name]
        assert abs(sum(logit["values"]) + logit["remainder"] - logit["logit_difference"]) < 1e-3
    assert [s["token"] for s in d["sinks"]] == ["He"]


def test_explain_logit_with_target_and_foil(capsys):
    code, out, err = run_cli(capsys, "The keys to the old cabinet", "--measure", "logit", "--target", " are",
                             "--foil", " is")
    assert code == 0, err
    assert out.startswith("why ' are' rather than ' is' after ' cabinet' — smollm2, logit contributions by "
                          "position read")
    assert "of the logit difference" in out


@pytest.mark.parametrize("argv,match", [
    ([TEXT, "--token", "bank", "--measure", "attention"], "--measure 'attention' is not one of weights, norms"),
    ([TEXT, "--token", "bank", "--target", " is"], "--target and --foil go with --measure logit"),
    ([TEXT, "--measure", "logit", "--target", " riverbank"], "' riverbank' is not one token: it tokenizes as"),
    ([TEXT, "--measure", "logit", "--target", "riverbank"], "a word after a space usually needs its space"),
    ([TEXT, "--token", "bank", "--measure", "mixing", "--head", "2"], "mixing is computed per layer, not per head"),
    ([TEXT, "--token", "bank", "--measure", "logit", "--model", "minilm"], "encoder with no language-model head"),
])
def test_explain_measure_bad_input_exits_2_with_one_line(capsys, argv, match):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("qkv: error: ") and err.count("\n") == 1 and match in err, err


def test_public_api_and_the_cli_know_the_same_measures():
    from qkv.cli.explain import MEASURE_NAMES, PREDICTION

    assert qkv.capture is capture and qkv.AttentionRecord.__name__ == "AttentionRecord"
    assert callable(qkv.capture_generation)
    assert MEASURE_NAMES == M.MEASURES and PREDICTION == M.PREDICTION and set(M.DEFINITIONS) == set(M.MEASURES)


def test_example_notebook_runs_and_the_record_displays_inline():
    """examples/seeing_attention.ipynb, its code cells run in order in one namespace (what a kernel does),
    and the last cell's record renders as the offline explorer in a sandboxed iframe: no URL anywhere."""
    import html
    import re
    from pathlib import Path

    nb = json.loads((Path(__file__).parents[2] / "examples" / "seeing_attention.ipynb").read_text(encoding="utf-8"))
    env: dict = {}
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code
    for cell in code:
        exec(compile("".join(cell["source"]), "seeing_attention.ipynb", "exec"), env)  # noqa: S102 — our file
    shown = env["rec"]._repr_html_()
    assert shown.startswith('<iframe sandbox="allow-scripts"')
    page = html.unescape(re.search(r'srcdoc="(.*)"', shown, re.S).group(1))
    assert 'id="qkv-data"' in page and "Content-Security-Policy" in page
    bare = page.replace('"http://www.w3.org/2000/svg"', "")  # the SVG export's namespace: a name, never fetched
    assert "http://" not in bare and "https://" not in bare and "require" not in page


@pytest.mark.parametrize("post_norm", [False, True])
def test_fast_alti_equals_the_readable_definition(post_norm):
    """alti_rows (keys as the matmul batch, in place) = alti(token_vectors(...)), pre- and post-norm, GQA."""
    g = torch.Generator().manual_seed(4)
    h, s, c = 4, 11, 16
    alpha = torch.softmax(torch.randn(h, s, s, generator=g), -1).tril()
    f, x = torch.randn(h, s, c, generator=g), torch.randn(s, c, generator=g)
    z = torch.randn(s, c, generator=g)
    norm = torch.nn.LayerNorm(c) if post_norm else None
    if norm is not None:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(c, generator=g))
    rows = torch.tensor([2, 5, 10])
    with torch.no_grad():
        y = norm(z) if norm is not None else z
        slow = M.alti(y[rows], M.token_vectors(alpha[:, rows], f, x, rows, norm=norm, z=z))
        fast = M.alti_rows(alpha[:, rows], f.transpose(0, 1).contiguous(), x, y, rows, norm=norm, z=z)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fast, M.shares(alpha[:, rows].mean(0)), atol=1e-3)  # not the weights
