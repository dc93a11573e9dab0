"""What a model hands to an observer while it runs (qkv.explain records it; the models only call these).

The attention module calls ``observer(q, k, v=..., mask=..., causal=..., out_proj=...)`` with the tensors
exactly as the attention core receives them; a block whose residual stream is known calls
``observer.residual(x, z, norm=..., out=...)`` after it has run. The model sets ``observer.layer``
before each layer, and a decoder with two attentions per layer (the encoder–decoder's) sets
``observer.site`` to "self" or "cross" before each. Models never read anything back: an observer cannot
change what they compute.
"""

from __future__ import annotations

import torch
from torch import nn


class AttentionObserver:
    """Base class: both calls do nothing. Subclasses record what they need."""

    layer: int = 0
    site: str = "self"  # "cross" while an encoder–decoder's decoder runs its cross-attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, *, v: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, causal: bool = False, out_proj: nn.Module | None = None) -> None:
        """q (B, H, T, D), k and v (B, K, S, D) after RoPE and the cache; ``out_proj`` the (C, H·D) output
        projection that mixes the heads."""

    def residual(self, x: torch.Tensor, z: torch.Tensor, *, norm: nn.Module | None = None,
                 out: torch.Tensor | None = None) -> None:
        """The residual stream around the layer's attention: ``x`` (B, T, C) its input, ``z = x + attention``
        before any post-norm, ``norm`` that post-norm (BERT's LayerNorm) or None (a pre-norm block, where the
        stream continues as ``z``), and ``out`` the whole layer's output (after the feed-forward)."""
