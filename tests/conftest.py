"""Shared fixtures: the embedded models are loaded once per test session (they are small)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the embedded GGUF, float32 (the exact dequantised weights)."""
    import qkv

    return qkv.load("smollm2", dtype="float32", device="cpu")
