"""Attention maths shared by every model: one concept per file, no file I/O.

Legend used throughout: B batch, T queries, S keys, H heads, K kv-heads, D head dim, C model dim.
"""

from .attention import attention, attention_rows, masked_softmax, tiled_attention, weight_rows
from .kv_cache import KVCache
from .masks import causal_mask, padding_mask
from .mlp import SwiGLU
from .modules import CrossAttention, MaskedSelfAttention, MultiHeadAttention, SelfAttention
from .norms import RMSNorm
from .rope import Llama3Scaling, RoPE, rotate_half

__all__ = [
    "attention", "attention_rows", "weight_rows", "tiled_attention", "masked_softmax", "KVCache", "causal_mask", "padding_mask",
    "SwiGLU", "RMSNorm", "RoPE", "Llama3Scaling", "rotate_half",
    "SelfAttention", "MaskedSelfAttention", "CrossAttention", "MultiHeadAttention",
]
