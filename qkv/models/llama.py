"""The Llama-architecture decoder (Llama 2/3, SmolLM2, TinyLlama, …), top to bottom as in the paper.

Legend: B batch, T new tokens, S all positions seen (cached + new), C hidden size, V vocabulary.

token ids -> embed_tokens -> N x [ RMSNorm -> grouped-query attention with RoPE (+ residual)
                                  RMSNorm -> SwiGLU MLP (+ residual) ] -> RMSNorm -> lm_head -> logits

Parameter names are Hugging Face's (``model.layers.0.self_attn.q_proj.weight`` …), so an HF
checkpoint maps by identity and a GGUF one through a table in ``qkv.weights``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlamaConfig
from ..errors import ShapeError
from ..nn import KVCache, MultiHeadAttention, RMSNorm, RoPE, SwiGLU
from ..nn.mlp import glu
from ..nn.modules import embedding
from ..nn.quant import QuantizedLinear


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: LlamaConfig, rope: RoPE):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = MultiHeadAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim=cfg.head_dim,
            bias=cfg.attention_bias, out_bias=cfg.attention_bias, rope=rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)

    def forward(self, x, *, mask, cache, positions, observer=None, last_only: bool = False):
        """(B, T, C) float32 -> (B, T, C) float32, or (B, 1, C) for the last position with ``last_only``
        (keys and values of every position are still computed and cached)."""
        # The residual stream stays float32; the sublayers run in the weights' dtype. In bf16 this halves
        # the error against the fp32 model (SmolLM2 mean KL ~2e-3 -> ~7e-4, RELIABILITY R7); in fp32 the
        # casts are no-ops.
        dt = self.input_layernorm.weight.dtype
        a = self.self_attn(self.input_layernorm(x).to(dt), mask=mask, causal=True, cache=cache,
                           positions=positions, observer=observer, last_query=last_only)
        h = (x[:, -1:] if last_only else x) + a.float()
        out = h + self.mlp(self.post_attention_layernorm(h).to(dt)).float()
        if observer is not None:  # the residual stream around attention, for the faithfulness measures
            observer.residual(x, h, out=out)
        return out


class LlamaModel(nn.Module):
    """Embedding, the decoder layers and the final norm: ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        rope = RoPE(cfg.head_dim, theta=cfg.rope_theta, scaling=cfg.rope_scaling,
                    freq_factors=cfg.rope_freq_factors)  # shared by every layer
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rope) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The decoder with its unembedding (tied to the embedding when the config says so)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """Share one (V, C) matrix between the embedding and the unembedding."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def make_cache(self, batch: int = 1, max_len: int | None = None) -> list[KVCache]:
        """One KV cache per layer, in the model's dtype and device."""
        cfg = self.config
        max_len = max_len or cfg.max_position_embeddings
        p = self.model.norm.weight
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        return [KVCache(batch, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype=dtype, device=p.device)
                for _ in range(cfg.num_hidden_layers)]

    def forward(self, input_ids: torch.Tensor, *, cache: list[KVCache] | None = None,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                last_only: bool = False, observer=None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V) in float32 (or (B, 1, V) with ``last_only``).

        Args:
            cache: from :meth:`make_cache`; new keys are appended, queries see every cached position.
            attention_mask: (B, S) bool, True for real tokens, over cached + new positions (left padding).
            positions: (B, T) or (T,) RoPE positions; by default from ``attention_mask`` (cumulative
                count of real tokens) or continuing the cache.
            last_only: compute logits for the last position only (the decode loop needs nothing else).
            observer: an ``AttentionObserver`` (qkv.explain) that sees each layer's q, k and lse.
        """
        b, t = self._check_ids(input_ids, cache)
        if t == 1 and cache and attention_mask is None and positions is None and observer is None \
                and self._compact_decode(b):
            return self._decode_step(input_ids, cache)
        offset = cache[0].offset if cache else 0
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (b, offset + t):
                raise ShapeError(f"attention_mask is {tuple(attention_mask.shape)}, expected (batch, cached + new) "
                                 f"= {(b, offset + t)}")
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S): padding keys hidden
            if positions is None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, offset:]  # (B, T)
        if positions is None:  # one tensor for all layers: RoPE looks its tables up once per forward
            positions = torch.arange(offset, offset + t, device=input_ids.device)
        x = self.model.embed_tokens(input_ids).float()  # (B, T, C), float32 residual stream
        layers = self.model.layers
        for i, layer in enumerate(layers):
            if observer is not None:
                observer.layer = i
            # With last_only, the final layer computes (and caches) every position's keys and values but
            # everything else for the last row alone, as llama.cpp does: ~1/N of a prompt's work saved,
            # the same logits to float rounding. Not while an observer reads every layer's queries.
            x = layer(x, mask=mask, cache=cache[i] if cache else None, positions=positions, observer=observer,
                      last_only=last_only and observer is None and i == len(layers) - 1)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x).to(self.model.norm.weight.dtype)).float()  # (B, T, V)

    # -- one-token steps on the compact weights ------------------------------------------------------------

    def _compact_decode(self, batch: int) -> bool:
        """Whether every matrix uses the compact copy ``qkv.load(dtype="auto")`` attaches on the CPU (fused
        q/k/v and gate/up, no biases) for ``batch`` rows: then a one-token step takes :meth:`_decode_step`.
        Checked on every call (a few µs): modules can be swapped after loading."""
        mats = [self.lm_head] + [m for layer in self.model.layers for m in (
            layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        return self.model.norm.weight.dtype == torch.float32 and all(
            isinstance(m, QuantizedLinear) and m.kind != "float" and m.bias is None and batch <= m.small_m
            for m in mats)

    def _decode_step(self, ids: torch.Tensor, cache: list[KVCache]) -> torch.Tensor:
        """The layers of :meth:`forward` for one new token per row, written out with the same kernels in the
        same order (so the logits are bitwise the same — a test holds them together) but without the module
        calls and reshapes around them: at 135M parameters those cost as much as the 4-bit matmuls."""
        cfg = self.config
        h, k, d, c, eps = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                           cfg.rms_norm_eps)
        b = ids.shape[0]
        rope = self.model.layers[0].self_attn.rope
        cos, signed_sin = rope.rotation(torch.arange(cache[0].offset, cache[0].offset + 1, device=ids.device),
                                        ids.device)  # (1, D) each
        x = self.model.embed_tokens(ids).float().view(b, c)  # (B, C)
        for layer, kv in zip(self.model.layers, cache):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = attn.qkv_proj.small(F.rms_norm(x, (c,), layer.input_layernorm.weight, eps=eps))
            qkv = qkv.view(b, 1, h + 2 * k, d).transpose(1, 2)  # (B, H + 2K, 1, D)
            qk = qkv[:, :h + k]
            q, new_k = (qk * cos + torch.roll(qk, d // 2, -1) * signed_sin).split([h, k], dim=1)
            keys, values = kv.update(new_k, qkv[:, h + k:])  # (B, K, S, D)
            o = F.scaled_dot_product_attention(q, keys, values, dropout_p=0.0, is_causal=False, scale=None,
                                               enable_gqa=h != k)  # (B, H, 1, D)
            x = x + attn.o_proj.small(o.reshape(b, h * d))
            gate, up = mlp.gate_up_proj.small(F.rms_norm(x, (c,), layer.post_attention_layernorm.weight,
                                                         eps=eps)).chunk(2, dim=-1)
            x = x + mlp.down_proj.small(glu(gate, up))
        x = F.rms_norm(x, (c,), self.model.norm.weight, eps=eps)
        return self.lm_head.small(x).view(b, 1, -1)  # (B, 1, V) float32

    def _check_ids(self, ids: torch.Tensor, cache) -> tuple[int, int]:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
            raise ShapeError("input_ids must be an integer tensor of shape (batch, length)")
        b, t = ids.shape
        if t == 0:
            raise ShapeError("input_ids is empty: give at least one token")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ShapeError(f"token ids must be in [0, {self.config.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        limit = cache[0].max_len if cache else self.config.max_position_embeddings
        if (cache[0].offset if cache else 0) + t > limit:
            raise ShapeError(f"{t} new tokens after {cache[0].offset if cache else 0} cached exceed the context "
                             f"of {limit} positions")
        return b, t
