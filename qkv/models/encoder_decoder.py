"""The 2017 Transformer (Vaswani et al.): an encoder, a decoder with cross-attention, on the shared core.

Legend: B batch, S source length, T target length, C model dim, V vocabulary.

source ids -> embedding · √C + sinusoidal positions -> N x [self-attention, feed-forward] -> memory
target ids -> embedding · √C + sinusoidal positions -> N x [masked self-attention,
              cross-attention over memory, feed-forward] -> linear -> logits

Each sublayer is wrapped as ``norm(x + f(x))`` (post-norm, the paper) or ``x + f(norm(x))`` (pre-norm);
both stacks end with a LayerNorm, as ``torch.nn.Transformer`` does, so the two compute the same
function from the same weights (a test holds them together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ShapeError
from ..nn import KVCache, MultiHeadAttention


@dataclass(frozen=True)
class Seq2SeqConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.0
    max_len: int = 512
    norm_first: bool = True  # pre-norm trains faster from scratch; False is the paper's post-norm

    def __post_init__(self):
        for n in ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "n_encoder_layers",
                  "n_decoder_layers", "d_ff", "max_len"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"Seq2SeqConfig.{n} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """(n, d): sin on even, cos on odd dimensions, wavelengths 2π … 10000·2π (computed in float64)."""
    pos = torch.arange(n, dtype=torch.float64, device="cpu")[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)
    table = torch.zeros(n, d, dtype=torch.float64, device="cpu")
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return table.float()


class FeedForward(nn.Module):
    """linear1 -> ReLU -> dropout -> linear2 (the paper's position-wise FFN)."""

    def __init__(self, d: int, d_ff: int, dropout: float):
        super().__init__()
        self.linear1, self.linear2, self.dropout = nn.Linear(d, d_ff), nn.Linear(d_ff, d), nn.Dropout(dropout)

    def forward(self, x):
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class _Block(nn.Module):
    """Residual + LayerNorm around one sublayer, pre- or post-norm."""

    def __init__(self, d: int, dropout: float, norm_first: bool):
        super().__init__()
        self.norm, self.dropout, self.norm_first = nn.LayerNorm(d), nn.Dropout(dropout), norm_first

    def forward(self, x, fn):
        if self.norm_first:
            return x + self.dropout(fn(self.norm(x)))
        return self.norm(x + self.dropout(fn(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, bias=True, dropout=cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.block1 = _Block(cfg.d_model, cfg.dropout, cfg.norm_first)
        self.block2 = _Block(cfg.d_model, cfg.dropout, cfg.norm_first)

    def forward(self, x, src_mask, observer=None):  # (B, S, C) -> (B, S, C)
        x = self.block1(x, lambda h: self.self_attn(h, mask=src_mask, observer=observer))
        return self.block2(x, self.ff)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, bias=True, dropout=cfg.dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, bias=True, dropout=cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.block1, self.block2, self.block3 = (_Block(cfg.d_model, cfg.dropout, cfg.norm_first) for _ in range(3))

    def forward(self, y, memory, src_mask, caches=(None, None), observer=None):  # (B, T, C) -> (B, T, C)
        self_cache, cross_cache = caches
        y = self.block1(y, lambda h: self.self_attn(h, causal=True, cache=self_cache))
        y = self.block2(y, lambda h: self.cross_attn(h, None if _filled(cross_cache) else memory, mask=src_mask,
                                                     cache=cross_cache, observer=observer))
        return self.block3(y, self.ff)


def _filled(cache: KVCache | None) -> bool:
    return cache is not None and cache.offset > 0


class EncoderDecoder(nn.Module):
    """The whole model: ``forward(src, tgt)`` -> logits (B, T, V_tgt); ``encode`` / ``decode`` apart."""

    is_causal = False

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.config = cfg
        self.src_embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab_size, cfg.d_model)
        self.register_buffer("positions", sinusoidal_positions(cfg.max_len, cfg.d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.encoder_norm = nn.LayerNorm(cfg.d_model)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.decoder_norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.tgt_vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def _embed(self, table: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = ids.shape[1]
        if start + t > self.config.max_len:
            raise ShapeError(f"sequence of {start + t} positions exceeds max_len {self.config.max_len}")
        x = table(ids) * math.sqrt(self.config.d_model) + self.positions[start:start + t]  # (B, L, C)
        return self.dropout(x)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None, observer=None) -> torch.Tensor:
        """src (B, S) [, src_mask (B, S) True = real token] -> memory (B, S, C)."""
        mask = None if src_mask is None else src_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(self.src_embed, src)
        for i, layer in enumerate(self.encoder):
            if observer is not None:
                observer.layer = i
            x = layer(x, mask, observer)
        return self.encoder_norm(x)

    def decode(self, tgt, memory, src_mask=None, *, caches: list[tuple[KVCache, KVCache]] | None = None,
               observer=None) -> torch.Tensor:
        """tgt (B, T) -> logits (B, T, V_tgt); with caches, tgt holds only the new positions."""
        mask = None if src_mask is None else src_mask.bool()[:, None, None, :]
        start = caches[0][0].offset if caches else 0
        y = self._embed(self.tgt_embed, tgt, start)
        for i, layer in enumerate(self.decoder):
            if observer is not None:
                observer.layer = i
            y = layer(y, memory, mask, caches[i] if caches else (None, None), observer)
        return self.out(self.decoder_norm(y))

    def forward(self, src, tgt, src_mask=None) -> torch.Tensor:
        return self.decode(tgt, self.encode(src, src_mask), src_mask)

    def make_caches(self, batch: int, max_tgt: int, src_len: int) -> list[tuple[KVCache, KVCache]]:
        c = self.config
        d, dev = c.d_model // c.n_heads, self.out.weight.device
        return [(KVCache(batch, c.n_heads, max_tgt, d, device=dev),
                 KVCache(batch, c.n_heads, src_len, d, device=dev, cross=True)) for _ in self.decoder]

    @torch.inference_mode()
    def greedy(self, src, *, bos: int, eos: int, max_new_tokens: int, src_mask=None) -> list[list[int]]:
        """Greedy decoding with a self-attention cache and a cross-attention cache filled once."""
        memory = self.encode(src, src_mask)
        b = src.shape[0]
        caches = self.make_caches(b, max_new_tokens + 1, src.shape[1])
        nxt = torch.full((b, 1), bos, dtype=torch.long, device=src.device)
        out, done = [[] for _ in range(b)], torch.zeros(b, dtype=torch.bool, device=src.device)
        for _ in range(max_new_tokens):
            nxt = self.decode(nxt, memory, src_mask, caches=caches)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            for i in range(b):
                if not done[i]:
                    out[i].append(int(nxt[i]))
            done |= nxt[:, 0] == eos
            if bool(done.all()):
                break
        return [row[:row.index(eos)] if eos in row else row for row in out]
