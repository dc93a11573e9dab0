"""The HTML explorer, read as a parser reads it: one self-contained page, no markup or URL from the input,
a JSON island that gives back exactly the record (RELIABILITY V1-V4)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time

import numpy as np
import pytest
import torch
from bs4 import BeautifulSoup

from qkv.explain import render_html
from qkv.explain.render_html import explorer_html, safe_json

# Every element and attribute the page itself writes; anything else came from the input.
OUR_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "p", "section", "label",
            "select", "input", "div", "noscript", "script", "button"}
OUR_ATTRS = {"lang", "charset", "http-equiv", "content", "name", "id", "class", "hidden", "aria-label",
             "type"}


def _island(page: str) -> dict:
    soup = BeautifulSoup(page, "html5lib")
    return json.loads(soup.find("script", id="qkv-data").string)


def _floats(b64: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=np.dtype(dtype).newbyteorder("<"))


def _assert_only_our_markup(page: str) -> BeautifulSoup:
    soup = BeautifulSoup(page, "html5lib")
    tags = {t.name for t in soup.find_all(True)}
    assert tags <= OUR_TAGS, tags - OUR_TAGS
    for t in soup.find_all(True):
        assert set(t.attrs) <= OUR_ATTRS, (t.name, t.attrs)
    scripts = soup.find_all("script")
    assert [s.get("type") for s in scripts] == ["application/json", None]
    assert not any(s.get("src") for s in scripts)
    return soup


def test_hostile_tokens_stay_data(make_record, hostile_strings):
    tokens = hostile_strings + ["bank"]
    rec = make_record(2, 2, tokens, model=hostile_strings[1], words=[(0, 3), (3, 5), (5, 11)])
    rec = type(rec)(rec.weights, tokens, tokens, rec.queries, rec.layers, rec.heads, model=rec.model,
                    key_words=rec.key_words, query_words=rec.query_words, note=hostile_strings[2])
    page = explorer_html(rec, title=hostile_strings[0])
    soup = _assert_only_our_markup(page)
    data = _island(page)
    assert data["query_tokens"] == tokens and data["key_tokens"] == tokens
    assert data["model"] == hostile_strings[1] and data["note"] == hostile_strings[2]
    assert data["title"] == hostile_strings[0] and soup.title.string == hostile_strings[0]
    assert data["key_word_labels"] == rec.word_labels("key")
    for s in hostile_strings:
        if set(s) & set("<>&\x00\u2028\u2029"):
            assert s not in page, repr(s)
    assert "\x00" not in page and "\u2028" not in page and "\u2029" not in page


def test_each_hostile_string_alone(make_record, hostile_strings):
    """One string per page, as query and key tokens and as the title (the title goes into <title>)."""
    for s in hostile_strings:
        tokens = ["a", s, "b"]
        page = explorer_html(make_record(1, 1, tokens), title=s)
        _assert_only_our_markup(page)
        assert _island(page)["query_tokens"] == tokens


@pytest.mark.parametrize("text", ["</script>", "<!--<script>", "a&b", "\u2028\u2029", "\ud800", "\x00\r\n",
                                  "é銀😀"])
def test_safe_json_round_trips(text):
    out = safe_json({"s": [text]})
    assert not set(out) & set("<>&\u2028\u2029")
    assert json.loads(out) == {"s": [text]}


def test_self_contained_and_csp(make_record):
    page = explorer_html(make_record(2, 3, ["He", " sat", " on", " the", " river", "'s", " bank"]))
    bare = page.replace('"http://www.w3.org/2000/svg"', "")  # the SVG export's namespace: a name, never fetched
    assert "http://" not in bare and "https://" not in bare and "//cdn" not in bare
    soup = _assert_only_our_markup(page)
    csp = soup.find("meta", attrs={"http-equiv": "Content-Security-Policy"})
    assert csp is not None and csp["content"] == render_html.CSP
    policy = dict(part.strip().split(" ", 1) for part in csp["content"].split(";"))
    assert policy["default-src"] == "'none'" and policy["style-src"] == "'unsafe-inline'"
    digest = base64.b64encode(hashlib.sha256(soup.find_all("script")[1].string.encode()).digest()).decode()
    assert policy["script-src"] == f"'sha256-{digest}'"  # the page's own script, and nothing inline else
    assert soup.head.find("meta") is soup.find("meta", charset=True)  # charset first, then the CSP
    assert not soup.find_all(attrs={"src": True}) and not soup.find_all(attrs={"href": True})
    assert len(soup.find_all("style")) == 1 and len(soup.find_all("script")) == 2


def test_small_record_embeds_exact_rows(make_record):
    rec = make_record(3, 2, [f"t{i}" for i in range(12)], queries=[2, 5, 11])
    data = _island(explorer_html(rec))
    assert data["mode"] == "full" and data["queries"] == [2, 5, 11]
    assert data["layers"] == rec.layers and data["heads"] == rec.heads and data["initial_query"] == 11
    w = _floats(data["weights"]["w"], "float32").reshape(data["weights"]["shape"])
    assert np.array_equal(w, rec.weights.numpy())


def test_initial_query_can_be_chosen(make_record):
    rec = make_record(1, 1, ["a", "b", "c"])
    assert _island(explorer_html(rec, query=1))["initial_query"] == 1
    assert _island(explorer_html(rec, query=99))["initial_query"] == 2  # not captured: the last one


def test_sink_words_follow_the_record(make_record):
    rec = make_record(1, 1, ["<s>", "He", " sat", " river", "'s"], words=[(0, 1), (1, 2), (2, 3), (3, 5)])
    data = _island(explorer_html(rec))
    light = rec.without_sink()
    assert data["nosink_key_words"] == [[a + 1, b + 1] for a, b in light.key_words]
    assert data["nosink_key_word_labels"] == light.word_labels("key")
    assert _island(explorer_html(light))["sink_available"] is False


def _sparse(part: dict, idx_type: str):
    shape = part["shape"]
    idx = _floats(part["idx"], idx_type).reshape(shape).astype(np.int64)
    val = _floats(part["val"], "float32").reshape(shape)
    rest = _floats(part["rest"], "float32").reshape(shape[:-1])
    return idx, val, rest


def test_long_text_is_bounded_and_top_k(make_record):
    """2,000 tokens, every row captured: top-k rows, exact means, a notice; small and quick enough."""
    rec = make_record(2, 2, [f" w{i}" for i in range(2000)], seed=3)
    start = time.perf_counter()
    page = explorer_html(rec)
    took = time.perf_counter() - start
    assert len(page.encode("utf-8")) < 15_000_000 and took < 15.0, (len(page), took)
    data = _island(page)
    assert data["mode"] == "topk" and data["k"] == 32 and len(data["queries"]) == 2000
    weights = data["weights"]
    idx, val, rest = _sparse(weights["lh"], weights["idx_type"])
    w = rec.weights.numpy()
    for li, hi, qi in [(0, 0, 1999), (1, 1, 1000), (0, 1, 5)]:
        row = w[li, hi, qi]
        assert idx[li, hi, qi, 0] == 0 and list(idx[li, hi, qi]) == sorted(idx[li, hi, qi])
        assert set(idx[li, hi, qi, 1:]) == set(np.argsort(row[1:])[-32:] + 1) or qi < 32
        assert np.array_equal(val[li, hi, qi], row[idx[li, hi, qi]])
        assert abs(rest[li, hi, qi] - (row.sum() - val[li, hi, qi].sum())) < 1e-5
    m_idx, m_val, _ = _sparse(weights["means_off"], weights["idx_type"])
    mean = rec.row(1500).numpy()  # mean of all layers and heads: the last view
    assert np.allclose(m_val[-1, 1500], mean[m_idx[-1, 1500]], atol=1e-7)
    on_idx, on_val, _ = _sparse(weights["means_on"], weights["idx_type"])
    mean_on = rec.without_sink().row(1500).numpy()
    assert np.allclose(on_val[-1, 1500, 1:], mean_on[on_idx[-1, 1500, 1:] - 1], atol=1e-7)


def test_budget_truncates_queries_with_notice(make_record, monkeypatch):
    monkeypatch.setattr(render_html, "BUDGET_BYTES", 20_000)
    rec = make_record(1, 2, [f"t{i}" for i in range(60)])
    data = _island(explorer_html(rec))
    assert data["mode"] == "topk" and data["k"] == render_html.MIN_TOP_K
    n = len(data["queries"])
    assert data["captured_queries"] == 60 and 0 < n < 60
    assert data["queries"] == rec.queries[-n:] and data["initial_query"] == 59  # by default the last rows
    around = _island(explorer_html(rec, query=30))
    assert around["initial_query"] == 30 and around["queries"] == rec.queries[30 - n // 2:30 - n // 2 + n]
    first = _island(explorer_html(rec, query=0))
    assert first["initial_query"] == 0 and first["queries"] == rec.queries[:n]


def test_plan_for_fifty_thousand_tokens():
    """V3: a 50,000-token record of a 30 x 9 model stays within the budget by fewer rows, never more bytes."""
    plan = render_html._plan(30, 9, 50_000, 50_000)
    assert plan["mode"] == "topk" and plan["k"] == render_html.MIN_TOP_K and 1 <= plan["queries"] < 50_000
    rows = 30 * 9 + 2 * (30 + 9 + 1)
    assert plan["queries"] * rows * ((plan["k"] + 1) * 6 + 4) <= render_html.BUDGET_BYTES


def test_fifty_thousand_key_tokens(make_record):
    tokens = [f"w{i}" for i in range(50_000)]
    g = torch.Generator().manual_seed(0)
    w = torch.rand(1, 1, 2, 50_000, generator=g)
    w = w / w.sum(-1, keepdim=True)
    rec = type(make_record(1, 1, ["a"]))(w, tokens, tokens, [10, 49_999], [0], [0])
    start = time.perf_counter()
    page = explorer_html(rec)
    assert time.perf_counter() - start < 15.0 and len(page) < 15_000_000
    assert _island(page)["mode"] == "full"


def test_nonfinite_weights_survive(make_record):
    rec = make_record(1, 1, ["a", "b", "c"], causal=False)
    w = rec.weights.clone()
    w[0, 0, 1, 1] = float("nan")
    w[0, 0, 2, 0] = float("inf")
    bad = type(rec)(w, rec.query_tokens, rec.key_tokens, rec.queries, rec.layers, rec.heads)
    data = _island(explorer_html(bad))
    got = _floats(data["weights"]["w"], "float32").reshape(1, 1, 3, 3)
    assert np.isnan(got[0, 0, 1, 1]) and np.isinf(got[0, 0, 2, 0])


def test_empty_selection_renders(make_record):
    rec = make_record(1, 1, ["a", "b"])
    none = type(rec)(torch.zeros(1, 1, 0, 2), ["a", "b"], ["a", "b"], [], [0], [0])
    data = _island(explorer_html(none))
    assert data["queries"] == [] and data["initial_query"] is None


def test_script_has_no_html_sinks():
    """The page's own script never turns data into markup: no innerHTML/outerHTML/insertAdjacentHTML,
    document.write or eval; and it never contains the end of its own element."""
    js = render_html._JS
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function("):
        assert sink not in js
    assert not re.search(r"</script", js, re.I) and "<!--" not in js


def test_cross_attention_record(make_record):
    """Queries and keys from different texts (encoder-decoder): both token lists travel, unmixed."""
    src, tgt = ["Das", " Ufer", " des", " Flusses"], ["the", " river", " bank"]
    w = torch.rand(1, 2, 3, 4)
    rec = type(make_record(1, 1, ["a"]))(w / w.sum(-1, keepdim=True), tgt, src, [0, 1, 2], [0], [0, 1],
                                         kind="cross")
    data = _island(explorer_html(rec))
    assert data["query_tokens"] == tgt and data["key_tokens"] == src and data["kind"] == "cross"
    assert data["key_words"] == [[i, i + 1] for i in range(4)] and len(data["nosink_key_words"]) == 3
