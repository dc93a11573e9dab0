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
from ..nn.modules import embedding


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

    def forward(self, x, fn, observer=None):
        """``observer.residual`` (qkv.explain's mixing measure) sees the stream around an attention sublayer."""
        if self.norm_first:
            z = x + self.dropout(fn(self.norm(x)))
            if observer is not None:
                observer.residual(x, z)
            return z
        z = x + self.dropout(fn(x))
        if observer is not None:
            observer.residual(x, z, norm=self.norm)
        return self.norm(z)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, bias=True, dropout=cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.block1 = _Block(cfg.d_model, cfg.dropout, cfg.norm_first)
        self.block2 = _Block(cfg.d_model, cfg.dropout, cfg.norm_first)

    def forward(self, x, src_mask, observer=None):  # (B, S, C) -> (B, S, C)
        x = self.block1(x, lambda h: self.self_attn(h, mask=src_mask, observer=observer), observer)
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
        if observer is not None:
            observer.site = "self"
        y = self.block1(y, lambda h: self.self_attn(h, causal=True, cache=self_cache, observer=observer), observer)
        if observer is not None:
            observer.site = "cross"
        y = self.block2(y, lambda h: self.cross_attn(h, None if _filled(cross_cache) else memory, mask=src_mask,
                                                     cache=cross_cache, observer=observer), observer)
        return self.block3(y, self.ff)


def _filled(cache: KVCache | None) -> bool:
    return cache is not None and cache.offset > 0


class EncoderDecoder(nn.Module):
    """The whole model: ``forward(src, tgt)`` -> logits (B, T, V_tgt); ``encode`` / ``decode`` apart."""

    is_causal = False

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.config = cfg
        self.src_embed = embedding(cfg.src_vocab_size, cfg.d_model)
        self.tgt_embed = embedding(cfg.tgt_vocab_size, cfg.d_model)
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
        d, dev, dt = c.d_model // c.n_heads, self.out.weight.device, self.out.weight.dtype
        return [(KVCache(batch, c.n_heads, max_tgt, d, dtype=dt, device=dev),
                 KVCache(batch, c.n_heads, src_len, d, dtype=dt, device=dev, cross=True)) for _ in self.decoder]

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

    @torch.inference_mode()
    def beam_search(self, src, *, bos: int, eos: int, max_new_tokens: int, beam_size: int = 4,
                    length_penalty: float = 1.0, src_mask=None) -> list[list[int]]:
        """Beam search: the best hypothesis per source row, without bos/eos (as :meth:`greedy` returns it).

        A hypothesis scores the sum of its tokens' log-probabilities (eos included) divided by
        ``length ** length_penalty``, length = generated tokens including eos — the plain power, not GNMT's
        ((5 + length) / 6) ** α; 0 ranks by the raw sum, 1 by the mean log-probability per token.
        Each step keeps the ``beam_size`` best continuations that are not eos; an eos among the best
        ``beam_size`` closes its hypothesis into the row's pool. A row stops once its pool holds
        ``beam_size`` hypotheses and no live beam can still beat the worst of them (log-probabilities only
        fall, so the bound is exact). A row with an empty pool after ``max_new_tokens`` returns its best
        live beam, cut short as greedy's output is. With ``beam_size=1, length_penalty=0`` this is greedy.

        The source is encoded once; the cross-attention caches are filled on the first step and only read
        after it; the self-attention caches follow the surviving beams' parents each step.
        """
        _check_beam_args(beam_size, max_new_tokens, length_penalty)
        b, k, dev = src.shape[0], beam_size, src.device
        if max_new_tokens == 0:
            return [[] for _ in range(b)]
        memory = self.encode(src, src_mask).repeat_interleave(k, dim=0)  # (B·k, S, C): a row's beams share it
        mask = None if src_mask is None else src_mask.repeat_interleave(k, dim=0)  # (B·k, S)
        caches = self.make_caches(b * k, max_new_tokens, src.shape[1])
        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # one live beam per row at first, or the k beams would all grow the same tokens
        seqs = torch.empty(b * k, 0, dtype=torch.long, device=dev)  # (B·k, t) tokens of the live beams
        nxt = torch.full((b * k, 1), bos, dtype=torch.long, device=dev)
        pools = [_Finished(k, length_penalty) for _ in range(b)]
        for step in range(max_new_tokens):
            logp = self.decode(nxt, memory, mask, caches=caches)[:, -1].float().log_softmax(-1)  # (B·k, V)
            top, parent, token = _candidates(scores, logp.view(b, k, -1))  # (B, 2k) each
            _close_finished(pools, top, parent, token, seqs, eos, step)
            scores, pos = top.masked_fill(token == eos, float("-inf")).topk(k, dim=1)  # (B, k) best non-eos
            rows = (torch.arange(b, device=dev)[:, None] * k + parent.gather(1, pos)).view(-1)  # (B·k,) parents
            nxt = token.gather(1, pos).view(-1, 1)  # (B·k, 1)
            seqs = torch.cat([seqs[rows], nxt], dim=1)  # (B·k, t + 1)
            for self_cache, _ in caches:
                # parents never leave their source row's block of k, whose cross-cache rows are equal: no reorder
                self_cache.reorder(rows)
            best_live = scores[:, 0].tolist()  # topk sorts: column 0 is each row's best live beam
            if all(p.closed(s, step, max_new_tokens) for p, s in zip(pools, best_live)):
                break
        return [p.best() if p.hyps else seqs[r * k].tolist() for r, p in enumerate(pools)]


def _check_beam_args(beam_size, max_new_tokens, length_penalty) -> None:
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ConfigError(f"beam_size must be an integer >= 1, got {beam_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or not math.isfinite(length_penalty):
        raise ConfigError(f"length_penalty must be a finite number, got {length_penalty!r}")


def _candidates(scores: torch.Tensor, logp: torch.Tensor):
    """scores (B, k), logp (B, k, V) -> the 2k best continuations per row: score, parent beam, token (B, 2k).

    2k is enough: at most k of them (one per parent) can be eos, so k non-eos ones always remain.
    """
    b, k, v = logp.shape
    cand = (scores[:, :, None] + logp).view(b, k * v)  # (B, k·V)
    top, idx = cand.topk(min(2 * k, k * v), dim=1)  # (B, 2k), best first
    return top, idx // v, idx % v


def _close_finished(pools, top, parent, token, seqs, eos: int, step: int) -> None:
    """Move each finite eos candidate ranked among a row's best k into that row's pool (open rows only)."""
    k = seqs.shape[0] // len(pools)
    hits = (token[:, :k] == eos) & top[:, :k].isfinite()  # (B, k)
    for r, j in hits.nonzero().tolist():
        if not pools[r].done:
            pools[r].add(float(top[r, j]), step + 1, seqs[r * k + int(parent[r, j])].tolist())


class _Finished:
    """One source row's finished hypotheses: the ``size`` best by length-normalised score."""

    def __init__(self, size: int, length_penalty: float):
        self.size, self.alpha, self.hyps, self.done = size, length_penalty, [], False

    def add(self, score: float, length: int, tokens: list[int]) -> None:
        self.hyps.append((score / length ** self.alpha, tokens))
        self.hyps.sort(key=lambda h: -h[0])
        del self.hyps[self.size:]

    def closed(self, best_live: float, step: int, max_new_tokens: int) -> bool:
        """Close the row when the pool is full and the best live beam can no longer beat its worst."""
        if not self.done and len(self.hyps) == self.size:
            # a live beam's sum only falls; it ends at a length in [step + 2, max_new_tokens], and the
            # normalised score is largest at the longest length when α > 0, at the shortest otherwise
            length = max_new_tokens if self.alpha > 0 else step + 2
            self.done = best_live / length ** self.alpha <= self.hyps[-1][0]
        return self.done

    def best(self) -> list[int]:
        return self.hyps[0][1]
