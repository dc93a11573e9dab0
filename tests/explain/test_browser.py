"""The explorer in a real browser (Debian's chromium, headless, driven by Playwright): the numbers the page
shows are the record's numbers, in every view, and no token ever runs as code.

A core test: without chromium or Playwright it fails, with the way to install them (``make setup``).
"""

from __future__ import annotations

import json
import os

import pytest

from qkv.explain import render_html
from qkv.explain.render_html import explorer_html

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TOL = 1e-6


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: run `make setup` (it installs the dev extra)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` as root, or `apt-get install -y chromium`")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser, tmp_path):
    """Write the page to a file, open it from its file:// URL; fail on any script error or any request
    for something other than that file (the page must need nothing else)."""
    pages = []

    def _open(html: str):
        path = tmp_path / "explorer.html"
        path.write_text(html, encoding="utf-8")
        page = browser.new_page()
        errors, requests = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri())
        pages.append((page, errors, requests, path.as_uri()))
        return page

    yield _open
    for page, errors, requests, url in pages:
        assert errors == [], errors
        assert {r for r in requests if not r.startswith("blob:")} <= {url}, requests  # (blob: = an export)
        page.close()


def _bars(page) -> dict[int, float]:
    """{key index: value} as the page states them in its bars' data-* attributes."""
    pairs = page.eval_on_selector_all(
        "#bars .bar[data-key]", "els => els.map(e => [Number(e.dataset.key), Number(e.dataset.value)])")
    return {k: v for k, v in pairs}


def _assert_row(page, expected, *, shift: int = 0, keys=None):
    """The bars equal ``expected`` (a tensor over keys); ``shift`` maps page keys to the expected index
    (1 when the sink is dropped: page key j is key j-1 of ``without_sink()``)."""
    got = _bars(page)
    want = {j + shift: float(v) for j, v in enumerate(expected)}
    if keys is None:
        assert sorted(got) == sorted(want)
    else:
        assert set(got) == set(keys)
    for j, v in got.items():
        assert abs(v - want[j]) <= TOL, (j, v, want[j])


def test_bars_match_the_record(open_page, make_record):
    tokens = ["<s>", "He", " sat", " on", " the", " river", "'s", " bank"]
    words = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 7), (7, 8)]
    rec = make_record(3, 4, tokens, words=words, seed=7)
    page = open_page(explorer_html(rec, title="bank"))
    page.click('#tokens [data-q="5"]')
    _assert_row(page, rec.row(5))
    page.select_option("#layer", "1")
    page.select_option("#head", "2")
    _assert_row(page, rec.row(5, rec.layers[1], rec.heads[2]))
    page.select_option("#head", "-1")
    _assert_row(page, rec.row(5, rec.layers[1], None))
    page.click('#tokens [data-q="7"]')
    _assert_row(page, rec.row(7, rec.layers[1], None))
    page.select_option("#layer", "-1")
    page.select_option("#head", "3")
    _assert_row(page, rec.row(7, None, rec.heads[3]))
    assert "head 4" in page.inner_text("#caption")


def test_word_view_and_sink(open_page, make_record):
    tokens = ["<s>", "He", " sat", " on", " the", " river", "'s", " bank"]
    words = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 7), (7, 8)]
    rec = make_record(2, 3, tokens, words=words, seed=11)
    page = open_page(explorer_html(rec))
    page.check("#words")
    page.click('#tokens [data-word="5"]')  # "river's": mean over its two pieces
    _assert_row(page, rec.word_row(5))
    page.select_option("#layer", "0")
    page.select_option("#head", "1")
    _assert_row(page, rec.word_row(5, rec.layers[0], rec.heads[1]))
    page.check("#nosink")
    _assert_row(page, rec.without_sink().word_row(5, rec.layers[0], rec.heads[1]))
    page.select_option("#head", "-1")
    _assert_row(page, rec.without_sink().word_row(5, rec.layers[0], None))
    page.uncheck("#words")  # back to tokens: the word's first piece stays selected
    _assert_row(page, rec.without_sink().row(5, rec.layers[0], None), shift=1)
    page.select_option("#layer", "-1")
    _assert_row(page, rec.without_sink().row(5), shift=1)


def test_views_select_layer_and_head(open_page, make_record):
    rec = make_record(2, 3, [f"t{i}" for i in range(6)], seed=2)
    page = open_page(explorer_html(rec))
    page.click('#tokens [data-q="4"]')
    assert page.locator("#headview canvas").count() == 3
    assert page.locator("#modelview td canvas").count() == 6
    page.locator("#modelview td").nth(4).click()  # layer index 1, head index 1
    assert page.input_value("#layer") == "1" and page.input_value("#head") == "1"
    _assert_row(page, rec.row(4, rec.layers[1], rec.heads[1]))
    page.locator("#headview figure").nth(2).click()
    assert page.input_value("#head") == "2"
    _assert_row(page, rec.row(4, rec.layers[1], rec.heads[2]))


def test_top_k_page(open_page, make_record, monkeypatch):
    """Forced into top-k with truncated queries: the bars are the record's values at the embedded keys
    (the first key and the k largest others), the means are exact, and the page says what it left out."""
    monkeypatch.setattr(render_html, "BUDGET_BYTES", 20_000)
    rec = make_record(1, 2, [f"t{i}" for i in range(60)], causal=False, seed=5)
    page = open_page(explorer_html(rec, query=20))
    k = render_html.MIN_TOP_K
    assert "largest weights" in page.inner_text("#notice") and "captured query rows" in page.inner_text("#notice")
    page.click('#tokens [data-q="20"]')
    page.select_option("#head", "1")
    row = rec.row(20, rec.layers[0], rec.heads[1])
    top = {0} | {int(j) + 1 for j in row[1:].topk(k).indices}
    _assert_row(page, row, keys=top)
    rest = float(page.get_attribute("#bars .bar.rest", "data-rest"))
    assert abs(rest - (1 - sum(float(row[j]) for j in top))) < 1e-5
    page.select_option("#head", "-1")
    mean = rec.row(20)
    _assert_row(page, mean, keys={0} | {int(j) + 1 for j in mean[1:].topk(k).indices})
    page.check("#nosink")
    mean_on = rec.without_sink().row(20)
    _assert_row(page, mean_on, shift=1, keys={int(j) + 1 for j in mean_on.topk(k).indices})
    assert not page.locator('#tokens [data-q="59"]').count()  # not embedded: not clickable
    assert page.locator('#tokens .tok').count() == 60


def test_tokens_never_run(open_page, make_record, hostile_strings):
    payloads = ['<img src=x onerror="window.__pwned=1">', "</script><script>window.__pwned=2</script>",
                "<svg onload=window.__pwned=3>", "javascript:window.__pwned=4"]
    tokens = payloads + hostile_strings
    rec = make_record(1, 2, tokens, seed=1)
    page = open_page(explorer_html(rec, title=payloads[1]))
    assert page.evaluate("typeof window.__pwned") == "undefined"
    for q in range(len(tokens)):
        page.click(f'#tokens [data-q="{q}"]')
    page.check("#words")
    page.click('#tokens [data-word="0"]')
    page.check("#nosink")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("img, svg, iframe, object, embed").count() == 0
    assert page.title() == payloads[1]
    page.uncheck("#words")
    texts = page.eval_on_selector_all("#tokens .tok", "els => els.map(e => e.textContent)")
    assert texts[:2] == payloads[:2]


def test_cross_attention_page(open_page):
    """An encoder–decoder's record: output tokens are the clickable queries, input tokens the bars."""
    import torch

    from qkv.explain.record import AttentionRecord

    src, out = list("Nov 23, 2026") + ["<eos>"], list("2026-11-23") + ["<eos>"]
    g = torch.Generator().manual_seed(5)
    w = torch.softmax(torch.randn(2, 3, len(out), len(src), generator=g) * 3, -1)
    rec = AttentionRecord(w, out, src, list(range(len(out))), [0, 1], [0, 1, 2], kind="cross", model="date")
    page = open_page(explorer_html(rec, title="cross", query=3))
    page.click('#tokens [data-q="8"]')  # the output's second-to-last digit
    _assert_row(page, rec.row(8))
    page.select_option("#layer", "1")
    page.select_option("#head", "2")
    _assert_row(page, rec.row(8, 1, 2))
    assert "cross" in page.inner_text("body") and "Output — click a token" in page.inner_text("body")
    assert page.is_disabled("#nosink")  # no attention sink to drop between two sequences
    labels = page.eval_on_selector_all("#bars .bar[data-key] .label", "els => els.map(e => e.textContent)")
    assert len(labels) == len(src) and labels[0] == "N"


def test_measure_selector_shows_the_record_measures(open_page, smollm2):
    """Every measure of a real capture, per layer, per head and whole-model, equals the record's views; the
    sink is marked; a prediction measure on another token says where it applies."""
    from qkv.explain.capture import capture

    rec = capture(smollm2, "He sat on the river's bank", measures=["norms", "mixing", "rollout", "logit"])
    page = open_page(explorer_html(rec, title="bank", query=6, measure="norms"))
    assert page.input_value("#measure") == "norms"
    assert "Attention sink" in page.inner_text("#sinknote")
    _assert_row(page, rec.row(6, measure="norms"))
    assert "sink" in page.eval_on_selector('#bars .bar[data-key="0"] .label', "e => e.textContent")
    for measure in ("norms", "mixing", "rollout", "logit", "weights"):
        page.select_option("#measure", measure)
        page.select_option("#layer", "-1")
        page.select_option("#head", "-1")
        _assert_row(page, rec.row(6, measure=measure))
        page.select_option("#layer", "29")
        _assert_row(page, rec.row(6, 29, measure=measure))
        if measure in ("norms", "weights"):
            page.select_option("#head", "4")
            _assert_row(page, rec.row(6, 29, 4, measure=measure))
            page.select_option("#layer", "-1")
            _assert_row(page, rec.row(6, None, 4, measure=measure))
    page.select_option("#measure", "mixing")
    page.select_option("#layer", "-1")
    page.select_option("#head", "-1")
    page.check("#nosink")
    _assert_row(page, rec.without_sink().row(6, measure="mixing"), shift=1)
    page.select_option("#measure", "logit")
    page.click('#tokens [data-q="3"]')
    assert "explains the prediction made at position 6 only" in page.inner_text("#bars")


def test_exports_carry_the_bars_shown(open_page, make_record):
    import xml.etree.ElementTree as ET

    tokens = ["<s>", "He", " sat", " on", " the", " river", "'s", ' "bank",']
    rec = make_record(2, 3, tokens, seed=3)
    page = open_page(explorer_html(rec, title="exports"))
    page.click('#tokens [data-q="6"]')
    bars = _bars(page)
    with page.expect_download() as d:
        page.click("#csv")
    import csv

    rows = list(csv.reader(open(d.value.path(), encoding="utf-8")))
    assert rows[0] == ["key", "value"] and [r[0] for r in rows[1:]] == tokens
    assert [float(r[1]) for r in rows[1:]] == [bars[j] for j in range(len(tokens))]
    with page.expect_download() as d:
        page.click("#svg")
    root = ET.parse(d.value.path()).getroot()
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert texts[0] == page.inner_text("#caption") and ' "bank",' in texts
    with page.expect_download() as d:
        page.click("#json")
    data = json.load(open(d.value.path(), encoding="utf-8"))
    assert data["keys"] == tokens and data["values"] == [bars[j] for j in range(len(tokens))]
