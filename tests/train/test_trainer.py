"""The training loop: bit-identical resume (RELIABILITY C6), accumulation, schedule, autocast."""

from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext

import pytest
import torch

from qkv.train import Trainer, train
from qkv.train import distributed as D
from qkv.train.checkpoint import decode_checkpoint, list_checkpoints
from qkv.train.jobs import make_job
from qkv.train.trainer import lr_at

from .conftest import step_records, tiny


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in step_records(out)}


@pytest.mark.parametrize("changes", [dict(), dict(dropout=0.1, grad_accum=2)], ids=["plain", "dropout+accum"])
def test_resume_is_bit_identical(tmp_path, changes):
    """C6: 2N steps straight vs N steps, the process gone, then resume for N more."""
    whole = tiny(tmp_path / "whole", max_steps=8, save_every=4, eval_every=4, **changes)
    train(whole, progress=False)
    half = tmp_path / "half"
    shutil.copytree(tmp_path / "whole", half)
    shutil.rmtree(half / "checkpoints" / "step-00000008")  # as if killed after step 4's checkpoint
    result = train(whole.replace(out=str(half)), resume=True, progress=False)
    assert result["start"] == 4
    a, _, _ = decode_checkpoint(tmp_path / "whole" / "checkpoints" / "step-00000008")
    b, _, _ = decode_checkpoint(half / "checkpoints" / "step-00000008")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "whole") == losses(half)  # the log reads as one run: steps 5..8 replaced, equal


def test_resume_is_not_a_no_op(tmp_path):
    """The C6 comparison can fail: a resume that goes on differently (another learning rate, which may
    change on resume) ends with other parameters than the straight run."""
    whole = tiny(tmp_path / "whole", max_steps=8, save_every=4, eval_every=4)
    train(whole, progress=False)
    half = tmp_path / "half"
    shutil.copytree(tmp_path / "whole", half)
    shutil.rmtree(half / "checkpoints" / "step-00000008")
    result = train(whole.replace(out=str(half), lr=whole.lr / 2), resume=True, progress=False)
    assert result["start"] == 4
    a, _, _ = decode_checkpoint(tmp_path / "whole" / "checkpoints" / "step-00000008")
    b, _, _ = decode_checkpoint(half / "checkpoints" / "step-00000008")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_is_the_mean_of_micro_batch_gradients(tmp_path):
    cfg = tiny(tmp_path / "run", grad_accum=3)
    t = Trainer(cfg, progress=False)
    t.job = make_job(cfg)
    model, d = t.job.build(), D.Dist()
    loss, _ = t._accumulate(d, model, step=2, autocast=nullcontext())
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    want, means = {n: torch.zeros_like(p) for n, p in model.named_parameters()}, []
    for micro in range(6, 9):  # step 2's micro-batches
        model.zero_grad()
        b = t.job.batch(micro)
        mean = t.job.loss_sum(model, b) / b.n_tokens
        mean.backward()
        means.append(float(mean.detach()))
        for n, p in model.named_parameters():
            want[n] += p.grad / 3
    assert loss == pytest.approx(sum(means) / 3, rel=1e-6)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


def test_learning_rate_schedule():
    cfg = tiny("unused", max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    steps = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # cosine only decays after warmup
    short = cfg.replace(max_steps=8)  # warmup 10 > the run: capped at half of it, so lr still peaks and decays
    assert lr_at(3, short) == pytest.approx(1e-3) and lr_at(7, short) < 1e-3


def test_fine_tuning_builds_fresh_copies(smollm2, tmp_path):
    """FSDP shards the model it is given in place; evaluation builds another — they must not be one object."""
    from qkv.train import TrainConfig
    from qkv.train.jobs import LMJob

    (tmp_path / "t.txt").write_text("abc " * 500, encoding="utf-8")
    job = LMJob(TrainConfig(task="text", data=str(tmp_path / "t.txt"), init="smollm2", out=str(tmp_path / "o")),
                loaded=smollm2)
    a, b = job.build(), job.build()
    assert a is not b and a is not smollm2.model
    assert torch.equal(a.model.layers[3].mlp.up_proj.weight, smollm2.model.model.layers[3].mlp.up_proj.weight)
    assert a.lm_head.weight is a.model.embed_tokens.weight  # the copy keeps its tie


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    train(tiny(tmp_path / "fp32", max_steps=3), progress=False)
    train(tiny(tmp_path / "bf16", max_steps=3, precision="bf16"), progress=False)
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert a[1] != b[1]  # autocast really ran in bfloat16 ...
    assert b[1] == pytest.approx(a[1], rel=2e-2)  # ... and stays close
    assert all(math.isfinite(v) for v in b.values())


def test_metrics_log_and_checkpoints(tmp_path):
    cfg = tiny(tmp_path / "run", max_steps=6, save_every=2, keep=2, eval_every=3)
    result = train(cfg, progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= steps[0].keys()
    assert [r["step"] for r in evals] == [3, 6] and "exact_match" in evals[0]["eval"] and evals[0]["samples"]
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [4, 6]  # keep=2
    assert result["eval"]["examples"] == 20
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["d_model"] == 32 and run["spec"]["kind"] == "seq2seq"
