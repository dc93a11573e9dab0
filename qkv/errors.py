"""Typed errors. Every error a user can fix is one of these: one line that says what, where, how to fix.

The CLI turns any ``QkvError`` into that line on stderr and exit code 2 — never a traceback.
"""

import re


class QkvError(Exception):
    """Base class of every error qkv raises on purpose.

    Its text is always one line: a message that quotes something from a hostile file (a value with a
    line break in it, a library's multi-line error) shows each line break as ``\\n`` instead of breaking
    the line — the CLI prints exactly one line per error.
    """

    def __str__(self) -> str:
        text = super().__str__()
        if "\n" in text or "\r" in text:
            text = text.replace("\r", "\\r").replace("\n", "\\n")
        return text


class ConfigError(QkvError, ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


class ModelFormatError(QkvError, ValueError):
    """A weights file (GGUF, safetensors, HF directory) is malformed or unsupported."""


class TokenizerError(QkvError, ValueError):
    """A tokenizer definition is malformed, or text cannot be tokenized."""


class TemplateError(QkvError, ValueError):
    """A chat template failed to compile, render, or broke the sandbox's limits."""


class CheckpointError(QkvError, ValueError):
    """A training checkpoint is missing, corrupt, or from another configuration."""


class InputError(QkvError, ValueError):
    """User input (text, matrices, options) is invalid."""


class ShapeError(QkvError, ValueError):
    """Tensor arguments have incompatible shapes, dtypes, or devices."""


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def one_line(text: str, limit: int = 300) -> str:
    """Any message (a compiler's output, a C++ exception with its backtrace) as one line of at most ``limit``
    characters, with no memory address of an object in it."""
    text = _ADDRESS.sub("", " ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"
