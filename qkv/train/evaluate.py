"""Held-out metrics of a finished (or running) training run, from its directory alone."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, InputError
from .config import TrainConfig
from .jobs import LMJob, Seq2SeqJob


def evaluate_run(run_dir: str | Path, *, split: str = "test", limit: int | None = None, beam_size: int = 1) -> dict:
    """Exact match + loss on the task's ``split`` (seq2seq; greedy, or beam search with ``beam_size`` > 1),
    or held-out loss + perplexity (text)."""
    from ..load import load

    run_dir = Path(run_dir)
    try:
        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        cfg = TrainConfig.from_dict(run["config"], where=str(run_dir / "run.json"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{run_dir}: not a qkv training run (run.json: {e.__class__.__name__})") from None
    if cfg.task == "text" and (beam_size != 1 or split != "test"):
        raise InputError(f"{run_dir} is a text run: it has one held-out part and no decoding to search "
                         "(--beam and --split are for the seq2seq tasks)")
    loaded = load(run_dir, dtype="float32", device="cpu")
    if cfg.task == "text":
        job = LMJob(cfg, model_config=loaded.config, tokenizer=loaded.tokenizer)
        result = job.evaluate(loaded.model, limit=limit)
    else:
        job = Seq2SeqJob(cfg, chars=loaded.tokenizer.chars)
        result = job.evaluate(loaded.model, split, limit=limit, beam_size=beam_size)
        result.pop("predictions")
        result["decoding"] = "greedy" if beam_size == 1 else f"beam {beam_size}"
    return {"run": str(run_dir), "task": cfg.task, "checkpoint": loaded.info["checkpoint"], **result}
