"""Hugging Face model directories: config.json and safetensors weights (single or sharded).

Policies (RELIABILITY §9.2): pickled weights (``.bin``/``.pt``) are refused — they can run code on
load; every shard named by an index must be a plain file name inside the directory (no ``..``, no
absolute path), and a symlink that resolves outside the directory is refused; a tensor listed in two
shards, a missing shard, or a malformed safetensors header is a ModelFormatError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelFormatError

PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "pytorch_model.bin.index.json")


def read_json(path: Path, *, what: str) -> dict:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot read {what}: {e}") from None
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    if not isinstance(d, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return d


def inside(root: Path, name: str, *, what: str) -> Path:
    """``root / name`` when it is a plain file inside root (symlinks resolved), else ModelFormatError."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ModelFormatError(f"{root}: {what} {name!r} is not a plain file name inside the model directory")
    p = root / name
    real = p.resolve()
    if root.resolve() not in real.parents:
        raise ModelFormatError(f"{p}: resolves to {real}, outside the model directory; copy the file in instead")
    if not real.is_file():
        raise ModelFormatError(f"{p}: {what} is missing")
    return p


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of a directory, validated; pickles are refused with the reason."""
    index = root / "model.safetensors.index.json"
    if index.exists():
        wm = read_json(index, what="the shard index").get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ModelFormatError(f"{index}: 'weight_map' must be a non-empty object of tensor -> shard file")
        return [inside(root, n, what="shard") for n in dict.fromkeys(wm.values())]
    single = root / "model.safetensors"
    if single.exists() or single.is_symlink():
        return [inside(root, single.name, what="weights file")]
    pickles = [n for n in PICKLE_NAMES if (root / n).exists()]
    if pickles:
        raise ModelFormatError(f"{root / pickles[0]}: pickled weights can run code when loaded, so qkv refuses them; "
                               "convert to safetensors (e.g. with transformers' save_pretrained(safe_serialization=True))")
    raise ModelFormatError(f"{root}: no model.safetensors or model.safetensors.index.json")


def load_safetensors(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the files, cast to ``dtype`` (floating tensors only); duplicates are an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    seen: dict[str, Path] = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            raise ModelFormatError(f"{f}: not a valid safetensors file ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''})") from None
        for name, t in tensors.items():
            if name in seen:
                raise ModelFormatError(f"{f}: tensor {name!r} also appears in {seen[name].name}")
            seen[name] = f
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out
