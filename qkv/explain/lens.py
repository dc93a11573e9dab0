"""What each layer of a Llama-architecture decoder does to one position: the residual stream, the two
updates added to it, the RMSNorm scales, the SwiGLU gate, and the logit lens (nostalgebraist 2020).

    from qkv.explain.lens import layer_lens, render_layers, layers_png
    lens = layer_lens(loaded, "He sat on the river's bank", word="bank", top=5)
    lens.steps[i]            # LayerStep of layer i: norms, update shares, 1/rms scales, gate, lens top tokens
    lens.lens_logits         # (L, V) the logits read from each layer's output stream
    print(render_layers(lens))

One forward pass on the model's own code. The model's observer hook (``observer.residual(x, h, out=...)``,
qkv.nn.observer) hands over the stream entering each layer (x), after its attention (h) and leaving it
(out); forward hooks on each layer's ``self_attn`` and ``mlp`` modules take the two updates as those
modules return them (and the MLP's input, the normalised h). Per layer, at the chosen position:

- ``norm_in``, ``norm_out``: ‖x‖ and ‖out‖ (Euclidean norms of the C-dim stream);
- ``attn_share`` = ‖a‖ / ‖x‖ and ``mlp_share`` = ‖m‖ / ‖h‖: each update's norm relative to the stream it
  is added to (h = x + a, out = h + m; the update sum x + a + m = out holds to float rounding);
- ``input_scale``, ``post_attention_scale``: 1/rms = 1/sqrt(mean(v²) + eps) that the layer's two RMSNorms
  multiply v = x and v = h by (before their learned weights);
- ``gate_active``: the fraction of the F intermediate units with |SiLU(gate)| > ``gate_threshold``
  (default 0.1: SiLU's negative dip never goes below −0.28, so a unit past 0.1 passes a real share of its
  ``up`` value, while a gate near 0 or far negative closes it); ``glu_mean_abs``: mean |SiLU(gate)·up| over
  the F units — what the MLP's down projection actually receives;
- the logit lens: ``lm_head(norm(out))`` with the model's final RMSNorm and unembedding, its top tokens
  and probabilities (softmax in float64), and the probability and rank there of the token the model
  finally predicts. The last layer's lens is the model's own logits.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..nn.observer import AttentionObserver
from ..nn.quant import exact_weights

__all__ = ["GATE_THRESHOLD", "LayerStep", "LayerLens", "layer_lens", "trace_position", "word_position",
           "check_llama", "render_layers", "layers_png"]

GATE_THRESHOLD = 0.1


@dataclass(frozen=True)
class LayerStep:
    """One layer at one position (see the module docstring for each number)."""

    layer: int
    norm_in: float
    norm_mid: float
    norm_out: float
    attn_norm: float
    mlp_norm: float
    input_scale: float
    post_attention_scale: float
    gate_active: float
    glu_mean_abs: float
    lens_ids: tuple[int, ...]
    lens_tokens: tuple[str, ...]
    lens_probs: tuple[float, ...]
    lens_logits: tuple[float, ...]
    final_prob: float  # probability of the model's final top token in this layer's lens
    final_rank: int  # its rank there (1 = top)

    @property
    def attn_share(self) -> float:
        return self.attn_norm / self.norm_in if self.norm_in else math.inf

    @property
    def mlp_share(self) -> float:
        return self.mlp_norm / self.norm_mid if self.norm_mid else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "norm_in": self.norm_in, "norm_after_attention": self.norm_mid,
                "norm_out": self.norm_out, "attention_update_norm": self.attn_norm, "mlp_update_norm": self.mlp_norm,
                "attention_share": self.attn_share, "mlp_share": self.mlp_share,
                "input_layernorm_scale": self.input_scale, "post_attention_layernorm_scale": self.post_attention_scale,
                "gate_active_fraction": self.gate_active, "glu_mean_abs": self.glu_mean_abs,
                "final_token_probability": self.final_prob, "final_token_rank": self.final_rank,
                "lens": [{"rank": r + 1, "id": i, "token": s, "probability": p, "logit": lg}
                         for r, (i, s, p, lg) in enumerate(zip(self.lens_ids, self.lens_tokens, self.lens_probs,
                                                               self.lens_logits))]}


@dataclass(frozen=True)
class LayerLens:
    """Every layer's effect on one position of a text, and the tensors behind the numbers (float32, on the
    CPU): ``stream_in``/``stream_mid``/``stream_out`` (L, C) the residual stream entering each layer, after its
    attention and leaving it; ``attn_update``/``mlp_update`` (L, C) what the two sublayers returned;
    ``lens_logits`` (L, V) each layer's logit-lens readout; ``final_logits`` (V,) the model's own logits."""

    model: str
    text: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    position: int
    word: str | None
    top: int
    gate_threshold: float
    final_id: int
    final_token: str
    final_prob: float
    steps: tuple[LayerStep, ...]
    stream_in: torch.Tensor
    stream_mid: torch.Tensor
    stream_out: torch.Tensor
    attn_update: torch.Tensor
    mlp_update: torch.Tensor
    lens_logits: torch.Tensor
    final_logits: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "text": self.text, "ids": list(self.ids), "tokens": list(self.tokens),
                "position": self.position, "token": self.tokens[self.position], "word": self.word,
                "top": self.top, "gate_threshold": self.gate_threshold,
                "final": {"id": self.final_id, "token": self.final_token, "probability": self.final_prob},
                "definitions": DEFINITIONS, "layers": [s.to_dict() for s in self.steps]}


DEFINITIONS = {
    "attention_share": "‖attention update‖ / ‖stream entering the layer‖",
    "mlp_share": "‖MLP update‖ / ‖stream after attention‖",
    "input_layernorm_scale": "1/sqrt(mean(x²) + eps) of the stream entering the layer",
    "post_attention_layernorm_scale": "1/sqrt(mean(h²) + eps) of the stream after attention",
    "gate_active_fraction": "fraction of MLP units with |SiLU(gate)| > gate_threshold",
    "glu_mean_abs": "mean over MLP units of |SiLU(gate)·up|",
    "lens": "softmax(lm_head(final_norm(stream leaving the layer))), the logit lens",
}


# --- finding the position -------------------------------------------------------------------------------


def check_llama(loaded, what: str) -> None:
    """Refuse models that are not a Llama-architecture decoder (one line)."""
    from ..models.llama import LlamaForCausalLM

    if not isinstance(loaded.model, LlamaForCausalLM):
        kind = "an encoder" if not getattr(loaded.model, "is_causal", True) else "not a Llama-architecture decoder"
        raise InputError(f"{loaded.name} is {kind}; {what} reads a Llama-architecture decoder (e.g. smollm2)")


def word_position(loaded, text: str, ids: Sequence[int], word: str, occurrence: int = 1) -> int:
    """The position of ``word`` in ``text``: a token whose text (spaces trimmed) is the word — exactly, else
    ignoring case — or else the last token of the word as ``qkv explain`` finds words (a word of several
    tokens is complete at its last one)."""
    from .capture import word_positions

    if not isinstance(word, str) or not word.strip():
        raise InputError("the word is empty: give a word of the text")
    if isinstance(occurrence, bool) or not isinstance(occurrence, int) or occurrence < 1:
        raise InputError(f"--occurrence must be >= 1, got {occurrence!r}")
    strings = loaded.tokenizer.token_strings(ids)
    want = word.strip()
    for same in (lambda s: s == want, lambda s: s.lower() == want.lower()):
        hits = [i for i, s in enumerate(strings) if same(s.strip())]
        if hits:
            if occurrence > len(hits):
                raise InputError(f"{word!r} occurs {len(hits)} time(s); --occurrence must be 1..{len(hits)}")
            return hits[occurrence - 1]
    return word_positions(loaded, text, word, occurrence)[-1]


# --- one forward pass -----------------------------------------------------------------------------------


class _StreamObserver(AttentionObserver):
    """Keeps the residual stream at one position: entering each layer, after attention, leaving it."""

    def __init__(self, position: int):
        self.position = position
        self.layer = 0
        self.x_in: dict[int, torch.Tensor] = {}
        self.x_mid: dict[int, torch.Tensor] = {}
        self.x_out: dict[int, torch.Tensor] = {}

    def residual(self, x, z, *, norm=None, out=None) -> None:
        p = self.position
        self.x_in[self.layer] = x[0, p].float().clone()  # (C,)
        self.x_mid[self.layer] = z[0, p].float().clone()
        self.x_out[self.layer] = out[0, p].float().clone()


@torch.inference_mode()
def trace_position(loaded, ids: Sequence[int], position: int) -> dict[str, torch.Tensor]:
    """One forward pass of ``ids``; at ``position``, per layer (stacked, (L, …), float32, CPU): ``stream_in``,
    ``stream_mid``, ``stream_out``, ``attn_update``, ``mlp_update``, ``mlp_input`` (the normalised h the MLP
    read), and ``logits`` (V,) the model's own output there."""
    check_llama(loaded, "this view")
    model = loaded.model
    layers = model.model.layers
    obs = _StreamObserver(position)
    attn: dict[int, torch.Tensor] = {}
    mlp: dict[int, torch.Tensor] = {}
    mlp_in: dict[int, torch.Tensor] = {}

    def keep_attn(i):
        return lambda mod, args, out: attn.__setitem__(i, out[0, position].float().clone())

    def keep_mlp(i):
        def hook(mod, args, out):
            mlp_in[i] = args[0][0, position].clone()  # (C,), in the weights' dtype
            mlp[i] = out[0, position].float().clone()
        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.self_attn.register_forward_hook(keep_attn(i)))
            handles.append(layer.mlp.register_forward_hook(keep_mlp(i)))
        x = torch.tensor([list(ids)], dtype=torch.long, device=loaded.device)  # (1, T)
        last = position == len(ids) - 1
        with exact_weights(model):  # a dtype="auto" model's compact copies would serve a short text
            logits = model(x, observer=obs, last_only=last)[0, -1 if last else position].float()  # (V,)
    finally:
        for h in handles:
            h.remove()
    n = len(layers)
    stack = lambda d: torch.stack([d[i] for i in range(n)]).cpu()  # noqa: E731
    return {"stream_in": stack(obs.x_in), "stream_mid": stack(obs.x_mid), "stream_out": stack(obs.x_out),
            "attn_update": stack(attn), "mlp_update": stack(mlp), "mlp_input": stack(mlp_in), "logits": logits.cpu()}


def _gate_up(mlp, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The SwiGLU's gate and up projections of u (…, C) -> (…, F) each, from the separate or fused matrix."""
    fused = mlp.gate_up_proj
    if fused is None:
        return mlp.gate_proj(u), mlp.up_proj(u)
    return fused(u).chunk(2, dim=-1)


def _inv_rms(v: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(mean(v²) + eps) over the last dim, float64."""
    v = v.double()
    return torch.rsqrt(v.pow(2).mean(-1) + eps)


# --- the view -------------------------------------------------------------------------------------------


@torch.inference_mode()
def layer_lens(loaded, text: str, *, word: str | None = None, occurrence: int = 1, top: int = 5,
               gate_threshold: float = GATE_THRESHOLD) -> LayerLens:
    """What each layer does to the position of ``word`` in ``text`` (default: the last token, whose next
    token the model predicts); ``top`` tokens of each layer's logit lens."""
    from .capture import check_context

    check_options(top, gate_threshold)
    check_llama(loaded, "qkv layers")
    ids, _, _ = check_context(loaded, text)
    position = word_position(loaded, text, ids, word, occurrence) if word is not None else len(ids) - 1
    t = trace_position(loaded, ids, position)
    model = loaded.model
    norm, head = model.model.norm, model.lm_head
    with exact_weights(model):
        dev = loaded.device
        lens = head(norm(t["stream_out"].to(dev)).to(norm.weight.dtype)).float().cpu()  # (L, V), as forward does
        gates = [tuple(z.double()[0].cpu() for z in _gate_up(layer.mlp, t["mlp_input"][i:i + 1].to(dev)))
                 for i, layer in enumerate(model.model.layers)]  # (F,) gate and up per layer
    final = t["logits"]
    final_id = int(final.argmax())
    logp = torch.log_softmax(lens.double(), dim=-1)  # (L, V)
    k = min(top, lens.shape[-1])
    name = _namer(loaded)
    steps = tuple(_step(i, layer, t, gates[i], lens[i], logp[i], k, final_id, name, gate_threshold)
                  for i, layer in enumerate(model.model.layers))
    return LayerLens(
        model=loaded.name, text=text, ids=tuple(ids), tokens=tuple(loaded.tokenizer.token_strings(ids)),
        position=position, word=word, top=k, gate_threshold=gate_threshold, final_id=final_id,
        final_token=name(final_id), final_prob=float(torch.softmax(final.double(), -1)[final_id]),
        steps=steps, stream_in=t["stream_in"], stream_mid=t["stream_mid"], stream_out=t["stream_out"],
        attn_update=t["attn_update"], mlp_update=t["mlp_update"], lens_logits=lens, final_logits=final)


def _step(i: int, layer, t: dict, gate_up: tuple, logits: torch.Tensor, logp: torch.Tensor, k: int, final_id: int,
          name, threshold: float) -> LayerStep:
    """Layer i's numbers from the traced tensors; ``logits``/``logp`` (V,) its lens readout."""
    g, u = gate_up
    act = F.silu(g)  # (F,) float64
    top_logp, top_ids = logp.topk(k)
    ids = top_ids.tolist()
    return LayerStep(
        layer=i, norm_in=_norm(t["stream_in"][i]), norm_mid=_norm(t["stream_mid"][i]),
        norm_out=_norm(t["stream_out"][i]), attn_norm=_norm(t["attn_update"][i]), mlp_norm=_norm(t["mlp_update"][i]),
        input_scale=float(_inv_rms(t["stream_in"][i], layer.input_layernorm.eps)),
        post_attention_scale=float(_inv_rms(t["stream_mid"][i], layer.post_attention_layernorm.eps)),
        gate_active=float((act.abs() > threshold).double().mean()), glu_mean_abs=float((act * u).abs().mean()),
        lens_ids=tuple(ids), lens_tokens=tuple(name(j) for j in ids), lens_probs=tuple(top_logp.exp().tolist()),
        lens_logits=tuple(logits[top_ids].tolist()), final_prob=float(logp[final_id].exp()),
        final_rank=int((logp > logp[final_id]).sum()) + 1)


def check_options(top: int, gate_threshold: float = GATE_THRESHOLD) -> None:
    """Validate before any model is loaded."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"--top must be an integer >= 1 (how many lens tokens per layer), got {top!r}")
    if isinstance(gate_threshold, bool) or not isinstance(gate_threshold, (int, float)) \
            or not math.isfinite(gate_threshold) or gate_threshold < 0:
        raise InputError(f"--gate-threshold must be a finite number >= 0, got {gate_threshold!r}")


def _norm(v: torch.Tensor) -> float:
    return float(v.double().norm())


def _namer(loaded):
    """id -> readable token text (rows past the tokenizer's vocabulary are padding: '<id N>')."""
    tok = loaded.tokenizer
    n = tok.vocab_size
    return lambda i: tok.token_strings([i])[0] if i < n else f"<id {i}>"


# --- terminal -------------------------------------------------------------------------------------------

_BAR = 8


def render_layers(lens: LayerLens) -> str:
    """Two blocks, one line per layer each: the stream (norms, update shares with bars, 1/rms scales, gate)
    and the logit lens (the final token's probability with a bar, its rank, the top tokens)."""
    from ..explain.render_text import bar
    from ..text.inspect import visible

    tok, final = visible(lens.tokens[lens.position]), visible(lens.final_token)
    shown = lens.text if len(lens.text) <= 60 else lens.text[:59] + "…"
    lines = [f"{lens.model} — what each layer does to {tok!r} (position {lens.position} of {len(lens.ids)} tokens) "
             f"in {json.dumps(shown, ensure_ascii=False)}",
             f"the model's next token there: {final!r} (p {lens.final_prob:.3f})",
             f"shares: update norm / norm of the stream it is added to (a full bar = as large as the stream); "
             f"gate: units with |SiLU(gate)| > {lens.gate_threshold:g}; 1/rms: the two RMSNorms' scales",
             "",
             f"{'layer':>5}  {'‖x‖ in':>8} → {'out':<8}  {'attention ‖a‖/‖x‖':<17}  "
             f"{'MLP ‖m‖/‖h‖':<17}  "
             f"{'1/rms in':>8} {'post':>7}  {'gate active':<12}  {'mean|SiLU(g)·up|':>16}"]
    for s in lens.steps:
        a, m = s.attn_share, s.mlp_share
        lines.append(f"{s.layer:>5}  {s.norm_in:8.2f} → {s.norm_out:<8.2f}  {bar(a, _BAR):<{_BAR}} {a:8.3f}  "
                     f"{bar(m, _BAR):<{_BAR}} {m:8.3f}  {s.input_scale:8.3f} {s.post_attention_scale:7.3f}  "
                     f"{bar(s.gate_active, 5):<5} {s.gate_active:6.1%}  {s.glu_mean_abs:16.4f}")
    lines += ["", "logit lens — the next token read from the stream leaving each layer (final norm + unembedding)",
              f"{'layer':>5}  {'p(' + _clip(final, 12) + ')':<17}  {'rank':>7}  top {lens.top}"]
    for s in lens.steps:
        tops = "  ".join(f"{_clip(visible(t), 12)} {p:.2f}" for t, p in zip(s.lens_tokens, s.lens_probs))
        lines.append(f"{s.layer:>5}  {bar(s.final_prob, _BAR):<{_BAR}} {s.final_prob:8.2%}  {s.final_rank:>7,}  {tops}")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[:limit - 1] + "…"


# --- PNG ------------------------------------------------------------------------------------------------


def layers_png(lens: LayerLens, path: str | os.PathLike) -> Path:
    """Top left: ‖x‖ entering and leaving each layer; top right: the attention and MLP shares; below: the
    logit-lens table (layers x ranks, each cell a token and its probability, coloured by it) with the
    final token's probability in its own column. qkv.explain's PNG house style (literal text, atomic write);
    ``path`` may be a directory."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from ..text.inspect import visible
    from . import render_png as style

    n = len(lens.steps)
    layers = [s.layer for s in lens.steps]
    width = max(9.0, min(2.5 + 1.5 * (lens.top + 1), 20.0))
    with style._style():  # noqa: SLF001 - the house style of every qkv PNG
        fig = style._new_figure(width, min(3.2 + 2.5 + 0.26 * n, 40.0))  # noqa: SLF001
        grid = fig.add_gridspec(2, 2, height_ratios=[2.5, 0.5 + 0.26 * n])
        ax_n, ax_s, ax_t = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
        ax_n.plot(layers, [s.norm_in for s in lens.steps], marker="o", ms=3, label="‖x‖ entering")
        ax_n.plot(layers, [s.norm_out for s in lens.steps], marker="o", ms=3, label="‖x‖ leaving")
        ax_n.set_xlabel("layer")
        ax_n.set_ylabel("residual stream norm")
        ax_n.legend(fontsize=7)
        w = 0.4
        ax_s.bar([x - w / 2 for x in layers], [_finite(s.attn_share) for s in lens.steps], w,
                 label="attention ‖a‖/‖x‖")
        ax_s.bar([x + w / 2 for x in layers], [_finite(s.mlp_share) for s in lens.steps], w,
                 label="MLP ‖m‖/‖h‖")
        ax_s.set_xlabel("layer")
        ax_s.set_ylabel("update norm / stream norm (log)")
        ax_s.set_yscale("log")
        ax_s.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # plain text: mathtext is off
        ax_s.yaxis.set_minor_formatter(NullFormatter())
        ax_s.legend(fontsize=7)
        for ax in (ax_n, ax_s):
            ax.spines[["top", "right"]].set_visible(False)
        _lens_table(ax_t, lens, visible)
        title = (f"{lens.model}: what each layer does to {visible(lens.tokens[lens.position])!r} "
                 f"(position {lens.position}) in {lens.text!r}")
        style._title(ax_n, width, title)  # noqa: SLF001
        return style._save(fig, path, f"{lens.model}-layers")  # noqa: SLF001


def _lens_table(ax, lens: LayerLens, visible) -> None:
    import numpy as np

    n, k = len(lens.steps), lens.top
    probs = np.array([[s.final_prob] + list(s.lens_probs) for s in lens.steps])  # (L, 1 + k)
    ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    for r, s in enumerate(lens.steps):
        cells = [f"{s.final_prob:.2f}"] + [f"{_clip(visible(t), 12)} {p:.2f}"
                                           for t, p in zip(s.lens_tokens, s.lens_probs)]
        for c, txt in enumerate(cells):
            ax.text(c, r, txt, ha="center", va="center", fontsize=7, color="white" if probs[r, c] > 0.6 else "black")
    ax.set_xticks(range(k + 1),
                  labels=[f"p({_clip(visible(lens.final_token), 12)})"] + [f"top {i + 1}" for i in range(k)])
    ax.xaxis.tick_top()
    ax.set_yticks(range(n), labels=[f"layer {s.layer}" for s in lens.steps])
    ax.tick_params(length=0, labelsize=7)
    ax.set_xlabel("logit lens: final norm + unembedding of the stream leaving each layer")
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0
