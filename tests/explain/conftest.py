"""Fixtures for the renderer tests: records built directly (no model) with random rows normalised to sum
to 1, and the hostile strings of RELIABILITY V1/V5. (Fixtures, not imports: tests/explain is no package.)"""

from __future__ import annotations

import pytest
import torch

from qkv.explain.record import AttentionRecord

# RELIABILITY V1: strings that must never become markup, and must come back unchanged from the page.
HOSTILE = ["<script>alert(1)</script>", "</script><script>x()</script>", '"><img src=x onerror=x()>',
           "' onmouseover='x()", "<!--", "&amp;", "\u2028", "\u2029", "\x00", "\r\n"]
# RELIABILITY V5: labels that matplotlib would parse as mathtext, or cannot draw with its default font.
HOSTILE_LABELS = ["$$", "$x$", "a_b^c", "\\frac", "😀", "銀行", "", " ", "\n", "\t \t", "$\\alpha$ and $"]


def random_record(n_layers: int, n_heads: int, tokens: list[str], *, queries: list[int] | None = None,
                  words: list[tuple[int, int]] | None = None, seed: int = 0, causal: bool = True,
                  model: str = "test-model") -> AttentionRecord:
    """Weights ~ rand**3 (peaked, like real heads), causal-masked, each row normalised to sum to 1."""
    g = torch.Generator().manual_seed(seed)
    t = len(tokens)
    queries = list(range(t)) if queries is None else queries
    w = torch.rand(n_layers, n_heads, t, t, generator=g) ** 3
    if causal:
        w = torch.tril(w)
    w = w[:, :, queries]
    w = w / w.sum(-1, keepdim=True)
    return AttentionRecord(w, list(tokens), list(tokens), queries, list(range(0, 2 * n_layers, 2)),
                           list(range(1, n_heads + 1)), kind="causal" if causal else "self", model=model,
                           key_words=words or [], query_words=words or [])


@pytest.fixture
def make_record():
    return random_record


@pytest.fixture
def hostile_strings() -> list[str]:
    return list(HOSTILE)


@pytest.fixture
def hostile_labels() -> list[str]:
    return list(HOSTILE_LABELS)
