"""Sentence embeddings from a BERT encoder, by the sentence-transformers rule.

    loaded = qkv.load("minilm")
    e = qkv.embed(loaded, ["A cat sits on the mat.", "A kitten rests on a rug."])   # (2, 384), unit rows
    similarity = e @ e.T                                                          # cosine similarity

A sentence-transformers model directory says how to pool in ``modules.json`` → the Pooling module's
folder (``1_Pooling/config.json``), and how long an input may be in ``sentence_bert_config.json``
(``max_seq_length``). Both are read from the loaded model's directory; without them the defaults are
sentence-transformers' own for a plain Hugging Face encoder: mean pooling and the model's positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError, InputError, ModelFormatError
from .weights import hf

POOLING_KEYS = {  # 1_Pooling/config.json flag -> the mode it selects ("supported" = what qkv computes)
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
SUPPORTED_POOLING = ("mean", "cls")
POOLING_TYPE = "sentence_transformers.models.Pooling"


@dataclass(frozen=True)
class SentenceConfig:
    """How a directory turns token vectors into one sentence vector."""

    pooling: str  # "mean" (average of the real tokens) or "cls" (the first token's vector)
    max_length: int  # tokens per sentence, [CLS] and [SEP] included; longer sentences are truncated


@torch.inference_mode()
def embed(loaded, sentences: str | list[str], *, normalize: bool = True, batch_size: int = 32) -> torch.Tensor:
    """One vector per sentence: (N, C) float32 on the model's device (rows of unit length by default).

    The encoder runs on batches of up to ``batch_size`` sentences, padded on the right; padding is
    hidden from attention and left out of the mean. Sentences longer than the model's maximum length
    (``max_seq_length`` of sentence_bert_config.json, else ``max_position_embeddings``; 256 tokens for
    minilm) are truncated to it, keeping the final [SEP] — as sentence-transformers does — so only the
    start of a long text shapes its vector. ``normalize`` divides each vector by its L2 norm, which
    makes a dot product a cosine similarity.
    """
    texts = check_sentences(sentences)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if getattr(loaded.model, "is_causal", True):
        raise InputError(f"{loaded.name} is a decoder; sentence embeddings need an encoder such as minilm")
    cfg = sentence_config(loaded)
    chunks = []
    for start in range(0, len(texts), batch_size):
        ids, mask = _batch(loaded, texts[start:start + batch_size], cfg.max_length)
        hidden = loaded.model(ids, attention_mask=mask)  # (B, T, C) float32
        chunks.append(pool(hidden, mask, cfg.pooling))
    vectors = torch.cat(chunks)  # (N, C)
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, C) token vectors + (B, T) mask -> (B, C): the mean over real tokens, or the first token."""
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ConfigError(f"pooling mode {mode!r} is not supported (supported: {', '.join(SUPPORTED_POOLING)})")
    w = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1): 1 for real tokens
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)  # (B, C)


def sentence_config(loaded) -> SentenceConfig:
    """Pooling mode and maximum length from the loaded model's directory (see the module docstring)."""
    root = Path(loaded.source)
    n_pos = loaded.config.max_position_embeddings
    pooling = _pooling_mode(root) if root.is_dir() else "mean"
    max_length = n_pos
    st = root / "sentence_bert_config.json"
    if st.is_file():
        value = hf.read_json(st, what="the sentence-transformers settings").get("max_seq_length")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ModelFormatError(f"{st}: max_seq_length must be an integer >= 2, got {value!r}")
            max_length = min(value, n_pos)
    return SentenceConfig(pooling, max_length)


def _pooling_mode(root: Path) -> str:
    """The one pooling mode the directory's Pooling config switches on (mean when there is none)."""
    folder = _pooling_folder(root)
    if folder is None:
        return "mean"
    where = folder / "config.json"
    raw = hf.read_json(where, what="the pooling configuration")
    modes = [mode for key, mode in POOLING_KEYS.items() if raw.get(key) is True]
    if len(modes) != 1:
        raise ConfigError(f"{where}: expected exactly one pooling_mode_* set to true, got "
                          f"{', '.join(modes) or 'none'}; qkv computes {' or '.join(SUPPORTED_POOLING)} pooling")
    if modes[0] not in SUPPORTED_POOLING:
        raise ConfigError(f"{where}: pooling mode {modes[0]!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_POOLING)})")
    return modes[0]


def _pooling_folder(root: Path) -> Path | None:
    """The Pooling module's folder named by modules.json, else ``1_Pooling`` if present."""
    modules = root / "modules.json"
    if not modules.is_file():
        return root / "1_Pooling" if (root / "1_Pooling" / "config.json").is_file() else None
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{modules}: cannot read the module list ({e})") from None
    if not isinstance(entries, list):
        raise ModelFormatError(f"{modules}: expected a JSON list of modules")
    paths = [m.get("path") for m in entries if isinstance(m, dict) and m.get("type") == POOLING_TYPE]
    if not paths:
        return None
    return _folder_inside(root, paths[0], modules)


def _folder_inside(root: Path, name, where: Path) -> Path:
    """A module folder must be a plain name inside the model directory (never ``..`` or absolute)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ModelFormatError(f"{where}: module path {name!r} is not a folder name inside the model directory")
    folder = root / name
    if root.resolve() not in folder.resolve().parents:
        raise ModelFormatError(f"{where}: module folder {name!r} resolves outside the model directory")
    return folder


def check_sentences(sentences) -> list[str]:
    """A str or a non-empty list of non-empty str (InputError naming the first bad one)."""
    texts = [sentences] if isinstance(sentences, str) else sentences
    if not isinstance(texts, (list, tuple)):
        raise InputError(f"sentences must be a str or a list of str, got {type(sentences).__name__}")
    if not texts:
        raise InputError("no sentences given: pass at least one")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"sentence {i} is a {type(t).__name__}, not a str")
        if not t.strip():
            raise InputError(f"sentence {i} is empty: give some text")
    return list(texts)


def _batch(loaded, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) padded on the right and the mask (B, T) of real tokens, each row truncated."""
    tok = loaded.tokenizer
    rows = [_truncate(tok.encode(t), tok.special_ids, max_length) for t in texts]
    width = max(len(r) for r in rows)
    pad = loaded.tokenizer.pad_id if loaded.tokenizer.pad_id is not None else 0  # hidden anyway
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=loaded.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=loaded.device)
    return ids, mask


def _truncate(ids: list[int], special_ids: frozenset[int], max_length: int) -> list[int]:
    """Keep the first tokens, and the closing special token ([SEP]) when the sequence ends with one."""
    if len(ids) <= max_length:
        return ids
    return ids[:max_length - 1] + ids[-1:] if ids[-1] in special_ids else ids[:max_length]
