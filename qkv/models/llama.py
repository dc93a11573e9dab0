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
from ..nn.quant import CompactLinear, QuantizedLinear, small_matmul


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
        # casts are no-ops. A compact model's prompt on an AMX CPU runs each sublayer in bfloat16 end to end
        # (matmuls, attention, SwiGLU), not just its matmuls (see sublayer_dtype).
        dt = self.input_layernorm.weight.dtype
        fused = self.self_attn.qkv_proj
        adt = sublayer_dtype(fused, x, dt) if observer is None else dt
        a = self.self_attn(self.input_layernorm(x).to(adt), mask=mask, causal=True, cache=cache,
                           positions=positions, observer=observer, last_query=last_only)
        h = (x[:, -1:] if last_only else x) + a.float()
        mdt = sublayer_dtype(self.mlp.gate_up_proj, h, dt) if observer is None else dt
        out = h + self.mlp(self.post_attention_layernorm(h).to(mdt)).float()
        if observer is not None:  # the residual stream around attention, for the faithfulness measures
            observer.residual(x, h, out=out)
        return out


def sublayer_dtype(fused: nn.Module | None, x: torch.Tensor, dt: torch.dtype) -> torch.dtype:
    """The dtype a sublayer runs in on input ``x`` when its weights are ``dt``: the compact matrix ``fused``'s
    prompt dtype where it multiplies x's rows in it (bfloat16 on AMX CPUs, for more rows than its ``small_m``,
    never under exact_weights()), else ``dt``. Running the whole sublayer in it — one cast in, attention in
    bfloat16 too, one cast out — saves the casts around every matmul and halves attention's time; the
    residual stream, RMSNorm, RoPE's arithmetic and the KV cache stay float32 (BENCHMARKS.md: its error)."""
    if dt == torch.float32 and isinstance(fused, CompactLinear) and fused.prompt_dtype != dt \
            and not fused.exact_only and fused._exact(x):
        return fused.prompt_dtype
    return dt


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
                last_only: bool = False, observer=None, unembed: bool = True,
                stop_after: int | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V) in float32 (or (B, 1, V) with ``last_only``).

        Args:
            cache: from :meth:`make_cache`; new keys are appended, queries see every cached position.
            attention_mask: (B, S) bool, True for real tokens, over cached + new positions (left padding).
            positions: (B, T) or (T,) RoPE positions; by default from ``attention_mask`` (cumulative
                count of real tokens) or continuing the cache.
            last_only: compute logits for the last position only (the decode loop needs nothing else).
            observer: an ``AttentionObserver`` (qkv.explain) that sees each layer's q, k and lse.
            unembed: False returns the final norm's output (B, T, C) instead of logits — for an analysis that
                reads no logits (the unembedding is the largest matrix; exact, it is dequantised per call).
            stop_after: run layers 0..stop_after only and return their residual stream (B, T, C), before any
                final norm — for an analysis that reads nothing past that layer (``qkv.capture(layers=[3])``).
        """
        b, t = self._check_ids(input_ids, cache)
        self._check_stop(stop_after, cache)
        if t == 1 and cache and attention_mask is None and positions is None and observer is None:
            weights = self.decode_weights(b)
            if weights is not None:
                return self._decode_step(input_ids, cache, weights)
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
        layers = self.model.layers[:None if stop_after is None else stop_after + 1]
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
        if stop_after is not None:
            return x
        if not unembed:
            return self.model.norm(x)
        return self.lm_head(self.model.norm(x).to(self.model.norm.weight.dtype)).float()  # (B, T, V)

    # -- one-token steps on the compact weights ------------------------------------------------------------

    def _compact_decode(self, batch: int) -> bool:
        """Whether every matrix uses the compact copy ``qkv.load(dtype="auto")`` attaches on the CPU (fused
        q/k/v and gate/up, no biases) for ``batch`` rows: then a one-token step takes :meth:`_decode_step`."""
        return self.decode_weights(batch) is not None

    def decode_weights(self, batch: int = 1) -> list | None:
        """The compact weights :func:`decode_layers` multiplies by — per layer [input norm, q/k/v, o,
        post-attention norm, gate/up, down], then [final norm, lm_head], each matrix as its
        ``compact_operands()`` — or None where a matrix has no compact copy for ``batch`` rows (or a bias).
        Walked on every step (modules can be swapped after loading) through the modules' own dicts: ~0.1 ms,
        where attribute access through ``nn.Module.__getattr__`` costs ~1 ms at 30 layers."""
        if self.model.norm.weight.dtype != torch.float32:
            return None

        def op(m):
            if not isinstance(m, QuantizedLinear) or m.kind == "float" or m.bias is not None or batch > m.small_m:
                raise LookupError
            return m.compact_operands()
        out: list = []
        try:
            for layer in self.model.layers._modules.values():
                mods = layer._modules
                attn, mlp = mods["self_attn"]._modules, mods["mlp"]._modules
                if "qkv_proj" not in attn or "gate_up_proj" not in mlp:
                    return None
                out.append([mods["input_layernorm"]._parameters["weight"], op(attn["qkv_proj"]), op(attn["o_proj"]),
                            mods["post_attention_layernorm"]._parameters["weight"], op(mlp["gate_up_proj"]),
                            op(mlp["down_proj"])])
            out.append([self.model.norm._parameters["weight"], op(self._modules["lm_head"])])
        except LookupError:
            return None
        return out

    def _decode_step(self, ids: torch.Tensor, cache: list[KVCache], weights: list) -> torch.Tensor:
        """The layers of :meth:`forward` for one new token per row (:func:`decode_layers`: the same kernels in
        the same order, so the logits are bitwise the same — a test holds them together — without the module
        calls and reshapes around them: at 135M parameters those cost as much as the 4-bit matmuls). Where a
        compiled step is cached for this model and machine (``qkv compile``), one row runs through it."""
        cfg = self.config
        b = ids.shape[0]
        rope = self.model.layers[0].self_attn.rope
        pos = torch.arange(cache[0].offset, cache[0].offset + 1, device=ids.device)
        cos, signed_sin = rope.rotation(pos, ids.device)  # (1, D) each
        x = self.model.embed_tokens(ids).float().view(b, cfg.hidden_size)  # (B, C)
        if b == 1:
            from . import compiled
            step = compiled.step_for(self)
            if step is not None:
                logits = step(x, pos, cos, signed_sin, cache, weights)
                if logits is not None:
                    return logits.view(b, 1, -1)
        return decode_layers(self.decode_dims(), x, cos, signed_sin, weights, appending(cache)).view(b, 1, -1)

    def decode_dims(self) -> tuple[int, int, int, int, float]:
        """(heads, kv heads, head dim, hidden size, RMSNorm eps): what :func:`decode_layers` needs besides weights."""
        c = self.config
        return c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.rms_norm_eps

    def _check_stop(self, stop_after: int | None, cache) -> None:
        n = len(self.model.layers)
        if stop_after is None:
            return
        if not 0 <= stop_after < n:
            raise ShapeError(f"stop_after={stop_after} is not a layer of this model (0..{n - 1})")
        if cache:
            raise ShapeError("stop_after runs part of the model: a KV cache would be left with its layers out of "
                             "step; pass no cache")

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



def decode_layers(dims: tuple[int, int, int, int, float], x: torch.Tensor, cos: torch.Tensor,
                  signed_sin: torch.Tensor, weights: list, attend) -> torch.Tensor:
    """The decoder for one new token per row on compact weights: embeddings x (B, C) float32 -> logits (B, V).

    ``weights`` is :meth:`LlamaForCausalLM.decode_weights`; ``attend(i, q, new_k, new_v)`` stores layer i's new
    key and value (B, K, 1, D) and returns the attention output (B, H, 1, D). The eager step appends to a
    :class:`KVCache`; the compiled one (qkv.models.compiled) writes into a fixed buffer at a position and masks
    the rest — the rest of the arithmetic is this one function in both.
    """
    h, k, d, c, eps = dims
    b = x.shape[0]
    for i, (norm1, qkv_op, o_op, norm2, gate_up_op, down_op) in enumerate(weights[:-1]):
        qkv = small_matmul(F.rms_norm(x, (c,), norm1, eps=eps), *_flat(qkv_op))
        qkv = qkv.view(b, 1, h + 2 * k, d).transpose(1, 2)  # (B, H + 2K, 1, D)
        qk = qkv[:, :h + k]
        q, new_k = (qk * cos + torch.roll(qk, d // 2, -1) * signed_sin).split([h, k], dim=1)
        o = attend(i, q, new_k, qkv[:, h + k:])  # (B, H, 1, D)
        x = x + small_matmul(o.reshape(b, h * d), *_flat(o_op))
        gate, up = small_matmul(F.rms_norm(x, (c,), norm2, eps=eps), *_flat(gate_up_op)).chunk(2, dim=-1)
        x = x + small_matmul(glu(gate, up), *_flat(down_op))
    norm, lm_op = weights[-1]
    return small_matmul(F.rms_norm(x, (c,), norm, eps=eps), *_flat(lm_op))  # (B, V) float32


def appending(cache: list[KVCache]):
    """The eager step's ``attend`` for :func:`decode_layers`: append to layer i's cache, attend over what it holds."""
    def attend(i: int, q, new_k, new_v):
        keys, values = cache[i].update(new_k, new_v)  # (B, K, S, D)
        return F.scaled_dot_product_attention(q, keys, values, dropout_p=0.0, is_causal=False, scale=None,
                                              enable_gqa=q.shape[1] != keys.shape[1])
    return attend


def _flat(op: tuple) -> tuple:
    kind, group, tensors = op
    return (kind, group, *tensors)
