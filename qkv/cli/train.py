"""``qkv train`` — train the 2017 encoder–decoder on a built-in task, or a decoder LM on a text file.

Settings come from ``--config FILE`` (TOML or JSON), then flags override them. Under
``torchrun --nproc_per_node=N -m qkv train …`` the same command trains with DDP (or ``--distributed fsdp``).
"""

from __future__ import annotations

import argparse
import dataclasses

# every TrainConfig field gets a flag (its type from the annotation); these add help (--task's comes from the tasks)
_HELP = {
    "data": "text task: a UTF-8 text file to train on",
    "out": "run directory: checkpoints, metrics.jsonl, run.json",
    "init": "text task: fine-tune this model (smollm2, a .gguf, an HF dir) instead of training from scratch",
    "tokenizer": "text task from scratch: 'bytes' (default) or a model whose tokenizer to use",
    "max_steps": "optimizer steps in all",
    "batch_size": "global sequences per micro-step (all processes together)",
    "grad_accum": "micro-steps per optimizer step",
    "precision": "fp32 or bf16 (autocast)",
    "nan_policy": "when the loss is not finite: stop, or skip the step",
    "device": "cpu, cuda or auto",
    "distributed": "under torchrun: ddp or fsdp (FSDP2)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.config import TrainConfig
    from ..train.tasks import TASKS

    helps = {**_HELP, "task": "; ".join(f"{name}: {t.description}" for name, t in TASKS.items())
             + "; text: a decoder LM on --data"}

    p.add_argument("--config", metavar="FILE", help="settings file (.toml or .json); flags override it")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines (evaluations are still shown)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = helps.get(f.name)
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, type=_bool, default=None, metavar="true|false", help=help_text)
            continue
        p.add_argument(flag, dest=f.name, type=_field_type(f), default=None, help=help_text or f"(default {f.default})")


def _field_type(f: dataclasses.Field):
    t = str(f.type)
    return int if "int" in t else float if "float" in t else str


def _bool(s: str) -> bool:
    if s.lower() in ("true", "1", "yes"):
        return True
    if s.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def settings(args: argparse.Namespace) -> dict:
    """Config file values, overridden by the flags given."""
    from ..train.config import TrainConfig, read_config_file

    d = read_config_file(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            d[f.name] = v
    if "out" not in d:
        d["out"] = f"runs/{d.get('task', TrainConfig.task)}"
    return d


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train

    cfg = TrainConfig.from_dict(settings(args), where=args.config or "flags")
    result = train(cfg, resume=args.resume, quiet=args.quiet)
    if result["rank"] != 0:
        return 0
    ev = result.get("eval") or {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if isinstance(v, float))
    print(f"trained {cfg.task} to step {result['steps']} in {result['out']}" + (f": {shown}" if shown else ""))
    return 0

