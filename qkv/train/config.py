"""TrainConfig: every knob of a training run, from a TOML/JSON file and/or flags, validated in one place."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .tasks import TASKS

TASK_NAMES = (*TASKS, "text")
SEQ2SEQ_POSITIONS = 128  # the encoder–decoder's sinusoidal table: every built-in task's strings are shorter
MAX_TASK_LEN = SEQ2SEQ_POSITIONS - 8  # reverse/sort strings: + <eos>/<bos> and decoding slack
# Fields that decide the model and the data: a resumed run must agree on them (RELIABILITY C7).
IDENTITY_FIELDS = ("task", "data", "init", "tokenizer", "seed", "max_len", "n_train", "n_val", "n_test",
                   "block_size", "d_model", "n_heads", "n_kv_heads", "n_layers", "d_ff", "dropout",
                   "norm_first", "precision")


@dataclass(frozen=True)
class TrainConfig:
    task: str = "reverse"
    out: str = "runs/reverse"
    data: str | None = None  # text task: a UTF-8 file
    init: str | None = None  # text task: fine-tune this model (embedded name, .gguf, HF dir) instead of from scratch
    tokenizer: str = "bytes"  # text task from scratch: "bytes" or a model whose tokenizer to use
    # optimisation
    max_steps: int = 2000
    batch_size: int = 64  # global examples (sequences) per micro-step, over all processes
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    precision: str = "fp32"  # or "bf16": autocast (CPU and CUDA)
    nan_policy: str = "stop"  # "stop" or "skip" the step when the loss is not finite
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_every: int = 200
    eval_size: int = 500  # validation examples (seq2seq) or windows (text) per evaluation
    log_every: int = 10
    save_every: int = 500
    keep: int = 3
    samples: int = 3
    # data
    max_len: int = 10  # reverse/sort: longest string
    n_train: int = 20000
    n_val: int = 500
    n_test: int = 1000
    block_size: int = 128  # text: tokens per training window
    # model (seq2seq: the 2017 Transformer; text: a Llama-style decoder)
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None
    n_layers: int = 2  # per stack (encoder and decoder each) for seq2seq
    d_ff: int = 512
    dropout: float = 0.0
    norm_first: bool = True
    # where
    device: str = "cpu"
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2, fully_shard)

    def __post_init__(self):
        if self.task not in TASK_NAMES:
            raise ConfigError(f"task must be one of {', '.join(TASK_NAMES)}, got {self.task!r}")
        if self.task == "text" and not self.data:
            raise ConfigError("task 'text' needs --data FILE (a UTF-8 text file)")
        if self.task != "text" and (self.data or self.init):
            raise ConfigError(f"--data and --init are for task 'text'; task {self.task!r} brings its own data")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_size", "log_every", "save_every",
                     "max_len", "n_train", "n_val", "n_test", "block_size", "d_model", "n_heads", "n_layers", "d_ff"):
            _positive_int(self, name)
        for name in ("warmup_steps", "keep", "samples", "seed"):
            _positive_int(self, name, zero_ok=True)
        if self.n_kv_heads is not None:
            _positive_int(self, "n_kv_heads")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 < min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("precision", ("fp32", "bf16")), ("nan_policy", ("stop", "skip")),
                              ("distributed", ("ddp", "fsdp"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.seed >= 2**32:
            raise ConfigError(f"seed must be below 2^32, got {self.seed}")
        if self.task in ("reverse", "sort") and self.max_len > MAX_TASK_LEN:
            raise ConfigError(f"max_len {self.max_len} is too long for the encoder–decoder's {SEQ2SEQ_POSITIONS} "
                              f"positions; use --max-len {MAX_TASK_LEN} or less")
        for name in ("task", "out", "tokenizer", "precision", "nan_policy", "device", "distributed"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("data", "init"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string (a path or model name), got {getattr(self, name)!r}")
        if not isinstance(self.norm_first, bool):
            raise ConfigError(f"norm_first must be true or false, got {self.norm_first!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "config") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _positive_int(cfg: TrainConfig, name: str, *, zero_ok: bool = False) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
        raise ConfigError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} integer, got {v!r}")


def read_config_file(path: str | Path) -> dict:
    """A TOML (``.toml``, Python 3.11+) or JSON file -> a dict of settings (a [train] table is allowed)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"--config {p}: {e.strerror}") from None
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            d = tomllib.loads(raw.decode("utf-8"))
        else:
            d = json.loads(raw)
    except ImportError:
        raise ConfigError(f"--config {p}: TOML needs Python 3.11 or newer; write the settings as JSON") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {p}: not valid {'TOML' if p.suffix.lower() == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--config {p}: the top level must be a table/object of settings")
    settings = d.get("train", d)
    if not isinstance(settings, dict):
        raise ConfigError(f"--config {p}: [train] must be a table/object of settings, got {type(settings).__name__}")
    return settings


def mismatches(saved: dict, current: TrainConfig) -> list[str]:
    """The identity fields that differ between a run directory's config and this one (C7)."""
    now = current.to_dict()
    return [f"{k}: {saved.get(k)!r} in the run, {now[k]!r} now" for k in IDENTITY_FIELDS if saved.get(k) != now[k]]
