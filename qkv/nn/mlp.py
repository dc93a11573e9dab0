"""Feed-forward blocks. Legend: C model dim, F hidden dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant import QuantizedLinear


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
        fused = self.gate_up_proj
        if fused is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
            seen = _hooked(self.gate_proj)
        elif isinstance(fused, QuantizedLinear) and not _hooked(fused):
            gate, up = fused.parts(x, (fused.out_features // 2,) * 2)  # (…, F) each, contiguous
            seen = False
        else:
            gate, up = fused(x).chunk(2, dim=-1)
            seen = _hooked(fused)
        return self.down_proj(glu(gate, up, in_place=not seen))


def glu(gate: torch.Tensor, up: torch.Tensor, *, in_place: bool = True) -> torch.Tensor:
    """silu(gate) * up. With ``in_place`` and autograd not recording, it runs in gate's buffer (the same
    numbers, two (…, F) buffers fewer to allocate and fill)."""
    if not in_place or gate.requires_grad or up.requires_grad:
        return F.silu(gate) * up
    return F.silu(gate, inplace=True).mul_(up)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook may hold on to the module's output (then it must not be overwritten)."""
    return bool(module._forward_hooks) or bool(nn.modules.module._global_forward_hooks)
