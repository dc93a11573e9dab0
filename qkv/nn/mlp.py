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
        self.gate_up_proj: nn.Module | None = None  # set by fuse_gate_up()

    def fuse_gate_up(self, fused: nn.Module) -> None:
        """Use ``fused`` (C -> 2F: gate then up weights stacked) instead of the two projections."""
        del self.gate_proj, self.up_proj
        self.gate_up_proj = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (…, C) -> (…, C)
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (…, F) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(glu(gate, up))


def glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; in place in gate's buffer when autograd is not recording (the same numbers, two
    (…, F) buffers fewer to allocate and fill)."""
    if gate.requires_grad or up.requires_grad:
        return F.silu(gate) * up
    return F.silu(gate, inplace=True).mul_(up)
