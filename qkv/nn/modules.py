"""The course's attention classes — thin, named views of the one core in ``qkv.nn.attention``.

Legend: B batch, T queries, S keys, C model dim, H heads, K kv heads, D head dim.

* :class:`SelfAttention` — one head: q = WQ x, k = WK x, v = WV x, Z = softmax(q kᵀ / √d_k) v.
* :class:`MaskedSelfAttention` — the same with the causal mask (a token sees only itself and the past).
* :class:`CrossAttention` — queries from one sequence, keys and values from another.
* :class:`MultiHeadAttention` — H heads in parallel, grouped-query (``n_kv_heads``), self / causal /
  cross, RoPE, KV cache, dropout, and an output projection.

Every forward takes ``(B, T, C)`` or an unbatched ``(T, C)`` and returns the same layout; with
``return_weights=True`` it also returns the attention weights (rows sum to 1: ``weights[..., i, j]``
is how much query i attends to key j).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ShapeError
from .attention import attention
from .kv_cache import KVCache
from .rope import RoPE


def embedding(num: int, dim: int, **kwargs) -> nn.Embedding:
    """``nn.Embedding(num, dim)``; under ``torch.device("meta")`` (a model built to receive a file's weights)
    without the random initialisation, whose meta-device ``normal_`` imports torch._dynamo (~2-3 s)."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim), **kwargs)
    return nn.Embedding(num, dim, **kwargs)


def _batched(x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """Accept (T, C) or (B, T, C); return (B, T, C) and whether to squeeze the batch back."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(f"{name} must be (batch, length, features) or (length, features), got {got}")
    return (x.unsqueeze(0), True) if x.dim() == 2 else (x, False)


def _unbatch(result, squeeze: bool):
    if not squeeze:
        return result
    if isinstance(result, tuple):
        return tuple(r.squeeze(0) for r in result)
    return result.squeeze(0)


class _OneHead(nn.Module):
    """Shared body of the single-head classes: three projections and one call of the core."""

    causal = False

    def __init__(self, d_model: int, d_k: int, *, d_context: int | None = None, d_v: int | None = None,
                 bias: bool = False):
        super().__init__()
        d_context = d_context or d_model
        self.q_proj = nn.Linear(d_model, d_k, bias=bias)  # WQ: C -> d_k
        self.k_proj = nn.Linear(d_context, d_k, bias=bias)  # WK: C_ctx -> d_k
        self.v_proj = nn.Linear(d_context, d_v or d_k, bias=bias)  # WV: C_ctx -> d_v

    def _attend(self, x, context, mask, causal, return_weights):
        x, squeeze = _batched(x, "x")
        context = x if context is None else _batched(context, "context")[0]
        q = self.q_proj(x).unsqueeze(1)  # (B, 1, T, d_k)
        k = self.k_proj(context).unsqueeze(1)  # (B, 1, S, d_k)
        v = self.v_proj(context).unsqueeze(1)  # (B, 1, S, d_v)
        res = attention(q, k, v, mask=mask, causal=causal, return_weights=return_weights)
        if return_weights:
            out, w = res
            return _unbatch((out.squeeze(1), w.squeeze(1)), squeeze)  # (B, T, d_v), (B, T, S)
        return _unbatch(res.squeeze(1), squeeze)


class SelfAttention(_OneHead):
    """One self-attention head, d_model -> d_k (the 6 -> 3 head of the by-hand exercise).

    ``forward(x)`` with x (B, T, C) returns Z (B, T, d_k); ``return_weights=True`` adds (B, T, T).
    """

    def __init__(self, d_model: int, d_k: int, *, d_v: int | None = None, bias: bool = False):
        super().__init__(d_model, d_k, d_v=d_v, bias=bias)

    def forward(self, x, *, mask=None, causal: bool = False, return_weights: bool = False):
        return self._attend(x, None, mask, causal or self.causal, return_weights)


class MaskedSelfAttention(SelfAttention):
    """Self-attention where token i sees only tokens 0..i (the decoder's causal mask)."""

    causal = True


class CrossAttention(_OneHead):
    """One cross-attention head: queries from x (width d_model), keys/values from context (d_context)."""

    def __init__(self, d_model: int, d_k: int, *, d_context: int | None = None, d_v: int | None = None,
                 bias: bool = False):
        super().__init__(d_model, d_k, d_context=d_context, d_v=d_v, bias=bias)

    def forward(self, x, context, *, mask=None, return_weights: bool = False):
        return self._attend(x, context, mask, False, return_weights)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped-query heads, RoPE, KV cache and dropout.

    Args:
        d_model: width C of the input and the output.
        n_heads: query heads H.
        n_kv_heads: key/value heads K (default H; 1 = multi-query). Must divide H.
        head_dim: D (default C / H).
        d_context: width of the cross-attention context (default C).
        bias: bias on q/k/v projections; ``out_bias`` on o_proj (default: same as ``bias``).
        dropout: dropout on the attention weights, in training mode only.
        rope: a :class:`RoPE` applied to q and k (self-attention only).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *, head_dim: int | None = None,
                 d_context: int | None = None, bias: bool = False, out_bias: bool | None = None,
                 dropout: float = 0.0, rope: RoPE | None = None):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ShapeError(f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}")
        if head_dim is None and d_model % n_heads:
            raise ShapeError(f"d_model={d_model} is not divisible by n_heads={n_heads}: pass head_dim")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.dropout, self.rope = dropout, rope
        d_context = d_context or d_model
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)  # C -> H·D
        self.k_proj = nn.Linear(d_context, n_kv_heads * self.head_dim, bias=bias)  # C_ctx -> K·D
        self.v_proj = nn.Linear(d_context, n_kv_heads * self.head_dim, bias=bias)  # C_ctx -> K·D
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias if out_bias is None else out_bias)
        self.qkv_proj: nn.Module | None = None  # set by fuse_qkv(): one matmul instead of three

    def fuse_qkv(self, fused: nn.Module) -> None:
        """Use ``fused`` (C -> (H + 2K)·D: q, k, v weights stacked) for self-attention instead of the three
        projections, which are removed. Decoding one token then makes one matmul call instead of three;
        the numbers are the same weights'. (Cross-attention keeps needing separate projections.)"""
        for name in ("q_proj", "k_proj", "v_proj"):
            delattr(self, name)
        self.qkv_proj = fused

    def _heads(self, x: torch.Tensor, proj: nn.Linear, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, n, self.head_dim).transpose(1, 2)  # (B, T, n·D) -> (B, n, T, D)

    def forward(self, x, context=None, *, mask=None, causal: bool = False, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, return_weights: bool = False, impl: str = "auto",
                observer=None, last_query: bool = False):
        """x (B, T, C) [, context (B, S, C_ctx)] -> (B, T, C) [, weights (B, H, T, S_total)].

        With ``cache`` in self-attention, the new keys are appended and queries see all cached ones
        (positions continue from ``cache.offset``). In cross-attention the cache stores the context's
        keys/values the first time and reuses them afterwards (pass ``context`` only on that call).

        ``observer(q, k, v=..., mask=..., causal=..., out_proj=...)``, if given, sees the queries, keys and
        values exactly as the core gets them (after RoPE, with the whole cache) and the output projection
        that mixes the heads — how qkv.explain rebuilds weight rows, and the faithfulness measures the
        vectors those weights multiply, without changing the path the model computes on.

        ``last_query=True`` attends from the last position only: the result is (B, 1, C), while keys and
        values still come from (and are cached for) every position. A decoder's final layer needs no
        more when only the next token's logits are wanted (the last row of the full output, computed
        alone).
        """
        x, squeeze = _batched(x, "x")
        if context is None and not (cache is not None and cache.cross):
            q, k, v = self._self_qkv(x, cache, positions)
        else:
            q = self._heads(x, self.q_proj, self.n_heads)  # (B, H, T, D)
            k, v = self._cross_kv(context, cache)
        if k.dtype != q.dtype:  # a float32 cache under a bfloat16 prompt (sublayer_dtype): attend in q's dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
        if last_query and q.shape[2] > 1:
            q = q[:, :, -1:]  # (B, H, 1, D); causal masks align bottom-right, so it still sees every key
            if isinstance(mask, torch.Tensor) and mask.dim() >= 2 and mask.shape[-2] > 1:
                mask = mask[..., -1:, :]
        if observer is not None:
            observer(q, k, v=v, mask=mask, causal=causal, out_proj=self.o_proj)
        res = attention(q, k, v, mask=mask, causal=causal, dropout_p=self.dropout if self.training else 0.0,
                        return_weights=return_weights, impl=impl)
        out, weights = (res if return_weights else (res, None))
        b, _, t, _ = out.shape
        out = self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))  # (B, T, C)
        return _unbatch((out, weights) if return_weights else out, squeeze)

    def _self_qkv(self, x, cache, positions):
        """Project q, k, v from x; rotate q and k at their positions; append k, v to the cache."""
        if self.qkv_proj is not None:
            b, t, _ = x.shape
            qkv = self.qkv_proj(x).view(b, t, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
            qkv = qkv.transpose(1, 2)  # (B, H + 2K, T, D)
            q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)
        else:
            q = self._heads(x, self.q_proj, self.n_heads)  # (B, H, T, D)
            k = self._heads(x, self.k_proj, self.n_kv_heads)  # (B, K, T, D)
            v = self._heads(x, self.v_proj, self.n_kv_heads)
        if self.rope is not None:
            if positions is None:
                start = cache.offset if cache is not None else 0  # new tokens continue the cached ones
                positions = torch.arange(start, start + x.shape[1], device=x.device)
            if self.qkv_proj is not None:  # q and k are adjacent heads of one tensor: rotate them in one call
                q, k = self.rope(qkv[:, :self.n_heads + self.n_kv_heads], positions).split(
                    [self.n_heads, self.n_kv_heads], dim=1)
            else:
                q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, offset + T, D)
        return q, k, v

    def _cross_kv(self, context, cache):
        if cache is not None and cache.offset > 0:
            return cache.k[:, :, :cache.offset], cache.v[:, :, :cache.offset]
        if context is None:
            raise ShapeError("cross-attention needs a context (or a cross cache filled on an earlier call)")
        context = _batched(context, "context")[0]
        k = self._heads(context, self.k_proj, self.n_kv_heads)  # (B, K, S, D)
        v = self._heads(context, self.v_proj, self.n_kv_heads)
        if cache is not None:
            k, v = cache.update(k, v)
        return k, v
