"""How many prompt rows a compact model's matrices multiply through their compact kernels, measured on this
machine by ``qkv compile`` and cached, where qkv's defaults were measured on other machines.

A compact matrix (qkv.nn.quant.CompactLinear) multiplies inputs of up to ``small_m`` rows through its int4/int8
kernel (or qkv's native 4-bit operator) and longer ones through its exact weight, dequantised for the call.
Where the two cost the same depends on the CPU, not only on its kind: qkv's 4-bit operator crosses over at
~20 rows on an Intel Xeon running AVX2 code and at ~50 on an AMD Zen 3 (BENCHMARKS.md runs 18 and 19).
:func:`measure` times a prompt's forward through the layers both ways, taking turns, at several lengths;
:func:`choose` puts the crossover where the compact side stops being faster; :func:`save` and :func:`cached`
keep it per model shape, kernels, CPU, torch build and thread count. A missing, unreadable or mismatched file
means the defaults (qkv.nn.quant.COMPACT_ROWS*), never an error.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from ..errors import InputError
from .cache import cache_root, machine_key

FORMAT = 1
LENGTHS = (8, 16, 24, 32, 40, 48, 64, 96)  # prompt tokens timed
TURNS = 4  # timed turns of each (after one untimed)
MAX_ROWS = 4096


def layer_matrices(model) -> list:
    """The compact matrices a prompt's rows go through (every CompactLinear but the unembedding, which a prompt
    multiplies by its last row only)."""
    from ..nn.quant import CompactLinear

    return [m for name, m in model.named_modules() if isinstance(m, CompactLinear) and name != "lm_head"]


def signature(model) -> dict | None:
    """What the crossover depends on: the matrices' kinds and shapes and the prompts' dtype, the native
    libraries' names (their sources, compiler, flags and CPU), torch's build, ATen's capability, the CPU and
    the thread count. None for a model with no compact matrices."""
    from . import matvec, native

    mats = layer_matrices(model)
    if not mats:
        return None
    shapes = sorted({(m.kind, m.out_features, m.in_features, str(m.prompt_dtype).removeprefix("torch."))
                     for m in mats})
    stems = (native._stem(), native._stem(matvec.SOURCE, matvec.flags()))
    libraries = [stem.name if stem else None for stem in stems]
    return {"format": FORMAT, "matrices": [list(s) for s in shapes], "libraries": libraries, **machine_key(),
            "threads": torch.get_num_threads()}


def path_for(sig: dict) -> Path:
    key = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "crossover" / f"{key}.json"


def cached(model) -> int | None:
    """The crossover ``qkv compile`` measured for this model on this machine, or None (never an error)."""
    try:
        sig = signature(model)
        if sig is None:
            return None
        d = json.loads(path_for(sig).read_text(encoding="utf-8"))
        rows = d["rows"]
        if d["signature"] == sig and type(rows) is int and 1 <= rows <= MAX_ROWS:
            return rows
    except (OSError, RuntimeError, ValueError, KeyError, TypeError):  # missing, unreadable, not ours
        pass
    return None


def apply(model, rows: int) -> None:
    for m in layer_matrices(model):
        m.small_m = rows


def measure(model, lengths=LENGTHS, turns: int = TURNS) -> dict[int, tuple[float, float]]:
    """Seconds (compact, dequantised) of one prompt's forward at each length (the longer ones cut to the model's
    context), the medians of ``turns`` turns that alternate the two sides' order; ``small_m`` put back."""
    import statistics  # here, not on every load (~5 ms)

    if turns < 1 or not lengths or min(lengths) < 1:
        raise ValueError(f"measure needs turns >= 1 and lengths >= 1, got {turns} and {list(lengths)}")
    lengths = sorted({min(n, model.config.max_position_embeddings) for n in lengths})
    mats = layer_matrices(model)
    saved = [m.small_m for m in mats]
    ids = torch.randint(model.config.vocab_size, (1, max(lengths)), generator=torch.Generator().manual_seed(0))
    times: dict[tuple[str, int], list[float]] = {}
    try:
        with torch.inference_mode():
            for turn in range(turns + 1):  # the first warms up, untimed
                for side in ("compact", "dequantised") if turn % 2 else ("dequantised", "compact"):
                    for n in lengths:
                        for m in mats:  # dequantised: every product of n rows (those of one row stay compact)
                            m.small_m = n if side == "compact" else n - 1
                        t0 = time.perf_counter()
                        model(ids[:, :n], last_only=True)
                        if turn:
                            times.setdefault((side, n), []).append(time.perf_counter() - t0)
    finally:
        for m, s in zip(mats, saved):
            m.small_m = s
    return {n: (statistics.median(times["compact", n]), statistics.median(times["dequantised", n]))
            for n in lengths}


def choose(timed: dict[int, tuple[float, float]]) -> int:
    """The crossover from :func:`measure`'s timings: where compact/dequantised first exceeds 1, interpolated
    linearly from the length before. Never outside the lengths timed: the shortest if compact is slower there
    already, the longest if it is never slower."""
    prev = None
    for n in sorted(timed):
        r = timed[n][0] / timed[n][1]
        if r > 1:
            if prev is None:
                return n
            m, q = prev
            return max(1, m + int((1 - q) / (r - q) * (n - m)))
        prev = (n, r)
    return max(timed)


def save(model, rows: int, timed: dict[int, tuple[float, float]]) -> Path | None:
    """Written atomically (InputError where it cannot be); None where the model has no compact matrices."""
    from ..io import write_bytes

    sig = signature(model)
    if sig is None:
        return None
    path = path_for(sig)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    body = {"signature": sig, "rows": rows,
            "ms": {str(n): [round(1000 * a, 3), round(1000 * b, 3)] for n, (a, b) in sorted(timed.items())}}
    return write_bytes(path, json.dumps(body, indent=1, sort_keys=True).encode())
