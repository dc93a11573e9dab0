"""Linear layers that decode fast on CPU from low-precision weights, and stay exact for long inputs.

Legend: M rows of input (batch x tokens), K in features, N out features.

Decoding one token reads every weight once per token, so its speed is memory traffic: 4-bit weights
read 8x less than float32. ``QuantizedLinear`` keeps the exact float32 weight for inputs of more than
``small_m`` rows (prefill, where the float matmul is faster) and a compact copy for small inputs:

* ``int4`` — GGUF Q4_0/Q4_1 codes in PyTorch's packed int4 layout, ``w = (q - 8) · scale + zero`` per
  group of 32, multiplied by ``torch.ops.aten._weight_int4pack_mm_for_cpu``. Scales, zeros and the
  activations go through bfloat16 there, which is where this path differs from the exact weights.
* ``half`` — a float16 copy of the weight (e.g. the 49152 x 576 unembedding of a tied model).

CPU only; on other devices qkv loads plain float weights.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class QuantizedLinear(nn.Module):
    """y = x Wᵀ (+ b), exact float32 for M > small_m, a compact copy of W for M <= small_m."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, small_m: int = 8):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.small_m = small_m
        self.kind = "float"
        self.group = 0

    @classmethod
    def int4(cls, weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             bias: torch.Tensor | None = None, *, group: int = 32) -> "QuantizedLinear":
        """From exact float weights (N, K) and their 4-bit codes (N, K), scales and zeros (N, K/group)."""
        m = cls(weight, bias)
        m.kind, m.group = "int4", group
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # (K/G, N, 2)
        m.register_buffer("packed", packed, persistent=False)
        m.register_buffer("scales_zeros", sz, persistent=False)
        return m

    @classmethod
    def half(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """Keep a float16 copy of the weight for small inputs (the float32 one stays for the rest)."""
        m = cls(weight, bias)
        m.kind = "half"
        m.register_buffer("weight16", weight.detach().to(torch.float16), persistent=False)
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, small={self.kind}"

    def _exact(self, x: torch.Tensor) -> bool:
        """Whether x (…, K) goes through the exact float32 weight (more than ``small_m`` rows, or no copy)."""
        return self.kind == "float" or x.numel() > self.small_m * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, K) -> (…, N)
        if self._exact(x):
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        y = self.small(x.reshape(-1, self.in_features))  # (M, K) -> (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def parts(self, x: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """``self(x).split(sizes, -1)`` for a fused matrix. On the exact float path each part is its own
        matmul on a row block of W: bitwise the same numbers, contiguous outputs, and for SmolLM2's
        gate/up (2 x 1536 rows) a few per cent faster on 128-token prompts than one 3072-row matmul."""
        if not self._exact(x):
            return self(x).split(list(sizes), dim=-1)
        ws = self.weight.split(list(sizes))
        bs = self.bias.split(list(sizes)) if self.bias is not None else (None,) * len(ws)
        return tuple(F.linear(x, w, b) for w, b in zip(ws, bs))

    def small(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) -> (M, N) through the compact copy, without the bias (M <= small_m; no checks)."""
        if self.kind == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.packed, self.group,
                                                              self.scales_zeros).to(x2.dtype)
        return F.linear(x2.to(torch.float16), self.weight16).to(x2.dtype)


@contextlib.contextmanager
def exact_weights(model: nn.Module):
    """Within the block every QuantizedLinear of ``model`` multiplies by its exact float32 weight, whatever
    the number of rows (qkv.explain must show what the exact model computes, also for short texts)."""
    mods = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    saved = [m.small_m for m in mods]
    for m in mods:
        m.small_m = 0
    try:
        yield model
    finally:
        for m, small in zip(mods, saved):
            m.small_m = small
