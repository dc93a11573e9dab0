"""The live explorer's ASGI app (Starlette): a page, its static files, and a small JSON API over qkv.

Why Starlette on uvicorn: an ASGI toolkit with routing, streaming responses and background threads for
blocking work, and nothing more — qkv needs no validation layer (FastAPI's pydantic) for four routes, and
the page talks plain JSON. The app holds no model maths: it calls qkv.load, TextState (one forward, rows
on demand from what it kept) and AttentionRecord.chart, the function `qkv explain` prints from.

API (JSON in, JSON out; errors are ``{"error": "..."}`` with a 4xx status, never a stack trace):
  GET  /api/models                      embedded names and the models in memory
  POST /api/texts  {"text", "model"}    one forward; -> {"id", "tokens", "words", "sinks", "layers", ...}
  GET  /api/texts/{id}/row?query=&measure=&layer=&head=&words=&nosink=&target=&foil=
                                        one query's bars, as `qkv explain --format json` gives them
  GET  /api/texts/{id}/row.csv?...      the same numbers as a CSV download
"""

from __future__ import annotations

import asyncio
import collections
import html
import itertools
import json
import threading
from importlib.resources import files

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import QkvError
from ..explain.measures import DEFINITIONS
from .state import SERVED_MEASURES, TextState

MAX_BODY = 1 << 20  # bytes of a request body: ~8k tokens of text fit many times over
STATIC = {"explorer.css": "text/css", "serve.js": "text/javascript"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Models:
    """At most ``limit`` loaded models, least recently used first out; one forward at a time per model."""

    def __init__(self, default: str, limit: int, dtype: str = "float32"):
        self.default, self.limit, self.dtype = default, limit, dtype
        self.loaded: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.locks: dict[str, asyncio.Lock] = {}
        self.guard = threading.Lock()

    def lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    def get(self, name: str):
        from ..load import load

        with self.guard:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return self.loaded[name]
        model = load(name, dtype=self.dtype, device="cpu")
        with self.guard:
            self.loaded[name] = model
            while len(self.loaded) > self.limit:
                self.loaded.popitem(last=False)
        return model


class Texts:
    """The texts' states, at most ``limit`` (the oldest is dropped first), under short random-free ids."""

    def __init__(self, limit: int):
        self.limit = limit
        self.states: collections.OrderedDict[str, TextState] = collections.OrderedDict()
        self.counter = itertools.count(1)

    def add(self, state: TextState) -> str:
        key = f"t{next(self.counter)}"
        self.states[key] = state
        while len(self.states) > self.limit:
            self.states.popitem(last=False)
        return key

    def get(self, key: str) -> TextState:
        if key not in self.states:
            raise BadRequest(f"text {key!r} is not (or no longer) kept on the server: submit it again", 404)
        return self.states[key]


def make_app(*, model: str = "smollm2", max_models: int = 2, max_texts: int = 4) -> Starlette:
    models, texts = Models(model, max_models), Texts(max_texts)

    async def page(request: Request) -> Response:
        return Response(_page(model), media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            raise BadRequest(f"no static file {name!r}", 404)
        return Response(_web(name), media_type=STATIC[name])

    async def list_models(request: Request) -> Response:
        from ..weights.embedded import embedded_names

        return JSONResponse({"default": model, "embedded": embedded_names(), "loaded": list(models.loaded)})

    async def submit(request: Request) -> Response:
        body = await _json_body(request)
        text, name = body.get("text"), body.get("model") or model
        if not isinstance(text, str) or not isinstance(name, str):
            raise BadRequest('send {"text": "...", "model": "..."} with strings')
        async with models.lock(name):  # one forward at a time per model; the queue is this lock's
            if await request.is_disconnected():
                raise BadRequest("the client went away before its turn", 499)
            loaded = await anyio.to_thread.run_sync(models.get, name)
            state = await anyio.to_thread.run_sync(TextState, loaded, text)
        key = texts.add(state)
        return JSONResponse({"id": key, "model": loaded.name, "tokens": state.tokens, "words": state.spans,
                             "word_labels": _word_labels(state), "layers": state.n_layers, "heads": state.n_heads,
                             "sinks": state.sinks, "measures": {m: DEFINITIONS[m] for m in SERVED_MEASURES},
                             "causal": state.causal, "kept_mib": round(state.nbytes() / 2**20, 1)})

    async def row(request: Request) -> Response:
        return JSONResponse(await anyio.to_thread.run_sync(_row, texts, dict(request.query_params),
                                                           request.path_params["id"]))

    async def row_csv(request: Request) -> Response:
        data = await anyio.to_thread.run_sync(_row, texts, dict(request.query_params), request.path_params["id"])
        lines = ["key,value"] + [f"{_csv(k)},{v!r}" for k, v in zip(data["keys"], data["values"])]
        return Response("\n".join(lines) + "\n", media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="qkv-row.csv"'})

    routes = [Route("/", page), Route("/static/{name}", static), Route("/api/models", list_models),
              Route("/api/texts", submit, methods=["POST"]), Route("/api/texts/{id}/row", row),
              Route("/api/texts/{id}/row.csv", row_csv)]
    app = Starlette(routes=routes, exception_handlers={BadRequest: _bad, QkvError: _user_error,
                                                       Exception: _server_error})
    app.state.models, app.state.texts = models, texts
    return app


async def _json_body(request: Request) -> dict:
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_BODY:
        raise BadRequest(f"the request is {size} bytes; the limit is {MAX_BODY}", 413)
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise BadRequest(f"the request is over the {MAX_BODY}-byte limit", 413)
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _row(texts: Texts, params: dict, key: str) -> dict:
    """One query's bars: the same record and chart as `qkv explain --format json` for that selection."""
    state = texts.get(key)
    query = _int(params, "query")
    layer, head = _int(params, "layer"), _int(params, "head")
    measure = params.get("measure", "norms")
    words, nosink = params.get("words", "1") == "1", params.get("nosink", "0") == "1"
    if query is None:
        raise BadRequest("give ?query=POSITION (a token index)")
    if not 0 <= query < len(state.ids):
        raise BadRequest(f"query {query} is outside the text's {len(state.ids)} tokens (0..{len(state.ids) - 1})")
    for what, value, n in (("layer", layer, state.n_layers), ("head", head, state.n_heads)):
        if value is not None and not 0 <= value < n:
            raise BadRequest(f"{what} {value} is out of range: the model has {n} {what}s, numbered 0..{n - 1}")
    positions = [query]
    if words:  # the clicked token's word: the mean of its pieces' rows, as the CLI's word view
        positions = next(list(range(a, b)) for a, b in state.spans if a <= query < b)
    if measure == "logit":
        positions = positions[-1:]  # the prediction is made at the last piece
    rec = state.record(positions, measures=[measure], target=params.get("target") or None,
                       foil=params.get("foil") or None)
    view = rec.without_sink() if nosink and not rec.sink_removed and len(rec.key_tokens) > 1 else rec
    labels, values, own = view.chart(positions, layer=layer, head=head, words=words, measure=measure)
    out = {"keys": labels, "values": [float(v) for v in values], "own": own, "measure": measure,
           "definition": DEFINITIONS[measure], "sinks": view.sinks, "positions": positions,
           "sink_removed": view.sink_removed}
    if measure == "logit":
        out["logit"] = view.measure("logit").info
    return out


def _int(params: dict, name: str) -> int | None:
    """An integer query parameter, None when absent."""
    raw = params.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}") from None


def _word_labels(state: TextState) -> list[str]:
    return ["".join(state.tokens[a:b]).strip() or "".join(state.tokens[a:b]) for a, b in state.spans]


def _csv(s: str) -> str:
    s = s.replace('"', '""')
    return f'"{s}"' if any(c in s for c in ',"\n\r') or s != s.strip() else s


def _web(name: str) -> str:
    return files("qkv.explain").joinpath("web", name).read_text(encoding="utf-8")


def _page(model: str) -> str:
    return _PAGE.replace("@@MODEL@@", html.escape(model, quote=True))


async def _bad(request: Request, exc: BadRequest) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


async def _user_error(request: Request, exc: QkvError) -> Response:
    return JSONResponse({"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}, status_code=400)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the details"},
                        status_code=500)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>qkv serve</title>
<link rel="stylesheet" href="/static/explorer.css">
</head>
<body data-model="@@MODEL@@">
<header><h1>qkv — live attention explorer</h1><p id="meta"></p><p id="error" class="notice" hidden></p></header>
<section aria-label="input">
 <label>model <input id="model" size="24"></label>
 <textarea id="text" rows="5" cols="100" placeholder="Type or paste a text, up to the model's context"></textarea>
 <button id="go">Run</button>
</section>
<section id="controls" aria-label="view">
 <label>measure <select id="measure"></select></label>
 <label>layer <select id="layer"></select></label>
 <label>head <select id="head"></select></label>
 <label><input type="checkbox" id="words" checked> word view</label>
 <label><input type="checkbox" id="nosink"> drop first token (sink) and renormalise</label>
 <button id="csv">CSV</button> <button id="json">JSON</button> <button id="svg">SVG</button>
</section>
<p id="sinknote" class="notice" hidden></p>
<section aria-label="text"><h2>Text — click a token</h2><div id="tokens"></div></section>
<section aria-label="bars"><h2 id="caption"></h2><p id="definition"></p><div id="bars"></div></section>
<script src="/static/serve.js"></script>
</body>
</html>
"""
