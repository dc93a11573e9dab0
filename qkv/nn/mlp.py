"""Feed-forward blocks. Legend: C model dim, F hidden dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """Gated linear unit with SiLU (Shazeer 2020), Llama's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)  # C -> F
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)  # C -> F
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)  # F -> C

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, C) -> (…, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
