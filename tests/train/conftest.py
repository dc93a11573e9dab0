"""Fixtures for the training tests: tiny configurations, and one reversal model trained for real."""

from __future__ import annotations

import json

import pytest

from qkv.train import TrainConfig


def tiny(out, **changes) -> TrainConfig:
    """A run that takes about a second: one layer per stack, 32 dimensions, a few hundred examples."""
    base = dict(task="reverse", out=str(out), max_steps=6, batch_size=8, d_model=32, n_heads=2, n_layers=1,
                d_ff=64, n_train=200, n_val=20, n_test=20, eval_every=3, save_every=3, eval_size=20, samples=1,
                log_every=1, warmup_steps=2)
    return TrainConfig(**{**base, **changes})


def step_records(out) -> list[dict]:
    """The training-step lines of a run's metrics.jsonl (those with a loss), in the order written."""
    lines = (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip())
    return [r for r in lines if "loss" in r]


@pytest.fixture(scope="session")
def trained_reverse(tmp_path_factory):
    """The reversal task trained through the public API to its held-out accuracy (about 30 s here)."""
    from qkv.train import train

    out = tmp_path_factory.mktemp("reverse") / "run"
    cfg = TrainConfig(task="reverse", out=str(out), max_steps=450, max_len=8, warmup_steps=50, eval_every=150,
                      save_every=150, eval_size=300, samples=2)
    result = train(cfg, progress=False)
    return cfg, result
