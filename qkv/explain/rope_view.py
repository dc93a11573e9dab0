"""RoPE as the lecture shows it: the frequency of each rotated pair, and what rotation does to q·k.

Legend: D head dim, i pair index (0 ≤ i < D/2), r relative distance in tokens.

Each pair of dimensions (x[i], x[i + D/2]) of a query or key is rotated by the angle p·θ_i at position p,
with θ_i = base^(-2i/D) (Su et al. 2021), then — in Llama 3.1-style models — stretched by the llama3
scaling for the long wavelengths (or divided by the GGUF file's per-frequency factors). A pair turns once
every 2π/θ_i tokens: its wavelength. Rotating the query at position p + r and the key at p gives a dot
product that depends on r alone:

    R(p + r) q · R(p) k = Σ_i  |q_i||k_i| cos(r θ_i + φ_i)      (φ_i: the angle between the two 2-D pairs)

so for q = k = (1, …, 1) it is 2 Σ_i cos(r θ_i): D at r = 0, falling off and oscillating with distance.

Everything is read from the loaded model's own ``qkv.nn.rope.RoPE`` (frequencies in float64) and the
rotations run through its ``forward`` (float32, as in the model); this module adds no RoPE maths.

    view = rope_view(qkv.load("smollm2"), max_distance=256)
    print(render_rope(view)); rope_png(view, "rope.png"); view.to_dict()
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..nn.rope import RoPE, rope_frequencies

VECTORS = ("ones", "random")
MAX_DISTANCE = 1 << 20  # positions rotated at once: (N + 1) × D floats, 256 MB at D = 64


@dataclass
class RopeView:
    """The RoPE frequencies of one model and the rotated dot product of a fixed query/key pair."""

    model: str
    head_dim: int
    theta: float
    scaling: dict | None  # llama3 scaling parameters, if the config has them
    freq_factors: bool  # the file's per-frequency divisors (GGUF rope_freqs) are applied
    context: int
    inv_freq_base: torch.Tensor  # (D/2,) float64: base^(-2i/D), before any scaling
    inv_freq: torch.Tensor  # (D/2,) float64: what the model rotates with
    vectors: str
    seed: int | None
    offset: int  # the key's position; the query sits at offset + r
    q: torch.Tensor  # (D,) float32
    k: torch.Tensor  # (D,) float32
    dots: torch.Tensor  # (N + 1,) float64: R(offset + r) q · R(offset) k for r = 0..N

    @property
    def wavelengths(self) -> torch.Tensor:
        """Tokens per full turn of each pair: 2π / θ_i."""
        return 2 * math.pi / self.inv_freq

    @property
    def max_distance(self) -> int:
        return self.dots.numel() - 1

    def to_dict(self) -> dict:
        d = self.head_dim
        pairs = [{"pair": i, "dims": [i, i + d // 2], "inv_freq_base": float(self.inv_freq_base[i]),
                  "inv_freq": float(self.inv_freq[i]), "wavelength": float(self.wavelengths[i]),
                  "scale": float(self.inv_freq_base[i] / self.inv_freq[i]),
                  "turns_in_context": float(self.context / self.wavelengths[i])} for i in range(d // 2)]
        return {"model": self.model, "head_dim": d, "rope_theta": self.theta, "rope_scaling": self.scaling,
                "freq_factors": self.freq_factors, "context": self.context, "pairs": pairs,
                "dot": {"vectors": self.vectors, "seed": self.seed, "key_position": self.offset,
                        "q": self.q.tolist(), "k": self.k.tolist(),
                        "distances": list(range(self.max_distance + 1)), "values": self.dots.tolist()}}


def find_rope(model: torch.nn.Module) -> RoPE | None:
    """The model's rotary embedding module (shared by its layers), or None for a model without RoPE."""
    return next((m for m in model.modules() if isinstance(m, RoPE)), None)


def check_options(max_distance: int, vectors: str, offset: int) -> None:
    """Options a user can get wrong, checked before any model is loaded."""
    if not 1 <= max_distance <= MAX_DISTANCE:
        raise InputError(f"--max-distance must be between 1 and {MAX_DISTANCE:,}, got {max_distance}")
    if vectors not in VECTORS:
        raise InputError(f"--vectors must be one of {', '.join(VECTORS)}, got {vectors!r}")
    if not 0 <= offset < 1 << 31:
        raise InputError(f"--offset must be a position >= 0, got {offset}")


def rope_view(loaded, *, max_distance: int = 256, vectors: str = "ones", seed: int = 0, offset: int = 0) -> RopeView:
    """The frequencies of ``loaded``'s RoPE and the rotated dot product for distances 0..max_distance."""
    check_options(max_distance, vectors, offset)
    rope = find_rope(loaded.model)
    if rope is None:
        kind = type(loaded.model).__name__
        raise InputError(f"{loaded.name} ({kind}) has no rotary position embedding (RoPE): its positions are "
                         "learned vectors added to the input; try a Llama-architecture model such as smollm2")
    cfg = loaded.config
    q, k = _vectors(rope.dim, vectors, seed)
    scaling = None if rope.scaling is None else dict(vars(rope.scaling), rope_type="llama3")
    return RopeView(loaded.name, rope.dim, rope.theta, scaling, getattr(cfg, "rope_freq_factors", None) is not None,
                    cfg.max_position_embeddings, rope_frequencies(rope.dim, rope.theta), rope.inv_freq64.clone(),
                    vectors, seed if vectors == "random" else None, offset, q, k,
                    rotated_dots(rope, q, k, max_distance, offset))


def _vectors(dim: int, vectors: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if vectors == "ones":
        ones = torch.ones(dim)
        return ones, ones.clone()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=g), torch.randn(dim, generator=g)


def rotated_dots(rope: RoPE, q: torch.Tensor, k: torch.Tensor, max_distance: int, offset: int = 0) -> torch.Tensor:
    """(N + 1,) float64: the model's rotation of q at offset + r and of k at offset, dotted, r = 0..N."""
    n = max_distance + 1
    qpos = torch.arange(offset, offset + n).unsqueeze(0)  # (1, N+1): 2-D positions take RoPE's direct path,
    kpos = torch.tensor([[offset]])  # not its cached table, so a long range costs (N+1)·D, not a table
    with torch.no_grad():
        qr = rope(q.float().expand(1, 1, n, rope.dim), qpos)  # (1, 1, N+1, D)
        kr = rope(k.float().view(1, 1, 1, rope.dim), kpos)  # (1, 1, 1, D)
    return (qr.double() * kr.double()).sum(-1).reshape(n)  # (N+1,)


# --- the terminal view --------------------------------------------------------------------------------------

_SPARK = "▁▂▃▄▅▆▇█"
_SPARK_WIDTH = 64


def render_rope(v: RopeView) -> str:
    return "\n".join(_frequency_lines(v) + [""] + _dot_lines(v)) + "\n"


def _frequency_lines(v: RopeView) -> list[str]:
    d = v.head_dim
    how = f"θ_i = {v.theta:,g}^(-2i/{d})"
    if v.scaling:
        s = v.scaling
        how += (f", then llama3 scaling: factor {s['factor']:g}, low/high freq factor {s['low_freq_factor']:g}/"
                f"{s['high_freq_factor']:g}, original context {s['original_max_position_embeddings']:,}")
    elif v.freq_factors:
        how += ", each divided by the file's rope_freqs factor"
    lines = [f"{v.model} · RoPE on q and k, head dim D = {d}: {d // 2} pairs (x[i], x[i+{d // 2}]), "
             f"pair i turns by p·θ_i at position p", how]
    scaled = not torch.equal(v.inv_freq, v.inv_freq_base)
    head = ["pair", "dims", "θ_i", *(["θ_i scaled", "÷"] if scaled else []), "wavelength (tokens)",
            f"turns in {v.context:,}"]
    rows = []
    for i in range(d // 2):
        wl = float(v.wavelengths[i])
        row = [str(i), f"{i},{i + d // 2}", f"{float(v.inv_freq_base[i]):.4e}"]
        if scaled:
            row += [f"{float(v.inv_freq[i]):.4e}", f"{float(v.inv_freq_base[i] / v.inv_freq[i]):.3g}"]
        row += [f"{wl:,.1f}", _num(v.context / wl)]
        rows.append(row)
    return lines + _table(head, rows)


def _table(head: list[str], rows: list[list[str]], left: int | None = None) -> list[str]:
    """Right-aligned columns, except column ``left`` (a bar)."""
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    return ["  ".join(x.ljust(w) if i == left else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))).rstrip()
            for r in [head] + rows]


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _dot_lines(v: RopeView) -> list[str]:
    what = ("q = k = (1, …, 1)" if v.vectors == "ones"
            else f"q, k ~ N(0, 1) drawn with seed {v.seed}")
    d0 = float(v.dots[0])
    lines = [f"q·k after rotation: {what}; key at position {v.offset:,}, query at {v.offset:,} + r",
             f"(the same for every key position: only the distance r counts){_beyond(v)}"]
    top = float(v.dots.abs().max()) or 1.0
    rows = [[f"{r:,}", f"{float(v.dots[r]):.3f}", f"{float(v.dots[r]) / d0:.3f}" if d0 else "—", _signed_bar(
        float(v.dots[r]) / top)] for r in _distances(v.max_distance)]
    lines += _table(["r", "q·k", "÷ r=0", "−".center(20) + "0" + "+".center(20)], rows, left=3)
    lines.append("")
    lines += _spark_lines(v.dots, 0, v.max_distance)
    if v.max_distance >= _SPARK_WIDTH:
        lines += _spark_lines(v.dots, 0, _SPARK_WIDTH - 1)
    return lines


def _beyond(v: RopeView) -> str:
    last = v.offset + v.max_distance
    return f"; positions past the context of {v.context:,} are outside training" if last >= v.context else ""


def _distances(n: int) -> list[int]:
    """0, 1, 2, 3, 4, 8, 16, … and n."""
    out = [r for r in range(min(n, 4) + 1)]
    p = 8
    while p < n:
        out.append(p)
        p *= 2
    return out + ([n] if n > 4 else [])


def _signed_bar(x: float, half: int = 20) -> str:
    """x in [-1, 1] as a bar left (negative) or right (positive) of a centre line."""
    n = round(abs(x) * half)
    left = ("█" * n).rjust(half) if x < 0 else " " * half
    right = "█" * n if x > 0 else ""
    return f"{left}│{right}"


def _spark_lines(dots: torch.Tensor, a: int, b: int) -> list[str]:
    """A sparkline of dots[a..b]; with more distances than columns, each column is its bucket's mean."""
    vals = dots[a:b + 1]
    cols = min(_SPARK_WIDTH, vals.numel())
    edges = torch.linspace(0, vals.numel(), cols + 1).round().long().tolist()
    means = [float(vals[edges[j]:edges[j + 1]].mean()) for j in range(cols)]
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    spark = "".join(_SPARK[min(len(_SPARK) - 1, int((m - lo) / span * len(_SPARK)))] for m in means)
    per = "one column per distance" if cols == vals.numel() else f"each column the mean of ~{vals.numel() / cols:.0f}"
    return [f"r = {a}..{b:,}  {spark}", f"   ({per}; ▁ = {lo:.2f}, █ = {hi:.2f})"]


# --- PNG ----------------------------------------------------------------------------------------------------


def rope_png(v: RopeView, path: str | os.PathLike) -> Path:
    """Two panels: each pair's wavelength (log scale, with the context length), and q·k against distance."""
    from . import render_png as style

    width = 12.0
    with style.styled_figure(width, 4.6) as fig:
        left, right = fig.subplots(1, 2)
        pairs = list(range(v.head_dim // 2))
        if not torch.equal(v.inv_freq, v.inv_freq_base):
            left.plot(pairs, (2 * math.pi / v.inv_freq_base).tolist(), "--", color="#8a8a8a", label="unscaled")
        left.plot(pairs, v.wavelengths.tolist(), "o-", ms=3, color="#2b6cb0", label="wavelength 2π/θ_i")
        left.axhline(v.context, color="#c05621", lw=1, label=f"context {v.context:,}")
        left.set_yscale("log")
        _plain_log_ticks(left.yaxis)  # the house style draws text literally: no mathtext 10^k labels
        left.set_xlabel(f"pair i (dims i, i+{v.head_dim // 2})")
        left.set_ylabel("tokens per full turn")
        left.legend(fontsize=8)
        r = list(range(v.max_distance + 1))
        right.plot(r, v.dots.tolist(), color="#2b6cb0", lw=1)
        right.axhline(0, color="#8a8a8a", lw=0.8)
        right.set_xlabel("relative distance r (tokens)")
        right.set_ylabel("q·k after rotation")
        for ax in (left, right):
            ax.spines[["top", "right"]].set_visible(False)
        what = "q = k = ones" if v.vectors == "ones" else f"random q, k (seed {v.seed})"
        style.wrapped_title(left, width / 2, f"{v.model}: RoPE θ base {v.theta:,g}, head dim {v.head_dim}")
        style.wrapped_title(right, width / 2, f"R(p+r)q · R(p)k, {what}")
        return style.save_figure(fig, path, f"{v.model}-rope")


def _plain_log_ticks(axis) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}" if y >= 1 else f"{y:g}"))
    axis.set_minor_formatter(NullFormatter())
