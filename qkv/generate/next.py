"""The next-token distribution: what a language model predicts after a text, at several temperatures,
and which tokens generation's samplers would keep.

    from qkv.generate.next import next_token_distribution, render_next, next_png
    dist = next_token_distribution(loaded, "The capital of France is", temperatures=(0.5, 1, 2), top_p=0.9)
    dist.probs[i]       # (V,) softmax(logits / T_i): the model's distribution at temperature T_i
    dist.kept[i]        # (V,) bool: the tokens top-k / top-p / min-p leave to draw from at T_i
    dist.sampled[i]     # (V,) what generation actually draws from: the kept tokens, renormalised
    print(render_next(dist))

One forward pass gives the logits at the last position; everything else is arithmetic on them. The
filters are qkv.generate.sampling's own (``filter_logits``: temperature, then top-k, top-p, min-p — the
order ``qkv generate`` uses), so the kept sets are exactly what generation samples from. Softmax runs in
float32, as in sampling. Temperatures must be > 0 here: 0 is greedy decoding, which is the top token.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .loop import check_budget
from .sampling import SamplingOptions, check_finite, filter_logits
from .text import prompt_ids

__all__ = ["NextTokenDistribution", "next_token_distribution", "check_options", "render_next", "next_png"]

DEFAULT_TEMPERATURES = (0.5, 1.0, 2.0)
MAX_TEMPERATURES = 8  # side-by-side columns; more would not fit a terminal or a figure


@dataclass(frozen=True)
class NextTokenDistribution:
    """The model's next-token distribution after a prompt, per temperature, with the samplers' kept sets.

    ``probs``, ``kept`` and ``sampled`` are (N, V) for the N temperatures. ``top_ids`` are the ``top`` most
    likely tokens (the same order at every temperature: dividing logits by T > 0 keeps their ranking),
    ``top_tokens`` their readable text and ``top_pieces`` their vocabulary entries.
    """

    model: str
    prompt: str
    prompt_ids: tuple[int, ...]
    logits: torch.Tensor  # (V,) float32, the last position
    temperatures: tuple[float, ...]
    options: tuple[SamplingOptions, ...]  # one per temperature (the same top-k / top-p / min-p)
    probs: torch.Tensor  # (N, V)
    kept: torch.Tensor  # (N, V) bool
    sampled: torch.Tensor  # (N, V)
    top_ids: tuple[int, ...]
    top_tokens: tuple[str, ...]
    top_pieces: tuple[str, ...]
    prompt_tokens: tuple[str, ...] = field(default=())

    @property
    def filters(self) -> dict[str, float | int | None]:
        """The samplers that are on (None for off): top_k, top_p, min_p."""
        o = self.options[0]
        return {"top_k": o.top_k or None, "top_p": o.top_p if o.top_p < 1 else None, "min_p": o.min_p or None}

    def entropy_bits(self) -> torch.Tensor:
        """(N,) entropy of each temperature's full distribution, in bits."""
        p = self.probs.double()
        return -(p * torch.log2(p.clamp_min(1e-300))).where(p > 0, torch.zeros((), dtype=p.dtype)).sum(-1)

    def to_dict(self) -> dict[str, Any]:
        entropy = self.entropy_bits().tolist()
        dists = []
        for n, t in enumerate(self.temperatures):
            top = [{"rank": r + 1, "id": i, "token": s, "piece": piece, "probability": float(self.probs[n, i]),
                    "kept": bool(self.kept[n, i]), "sampled_probability": float(self.sampled[n, i])}
                   for r, (i, s, piece) in enumerate(zip(self.top_ids, self.top_tokens, self.top_pieces))]
            dists.append({"temperature": t, "kept_count": int(self.kept[n].sum()),
                          "kept_mass": float(self.probs[n][self.kept[n]].sum()), "entropy_bits": entropy[n],
                          "top": top})
        greedy = int(self.logits.argmax())
        return {"model": self.model, "text": self.prompt, "prompt_ids": list(self.prompt_ids),
                "prompt_tokens": list(self.prompt_tokens), "vocab_size": int(self.logits.numel()),
                "samplers": self.filters, "greedy_id": greedy, "temperatures": list(self.temperatures),
                "distributions": dists}


def check_options(temperatures: Sequence[float], *, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None, show: int = 10) -> tuple[SamplingOptions, ...]:
    """Validate before any model is loaded; one SamplingOptions per temperature (typed errors, one line)."""
    temps = list(temperatures)
    if not temps:
        raise InputError("give at least one temperature")
    if len(temps) > MAX_TEMPERATURES:
        raise InputError(f"at most {MAX_TEMPERATURES} temperatures side by side, got {len(temps)}")
    for t in temps:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise InputError(f"temperature must be a finite number > 0, got {t!r} "
                             "(0 would be greedy decoding: that is the top token at any temperature)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top-k must be an integer >= 1 (leave it out to switch it off), got {top_k!r}")
    if isinstance(show, bool) or not isinstance(show, int) or show < 1:
        raise InputError(f"show must be an integer >= 1 (how many tokens to list), got {show!r}")
    return tuple(SamplingOptions(temperature=float(t), top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
                                 min_p=0.0 if min_p is None else min_p) for t in temps)


@torch.inference_mode()
def next_token_distribution(loaded, text: str | Sequence[Mapping[str, Any]], *,
                            temperatures: Sequence[float] = DEFAULT_TEMPERATURES, top_k: int | None = None,
                            top_p: float | None = None, min_p: float | None = None, top: int = 10,
                            chat: bool | None = None, system: str | None = None) -> NextTokenDistribution:
    """The distribution of the token that follows ``text`` (a prompt, or chat messages / ``chat=True``:
    the first token of the assistant's reply). ``top_k``/``top_p``/``min_p`` None = off."""
    options = check_options(temperatures, top_k=top_k, top_p=top_p, min_p=min_p, show=top)
    if isinstance(text, str) and not text:
        raise InputError("the text is empty: give some text to continue")
    ids = prompt_ids(loaded, text, chat=chat, system=system)
    check_budget(len(ids), 0, loaded.config.max_position_embeddings)
    vocab = loaded.config.vocab_size
    for o in options:
        o.check_vocab(vocab)
    x = torch.tensor([ids], dtype=torch.long, device=loaded.device)  # (1, T)
    from ..nn.quant import exact_weights

    with exact_weights(loaded.model):  # the exact model's distribution, also for a compact (dtype="auto") model
        logits = loaded.model(x, last_only=True)[:, -1].float()  # (1, V)
    check_finite(logits, 0)
    scaled = torch.cat([logits / o.temperature for o in options])  # (N, V)
    filtered = torch.cat([filter_logits(logits, o) for o in options])  # (N, V), removed tokens -inf
    probs = torch.softmax(scaled, dim=-1)
    sampled = torch.softmax(filtered, dim=-1)
    kept = torch.isfinite(filtered)
    order = torch.topk(logits[0], min(top, logits.shape[-1])).indices.tolist()
    tok = loaded.tokenizer
    n_tok = tok.vocab_size  # the embedding may have rows past the tokenizer's last id (padding)
    name = lambda i: tok.token_strings([i])[0] if i < n_tok else f"<id {i}>"  # noqa: E731
    piece = lambda i: tok.id_to_token(i) if i < n_tok else ""  # noqa: E731
    return NextTokenDistribution(
        model=loaded.name, prompt=text if isinstance(text, str) else "", prompt_ids=tuple(ids),
        logits=logits[0].cpu(), temperatures=tuple(o.temperature for o in options), options=options,
        probs=probs.cpu(), kept=kept.cpu(), sampled=sampled.cpu(), top_ids=tuple(order),
        top_tokens=tuple(name(i) for i in order), top_pieces=tuple(piece(i) for i in order),
        prompt_tokens=tuple(tok.token_strings(ids)))


# --- terminal ----------------------------------------------------------------------------------------------

_BAR = 10  # cells per bar; bars share one absolute scale (probability 1 = full) so temperatures compare


def render_next(dist: NextTokenDistribution, *, show: int | None = None) -> str:
    """The top tokens, one row each, with one column per temperature: bar, probability, kept (✓) or
    removed (✗) by the samplers (marks only when a sampler is on)."""
    from ..explain.render_text import bar
    from ..text.inspect import visible

    n = len(dist.top_ids) if show is None else min(show, len(dist.top_ids))
    on = {k: v for k, v in dist.filters.items() if v is not None}
    lines = [_heading(dist, on)]
    labels = [_clip(visible(s)) for s in dist.top_tokens[:n]]
    ids = [str(i) for i in dist.top_ids[:n]]
    lw, iw = max([14] + [_width(s) for s in labels]), max([2] + [len(s) for s in ids])
    col = _BAR + 9 + (2 if on else 0)
    head = f"{'rank':>4}  {_pad('token', lw)}  {'id':>{iw}}  " + "".join(f"{'T=' + _num(t):<{col}}"
                                                                          for t in dist.temperatures)
    lines.append(head.rstrip())
    for r in range(n):
        i = dist.top_ids[r]
        cells = []
        for k in range(len(dist.temperatures)):
            p = float(dist.probs[k, i])
            mark = (" ✓" if dist.kept[k, i] else " ✗") if on else ""
            cells.append(f"{bar(p, _BAR):<{_BAR}} {p:6.1%}{mark}".ljust(col))
        lines.append(f"{r + 1:>4}  {_pad(labels[r], lw)}  {ids[r]:>{iw}}  {''.join(cells)}".rstrip())
    lead = " " * (4 + 2 + lw + 2 + iw + 2)
    entropy = dist.entropy_bits().tolist()
    if on:
        kept = [f"{int(dist.kept[k].sum()):,} kept, {float(dist.probs[k][dist.kept[k]].sum()):.1%}".ljust(col)
                for k in range(len(dist.temperatures))]
        lines.append(f"{_pad('kept by the samplers', len(lead))}{''.join(kept)}".rstrip())
    lines.append(f"{_pad('entropy', len(lead))}{''.join(f'{e:.2f} bits'.ljust(col) for e in entropy)}".rstrip())
    return "\n".join(lines) + "\n"


def _heading(dist: NextTokenDistribution, on: dict) -> str:
    shown = dist.prompt if len(dist.prompt) <= 60 else "…" + dist.prompt[-59:]
    first = (f"{dist.model} — the next token after {json.dumps(shown, ensure_ascii=False)} "
             f"({len(dist.prompt_ids)} prompt tokens, vocabulary {dist.logits.numel():,})")
    if not on:
        return first + "\nsamplers: none (add --top-k, --top-p or --min-p to see what each keeps)"
    names = ", ".join(f"{k.replace('_', '-')} {_num(v)}" for k, v in on.items())
    return (first + f"\nsamplers: {names}, applied after temperature as in `qkv generate` "
            "(✓ kept, ✗ removed)")


def _num(v: float) -> str:
    return f"{v:g}"


def _clip(s: str, limit: int = 20) -> str:
    return s if _width(s) <= limit else s[:limit - 1] + "…"


def _width(s: str) -> int:
    from rich.cells import cell_len

    return cell_len(s)


def _pad(s: str, width: int) -> str:
    return s + " " * max(0, width - _width(s))


# --- PNG ---------------------------------------------------------------------------------------------------


def next_png(dist: NextTokenDistribution, path: str | os.PathLike, *, show: int | None = None) -> Path:
    """One bar chart per temperature, side by side: the top tokens' probabilities, kept tokens in blue and
    removed ones in grey. Drawn with qkv.explain's PNG house style (literal text, font fallbacks, atomic
    write); ``path`` may be a directory."""
    from ..explain import render_png as style
    from ..text.inspect import visible

    n = len(dist.top_ids) if show is None else min(show, len(dist.top_ids))
    ids = list(dist.top_ids[:n])
    labels = [visible(s) for s in dist.top_tokens[:n]]
    cols = len(dist.temperatures)
    width = min(3.0 + 3.2 * cols, 26.0)
    with style._style():  # noqa: SLF001 - the house style of every qkv PNG
        fig = style._new_figure(width, min(2.2 + 0.32 * n, 40.0))  # noqa: SLF001
        axes = fig.subplots(1, cols, sharey=True, squeeze=False)[0]
        for k, (ax, t) in enumerate(zip(axes, dist.temperatures)):
            p = [float(dist.probs[k, i]) for i in ids]
            colours = ["#2b6cb0" if dist.kept[k, i] else "#b8b8b8" for i in ids]
            ax.barh(range(n), p, color=colours)
            ax.set_xlim(0, 1.18)
            for y, (v, i) in enumerate(zip(p, ids)):
                gone = not dist.kept[k, i]
                ax.text(v + 0.01, y, f"{v:.3f}" + (" ✗" if gone else ""), va="center", fontsize=7,
                        color="#8a8a8a" if gone else "black")
            ax.set_xlabel(f"probability at T={_num(t)}")
            ax.spines[["top", "right"]].set_visible(False)
        axes[0].set_yticks(range(n), labels=labels)
        axes[0].invert_yaxis()  # most likely on top
        on = {k: v for k, v in dist.filters.items() if v is not None}
        samplers = ", ".join(f"{k.replace('_', '-')} {_num(v)}" for k, v in on.items())
        title = f"{dist.model}: next token after {dist.prompt!r}" + (f" — grey ✗: removed by {samplers}" if on else "")
        style._title(axes[0], width, title)  # noqa: SLF001
        return style._save(fig, path, f"{dist.model}-next")  # noqa: SLF001
