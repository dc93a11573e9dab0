"""Sampling: pure functions of logits, the options and a ``torch.Generator``.

Order of the filters (Hugging Face's): repetition penalty -> temperature -> top-k -> top-p -> min-p ->
draw. ``temperature == 0`` is greedy (argmax, no randomness). Logits that are NaN or +inf, or a row in which
no token has a finite logit (all -inf: nothing can be chosen), are an error naming the step — never a
silently sampled token 0. A temperature so small that dividing overflows the logits is an error too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick each next token; validated on construction (RELIABILITY A12).

    temperature: 0 = greedy; > 0 divides the logits. top_k: keep the k most likely (0 = off).
    top_p: keep the smallest set whose probability reaches p (1 = off). min_p: drop tokens less likely
    than min_p x the most likely one (0 = off). repetition_penalty: > 1 discourages tokens already in
    the context (1 = off). seed: makes sampling reproducible (None = fresh randomness).
    """

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _num(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _num(self.min_p) or not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not _num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise InputError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_vocab(self, vocab_size: int) -> None:
        if self.top_k > vocab_size:
            raise InputError(f"top_k {self.top_k} is larger than the vocabulary ({vocab_size} tokens); "
                             "use 0 to switch top-k off")

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def _num(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def check_finite(logits: torch.Tensor, step: int) -> None:
    """NaN or +inf logits, or a row with no finite logit, mean the model broke: say so with the step,
    never sample from them (argmax of an all -inf row is token 0, which may well be EOS)."""
    # The usual case, from one number: a NaN or an infinity among the logits makes their sum NaN or infinite.
    # A sum that is not finite (that, or finite logits so large that adding them overflows) is looked into.
    # (torch.isfinite(logits).all() is ~120 us at 49k logits; the sum ~20 us, a step is ~10 ms.)
    if bool(torch.isfinite(logits.sum())):
        return
    bad = torch.isnan(logits) | (logits == float("inf"))
    if bool(bad.any()):
        raise InputError(f"non-finite logits at generation step {step} ({int(bad.sum())} NaN/+inf values): "
                         "the model produced invalid numbers; try --dtype float32")
    _check_choosable(logits, step, "the model's logits are -inf for every token")


def _check_choosable(logits: torch.Tensor, step: int, why: str) -> None:
    """Every row (B, V) needs at least one token with a finite logit."""
    empty = ~torch.isfinite(logits).any(dim=-1)
    if bool(empty.any()):
        raise InputError(f"non-finite logits at generation step {step}: {why} (row {int(empty.nonzero()[0])}), "
                         "so no token can be chosen; the model produced invalid numbers — check the weights "
                         "or try --dtype float32")


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V), context ids (B, L): tokens already seen get logit / p if positive, logit · p if not."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def filter_logits(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on (B, V) float logits; removed tokens become -inf."""
    x = logits / opts.temperature
    neg = float("-inf")
    if opts.top_k:
        kth = torch.topk(x, opts.top_k, dim=-1).values[:, -1:]  # (B, 1)
        x = x.masked_fill(x < kth, neg)
    if opts.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= opts.top_p  # the first token is always kept
        x = x.masked_fill(drop_sorted.scatter(1, order, drop_sorted), neg)
    if opts.min_p > 0:
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < opts.min_p * probs.amax(dim=-1, keepdim=True), neg)
    return x


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) finite logits -> (B,) the index of each row's largest, the first of equal ones (as
    ``torch.argmax``). On the CPU through NumPy's argmax: ~6 us at 49k logits against torch's ~100 us."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.asarray(np.argmax(logits.detach().numpy(), axis=-1), dtype=np.int64))
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator, *,
           context: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    logits = logits.float()
    check_finite(logits, step)
    if context is not None:
        logits = apply_repetition_penalty(logits, context, opts.repetition_penalty)
        _check_choosable(logits, step, f"repetition_penalty {opts.repetition_penalty:g} pushed every logit to -inf")
    if opts.greedy:
        return greedy(logits)
    x = filter_logits(logits, opts)
    if bool((x == float("inf")).any()) or bool(torch.isnan(x).any()):
        raise InputError(f"temperature {opts.temperature:g} overflows the logits at generation step {step}; "
                         "use a larger temperature, or 0 for greedy decoding")
    _check_choosable(x, step, "the samplers removed every token")
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
