"""Self-attention "by hand": every number of one or more heads, exact and with classroom approximations.

The exercise: 4 tokens of 6 features, one 6 -> 3 head with weight matrices WQ, WK, WV (each d_k x d_model,
so q = WQ x). The classroom approximations make the arithmetic doable with pencil and paper:

* divide by √d_k            ->  divide by round(√d_k) and floor (for d_k = 3: ⌊x / 2⌋)
* e^x                       ->  3^x

Everything is computed in float64 in the **row layout** code uses (Q is tokens x d_k, ``weights[i][j]``
is how much query i attends to key j, rows sum to 1). The exercise's **column layout** (tokens as
columns, Kᵀ Q, columns sum to 1, Z = V A) is the transpose of the same numbers; the renderers show it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

# The default example: small integers chosen so that every step can be done by hand and the heads
# attend to different tokens (X is one row per token; each W is d_k x d_model).
DEFAULT_X = [[0, 0, 2, 0, 0, 1], [1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 0], [1, 1, 2, 0, 0, 0]]
DEFAULT_HEADS = [
    {"WQ": [[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 1, 0, 0, 1]],
     "WK": [[1, 0, 0, 0, 1, 0], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]],
     "WV": [[0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 1], [0, 0, 1, 0, 1, 1]]},
    {"WQ": [[1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [1, 0, 0, 1, 1, 1]],
     "WK": [[1, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0]],
     "WV": [[1, 0, 0, 1, 0, 1], [0, 0, 1, 1, 0, 0], [1, 0, 1, 1, 1, 0]]},
]
MAX_SIZE = 64  # tokens, features and d_k: a by-hand page, not a model


@dataclass(frozen=True)
class Example:
    """The inputs: X (n_tokens x d_model) and, per head, WQ, WK, WV (each d_k x d_model)."""

    X: np.ndarray
    heads: tuple[dict[str, np.ndarray], ...]
    tokens: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.tokens:
            object.__setattr__(self, "tokens", tuple(f"x{i + 1}" for i in range(self.X.shape[0])))


@dataclass
class Steps:
    """One head's numbers for one way of computing (exact or approximate), row layout."""

    scaled: np.ndarray  # scores after scaling (n x n)
    exp: np.ndarray  # e^scaled or 3^scaled
    sums: np.ndarray  # row sums of exp (the exercise's column sums)
    weights: np.ndarray  # exp / sums, rows sum to 1
    Z: np.ndarray  # weights @ V (n x d_v)


@dataclass
class HeadTrace:
    """Every number of one head."""

    W: dict[str, np.ndarray]  # WQ, WK, WV (each d_k x d_model)
    Q: np.ndarray
    K: np.ndarray
    V: np.ndarray
    scores: np.ndarray  # Q Kᵀ, unscaled (n x n)
    d_k: int
    exact: Steps
    approx: Steps
    divisor: int = field(default=2)  # √d_k rounded: the classroom's denominator


@dataclass
class Trace:
    example: Example
    heads: list[HeadTrace]

    def output(self, mode: str = "exact") -> np.ndarray:
        """The heads' Z side by side: n_tokens x (d_v · n_heads) — multi-head without an output projection."""
        return np.concatenate([getattr(h, mode).Z for h in self.heads], axis=1)


def default_example(n_heads: int = 1) -> Example:
    if n_heads not in (1, 2):
        raise InputError(f"the default example has 1 or 2 heads, not {n_heads}; use --seed N for more heads")
    return parse_example({"X": DEFAULT_X, "heads": DEFAULT_HEADS[:n_heads]}, where="default example")


def random_example(seed: int, n_heads: int = 1, n_tokens: int = 4, d_model: int = 6, d_k: int = 3) -> Example:
    """Small non-negative integers (0..2 for X, 0..1 for W), reproducible from ``seed``."""
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    if not 1 <= n_heads <= 8:
        raise InputError(f"--heads must be between 1 and 8, got {n_heads}")
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, size=(n_tokens, d_model))
    heads = [{w: (rng.random((d_k, d_model)) < 0.4).astype(int) for w in ("WQ", "WK", "WV")}
             for _ in range(n_heads)]
    return parse_example({"X": x.tolist(), "heads": [{k: v.tolist() for k, v in h.items()} for h in heads]},
                         where=f"seed {seed}")


def load_example(path: str | Path) -> Example:
    """Read ``{"X": ..., "WQ": ..., "WK": ..., "WV": ...}`` or ``{"X": ..., "heads": [...]}`` from JSON."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    return parse_example(obj, where=str(p))


def parse_example(obj, where: str = "input") -> Example:
    """Validate a JSON-like object into an Example; every problem is one InputError line."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object with keys X and WQ/WK/WV (or heads)")
    if "X" not in obj:
        raise InputError(f"{where}: missing key 'X' (one row of features per token)")
    x = _matrix(obj["X"], "X", where)
    if "heads" in obj:
        raw = obj["heads"]
        if not isinstance(raw, list) or not raw:
            raise InputError(f"{where}: 'heads' must be a non-empty list of {{WQ, WK, WV}} objects")
    else:
        raw = [obj]
    heads = tuple(_head(h, i, len(raw), x.shape[1], where) for i, h in enumerate(raw))
    tokens = obj.get("tokens", ())
    if tokens and (not isinstance(tokens, list) or len(tokens) != x.shape[0]
                   or not all(isinstance(t, str) for t in tokens)):
        raise InputError(f"{where}: 'tokens' must be a list of {x.shape[0]} strings, one per row of X")
    return Example(x, heads, tuple(tokens))


def _head(h, i: int, n: int, d_model: int, where: str) -> dict[str, np.ndarray]:
    label = f" of head {i + 1}" if n > 1 else ""
    if not isinstance(h, dict):
        raise InputError(f"{where}: head {i + 1} must be an object with WQ, WK, WV")
    missing = [w for w in ("WQ", "WK", "WV") if w not in h]
    if missing:
        raise InputError(f"{where}: missing {', '.join(missing)}{label} (each d_k x {d_model}, q = WQ x)")
    mats = {w: _matrix(h[w], w + label, where) for w in ("WQ", "WK", "WV")}
    for w, m in mats.items():
        if m.shape[1] != d_model:
            raise InputError(f"{where}: {w}{label} is {m.shape[0]}x{m.shape[1]} but X has {d_model} features per "
                             f"token: each W must be d_k x {d_model}")
    if mats["WQ"].shape[0] != mats["WK"].shape[0]:
        raise InputError(f"{where}: WQ{label} is {mats['WQ'].shape[0]}x{d_model} and WK{label} is "
                         f"{mats['WK'].shape[0]}x{d_model}: queries and keys need the same d_k")
    return mats


def _matrix(value, name: str, where: str) -> np.ndarray:
    """A non-empty, rectangular list of lists of finite numbers, at most MAX_SIZE each way."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: {name} must be a non-empty list of rows")
    if not all(isinstance(r, list) for r in value):
        raise InputError(f"{where}: {name} must be a list of rows (lists of numbers)")
    widths = {len(r) for r in value}
    if len(widths) != 1 or 0 in widths:
        raise InputError(f"{where}: {name} is ragged: rows have {sorted(widths)} entries; all rows need the same")
    for r_i, row in enumerate(value):
        for c_i, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"{where}: {name}[{r_i}][{c_i}] = {v!r} is not a finite number")
    m = np.asarray(value, dtype=np.float64)
    if max(m.shape) > MAX_SIZE:
        raise InputError(f"{where}: {name} is {m.shape[0]}x{m.shape[1]}; by hand means at most {MAX_SIZE} each way")
    return m


def compute(example: Example) -> Trace:
    """All heads, exact (e^x, /√d_k) and approximate (3^x, ⌊x / round(√d_k)⌋), in float64."""
    return Trace(example, [_head_trace(example.X, h) for h in example.heads])


def _head_trace(x: np.ndarray, w: dict[str, np.ndarray]) -> HeadTrace:
    q, k, v = x @ w["WQ"].T, x @ w["WK"].T, x @ w["WV"].T  # (n, d_k): q_i = WQ x_i
    scores = q @ k.T  # (n, n): scores[i, j] = q_i · k_j — the exercise's (Kᵀ Q)[j, i]
    d_k = q.shape[1]
    divisor = max(1, round(math.sqrt(d_k)))
    exact = _steps(scores / math.sqrt(d_k), np.exp, v)
    approx = _steps(np.floor(scores / divisor), lambda s: np.power(3.0, s), v)
    return HeadTrace(w, q, k, v, scores, d_k, exact, approx, divisor)


def _steps(scaled: np.ndarray, exp, v: np.ndarray) -> Steps:
    # subtracting the row max would change the hand numbers; the exercise's values are small enough
    with np.errstate(over="ignore"):
        e = exp(scaled)
    if not np.all(np.isfinite(e)):
        raise InputError("scores are too large to exponentiate by hand (overflow): use smaller numbers")
    sums = e.sum(axis=1)
    weights = e / sums[:, None]
    return Steps(scaled, e, sums, weights, weights @ v)


def to_json(trace: Trace, include_approx: bool = True) -> dict:
    """Row layout, exact numbers; with ``include_approx`` the same keys again under "approx"."""
    def heads(mode: str) -> list[dict]:
        return [{"d_k": h.d_k, "Q": h.Q.tolist(), "K": h.K.tolist(), "V": h.V.tolist(), "scores": h.scores.tolist(),
                 "scaled": getattr(h, mode).scaled.tolist(), "weights": getattr(h, mode).weights.tolist(),
                 "Z": getattr(h, mode).Z.tolist()} for h in trace.heads]

    out: dict = {"layout": "rows: Q is n_tokens x d_k; weights[i][j] = how much query i attends to key j",
                 "tokens": list(trace.example.tokens), "X": trace.example.X.tolist(),
                 "heads": heads("exact"), "output": trace.output("exact").tolist()}
    if include_approx:
        rules = [{"scale": f"floor(x / {h.divisor})", "exp": "3^x"} for h in trace.heads]
        out["approx"] = {"rules": rules, "heads": heads("approx"), "output": trace.output("approx").tolist()}
    return out
