"""Hugging Face model directories: config.json and safetensors weights (single or sharded).

Policies (RELIABILITY §9.2): pickled weights (``.bin``/``.pt``) are refused — they can run code on
load; every shard named by an index must be a plain file name inside the directory (no ``..``, no
absolute path), and a symlink that resolves outside the directory is refused (a Hugging Face hub cache
snapshot's links into its own repository's ``blobs/`` are inside); a tensor listed in two shards, a missing
shard, or a malformed safetensors header is a ModelFormatError naming the file. :func:`tensor_table` reads
only the headers, so the loader can compare every name, shape and dtype with the config before any
tensor is read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import files
from ..errors import ModelFormatError

PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "pytorch_model.bin.index.json")


def read_json(path: Path, *, what: str, limit: int = files.MAX_CONFIG_BYTES) -> dict:
    """A JSON object from a model file: size-limited, nesting-limited, every failure a ModelFormatError."""
    d = files.read_json(path, what=what, limit=limit, error=ModelFormatError)
    if not isinstance(d, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, found a {type(d).__name__}")
    return d


def read_model_json(root: Path, name: str, *, what: str, limit: int = files.MAX_CONFIG_BYTES) -> dict:
    """:func:`read_json` of ``root / name`` after the symlink policy (:func:`qkv.files.inside`)."""
    return read_json(inside(root, name, what=what), what=what, limit=limit)


def inside(root: Path, name: str, *, what: str) -> Path:
    """``root / name`` when it is a plain regular file inside root (symlinks resolved; a Hugging Face hub
    cache snapshot may link into its repository's blobs), else ModelFormatError."""
    p = files.inside(root, name, what=what, error=ModelFormatError)
    assert p is not None
    return p


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of a directory, validated; pickles are refused with the reason."""
    index = root / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        wm = read_model_json(root, index.name, what="the shard index", limit=files.MAX_TOKENIZER_CONFIG_BYTES
                             ).get("weight_map")
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise ModelFormatError(f"{index}: 'weight_map' must be a non-empty object of tensor -> shard file name")
        return [inside(root, n, what="shard") for n in dict.fromkeys(wm.values())]
    single = root / "model.safetensors"
    if single.exists() or single.is_symlink():
        return [inside(root, single.name, what="weights file")]
    pickles = [n for n in PICKLE_NAMES if (root / n).exists()]
    if pickles:
        raise ModelFormatError(f"{root / pickles[0]}: pickled weights can run code when loaded, so qkv refuses them; "
                               "convert to safetensors (e.g. with transformers' save_pretrained(safe_serialization=True))")
    raise ModelFormatError(f"{root}: no model.safetensors or model.safetensors.index.json")


def load_safetensors(paths: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the files, cast to ``dtype`` (floating tensors only); duplicates are an error."""
    from safetensors.torch import load_file

    tensors = _per_file(paths, lambda f: load_file(str(f)))
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}


def tensor_table(paths: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name) from the files' headers only; duplicates are an error.

    safetensors checks each header against its file (offsets inside the data, sizes matching shape and
    dtype), so what this returns describes tensors the file really holds — and nothing is read yet.
    """
    from safetensors import safe_open

    def headers(f: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        with safe_open(str(f), framework="pt") as st:
            return {name: (tuple(st.get_slice(name).get_shape()), st.get_slice(name).get_dtype()) for name in st.keys()}

    return _per_file(paths, headers)


def _per_file(paths: list[Path], read) -> dict:
    """``read(file)`` of every file merged into one dict; a file safetensors refuses, or a tensor name in
    two files, is a ModelFormatError naming the file."""
    from safetensors import SafetensorError

    out: dict = {}
    seen: dict[str, Path] = {}
    for f in paths:
        try:
            entries = read(f)
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            raise ModelFormatError(f"{f}: not a valid safetensors file ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''})") from None
        for name, value in entries.items():
            if name in seen:
                raise ModelFormatError(f"{f}: tensor {name!r} also appears in {seen[name].name}")
            seen[name] = f
            out[name] = value
    return out
