"""The date task: trained here to ≥ 99 % on held-out dates, and its cross-attention aligns field by field."""

from __future__ import annotations

import pytest

import qkv
from qkv.explain.capture import capture_cross
from qkv.train import TrainConfig, train
from qkv.train.evaluate import evaluate_run


@pytest.fixture(scope="module")
def date_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("date") / "run"
    cfg = TrainConfig(task="date", out=str(out), max_steps=600, warmup_steps=50, eval_every=300, save_every=600,
                      eval_size=200, samples=1)
    train(cfg, quiet=True)
    return cfg


def test_date_normalisation_reaches_99_percent_on_unseen_dates(date_run):
    result = evaluate_run(date_run.out, split="test", limit=500)  # dates never trained on, in any spelling
    assert result["exact_match"] >= 0.99, result


@pytest.mark.parametrize("text, fields", [
    ("23/11/2026", {"day": range(0, 2), "month": range(3, 5), "year": range(6, 10)}),
    ("Nov 23, 2026", {"month": range(0, 3), "day": range(4, 6), "year": range(8, 12)}),
    ("23 November 2026", {"day": range(0, 2), "month": range(3, 11), "year": range(12, 16)}),
])
def test_cross_attention_aligns_each_output_field_with_its_input_field(date_run, text, fields):
    """Each digit of "2026-11-23" puts more attention (mean over layers and heads) on the input field it
    comes from than on either other field: the alignment the model learned by itself."""
    output, rec = capture_cross(qkv.load(date_run.out), text)
    assert output == "2026-11-23"
    w = rec.weights.mean(dim=(0, 1))  # (Q, S)
    source_of = {0: "year", 1: "year", 2: "year", 3: "year", 5: "month", 6: "month", 8: "day", 9: "day"}
    for q, field in source_of.items():
        mass = {name: float(w[q, list(span)].sum()) for name, span in fields.items()}
        assert max(mass, key=mass.get) == field, (rec.query_tokens[q], q, mass)
