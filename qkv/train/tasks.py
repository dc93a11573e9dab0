"""Built-in sequence-to-sequence tasks: no download, seeded, with splits that never overlap.

    date     "23 November 2026", "Nov 23, 2026", "23/11/2026", … -> "2026-11-23"
    reverse  "attention" -> "noitnetta"
    sort     "qkvattn" -> "aknqttv"

Which split an example belongs to is decided by a hash of its *key* — the source string for reverse
and sort, the calendar date for date (so every spelling of a held-out date is held out) — never by
the seed. Train, validation and test can therefore never share an example, whatever seed or sizes are
asked for; the seed only chooses which examples of each split are drawn.

Tokens are characters. Ids 0, 1, 2 are <pad>, <bos>, <eos>; the task's alphabet follows.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import random
import string
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError, InputError

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
SPLITS = ("train", "val", "test")
_SPLIT_BOUNDS = (80, 90, 100)  # hash % 100 below 80 -> train, below 90 -> val, else test


@dataclass(frozen=True)
class CharVocab:
    """Characters <-> ids, with the three specials first."""

    chars: str

    def __post_init__(self):
        if len(set(self.chars)) != len(self.chars):
            raise ConfigError("CharVocab: characters must be unique")
        # char -> id, built once: encode runs for every example of every batch (frozen: set it directly)
        object.__setattr__(self, "_index", {c: i + len(SPECIALS) for i, c in enumerate(self.chars)})

    @property
    def size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    vocab_size = size
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text: str) -> list[int]:
        index = self._index
        bad = sorted({c for c in text if c not in index})
        if bad:
            raise InputError(f"characters {''.join(bad)!r} are not in this task's alphabet {self.chars!r}")
        return [index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS))

    def token_strings(self, ids) -> list[str]:
        return [SPECIALS[i] if i < len(SPECIALS) else self.chars[i - len(SPECIALS)] for i in ids]


# --- the three tasks: (rng, max_len) -> (key, source, target) -------------------------------------------

_MONTHS = [calendar.month_name[m] for m in range(1, 13)]
_FIRST_DAY, _LAST_DAY = dt.date(1900, 1, 1).toordinal(), dt.date(2099, 12, 31).toordinal()
_DATE_FORMATS: tuple[Callable[[dt.date], str], ...] = (
    lambda d: f"{d.day} {_MONTHS[d.month - 1]} {d.year}",          # 23 November 2026
    lambda d: f"{d.day} {_MONTHS[d.month - 1][:3]} {d.year}",      # 23 Nov 2026
    lambda d: f"{_MONTHS[d.month - 1][:3]} {d.day}, {d.year}",     # Nov 23, 2026
    lambda d: f"{_MONTHS[d.month - 1]} {d.day}, {d.year}",         # November 23, 2026
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}",               # 23/11/2026
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",               # 23.11.2026
)


def _date_example(rng: random.Random, max_len: int) -> tuple[str, str, str]:
    day = dt.date.fromordinal(rng.randint(_FIRST_DAY, _LAST_DAY))
    return day.isoformat(), rng.choice(_DATE_FORMATS)(day), day.isoformat()


def _reverse_example(rng: random.Random, max_len: int) -> tuple[str, str, str]:
    s = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, max_len)))
    return s, s, s[::-1]


def _sort_example(rng: random.Random, max_len: int) -> tuple[str, str, str]:
    s = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, max_len)))
    return s, s, "".join(sorted(s))


@dataclass(frozen=True)
class TaskSpec:
    alphabet: str
    make: Callable[[random.Random, int], tuple[str, str, str]]
    description: str


TASKS: dict[str, TaskSpec] = {
    "date": TaskSpec("".join(sorted(set(string.digits + " ,/.-" + "".join(_MONTHS)))), _date_example,
                     "normalise a date written six ways to YYYY-MM-DD"),
    "reverse": TaskSpec(string.ascii_lowercase, _reverse_example, "reverse a string of letters"),
    "sort": TaskSpec(string.ascii_lowercase, _sort_example, "sort the letters of a string"),
}


def split_of(key: str) -> str:
    """The split an example's key belongs to: a property of the key alone (seed-independent)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") % 100
    return next(name for name, bound in zip(SPLITS, _SPLIT_BOUNDS) if bucket < bound)


@dataclass(frozen=True)
class Seq2SeqData:
    """The three splits of one task: lists of (source, target) strings, and the vocabulary."""

    vocab: CharVocab
    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]

    def split(self, name: str) -> list[tuple[str, str]]:
        if name not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


def make_task(name: str, *, seed: int = 0, n_train: int = 20000, n_val: int = 500, n_test: int = 1000,
              max_len: int = 10) -> Seq2SeqData:
    """Draw ``n_*`` distinct examples per split of task ``name`` (deterministic in all arguments)."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}: choose one of {', '.join(TASKS)} (or 'text' for a language model)")
    for label, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("max_len", max_len)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{label} must be a positive integer, got {n!r}")
    spec, rng = TASKS[name], random.Random(f"qkv-task:{name}:{seed}")
    want = dict(zip(SPLITS, (n_train, n_val, n_test)))
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for _ in range(50 * sum(want.values())):
        key, src, tgt = spec.make(rng, max_len)
        split = split_of(key)
        if src in seen or len(out[split]) >= want[split]:
            continue
        seen.add(src)
        out[split].append((src, tgt))
        if all(len(out[s]) >= want[s] for s in SPLITS):
            return Seq2SeqData(CharVocab(spec.alphabet), out["train"], out["val"], out["test"])
    short = ", ".join(f"{s} {len(out[s])}/{want[s]}" for s in SPLITS)
    raise ConfigError(f"task {name!r} with max_len={max_len} has too few distinct examples ({short}); "
                      "ask for fewer examples or a larger max_len")
