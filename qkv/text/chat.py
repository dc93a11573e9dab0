"""Chat templates: a model's Jinja2 template rendered the way Hugging Face renders it, in a sandbox.

A chat template comes with the model file, so it is untrusted code (RELIABILITY.md §9.3). It runs in
Jinja2's ``ImmutableSandboxedEnvironment`` (jinja2 ≥ 3.1.6, which closes the ``str.format`` escapes
CVE-2024-56326 / CVE-2025-27516), with the settings and helpers of transformers'
``apply_chat_template``: ``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension
(``{% break %}``), a no-op ``{% generation %}`` block, ``tojson`` (no HTML escaping),
``raise_exception`` and ``strftime_now``.

On top of the sandbox:

* Unsafe attribute access (``''.__class__``) is an error even when only printed; the stock sandbox
  prints it as an empty string.
* Limits: template size, output size and render time. Rendering runs in a worker thread; at the
  deadline the thread gets an exception injected, so even a loop that calls nothing (nested
  ``range`` loops with an empty body) stops. Operations that could allocate a huge value in one C
  call (``'x' * 10**9``, ``'x'|center(10**9)``, ``a.replace(...)``, ``~`` chains, 9**9**9) are
  checked before they run.
* Messages are validated (T8): a list of dicts, each with a non-empty string ``role`` and a
  ``content`` that is a string or a list of ``{"type": "text", "text": str}`` parts (passed to the
  template as-is, as transformers does). ``content`` may be None/absent only beside ``tool_calls``;
  keys whose value is None are dropped (transformers does the same). Everything the template sees
  is rebuilt from plain JSON types.
* :meth:`ChatTemplate.encode` turns a conversation into ids so that special-token text typed by a
  user stays text while the template's own markers are special tokens (T7).

Every failure is a one-line :class:`qkv.errors.TemplateError`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace

from qkv.errors import TemplateError

if TYPE_CHECKING:
    from qkv.text.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "MAX_TEMPLATE_CHARS", "MAX_OUTPUT_CHARS", "TIME_LIMIT_S"]

MAX_TEMPLATE_CHARS = 1_000_000  # real templates are < 20 kB
MAX_OUTPUT_CHARS = 1_000_000  # ~250k tokens: beyond any context this library runs
TIME_LIMIT_S = 2.0  # real templates render in milliseconds
_GRACE_S = 0.5  # how long an interrupted render may take to unwind
_MAX_DEPTH = 32  # nesting of message data
_MAX_INT_BITS = 4096  # integers a template computes (9**9**9 would take minutes)
_BIG_WIDTH = re.compile(r"\d{7,}")  # a format width of ≥ 1e6 columns
_MIN_JINJA = (3, 1, 6)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the render budget (per worker thread) ----------------------------------------------------------------


class _RenderTimeout(BaseException):
    """Injected into the render thread at the deadline; BaseException so no template code catches it."""


class _Raised(Exception):
    """A template called raise_exception(message)."""


class _OutputTooLong(Exception):
    """The rendered text passed max_output_chars."""


class _LimitError(Exception):
    """An operation inside the template would exceed a size limit (refused before it runs)."""


@dataclass
class _Budget:
    deadline: float
    max_output: int


_active = threading.local()


def _budget() -> _Budget | None:
    return getattr(_active, "budget", None)


def _check_time() -> None:
    budget = _budget()
    if budget is not None and time.monotonic() > budget.deadline:
        raise _RenderTimeout


def _max_size() -> int:
    budget = _budget()
    return budget.max_output if budget is not None else MAX_OUTPUT_CHARS


def _check_size(value: Any, what: str) -> Any:
    """A value a template produced may not be bigger than the whole output may be."""
    if isinstance(value, (str, list, tuple, dict)) and len(value) > _max_size():
        raise _LimitError(f"{what} would hold {len(value):,} items, over the limit of {_max_size():,}")
    return value


def _check_int(value: Any, what: str) -> Any:
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _LimitError(f"{what} would be an integer of {value.bit_length():,} bits")
    return value


# --- size prechecks: refuse a result before one C call allocates it ------------------------------------------


def _width(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _replace_size(s: str, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(old, str) and isinstance(new, str)):
        return len(s)
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * (len(new) - len(old))


def _join_size(sep: Any, items: Any) -> int:
    if not isinstance(items, (list, tuple)):
        return 0
    sizes = sum(len(x) if isinstance(x, str) else 16 for x in items)
    return sizes + max(len(items) - 1, 0) * (len(sep) if isinstance(sep, str) else 0)


def _format_string(fmt: Any, what: str) -> None:
    if isinstance(fmt, str) and _BIG_WIDTH.search(fmt):
        raise _LimitError(f"{what} asks for a field width of a million columns or more")


def _method_size(method: Any, args: tuple, kwargs: dict) -> int:
    """Size of what a str method would return (0 when it cannot grow)."""
    owner = getattr(method, "__self__", None)
    name = getattr(method, "__name__", "")
    wrapped = getattr(method, "__wrapped__", None)  # jinja's sandboxed str.format wrapper
    if wrapped is not None and isinstance(getattr(wrapped, "__self__", None), str):
        _format_string(wrapped.__self__, "str.format")
        return len(wrapped.__self__)
    if not isinstance(owner, str):
        return 0
    if name in ("ljust", "rjust", "center", "zfill"):
        return _width(args[0] if args else kwargs.get("width"))
    if name == "expandtabs":
        return len(owner) * max(_width(args[0] if args else kwargs.get("tabsize", 8)), 1)
    if name == "replace":
        return _replace_size(owner, *args[:3])
    if name == "join":
        return _join_size(owner, list(args[0]) if args and isinstance(args[0], (list, tuple)) else None)
    return 0


_FILTER_SIZE: dict[str, Callable[..., int]] = {
    "center": lambda value, width=80, *a, **k: _width(width),
    "indent": lambda value, width=4, *a, **k: (str(value).count("\n") + 1) * (
        _width(width) if not isinstance(width, str) else len(width)),
    "replace": lambda value, old="", new="", count=None, *a, **k: _replace_size(
        str(value), old, new, -1 if count is None else count),
    "join": lambda value, d="", *a, **k: _join_size(d, value if isinstance(value, (list, tuple)) else None),
    "tojson": lambda value, *a, indent=None, **k: _width(indent) * 1000,
}


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a filter with the time check, its size precheck and a size check of its result."""
    estimate = _FILTER_SIZE.get(name)

    @wraps(func)  # keeps jinja's pass_context/pass_environment marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        value_args = _strip_context(func, args)
        if name == "format" and value_args:
            _format_string(value_args[0], "the format filter")
        if estimate is not None and value_args and estimate(*value_args, **kwargs) > _max_size():
            raise _LimitError(f"filter {name} would produce more than {_max_size():,} characters")
        return _check_size(func(*args, **kwargs), f"filter {name}")

    return guarded


def _strip_context(func: Callable[..., Any], args: tuple) -> tuple:
    """The filter's own arguments, without the context/environment jinja passes first."""
    return args[1:] if getattr(func, "jinja_pass_arg", None) is not None else args


def _guarded_binop(operator: str, left: Any, right: Any) -> Any:
    """``*``, ``**``, ``+``, ``%`` with their result size checked before Python computes it."""
    _check_time()
    if operator == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * max(n, 0) > _max_size():
            raise _LimitError(f"'*' would build a sequence of {len(seq) * n:,} items, over {_max_size():,}")
        if isinstance(left, int) and isinstance(right, int) and \
                left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            bits = left.bit_length() + right.bit_length()
            raise _LimitError(f"'*' would compute an integer of about {bits:,} bits")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        if right > 0 and left.bit_length() * right > _MAX_INT_BITS:
            raise _LimitError(f"'**' would compute an integer of about {left.bit_length() * right:,} bits")
    elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        if len(left) + len(right) > _max_size():
            raise _LimitError(f"'+' would build {len(left) + len(right):,} items, over {_max_size():,}")
    elif operator == "%":
        _format_string(left, "'%' formatting")
    return _check_size(_BINOPS[operator](left, right), f"'{operator}'")


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "*": lambda a, b: a * b, "**": lambda a, b: a ** b, "+": lambda a, b: a + b, "%": lambda a, b: a % b,
}


def _guarded_join(join: Callable[[Any], str]) -> Callable[[Any], str]:
    """The ``~`` operator: jinja compiles it to str_join/markup_join; check the total first."""

    def checked(seq: Any) -> str:
        parts = list(seq)
        if sum(len(p) if isinstance(p, str) else 0 for p in parts) > _max_size():
            raise _LimitError(f"'~' would build a string over {_max_size():,} characters")
        return join(parts)

    return checked


# --- the environment ----------------------------------------------------------------------------------------


class _Undefined(jinja2.Undefined):
    """Undefined as transformers has it, except that an unsafe attribute fails however it is used."""

    __slots__ = ()

    def _fail_if_unsafe(self) -> None:
        if self._undefined_exception is SecurityError:
            self._fail_with_undefined_error()

    def __str__(self) -> str:
        self._fail_if_unsafe()
        return super().__str__()

    def __bool__(self) -> bool:
        self._fail_if_unsafe()
        return super().__bool__()

    def __iter__(self) -> Iterator[Any]:
        self._fail_if_unsafe()
        return super().__iter__()

    def __len__(self) -> int:
        self._fail_if_unsafe()
        return super().__len__()

    def __repr__(self) -> str:  # a list of them prints through repr
        self._fail_if_unsafe()
        return super().__repr__()


class _Namespace(Namespace):
    """``namespace()`` that refuses private names and oversized values (its attributes are mutable)."""

    def __setitem__(self, name: str, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} may not start with an underscore")
        _check_size(value, f"namespace attribute {name!r}")
        super().__setitem__(name, _check_int(value, f"namespace attribute {name!r}"))


def _namespace(*args: Any, **kwargs: Any) -> _Namespace:
    for name in dict(*args, **kwargs):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} may not start with an underscore")
    return _Namespace(*args, **kwargs)


class _Generation(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` marks assistant text for training masks; here a no-op."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox with the limit checks wired into every call and the growing operators."""

    intercepted_binops = frozenset(_BINOPS)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        return _guarded_binop(operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_time()
        if _method_size(__obj, args, kwargs) > _max_size():
            raise _LimitError(f"{getattr(__obj, '__name__', 'a call')}() would produce more than "
                                f"{_max_size():,} characters")
        for value in (*args, *kwargs.values()):
            _check_size(value, "an argument")
        result = super().call(__context, __obj, *args, **kwargs)
        return _check_int(_check_size(result, f"{getattr(__obj, '__name__', 'a call')}()"), "a call")


def _raise_exception(message: Any) -> None:
    raise _Raised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: plain json.dumps, no HTML escaping (so never put it in HTML unescaped)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: Any) -> str:
    if not isinstance(fmt, str) or len(fmt) > 200:
        raise _LimitError("strftime_now expects a short format string")
    return datetime.now().strftime(fmt)


def _make_environment() -> _Sandbox:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, autoescape=False, undefined=_Undefined,
        extensions=[_Generation, jinja2.ext.loopcontrols],
    )
    env.globals.pop("lipsum", None)  # generates text on demand; no chat template uses it
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_namespace,
        dict=lambda *args, **kwargs: dict(*args, **kwargs),
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    return env


# --- message data -----------------------------------------------------------------------------------------


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """Rebuild ``value`` from JSON types so the template sees no object with methods of its own."""
    if depth > _MAX_DEPTH:
        raise TemplateError(f"{where} is nested more than {_MAX_DEPTH} levels deep; fix: flatten it")
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TemplateError(f"{where} has a key of type {type(key).__name__}; fix: use string keys")
            out[key] = _plain(item, f"{where}[{key!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise TemplateError(f"{where} is a {type(value).__name__}; fix: pass only str, int, float, bool, None, "
                        "list and dict values to a chat template")


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, (list, tuple)):
        raise TemplateError(f"{where} is a {type(content).__name__}; fix: make it a string or a list of "
                            "{'type': 'text', 'text': ...} parts")
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise TemplateError(f"{where}[{j}] is not a {{'type': 'text', 'text': str}} part; fix: qkv "
                                "passes only text parts to a template")


def _messages(messages: Any) -> list[dict[str, Any]]:
    """Validated, plain copies of the messages (T8)."""
    if not isinstance(messages, (list, tuple)):
        raise TemplateError(f"messages is a {type(messages).__name__}; fix: pass a list of "
                            "{'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise TemplateError(f"{where} is a {type(message).__name__}, not a dict; fix: pass "
                                "{'role': ..., 'content': ...}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise TemplateError(f"{where} has no string 'role'; fix: add e.g. 'role': 'user'")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise TemplateError(f"{where} ({role}) has no 'content'; fix: add the message text as 'content'")
        if content is not None:
            _check_content(content, f"{where}['content']")
        kept = {k: v for k, v in message.items() if v is not None}
        out.append(_plain(kept, where))
    return out


# --- control-token marking (T7) ---------------------------------------------------------------------------

# Unicode noncharacters: reserved for a program's internal use, so they never mean anything in user text.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"


def _mark(value: Any, pattern: re.Pattern[str]) -> Any:
    """Wrap every special-token string inside user-supplied strings in _OPEN … _CLOSE."""
    if isinstance(value, str):
        value = value.replace(_OPEN, "").replace(_CLOSE, "")  # no forged markers
        return pattern.sub(lambda m: _OPEN + m.group() + _CLOSE, value)
    if isinstance(value, dict):  # keys too: a template may print the keys of a user's tool schema
        return {_mark(k, pattern): _mark(v, pattern) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark(v, pattern) for v in value]
    return value


def _segments(rendered: str, pattern: re.Pattern[str]) -> list[tuple[str, bool]]:
    """Split a rendered chat into (text, parse_special) pieces: user-typed tokens stay text.

    A lone marker (the template cut a marked token apart) is dropped but still separates the text
    on its two sides, so they cannot join into a control token.
    """
    splitter = re.compile(f"{_OPEN}({pattern.pattern}){_CLOSE}|[{_OPEN}{_CLOSE}]")
    pieces = splitter.split(rendered)
    segments = [(pieces[0], True)]
    for n, piece in enumerate(pieces[1:], start=1):
        if piece:
            segments.append((piece, n % 2 == 0))
    return segments


# --- the template -----------------------------------------------------------------------------------------


class ChatTemplate:
    """One chat template, compiled once, rendered under limits."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 name: str = "tokenizer.chat_template", max_output_chars: int = MAX_OUTPUT_CHARS,
                 time_limit_s: float = TIME_LIMIT_S) -> None:
        """Compile ``source``; ``name`` says where it came from in error messages."""
        _require_jinja()
        self.name = name
        if not isinstance(source, str):
            raise TemplateError(f"chat template {name} is a {type(source).__name__}, not a string; "
                                "fix: pass the template text")
        if not source.strip():
            raise TemplateError(f"chat template {name} is empty; fix: pass a template or use plain generation")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateError(f"chat template {name} has {len(source):,} characters, over the limit of "
                                f"{MAX_TEMPLATE_CHARS:,}; fix: check where the template comes from")
        self.source = source
        self.sha256 = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
        self.bos_token, self.eos_token = bos_token, eos_token
        if isinstance(max_output_chars, bool) or not isinstance(max_output_chars, int) or max_output_chars < 1:
            raise TemplateError(f"max_output_chars={max_output_chars!r} for {name}; fix: pass a positive int")
        if not isinstance(time_limit_s, (int, float)) or not 0 < time_limit_s <= 600:
            raise TemplateError(f"time_limit_s={time_limit_s!r} for {name}; fix: pass seconds in (0, 600]")
        self.max_output_chars, self.time_limit_s = max_output_chars, float(time_limit_s)
        self._template = self._compile(source)

    def _compile(self, source: str) -> jinja2.Template:
        try:
            template = _make_environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template {self.name} has a syntax error at line {exc.lineno}: "
                                f"{_one_line(exc.message or '')}; fix: correct the template") from None
        except (_LimitError, RecursionError, MemoryError, ValueError, TypeError) as exc:
            raise TemplateError(f"chat template {self.name} does not compile: {_one_line(str(exc))}; "
                                "fix: correct the template") from None
        names = template.root_render_func.__globals__  # the compiled module: `~` goes through these
        for join in ("str_join", "markup_join"):
            if join in names:
                names[join] = _guarded_join(names[join])
        return template

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, **extra: Any) -> str:
        """The conversation as the model's prompt text (what transformers' apply_chat_template renders)."""
        return self._render(self._context(_messages(messages), add_generation_prompt, tools, extra))

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *,
               add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
               **extra: Any) -> list[int]:
        """Token ids of the rendered conversation, with special-token text typed by users kept as text.

        Use this rather than ``tokenizer.encode(render(...), parse_special=True)``, which would turn
        a user's ``<|im_end|>`` into the real control token (T7).
        """
        specials = tokenizer.special_tokens
        if not specials:
            return tokenizer.encode_segments([(self.render(messages, add_generation_prompt=add_generation_prompt,
                                                           tools=tools, **extra), True)])
        pattern = re.compile("|".join(map(re.escape, specials)))
        context = self._context(_messages(messages), add_generation_prompt, tools, extra)
        user_keys = ("messages", "tools", *(k for k in extra if not k.endswith("_token")))  # bos_token: trusted
        context.update({k: _mark(context[k], pattern) for k in user_keys if k in context})
        segments = _segments(self._render(context), pattern)
        ids = tokenizer.encode_segments(segments)
        _assert_no_forged_tokens(tokenizer, segments)
        return ids

    def _context(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                 tools: Sequence[Mapping[str, Any]] | None, extra: Mapping[str, Any]) -> dict[str, Any]:
        if tools is not None and not isinstance(tools, (list, tuple)):
            raise TemplateError(f"tools is a {type(tools).__name__}; fix: pass a list of JSON-schema dicts")
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        context.update({k: _plain(v, k) for k, v in extra.items()})
        context.update(messages=messages, add_generation_prompt=bool(add_generation_prompt),
                       tools=_plain(tools, "tools"))
        return context

    def _render(self, context: dict[str, Any]) -> str:
        """Run the template in a worker thread that is interrupted at the deadline."""
        outcome: dict[str, Any] = {}
        budget = _Budget(time.monotonic() + self.time_limit_s, self.max_output_chars)
        worker = threading.Thread(target=self._work, args=(context, budget, outcome),
                                  name="qkv-chat-template", daemon=True)
        worker.start()
        try:
            worker.join(self.time_limit_s + 0.05)
        except BaseException:  # Ctrl-C while waiting: stop the render too
            _interrupt(worker)
            raise
        if worker.is_alive():
            _interrupt(worker)
            worker.join(_GRACE_S)  # a thread stuck in one C call is abandoned (it is a daemon)
            raise self._timeout()
        if "error" in outcome:
            raise self._error(outcome["error"])
        return outcome["text"]

    def _work(self, context: dict[str, Any], budget: _Budget, outcome: dict[str, Any]) -> None:
        _active.budget = budget
        try:
            parts, size = [], 0
            for chunk in self._template.generate(context):
                size += len(chunk)
                if size > budget.max_output:
                    raise _OutputTooLong(f"output passed {budget.max_output:,} characters")
                parts.append(chunk)
            outcome["text"] = "".join(parts)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller's thread
            outcome["error"] = exc
        finally:
            _active.budget = None

    def _timeout(self) -> TemplateError:
        return TemplateError(f"chat template {self.name} did not finish within {self.time_limit_s:g} s; "
                             "fix: inspect the template (qkv --show-template) or override it")

    def _error(self, exc: BaseException) -> TemplateError:
        """One line for whatever went wrong inside the template, with its line number when known."""
        if isinstance(exc, _RenderTimeout):
            return self._timeout()
        line = _template_line(exc)
        at = f" (line {line})" if line else ""
        if isinstance(exc, _Raised):
            return TemplateError(f"chat template {self.name}{at} refused the conversation: {_one_line(str(exc))}; "
                                 "fix: change the messages as the message says")
        if isinstance(exc, SecurityError):
            return TemplateError(f"chat template {self.name}{at} tried something the sandbox forbids: "
                                 f"{_one_line(str(exc))}; fix: do not use this template (or override it)")
        if isinstance(exc, _OutputTooLong):
            return TemplateError(f"chat template {self.name}: rendered {_one_line(str(exc))}; fix: shorten the "
                                 "conversation, raise max_output_chars, or inspect the template")
        if isinstance(exc, _LimitError):
            return TemplateError(f"chat template {self.name}{at} broke a size limit: {_one_line(str(exc))}; "
                                 "fix: inspect the template (qkv --show-template) or override it")
        if isinstance(exc, RecursionError):
            return TemplateError(f"chat template {self.name}{at} recursed too deep; fix: inspect the template")
        detail = _one_line(str(exc)) or type(exc).__name__
        return TemplateError(f"chat template {self.name}{at} failed: {detail}; fix: check the messages "
                             "against what the template expects, or override the template")

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, sha256={self.sha256[:12]}…)"


def _template_line(exc: BaseException) -> int | None:
    """Line of the template where ``exc`` was raised (jinja rewrites tracebacks to template lines)."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _interrupt(worker: threading.Thread) -> None:
    """Raise _RenderTimeout inside ``worker`` at its next bytecode (CPython's async exception)."""
    if worker.ident is not None and worker.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(_RenderTimeout))


def _assert_no_forged_tokens(tokenizer: Tokenizer, segments: list[tuple[str, bool]]) -> None:
    """User text must never become a special token, however the tokenizer merges it (T7)."""
    for text, parse_special in segments:
        if parse_special:
            continue
        forged = set(tokenizer.encode_segments([(text, False)])) & tokenizer.special_ids
        if forged:
            raise TemplateError(f"user text {text[:40]!r} encodes to special token id {min(forged)}; fix: remove "
                                "that text from the message")


def _require_jinja() -> None:
    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < _MIN_JINJA:
        raise TemplateError(f"jinja2 {jinja2.__version__} has known sandbox escapes; fix: pip install 'jinja2>=3.1.6'")
