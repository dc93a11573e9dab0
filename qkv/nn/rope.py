"""Rotary position embedding (RoPE), rotate-half convention.

Legend: B batch, H heads, T positions, D head dim (even).

The pair rotated together is (x[i], x[i + D/2]) — Hugging Face's and Meta's Llama layout. GGUF stores
Q/K weights for the *interleaved* pairs (x[2i], x[2i+1]); the loader converts them once
(``qkv.weights.convert.gguf_to_rotate_half``), so this is the only convention inside qkv.

Angles are computed in float64 and only the final cos/sin are cast, so tables stay within 2e-7 of the
exact values at every position (RELIABILITY R5). The tables are plain attributes, not buffers, so
``model.half()`` or autocast never changes them; they follow the input's device on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's frequency scaling (``rope_scaling.rope_type == "llama3"``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if not (self.factor > 0 and self.low_freq_factor > 0 and self.high_freq_factor > self.low_freq_factor
                and self.original_max_position_embeddings > 0):
            raise ConfigError(f"invalid llama3 rope scaling {self}: need factor > 0 and "
                              "high_freq_factor > low_freq_factor > 0")

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """Stretch low frequencies by ``factor``, keep high ones, blend smoothly in between."""
        orig = self.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        smooth = (orig / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smooth = smooth.clamp(0.0, 1.0)  # 0 -> fully scaled (long waves), 1 -> untouched (short waves)
        return (1 - smooth) * inv_freq / self.factor + smooth * inv_freq


def rope_frequencies(dim: int, theta: float, scaling: Llama3Scaling | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/dim), i < dim/2, in float64."""
    if dim <= 0 or dim % 2:
        raise ConfigError(f"RoPE dimension must be a positive even number, got {dim}")
    if not (math.isfinite(theta) and theta > 1):
        raise ConfigError(f"rope_theta must be a finite number > 1, got {theta}")
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))  # never meta
    return scaling.apply(inv) if scaling is not None else inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """(sin₁, sin₂) -> (-sin₁, sin₂): the sin that multiplies (x₂, x₁) in the rotation."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class RoPE(nn.Module):
    """Rotary embedding of q or k at given positions.

    >>> rope = RoPE(64, theta=10000.0)
    >>> q = rope(q, positions)   # q (B, H, T, D), positions (T,) or (B, T) ints
    """

    def __init__(self, dim: int, theta: float = 10000.0, scaling: Llama3Scaling | None = None,
                 freq_factors: list[float] | None = None):
        """``freq_factors``: one divisor per frequency (llama.cpp's ``rope_freqs`` tensor, Llama 3.1+ GGUF)."""
        super().__init__()
        self.dim, self.theta, self.scaling = dim, float(theta), scaling
        self.inv_freq64 = rope_frequencies(dim, self.theta, scaling)  # (D/2,) float64, not a buffer
        if freq_factors is not None:
            factors = torch.tensor(freq_factors, dtype=torch.float64, device="cpu")
            if factors.shape != self.inv_freq64.shape or not bool((factors > 0).all()):
                raise ConfigError(f"RoPE freq_factors must be {dim // 2} positive numbers, got {tuple(factors.shape)}")
            self.inv_freq64 = self.inv_freq64 / factors
        self._cos = self._sin = None  # cached fp32 tables (P, D) on the last device used
        self._last: tuple | None = None  # (positions tensor, device, cos, signed sin): layers sharing one call

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}, scaling={self.scaling}"

    def tables(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (n, D) in float32 for positions 0..n-1 (cached, grown by doubling)."""
        device = torch.device(device)  # "cpu" != torch.device("cpu"): a string would rebuild (and double) every call
        if self._cos is None or self._cos.shape[0] < n or self._cos.device != device:
            size = max(n, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            self._cos, self._sin = self.angles(torch.arange(size, dtype=torch.float64, device="cpu"), device)
        return self._cos[:n], self._sin[:n]

    def angles(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (…, D) in float32 for arbitrary positions, computed in float64."""
        ang = positions.to(torch.float64).unsqueeze(-1) * self.inv_freq64  # (…, D/2)
        ang = torch.cat((ang, ang), dim=-1)  # (…, D): the same angle for x[i] and x[i + D/2]
        return ang.cos().float().to(device), ang.sin().float().to(device)

    def rotation(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (-sin₁, sin₂) for positions (T,) -> (T, D) or (B, T) -> (B, 1, T, D), float32.

        The model passes one positions tensor to all its layers; the result for that same tensor object
        is reused, so a 30-layer forward looks the tables up once, not 30 times.
        """
        last = self._last
        if last is not None and last[0] is positions and last[1] == device:
            return last[2], last[3]
        if positions.dim() == 1:
            cos, sin = self.tables(int(positions.max()) + 1 if positions.numel() else 1, device)
            cos, sin = cos[positions], sin[positions]  # (T, D)
        else:
            cos, sin = self.angles(positions, device)  # (B, T, D)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
        signed_sin = _signed_sin(sin)
        self._last = (positions, device, cos, signed_sin)
        return cos, signed_sin

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, D) at positions (T,) or (B, T); math in fp32, result in x's dtype."""
        cos, signed_sin = self.rotation(positions, x.device)
        xf = x.float()
        # rotate_half(x) · sin == roll(x, D/2) · (-sin₁, sin₂), exactly (negation is exact): 2 kernels fewer
        return (xf * cos + torch.roll(xf, self.dim // 2, -1) * signed_sin).to(x.dtype)
