"""The live explorer's ASGI app (Starlette): a page, its static files, and a small JSON API over qkv.

Why Starlette on uvicorn: an ASGI toolkit with routing, streaming responses and background threads for
blocking work, and nothing more — qkv needs no validation layer (FastAPI's pydantic) for its few routes, and
the page talks plain JSON. The app holds no model maths: it calls qkv.load, TextState (one forward, rows
on demand from what it kept) and AttentionRecord.chart, the function `qkv explain` prints from.

API (JSON in, JSON out; errors are ``{"error": "..."}`` with a 4xx status, never a stack trace):
  GET  /api/models                      embedded names and the models in memory
  POST /api/texts  {"text", "model"}    one forward; -> {"id", "tokens", "words", "sinks", "layers", ...}
  GET  /api/texts/{id}/row?query=&measure=&layer=&head=&words=&nosink=&target=&foil=
                                        one query's bars, as `qkv explain --format json` gives them
  GET  /api/texts/{id}/row.csv?...      the same numbers as a CSV download
  GET  /api/texts/{id}/row.png?...&top=  the same bars as a PNG figure (a long row: its top keys, in text order)
  GET  /api/texts/{id}/heatmap?layer=&head=&measure=&r0=&r1=&c0=&c1=&cells=
                                        a layer's map over a range of rows x keys, at most cells x cells values,
                                        each the max of a block when the range is larger (zoom = a smaller range)
  GET  /api/texts/{id}/explorer.html?query=&rows=
                                        the offline explorer (head view, model view, every layer and head) for
                                        up to 64 query rows around a token, as a self-contained file
  DELETE /api/texts/{id}                drop a text's state (the page does it when it leaves)
  POST /api/generate {"prompt", "model", "chat", "max_new_tokens", "temperature", "seed"}
                                        server-sent events: "token" per piece, then "done" with an id
  GET  /api/generations/{id}/row?token=&layer=&head=
                                        generated token i's attention at the step that produced it
"""

from __future__ import annotations

import collections
import html
import itertools
import json
import threading
from importlib.resources import files

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import QkvError
from ..explain.measures import DEFINITIONS
from .state import MAX_WHOLE_TOKENS, SERVED_MEASURES, WHOLE_MEASURES, TextState

MAX_BODY = 1 << 20  # bytes of a request body: ~8k tokens of text fit many times over
DRAIN_LIMIT = 16 << 20  # an oversize body up to this is read (and dropped) before the 413; beyond, refused at once
STATIC = {"explorer.css": "text/css", "common.js": "text/javascript", "serve.js": "text/javascript"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; frame-src 'self'; base-uri 'none'; form-action 'none'")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Models:
    """At most ``limit`` loaded models, least recently used first out; one forward (or generation) at a time
    per model: the worker threads queue on the model's lock."""

    def __init__(self, default: str, limit: int, dtype: str = "float32"):
        self.default, self.limit, self.dtype = default, limit, dtype
        self.loaded: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()

    def lock(self, name: str) -> threading.Lock:
        with self.guard:
            return self.locks.setdefault(name, threading.Lock())

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
    """The texts' states (or generations' records), at most ``limit``, the oldest dropped first."""

    def __init__(self, limit: int, prefix: str = "t"):
        self.limit, self.prefix = limit, prefix
        self.states: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.counter = itertools.count(1)
        self.guard = threading.Lock()

    def add(self, state) -> str:
        with self.guard:
            return self._add(state)

    def _add(self, state) -> str:
        key = f"{self.prefix}{next(self.counter)}"
        self.states[key] = state
        evicted = len(self.states) > self.limit
        while len(self.states) > self.limit:
            self.states.popitem(last=False)
        if evicted:
            release_memory()
        return key

    def drop(self, key: str) -> None:
        with self.guard:
            state = self.states.pop(key, None)
        if state is not None:
            del state
            release_memory()

    def get(self, key: str):
        if key not in self.states:
            raise BadRequest(f"{key!r} is not (or no longer) kept on the server: submit it again", 404)
        return self.states[key]


def make_app(*, model: str = "smollm2", max_models: int = 2, max_texts: int = 4) -> Starlette:
    models, texts, generations = Models(model, max_models), Texts(max_texts), Texts(max_texts, prefix="g")

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
        if await request.is_disconnected():
            raise BadRequest("the client went away", 499)

        def forward():
            with models.lock(name):  # one forward at a time per model; waiting threads queue here
                loaded = models.get(name)
                state = TextState(loaded, text, lock=models.lock(name))
            release_memory()  # the forward's transients (GiBs at 8k tokens) go back to the system
            return loaded, state
        loaded, state = await anyio.to_thread.run_sync(forward)
        key = texts.add(state)
        return JSONResponse({"id": key, "model": loaded.name, "tokens": state.tokens, "words": state.spans,
                             "word_labels": _word_labels(state), "layers": state.n_layers, "heads": state.n_heads,
                             "sinks": state.sinks, "measures": {m: DEFINITIONS[m] for m in SERVED_MEASURES
                                                                if m not in WHOLE_MEASURES
                                                                or len(state.ids) <= MAX_WHOLE_TOKENS},
                             "causal": state.causal, "kept_mib": round(state.nbytes() / 2**20, 1)})

    async def drop(request: Request) -> Response:
        texts.get(request.path_params["id"])  # a 404 for an unknown id
        texts.drop(request.path_params["id"])
        return JSONResponse({"dropped": request.path_params["id"]})

    async def row_png(request: Request) -> Response:
        data = await anyio.to_thread.run_sync(_row_png, texts, dict(request.query_params), request.path_params["id"])
        return Response(data, media_type="image/png",
                        headers={"Content-Disposition": 'attachment; filename="qkv-row.png"'})

    async def heat(request: Request) -> Response:
        return JSONResponse(await anyio.to_thread.run_sync(_heatmap, texts, dict(request.query_params),
                                                           request.path_params["id"]))

    async def explorer(request: Request) -> Response:
        page = await anyio.to_thread.run_sync(_explorer, texts, dict(request.query_params), request.path_params["id"])
        inline = request.query_params.get("inline") == "1"  # shown in the page's sandboxed frame
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={} if inline else {"Content-Disposition": 'attachment; filename="qkv-explorer.html"'})

    async def row(request: Request) -> Response:
        return JSONResponse(await anyio.to_thread.run_sync(_row, texts, dict(request.query_params),
                                                           request.path_params["id"]))

    async def row_csv(request: Request) -> Response:
        data = await anyio.to_thread.run_sync(_row, texts, dict(request.query_params), request.path_params["id"])
        lines = ["key,value"] + [f"{_csv(k)},{v!r}" for k, v in zip(data["keys"], data["values"])]
        return Response("\n".join(lines) + "\n", media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="qkv-row.csv"'})

    async def generate(request: Request) -> Response:
        body = await _json_body(request)
        opts = _generation_options(body)
        name = body.get("model") or model
        if not isinstance(name, str):
            raise BadRequest("model must be a string")
        events = _generation_events(models, generations, name, opts)
        first = await anyio.to_thread.run_sync(next, events)  # load errors answer as a 4xx, not a stream
        return StreamingResponse(itertools.chain([first], events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    async def generation_row(request: Request) -> Response:
        return JSONResponse(await anyio.to_thread.run_sync(_generation_row, generations, dict(request.query_params),
                                                           request.path_params["id"]))

    routes = [Route("/", page), Route("/static/{name}", static), Route("/api/models", list_models),
              Route("/api/texts", submit, methods=["POST"]), Route("/api/texts/{id}/row", row),
              Route("/api/texts/{id}/row.csv", row_csv), Route("/api/texts/{id}/row.png", row_png),
              Route("/api/texts/{id}/heatmap", heat), Route("/api/texts/{id}/explorer.html", explorer),
              Route("/api/texts/{id}", drop, methods=["DELETE"]), Route("/api/generate", generate, methods=["POST"]),
              Route("/api/generations/{id}/row", generation_row)]
    app = Starlette(routes=routes, exception_handlers={BadRequest: _bad, QkvError: _user_error,
                                                       Exception: _server_error})
    app.state.models, app.state.texts = models, texts
    return app


def release_memory() -> None:
    """Hand freed memory back to the system. A text's tensors (~1 GiB at 8k tokens) are freed when it is
    dropped, but glibc keeps freed blocks in its per-thread arenas, so without this the server's resident
    size would only ever grow; malloc_trim(0) returns every arena's free pages. Nothing on other C libraries."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def _json_body(request: Request) -> dict:
    try:
        size = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise BadRequest("the Content-Length header is not a number") from None
    if size > MAX_BODY:
        if size <= DRAIN_LIMIT:  # read and drop a modest excess, so that the client sees the answer (closing
            async for _ in request.stream():  # with its body unread would reset the connection under it)
                pass
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
    out = {"keys": labels, "values": values.tolist(), "own": own, "measure": measure,
           "definition": DEFINITIONS[measure], "sinks": view.sinks, "positions": positions,
           "sink_removed": view.sink_removed}
    if measure == "logit":
        out["logit"] = view.measure("logit").info
    return out


PNG_TOP = 40  # bars in a PNG of a long row: the largest keys, kept in text order


def _row_png(texts: Texts, params: dict, key: str) -> bytes:
    from ..explain.render_png import bar_chart_bytes

    data = _row(texts, params, key)
    top = _int(params, "top")
    n = len(data["keys"])
    keep = list(range(n))
    if top is not None or n > PNG_TOP * 3 // 2:
        k = min(n, top or PNG_TOP)
        if k < 1:
            raise BadRequest("top must be at least 1")
        keep = sorted(sorted(range(n), key=lambda i: -abs(data["values"][i]))[:k])
    state = texts.get(key)
    query = "".join(state.tokens[p] for p in data["positions"]).strip()
    where = ", ".join(f"{w} {params[w]}" for w in ("layer", "head") if params.get(w)) or "all layers and heads"
    title = f"{query!r} — {state.loaded.name}, {data['measure']}, {where}" + \
        (f", top {len(keep)} of {n} keys" if len(keep) < n else "")
    return bar_chart_bytes([data["keys"][i] for i in keep], [data["values"][i] for i in keep], title=title)


def _heatmap(texts: Texts, params: dict, key: str) -> dict:
    state = texts.get(key)
    t = len(state.ids)
    layer, head = _int(params, "layer"), _int(params, "head")
    if layer is None or not 0 <= layer < state.n_layers:
        raise BadRequest(f"give ?layer= in 0..{state.n_layers - 1}")
    if head is not None and not 0 <= head < state.n_heads:
        raise BadRequest(f"head {head} is out of range: the model has {state.n_heads} heads, "
                         f"numbered 0..{state.n_heads - 1}")
    get = lambda name, default: default if _int(params, name) is None else _int(params, name)  # noqa: E731
    out = state.heatmap(layer, head, params.get("measure", "weights"), get("r0", 0), get("r1", t), get("c0", 0),
                        get("c1", t), get("cells", 256))
    out.update(layer=layer, head=head, measure=params.get("measure", "weights"))
    return out


EXPLORER_ROWS = 64  # query rows in an explorer file from the server: all layers and heads of each


def _explorer(texts: Texts, params: dict, key: str) -> str:
    from ..explain.render_html import explorer_html

    state = texts.get(key)
    t = len(state.ids)
    query = _int(params, "query")
    query = t - 1 if query is None else query
    n = _int(params, "rows") or 32
    if not 0 <= query < t:
        raise BadRequest(f"query {query} is outside the text's {t} tokens (0..{t - 1})")
    if not 1 <= n <= EXPLORER_ROWS:
        raise BadRequest(f"rows must be in 1..{EXPLORER_ROWS}")
    a = max(0, min(query - n // 2, t - n))
    rows = list(range(a, min(t, a + n)))
    measures = ["weights", "norms"] + (list(WHOLE_MEASURES) if state.whole is not None else [])
    rec = state.record(rows, measures=measures)
    what = f"rows {rows[0]}..{rows[-1]} of {t} tokens" if len(rows) < t else f"all {t} tokens"
    return explorer_html(rec, title=f"qkv serve — {state.loaded.name}, {what}", query=query, measure="norms")


MAX_NEW_TOKENS = 256


def _generation_options(body: dict) -> dict:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("give a prompt: a non-empty string")
    n = body.get("max_new_tokens", 32)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEW_TOKENS:
        raise BadRequest(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {n!r}")
    temperature = body.get("temperature", 0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise BadRequest(f"temperature must be a number, got {temperature!r}")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest(f"seed must be an integer, got {seed!r}")
    return {"prompt": prompt, "chat": bool(body.get("chat", False)), "max_new_tokens": n,
            "temperature": float(temperature), "seed": seed}


def _generation_events(models: Models, generations: Texts, name: str, opts: dict):
    """Server-sent events of one generation: an opening "start", a "token" per piece, then "done" (or an
    "error" line once the stream has begun). The model's lock is held for the whole generation."""
    from ..explain.capture import capture_generation

    def sse(event: str, data: dict) -> str:
        return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    with models.lock(name):
        loaded = models.get(name)
        yield sse("start", {"model": loaded.name})
        prompt = opts["prompt"] if not opts["chat"] else [{"role": "user", "content": opts["prompt"]}]
        try:
            for piece, rec in capture_generation(loaded, prompt, chat=opts["chat"], temperature=opts["temperature"],
                                                 max_new_tokens=opts["max_new_tokens"], seed=opts["seed"]):
                if piece is not None:
                    yield sse("token", {"text": piece.text, "id": piece.token_id})
                else:
                    key = generations.add(rec)
                    first = rec.queries[0] + 1 if rec.queries else len(rec.key_tokens)
                    yield sse("done", {"id": key, "tokens": rec.key_tokens, "first_generated": first,
                                       "roles": rec.key_roles, "layers": len(rec.layers), "heads": len(rec.heads)})
        except QkvError as e:
            yield sse("error", {"error": str(e).splitlines()[0]})


def _generation_row(generations: Texts, params: dict, key: str) -> dict:
    """Generated token i's row: the query that produced it (the position before it), at that step."""
    rec = generations.get(key)
    token = _int(params, "token")
    layer, head = _int(params, "layer"), _int(params, "head")
    if token is None or not 0 <= token < len(rec.queries):
        raise BadRequest(f"give ?token=I for a generated token, 0..{len(rec.queries) - 1}")
    for what, value, n in (("layer", layer, len(rec.layers)), ("head", head, len(rec.heads))):
        if value is not None and not 0 <= value < n:
            raise BadRequest(f"{what} {value} is out of range: the model has {n} {what}s, numbered 0..{n - 1}")
    labels, values, own = rec.chart([rec.queries[token]], layer=layer, head=head, words=False)
    return {"keys": labels, "values": values.tolist(), "own": own, "positions": [rec.queries[token]],
            "measure": "weights", "definition": DEFINITIONS["weights"] + "; row = the query that produced the token",
            "roles": rec.key_roles, "sinks": [], "sink_removed": False}


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
 <button id="png">PNG</button> <button id="html">Offline HTML</button>
</section>
<p id="sinknote" class="notice" hidden></p>
<section aria-label="text"><h2>Text — click a token</h2><div id="tokens"></div></section>
<section aria-label="generate"><h2>Generate — click a generated token to see its attention at the step that
 produced it</h2>
 <input id="prompt" size="60" placeholder="a prompt"> <label><input type="checkbox" id="chat"> chat</label>
 <label>tokens <input id="ntok" type="number" min="1" max="256" value="24"></label> <button id="gen">Generate</button>
 <div id="gentokens"></div></section>
<section aria-label="bars"><h2 id="caption"></h2><p id="definition"></p><div id="bars"></div></section>
<section aria-label="heatmap"><h2>Heatmap — the chosen layer (layer 0 when "all") and head</h2>
 <button id="heatgo">Draw heatmap</button> <button id="heatpng">PNG</button>
 <p id="heatcaption"></p>
 <canvas id="heat" width="1" height="1" style="width:min(90vw,720px);height:min(90vw,720px);image-rendering:pixelated;border:1px solid #cbd5e0"></canvas>
</section>
<section aria-label="head and model views"><h2>Head view and model view — every layer and head around the
 selected token</h2> <button id="views">Show</button>
 <iframe id="viewframe" hidden sandbox="allow-scripts" title="head and model views"
  style="width:100%;height:760px;border:1px solid #e2e8f0"></iframe></section>
<script src="/static/common.js"></script>
<script src="/static/serve.js"></script>
</body>
</html>
"""
