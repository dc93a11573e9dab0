"""`qkv serve` against a real uvicorn server on a free loopback port: every row the page gets equals what
`qkv.capture` and `qkv explain --format json` give; bad requests are one-line JSON errors with a 4xx; the
page in headless Chromium shows those numbers and never runs a token as code."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import qkv
from qkv.cli.main import main

TEXT = "He sat on the river's bank"
TOL = 1e-6


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from qkv.serve.app import make_app

    srv = uvicorn.Server(uvicorn.Config(make_app(model="smollm2", max_models=1, max_texts=3), host="127.0.0.1",
                                        port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(30)
    assert not thread.is_alive(), "the server did not stop"


def call(url: str, body: dict | bytes | None = None, *, method: str | None = None,
         raw: bool = False) -> tuple[int, dict | str | bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            got, status, kind = r.read(), r.status, r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        got, status, kind = e.read(), e.code, e.headers.get("content-type", "")
    if raw and status == 200:
        return status, got
    return status, json.loads(got) if kind.startswith("application/json") else got.decode()


def oversize(url: str, body: bytes) -> tuple[int, dict]:
    """POST a body over the limit: the server answers 413 from the headers and may close the connection
    while the client is still sending (a broken pipe here); its answer is read either way."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.putrequest("POST", u.path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    try:
        conn.send(body)
    except (BrokenPipeError, ConnectionResetError):
        pass
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def submit(server, text, model="smollm2") -> dict:
    status, t = call(f"{server}/api/texts", {"text": text, "model": model})
    assert status == 200, t
    return t


def test_rows_equal_capture_for_every_measure(server, smollm2):
    t = submit(server, TEXT)
    assert t["tokens"] == smollm2.tokenizer.token_strings(smollm2.tokenizer.encode(TEXT))
    assert [s["token"] for s in t["sinks"]] == ["He"]
    n = len(t["tokens"])
    for q in (0, n // 2, n - 1):
        for measure in ("weights", "norms"):
            rec = qkv.capture(smollm2, TEXT, queries=[q], measures=[measure])
            for layer, head in ((None, None), (3, None), (None, 2), (29, 8)):
                extra = "".join(f"&{k}={v}" for k, v in (("layer", layer), ("head", head)) if v is not None)
                status, row = call(f"{server}/api/texts/{t['id']}/row?query={q}&measure={measure}&words=0{extra}")
                assert status == 200, row
                want = rec.row(q, layer, head, measure)
                assert torch.allclose(torch.tensor(row["values"]), want, atol=TOL, rtol=0), (q, measure, layer, head)


def test_word_rows_equal_qkv_explain_json(server, capsys):
    t = submit(server, TEXT)
    bank = t["word_labels"].index("bank")
    query = t["words"][bank][0]
    for measure in ("norms", "weights"):
        assert main(["explain", TEXT, "--token", "bank", "--measure", measure, "--format", "json",
                     "--threads", "1"]) == 0
        cli = json.loads(capsys.readouterr().out)
        status, row = call(f"{server}/api/texts/{t['id']}/row?query={query}&measure={measure}")
        assert status == 200 and row["keys"] == cli["keys"]
        assert max(abs(a - b) for a, b in zip(row["values"], cli["measures"][measure]["values"])) <= 1e-6


def test_logit_row_and_csv(server, smollm2):
    text = "The keys to the old cabinet"
    t = submit(server, text)
    last = len(t["tokens"]) - 1
    status, row = call(f"{server}/api/texts/{t['id']}/row?query={last}&measure=logit&words=0&target=%20are"
                       "&foil=%20is")
    assert status == 200, row
    rec = qkv.capture(smollm2, text, measures=["logit"], target=" are", foil=" is")
    assert torch.allclose(torch.tensor(row["values"]), rec.values("logit")[0], atol=1e-4, rtol=1e-5)
    assert abs(row["logit"]["logit_difference"] - rec.measures["logit"].info["logit_difference"]) < 1e-4
    status, csv = call(f"{server}/api/texts/{t['id']}/row.csv?query={last}&measure=logit&words=0&target=%20are"
                       "&foil=%20is")
    lines = csv.strip().splitlines()
    assert lines[0] == "key,value" and len(lines) == len(t["tokens"]) + 1
    assert [float(x.rsplit(",", 1)[1]) for x in lines[1:]] == row["values"]


def long_text(smollm2, n: int) -> str:
    words = ("the river bank was steep and the old man sat on it watching boats drift past slowly " * 800).split()
    return smollm2.tokenizer.decode(smollm2.tokenizer.encode(" ".join(words))[:n])


def test_mixing_and_rollout_rows_and_their_limit(server, smollm2):
    t = submit(server, TEXT)
    rec = qkv.capture(smollm2, TEXT, measures=["mixing", "rollout"], heads=[0])
    for measure in ("mixing", "rollout"):
        for layer in (None, 7):
            extra = "" if layer is None else f"&layer={layer}"
            status, row = call(f"{server}/api/texts/{t['id']}/row?query=6&measure={measure}&words=0{extra}")
            assert status == 200, row
            assert torch.allclose(torch.tensor(row["values"]), rec.row(6, layer, None, measure), atol=TOL, rtol=0)
    long = submit(server, long_text(smollm2, 600))
    assert "mixing" not in long["measures"]
    status, data = call(f"{server}/api/texts/{long['id']}/row?query=1&measure=mixing")
    assert status == 400 and "up to 512 tokens" in data["error"]


def test_heatmap_blocks_equal_the_captured_map(server, smollm2):
    text = long_text(smollm2, 300)
    t = submit(server, text)
    n = len(t["tokens"])
    rec = qkv.capture(smollm2, text, layers=[5], measures=["norms"])
    for head, measure in ((2, "weights"), (None, "weights"), (4, "norms")):
        full = rec.measures["norms"].heads[0, 4] if measure == "norms" else \
            rec.weights[0, head] if head is not None else rec.weights[0].mean(0)  # (T, T)
        extra = f"&head={head}" if head is not None else ""
        status, d = call(f"{server}/api/texts/{t['id']}/heatmap?layer=5&measure={measure}&cells=64{extra}")
        assert status == 200, d
        got = torch.frombuffer(bytearray(base64.b64decode(d["values"])), dtype=torch.float32).view(d["rows"], d["cols"])
        br, bc = d["block"]
        assert (br, bc) == (5, 5) and d["rows"] == d["cols"] == 60  # ceil(300 / 64) = 5: 60 blocks
        want = torch.nn.functional.max_pool2d(full[None], (br, bc), ceil_mode=True)[0]
        assert torch.allclose(got, want, atol=TOL, rtol=0), (head, measure)
        status, d = call(f"{server}/api/texts/{t['id']}/heatmap?layer=5&measure={measure}&r0=100&r1=130&c0=90&c1=140"
                         f"{extra}")  # zoomed in: every cell exact
        got = torch.frombuffer(bytearray(base64.b64decode(d["values"])), dtype=torch.float32).view(30, 50)
        assert d["block"] == [1, 1] and torch.allclose(got, full[100:130, 90:140], atol=TOL, rtol=0)
    for query, match in (("layer=30", "give ?layer="), ("layer=1&r0=5&r1=5", "outside the text"),
                         ("layer=1&measure=logit", "weights or norms"), ("layer=1&head=9", "head 9")):
        status, data = call(f"{server}/api/texts/{t['id']}/heatmap?{query}")
        assert status == 400 and match in data["error"], (query, data)
    assert n == 300


def test_png_explorer_file_and_drop(server, smollm2):
    import io

    import matplotlib.image

    text = long_text(smollm2, 200)
    t = submit(server, text)
    status, png = call(f"{server}/api/texts/{t['id']}/row.png?query=150&measure=norms", raw=True)
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(io.BytesIO(png), format="png").shape[2] in (3, 4)  # it decodes
    status, page = call(f"{server}/api/texts/{t['id']}/explorer.html?query=150&rows=8")
    assert status == 200 and page.startswith("<!DOCTYPE html>")
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(page, "html.parser")
    data = json.loads(soup.find(id="qkv-data").string)
    assert data["queries"] == list(range(146, 154)) and len(data["key_tokens"]) == 200
    assert "Content-Security-Policy" in page and "<script src" not in page  # self-contained
    status, data = call(f"{server}/api/texts/{t['id']}", method="DELETE")
    assert status == 200
    status, data = call(f"{server}/api/texts/{t['id']}/row?query=1")
    assert status == 404 and "submit it again" in data["error"]


@pytest.mark.parametrize("path,body,status,match", [
    ("/api/texts", {"text": "", "model": "smollm2"}, 400, "the text is empty"),
    ("/api/texts", {"text": "word " * 9000, "model": "smollm2"}, 400, "context window is 8192"),
    ("/api/texts", {"text": "hi", "model": "/no/such/model.gguf"}, 400, "/no/such/model.gguf"),
    ("/api/texts", {"text": 5}, 400, 'send {"text"'),
    ("/api/texts", b"not json", 400, "not JSON"),
    ("/api/texts", b"x" * (2 << 20), 413, "limit"),
    ("/api/texts/t999/row?query=0", None, 404, "submit it again"),
])
def test_bad_requests_are_json_errors(server, path, body, status, match):
    got, data = call(server + path, body) if status != 413 else oversize(server + path, body)
    assert got == status and isinstance(data, dict) and match in data["error"], data
    assert "Traceback" not in data["error"] and "\n" not in data["error"]


def test_bad_row_parameters(server):
    t = submit(server, TEXT)
    for query, match in (("query=99", "outside the text"), ("query=x", "integer"), ("", "give ?query"),
                         ("query=1&layer=30", "layer 30 is out of range"),
                         ("query=1&measure=logit", "prediction after the text"),
                         ("query=6&measure=logit&target=%20riverbank", "is not one token")):
        status, data = call(f"{server}/api/texts/{t['id']}/row?{query}")
        assert status == 400 and match in data["error"], (query, data)


def test_cli_refuses_bad_flags(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err


# --- the page in a real browser ---------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` as root, or `apt-get install -y chromium`")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pg = browser.new_page(accept_downloads=True)
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(server + "/")
        yield pg
        browser.close()
        assert errors == [], errors


def _bars(pg) -> list[float]:
    pg.wait_for_selector("#bars .bar")
    return pg.eval_on_selector_all("#bars .bar", "els => els.map(e => Number(e.dataset.value))")


def test_page_types_clicks_and_matches_capture(page, smollm2):
    hostile = '<img src=x onerror="window.__pwned=1"> and </script><script>window.__pwned=2</script>'
    text = TEXT + " " + hostile
    page.fill("#text", text)
    page.click("#go")
    page.wait_for_selector("#tokens .tok")  # (selectors, not wait_for_function: the page's CSP forbids eval)
    n = page.locator("#tokens .tok").count()
    assert n == len(smollm2.tokenizer.encode(text))
    page.uncheck("#words")
    for q in (0, 6, n - 1):
        page.click(f'#tokens .tok[data-q="{q}"]')
        page.wait_for_selector(f'#tokens .tok.sel[data-q="{q}"]')
        got = _bars(page)
        want = qkv.capture(smollm2, text, queries=[q], measures=["norms"]).row(q, measure="norms")
        assert max(abs(a - float(b)) for a, b in zip(got, want)) <= TOL
    page.select_option("#measure", "weights")
    page.wait_for_selector("#caption:has-text('weights')")
    want = qkv.capture(smollm2, text, queries=[n - 1]).row(n - 1)
    assert max(abs(a - float(b)) for a, b in zip(_bars(page), want)) <= TOL
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("#tokens img, #tokens script, #bars img").count() == 0
    assert "Attention sink" in page.inner_text("#sinknote")
    with page.expect_download() as d:
        page.click("#svg")
    svg = open(d.value.path(), encoding="utf-8").read()
    import xml.etree.ElementTree as ET

    root = ET.fromstring(svg)  # parses: every label escaped
    assert root.tag.endswith("svg") and "onerror" not in "".join(root.attrib)


def test_page_shows_server_errors(page):
    page.fill("#text", "")
    page.click("#go")
    page.wait_for_selector("#error:not([hidden])")
    assert "the text is empty" in page.inner_text("#error")


def _events(server, body) -> list[tuple[str, dict]]:
    req = urllib.request.Request(f"{server}/api/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    out = []
    for block in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_generation_streams_and_each_token_row_equals_capture_generation(server, smollm2):
    events = _events(server, {"prompt": "Name a colour.", "chat": True, "max_new_tokens": 5, "temperature": 0})
    kinds = [e for e, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
    done = events[-1][1]
    pieces, record = [], None
    for piece, rec in qkv.capture_generation(smollm2, [{"role": "user", "content": "Name a colour."}], chat=True,
                                             temperature=0, max_new_tokens=5):
        pieces.append(piece) if piece is not None else None
        record = rec or record
    assert "".join(d["text"] for e, d in events if e == "token") == "".join(p.text for p in pieces)
    assert done["tokens"] == record.key_tokens
    for i in range(len(record.queries)):
        status, row = call(f"{server}/api/generations/{done['id']}/row?token={i}&layer=12")
        assert status == 200, row
        assert torch.allclose(torch.tensor(row["values"]), record.row(record.queries[i], 12), atol=TOL, rtol=0)
        assert row["positions"] == [record.queries[i]]
    status, data = call(f"{server}/api/generations/{done['id']}/row?token=99")
    assert status == 400 and "generated token" in data["error"]


@pytest.mark.parametrize("body,match", [
    ({"prompt": ""}, "give a prompt"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens must be an integer in 1..256"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature must be a number"),
    ({"prompt": "hi", "model": "/no/such/model.gguf"}, "/no/such/model.gguf"),
])
def test_bad_generation_requests(server, body, match):
    status, data = call(f"{server}/api/generate", body)
    assert status == 400 and match in data["error"], data


def test_page_streams_a_generation_and_shows_a_generated_token(page, smollm2):
    page.fill("#prompt", "Once upon a time")
    page.fill("#ntok", "4")
    page.click("#gen")
    page.wait_for_selector("#gentokens .tok.gen")
    n = page.locator("#gentokens .tok.gen").count()
    assert 1 <= n <= 4
    page.select_option("#layer", "-1")
    page.select_option("#head", "-1")
    page.click('#gentokens .tok.gen[data-g="1"]' if n > 1 else '#gentokens .tok.gen[data-g="0"]')
    page.wait_for_selector("#gentokens .tok.gen.sel")
    got = _bars(page)
    record = None
    for _, rec in qkv.capture_generation(smollm2, "Once upon a time", temperature=0, max_new_tokens=4):
        record = rec or record
    i = 1 if n > 1 else 0
    want = record.row(record.queries[i])
    assert max(abs(a - float(b)) for a, b in zip(got, want)) <= TOL
    assert "generated" in page.inner_text("#caption")


def test_page_heatmap_zoom_views_and_exports(page, smollm2):
    text = long_text(smollm2, 300)
    page.fill("#text", text)
    page.click("#go")
    page.wait_for_selector("#meta:has-text('300 tokens')")
    page.select_option("#layer", "5")
    page.select_option("#head", "2")
    page.click("#heatgo")
    page.wait_for_selector("#heatcaption:has-text('block of 2 rows')")  # 300 rows in 256 cells: blocks of 2
    page.set_viewport_size({"width": 1280, "height": 1000})
    page.locator("#heat").scroll_into_view_if_needed()
    box = page.locator("#heat").bounding_box()  # (in the viewport, where the mouse can reach it)
    page.mouse.move(box["x"] + box["width"] * 0.30, box["y"] + box["height"] * 0.30)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.45)
    page.mouse.up()
    page.wait_for_selector("#heatcaption:has-text('every cell exact')")  # zoomed in to ~46 x 46 tokens
    caption = page.inner_text("#heatcaption")
    assert "layer 5" in caption and "head 2" in caption
    with page.expect_download() as d:
        page.click("#heatpng")
    assert open(d.value.path(), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with page.expect_download() as d:
        page.click("#png")
    assert open(d.value.path(), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with page.expect_download() as d:
        page.click("#csv")
    lines = open(d.value.path(), encoding="utf-8").read().strip().splitlines()
    assert lines[0] == "key,value" and len(lines) > 10
    with page.expect_download() as d:
        page.click("#html")
    assert 'id="qkv-data"' in open(d.value.path(), encoding="utf-8").read()
    page.click("#views")  # the offline explorer's head and model views, in a sandboxed frame
    frame = page.frame_locator("#viewframe")
    frame.locator("#headview canvas, #modelview canvas").first.wait_for()
    assert frame.locator("#modelview canvas").count() == 30 * 9


def test_page_clicks_first_middle_and_last_token_of_an_8k_text(page, smollm2):
    text = long_text(smollm2, 8192)
    n = len(smollm2.tokenizer.encode(text))
    assert n == 8192
    page.fill("#text", text)
    page.uncheck("#words")
    page.select_option("#measure", "norms") if page.locator("#measure option").count() else None
    page.click("#go")
    page.wait_for_selector("#meta:has-text('8192 tokens')", timeout=240_000)
    page.wait_for_selector("#bars .bar")  # it opens on the last token's row
    page.select_option("#layer", "20")
    mid = 4100
    rec = qkv.capture(smollm2, text, queries=[0, mid, n - 1], layers=[20], measures=["norms"])
    for q in (n - 1, 0, mid):
        page.locator(f'#tokens .block[data-start="{q // 400 * 400}"]').scroll_into_view_if_needed()
        page.click(f'#tokens .tok[data-q="{q}"]')
        page.wait_for_selector(f'#tokens .tok.sel[data-q="{q}"]')
        page.wait_for_selector("#caption:has-text('layer 20')")
        got = _bars(page)
        want = rec.row(q, 20, None, "norms")
        assert len(got) == n and max(abs(a - float(b)) for a, b in zip(got, want)) <= TOL, q
