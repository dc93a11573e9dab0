"""Batches as pure functions of (seed, micro-step): resuming at step N needs no saved data position.

Legend: B batch, S source length, T target length.

Seq2seq: each epoch is a seeded permutation of the training examples; micro-batch ``m`` covers
positions ``[m·B, (m+1)·B)`` of the concatenated epochs. Text: micro-batch ``m`` is B windows of
``block_size + 1`` tokens at offsets drawn from a generator seeded with (seed, m).
Every process builds the same *global* batch and keeps its own rows (``rank::world``), so a run on
N processes sees exactly the data of a run on one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .tasks import BOS, EOS, PAD, CharVocab

VAL_FRACTION = 0.1  # the held-out tail of a text file


def _generator(*parts: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return g.manual_seed(seed)


@dataclass
class Seq2SeqBatch:
    src: torch.Tensor  # (B, S) ids, right-padded with PAD
    src_mask: torch.Tensor  # (B, S) True for real tokens
    tgt_in: torch.Tensor  # (B, T) BOS + target
    labels: torch.Tensor  # (B, T) target + EOS, PAD where there is nothing to predict

    def to(self, device) -> Seq2SeqBatch:
        return Seq2SeqBatch(*(t.to(device) for t in (self.src, self.src_mask, self.tgt_in, self.labels)))

    def rows(self, index) -> Seq2SeqBatch:
        return Seq2SeqBatch(*(t[index] for t in (self.src, self.src_mask, self.tgt_in, self.labels)))

    @property
    def n_tokens(self) -> int:
        return int((self.labels != PAD).sum())


def _pad(rows: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate(pairs: list[tuple[str, str]], vocab: CharVocab) -> Seq2SeqBatch:
    src = _pad([vocab.encode(s) + [EOS] for s, _ in pairs])  # (B, S)
    tgt = [vocab.encode(t) for _, t in pairs]
    return Seq2SeqBatch(src, src != PAD, _pad([[BOS] + t for t in tgt]), _pad([t + [EOS] for t in tgt]))


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    return torch.randperm(n, generator=_generator(seed, epoch)).tolist()


def seq2seq_batch(examples: list[tuple[str, str]], vocab: CharVocab, *, seed: int, micro_step: int,
                  batch_size: int) -> Seq2SeqBatch:
    """The global micro-batch number ``micro_step`` of an endless, epoch-shuffled stream."""
    n = len(examples)
    picks = []
    for pos in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        picks.append(_epoch_order(seed, epoch, n)[i])
    return collate([examples[i] for i in picks], vocab)


def shard(batch, rank: int, world: int):
    """This process's rows of a global batch (every ``world``-th row from ``rank``)."""
    if world == 1:
        return batch
    index = torch.arange(rank, _rows(batch), world)
    return batch.rows(index) if isinstance(batch, Seq2SeqBatch) else batch[index]


def _rows(batch) -> int:
    return batch.src.shape[0] if isinstance(batch, Seq2SeqBatch) else batch.shape[0]


# --- text ---------------------------------------------------------------------------------------------


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--data {p}: no such file; give a UTF-8 text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--data {p}: not UTF-8 (byte {e.start} is {e.object[e.start]:#04x}); "
                         "convert the file to UTF-8") from None
    except OSError as e:
        raise InputError(f"--data {p}: cannot read it ({e.strerror})") from None


@dataclass(frozen=True)
class TextData:
    """A token stream cut into a training part and a held-out tail (the last ``VAL_FRACTION``)."""

    train: torch.Tensor  # (N,) ids
    val: torch.Tensor  # (M,) ids

    @classmethod
    def from_ids(cls, ids: list[int], *, block_size: int, source: str = "text"):
        n_val = max(block_size + 1, int(len(ids) * VAL_FRACTION))
        if len(ids) < n_val + block_size + 1:
            raise InputError(f"{source}: {len(ids)} tokens are too few for block_size {block_size} "
                             f"(need at least {n_val + block_size + 1}); give more text or a smaller --block-size")
        t = torch.tensor(ids, dtype=torch.long)
        return cls(t[:-n_val], t[-n_val:])


def text_batch(data: torch.Tensor, *, seed: int, micro_step: int, batch_size: int, block_size: int) -> torch.Tensor:
    """(B, block_size + 1) windows at seeded random offsets; inputs are [:, :-1], labels [:, 1:]."""
    starts = torch.randint(0, len(data) - block_size, (batch_size,), generator=_generator(seed, micro_step))
    return torch.stack([data[s:s + block_size + 1] for s in starts.tolist()])  # (B, block_size + 1)


def text_eval_batches(data: torch.Tensor, *, batch_size: int, block_size: int, max_windows: int | None = None):
    """The first ``max_windows`` consecutive non-overlapping windows of the held-out tokens, in batches
    (the same every time)."""
    n = min((len(data) - 1) // block_size, max_windows if max_windows is not None else 1 << 62)
    windows = [data[i * block_size:(i + 1) * block_size + 1] for i in range(n)]
    for b in range(0, n, batch_size):
        yield torch.stack(windows[b:b + batch_size])  # (≤ batch_size, block_size + 1)
