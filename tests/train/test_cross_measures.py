"""The encoder–decoder's cross-attention measures (qkv.explain.capture.capture_cross).

* mixing (ALTI per layer, ALTI+ through the model) against float64 loops written from the formulas
  (tests/reference/cross_measures_loop.py), on pre- and post-norm runs trained briefly through the public
  API, after checking that the loops' forward gives the model's own logits;
* the exactness identity on the trained reversal model: each step's token vectors sum to the decoder's
  actual cross-attention sublayer output;
* `qkv explain --model RUN --measure mixing` and the measures an encoder–decoder cannot give.
"""

from __future__ import annotations

import json

import pytest
import torch

import qkv
from qkv.cli.main import main
from qkv.errors import InputError
from qkv.explain import measures as M
from qkv.explain.capture import capture_cross
from qkv.nn.attention import weight_rows
from qkv.nn.observer import AttentionObserver
from qkv.train import train
from tests.reference.cross_measures_loop import cross_alti
from tests.train.conftest import tiny

TOL = dict(rtol=1e-4, atol=2e-5)  # fp32 against float64 (RELIABILITY R2)


@pytest.fixture(scope="module", params=[True, False], ids=["pre-norm", "post-norm"])
def short_run(request, tmp_path_factory):
    """Two layers per stack, trained ~150 steps (a couple of seconds): outputs of several tokens."""
    out = tmp_path_factory.mktemp("cross") / "run"
    train(tiny(out, norm_first=request.param, n_layers=2, max_steps=150, n_train=2000, max_len=6,
               eval_every=150, save_every=150), progress=False)
    return qkv.load(str(out))


def _decoder_inputs(loaded, output: str, rec) -> list[int]:
    v = loaded.tokenizer
    ids = v.encode(output) + ([v.eos_id] if rec.query_tokens[-1] == "<eos>" else [])
    return [v.bos_id] + ids[:-1]


def test_cross_mixing_equals_the_float64_loops(short_run):
    text = "abcdef"
    output, rec = capture_cross(short_run, text, measures=["norms", "mixing"], max_new_tokens=8)
    v = short_run.tokenizer
    src = v.encode(text) + [v.eos_id]
    tgt = _decoder_inputs(short_run, output, rec)
    assert len(tgt) >= 3, "the run should produce a few tokens"
    ref = cross_alti(short_run.model, src, tgt)
    with torch.inference_mode():  # the loops' forward is the model's: same logits, teacher-forced
        logits = short_run.model(torch.tensor([src]), torch.tensor([tgt]))[0]
    torch.testing.assert_close(ref["logits"].float(), logits, rtol=1e-4, atol=1e-4)
    assert ref["sum_error"] <= 1e-12  # the loops' token vectors sum to their own outputs (float64)
    mix = rec.measures["mixing"]
    torch.testing.assert_close(mix.layers.double(), ref["cross"][..., :-1], **TOL)
    torch.testing.assert_close(mix.info["residual"].double(), ref["cross"][..., -1], **TOL)
    torch.testing.assert_close(mix.model.double(), ref["model_source"], **TOL)
    torch.testing.assert_close(mix.info["target_share"].double(), ref["target_share"], **TOL)
    # shares: each layer's source part + the residual, and the model's source part + the target prefix, are 1
    torch.testing.assert_close(mix.layers.sum(-1) + mix.info["residual"], torch.ones_like(mix.info["residual"]))
    torch.testing.assert_close(mix.model.sum(-1) + mix.info["target_share"], torch.ones(len(tgt)))
    # not vacuous: mixing is not the weights, and the model view is not one layer's
    assert not torch.allclose(mix.layers[-1], rec.values("weights", layer=rec.layers[-1]), **TOL)
    assert not torch.allclose(mix.model.double(), ref["cross"][-1, :, :-1], **TOL)


class KeepCross(AttentionObserver):
    """Each decoder step's cross-attention: what the sublayer hands over and its residual stream."""

    def __init__(self):
        self.steps = []

    def __call__(self, q, k, *, v=None, mask=None, causal=False, out_proj=None):
        if self.site == "cross":
            self.pending = dict(q=q[0], k=k[0], v=v[0], out_proj=out_proj)

    def residual(self, x, z, *, norm=None, out=None):
        if self.site == "cross":
            self.steps.append(dict(self.pending, x=x[0, -1], z=z[0, -1], norm=norm))


def test_cross_token_vectors_sum_to_the_decoder_output(trained_reverse):
    cfg, _ = trained_reverse
    loaded = qkv.load(cfg.out)
    model, v = loaded.model, loaded.tokenizer
    src = torch.tensor([v.encode("attention") + [v.eos_id]])
    keep = KeepCross()
    with torch.inference_mode():
        memory = model.encode(src)
        caches = model.make_caches(1, 12, src.shape[1])
        nxt = torch.tensor([[v.bos_id]])
        for _ in range(10):
            nxt = model.decode(nxt, memory, caches=caches, observer=keep)[:, -1].argmax(-1, keepdim=True)
    worst = 0.0
    with torch.no_grad():  # the norms' parameters would otherwise be tracked
        for s in keep.steps:
            h = s["q"].shape[0]
            alpha = weight_rows(s["q"][None], s["k"][None], [s["q"].shape[1] - 1])[0, :, 0]
            f = M.head_vectors(M.expand_heads(s["v"], h), M.head_projections(s["out_proj"].weight, h))
            t = M.step_token_vectors(alpha, f, s["x"], None, s["norm"], s["z"])  # (S + 1, C)
            b = M.output_bias(s["out_proj"].bias, s["z"][None], torch.tensor([0]), s["x"].shape[-1], norm=s["norm"])[0]
            y = s["norm"](s["z"]) if s["norm"] is not None else s["z"]
            worst = max(worst, float((t.sum(0) + b - y).norm() / y.norm()))
    assert len(keep.steps) == 10 * cfg.n_layers
    assert worst <= 1e-5


def test_trained_reversal_shares_on_the_real_run(trained_reverse):
    """On the trained reversal model: the last layer's norms put output i on source position n−1−i (the
    alignment the task needs), and mixing accounts for every row — each layer's source shares plus the
    decoder's residual, and the model view's source part plus the target prefix, are 1. (Here the residual
    stream dominates, as ALTI often finds: the source part of a layer's output is small; the CLI says so.)"""
    cfg, _ = trained_reverse
    loaded = qkv.load(cfg.out)
    output, rec = capture_cross(loaded, "planets", measures=["norms", "mixing"])
    assert output == "stenalp"
    last = rec.values("norms", layer=rec.layers[-1])[:7, :7]  # output letters x source letters
    assert [int(last[i].argmax()) for i in range(7)] == [6, 5, 4, 3, 2, 1, 0]
    mix = rec.measures["mixing"]
    torch.testing.assert_close(mix.layers.sum(-1) + mix.info["residual"], torch.ones_like(mix.info["residual"]))
    torch.testing.assert_close(mix.model.sum(-1) + mix.info["target_share"], torch.ones(len(rec.queries)))
    assert float(mix.model.sum()) > 0


def test_explain_cross_mixing_cli(short_run, capsys):
    run = str(short_run.source)
    assert main(["explain", "abc", "--model", run, "--measure", "mixing,norms", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    mix = out["measures"]["mixing"]
    assert len(mix["values"]) == len(out["queries"]) == len(mix["target_share"])
    for row, rest in zip(mix["values"], mix["target_share"]):
        assert sum(row) + rest == pytest.approx(1, abs=1e-4)
    assert main(["explain", "abc", "--model", run, "--measure", "mixing", "--layer", "1", "--format", "json"]) == 0
    assert "residual" in json.loads(capsys.readouterr().out)["measures"]["mixing"]
    assert main(["explain", "abc", "--model", run, "--measure", "mixing", "--token", "<eos>"]) == 0
    assert "makes up the remaining" in capsys.readouterr().out
    for measure in ("rollout", "logit"):
        assert main(["explain", "abc", "--model", run, "--measure", measure]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "cross-attention gives weights, norms and mixing" in err
    with pytest.raises(InputError, match="gives weights, norms and mixing"):
        capture_cross(short_run, "abc", measures=["alti-logit"])
