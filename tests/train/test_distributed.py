"""``qkv train`` under torchrun with 2 CPU processes (gloo) learns exactly what one process learns."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from qkv.train.checkpoint import decode_checkpoint

from .conftest import step_records

ARGS = ["train", "--task", "reverse", "--max-steps", "8", "--batch-size", "16", "--d-model", "32", "--n-heads", "2",
        "--n-layers", "1", "--d-ff", "64", "--n-train", "400", "--n-val", "20", "--n-test", "20", "--eval-every", "4",
        "--save-every", "4", "--eval-size", "20", "--log-every", "1", "--warmup-steps", "2", "--grad-accum", "2",
        "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out, *extra, procs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "qkv"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master-port={_free_port()}",
        "-m", "qkv"]
    done = subprocess.run([*launch, *ARGS, "--out", str(out), *extra], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def curve(out) -> list[float]:
    return [r["loss"] for r in step_records(out)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "one"
    run(out)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_loss_curve(single, tmp_path, mode):
    done = run(tmp_path / mode, "--distributed", mode, procs=2)
    assert done.stdout.count("trained reverse") == 1  # rank 0 alone reports ...
    assert sorted(p.name for p in (tmp_path / mode).iterdir()) == sorted(p.name for p in single.iterdir())
    one, two = curve(single), curve(tmp_path / mode)
    assert len(one) == len(two) == 8
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-6)
    a, _, _ = decode_checkpoint(single / "checkpoints" / "step-00000008")
    b, _, state = decode_checkpoint(tmp_path / mode / "checkpoints" / "step-00000008")
    assert state["world_size"] == 2 and a.keys() == b.keys()  # full tensors under plain names, whatever the wrapping
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_the_curves_can_differ(single, tmp_path):
    """The comparison above is not vacuous: another global batch gives another curve."""
    run(tmp_path / "other", "--seed", "3")
    assert max(abs(x - y) for x, y in zip(curve(single), curve(tmp_path / "other"))) > 1e-3
