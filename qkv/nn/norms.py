"""Normalisation layers. Legend: C model dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * weight, no mean, no bias.

    The statistic is computed in fp32 whatever the input dtype; the result is cast back before the
    weight is applied, as Llama does (which matters for bf16 parity).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, C) -> (…, C)
        # one fused kernel for x / sqrt(mean(x²) + eps) in fp32 (the same maths as the three-op form)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # weight inside: one call fewer
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)  # bitwise = weight * rms_norm(x)
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * xf.to(x.dtype)
