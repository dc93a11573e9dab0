"""The Jinja2 sandbox chat templates run in, with every limit checked before the thing it limits is built.

A chat template comes with the model file, so it is untrusted code (RELIABILITY.md §9.3, SECURITY.md).
It runs in Jinja2's ``ImmutableSandboxedEnvironment`` (jinja2 ≥ 3.1.6: the ``str.format`` escapes
CVE-2024-56326 / CVE-2025-27516 are closed) with transformers' settings and helpers, and on top:

* **Size.** Every value a template holds — a call's or a filter's result, an argument, a namespace
  attribute, a joined buffer — *weighs* at most ``VALUE_FACTOR`` × the output limit, where a value's
  weight is about the length of its printed form, nested containers and shared references included
  (``[[s] * 1000] * 1000`` weighs a million times ``s``). Operations that build a large value in one
  C call are refused from their arguments *before* they run: ``*``, ``+``, ``%``, ``~``, ``str.format``
  (widths from arguments too), ``ljust``/``center``/``zfill``/``expandtabs``/``replace``/``join``/
  ``translate`` (str and bytes), ``int.to_bytes``, and the filters ``center``, ``indent``, ``replace``,
  ``join``, ``format``, ``tojson(indent)``, ``batch(fill)``, ``slice``, ``sum`` (summing lists is made
  linear). Integers are capped at 4096 bits.
* **Time.** Rendering runs in a worker thread with a deadline (qkv.text.chat); every call and filter
  checks the clock. Filters whose worst case is super-linear or that no chat template needs —
  ``urlize`` (regex backtracking on crafted text), ``wordwrap``, ``xmlattr``, ``pprint``,
  ``filesizeformat``, ``urlencode`` — are not available (using one is a compile error naming it).
  Every block's output buffer counts what it holds, so a loop cannot grow one without bound before the
  deadline.
* **No internals.** Only plain data can be printed or turned into text: strings, numbers, booleans,
  None and lists/dicts/tuples of them. Printing or stringifying a function, method, generator or other
  object (``{{ ''.format_map }}``, ``{{ raise_exception }}``, ``x.upper|string``) is an error, so no
  repr — and no memory address — ever reaches a prompt. Unsafe attributes (``''.__class__``) fail
  however they are used.
* **Compilation** is bounded too (qkv.text.chat): template characters, lexer tokens, nesting.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import wraps
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace

MAX_OUTPUT_CHARS = 1_000_000  # ~250k tokens: beyond any context this library runs
VALUE_FACTOR = 4  # a value inside the template may weigh 4x the output limit
MAX_VALUE_DEPTH = 64  # nesting of any value a template holds
MAX_INT_BITS = 4096  # integers a template computes (9**9**9 would take minutes)
DROPPED_FILTERS = ("urlize", "wordwrap", "xmlattr", "pprint", "filesizeformat", "urlencode")
_BIG_WIDTH = re.compile(r"\d{7,}")  # a format width of ≥ 1e6 columns
_BIG_NUMBER = 10**6


# --- outcomes other than text ------------------------------------------------------------------------------


class RenderTimeout(BaseException):
    """Injected into the render thread at the deadline; BaseException so no template code catches it."""


class Raised(Exception):
    """A template called raise_exception(message)."""


class OutputTooLong(Exception):
    """The rendered text passed max_output_chars."""


class LimitError(Exception):
    """An operation inside the template would exceed a size limit (refused before it runs)."""


class Unprintable(Exception):
    """A template tried to print or stringify something that is not plain data."""


# --- the render budget (per worker thread) -----------------------------------------------------------------


@dataclass
class Budget:
    deadline: float
    max_output: int
    # id -> (the object, its weight, the type name of an unprintable part or ""): values are immutable
    # inside the sandbox, and keeping the object keeps its id from being reused during the render
    weights: dict[int, tuple[Any, int, str]] = field(default_factory=dict)


_active = threading.local()


def activate(budget: Budget | None) -> None:
    _active.budget = budget


def _budget() -> Budget | None:
    return getattr(_active, "budget", None)


def check_time() -> None:
    budget = _budget()
    if budget is not None and time.monotonic() > budget.deadline:
        raise RenderTimeout


def max_output() -> int:
    budget = _budget()
    return budget.max_output if budget is not None else MAX_OUTPUT_CHARS


def max_weight() -> int:
    return VALUE_FACTOR * max_output()


# --- weighing values ---------------------------------------------------------------------------------------

_LEAVES = (bool, int, float, type(None))
_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))


def weigh(value: Any) -> tuple[int, str]:
    """(about how many characters ``value`` prints as, the type name of an unprintable part or "").

    Shared references count every time they appear (that is what printing does); each container is
    walked once per render (memoised), and the walk stops once the weight passes the limit.
    """
    budget = _budget()
    memo = budget.weights if budget is not None else {}
    return _weigh(value, memo, 0, max_weight())


def _weigh(value: Any, memo: dict, depth: int, cap: int) -> tuple[int, str]:
    if isinstance(value, str):
        return len(value) + 2, ""
    if isinstance(value, _LEAVES):
        return (value.bit_length() * 3 // 10 + 2 if isinstance(value, int) and not isinstance(value, bool) else 8), ""
    if isinstance(value, jinja2.Undefined):
        return 0, ""
    if isinstance(value, (bytes, bytearray)):
        return 4 * len(value) + 3, ""
    if isinstance(value, range):
        return 32, ""
    if not isinstance(value, (list, tuple, dict, set, frozenset, *_VIEWS)):
        return 64, type(value).__name__
    hit = memo.get(id(value))
    if hit is not None and hit[0] is value:
        return hit[1], hit[2]
    if depth >= MAX_VALUE_DEPTH:
        raise LimitError(f"a value nests more than {MAX_VALUE_DEPTH} levels deep")
    total, bad = 2, ""
    for item in value.items() if isinstance(value, dict) else value:
        w, b = _weigh(item, memo, depth + 1, cap)
        total, bad = total + w + 2, bad or b
        if total > cap:
            return total, bad  # already too heavy: the caller refuses it, no need to walk the rest
    memo[id(value)] = (value, total, bad)
    return total, bad


def check_value(value: Any, what: str) -> Any:
    """A value the template holds: weight within the limit, integers within MAX_INT_BITS."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > MAX_INT_BITS:
            raise LimitError(f"{what} would be an integer of {value.bit_length():,} bits")
        return value
    if isinstance(value, str):
        if len(value) > max_weight():
            raise LimitError(f"{what} would hold {len(value):,} characters, over the limit of {max_weight():,}")
        return value
    w, _ = weigh(value)
    if w > max_weight():
        raise LimitError(f"{what} would weigh about {w:,} characters, over the limit of {max_weight():,}")
    return value


def check_printable(value: Any, what: str) -> Any:
    """A value about to become text: plain data only (no repr of a function or object reaches a prompt)."""
    check_value(value, what)
    if isinstance(value, (str, *_LEAVES)):
        return value
    _, bad = weigh(value)
    if bad:
        raise Unprintable(f"{what}: a {bad} is not text or plain data and cannot be printed")
    return value


def _size(value: Any) -> int:
    """Length for str/bytes (what ``*`` repeats), weight for anything else."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    return weigh(value)[0]


# --- size prechecks: refuse a result before one C call allocates it ------------------------------------------


def _width(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, (str, bytes, bytearray)) and type(old) is type(new) and isinstance(old, (str, bytes))):
        return _size(s)
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _join_size(sep: Any, items: Any) -> int:
    if not isinstance(items, (list, tuple)):
        return 0
    sep_len = len(sep) if isinstance(sep, (str, bytes, bytearray)) else 0
    return sum(_size(x) for x in items) + max(len(items) - 1, 0) * sep_len


def _big_numbers(args: tuple, kwargs: dict) -> bool:
    """Whether an argument could be a huge field width (an int ≥ 1e6, or a string of 7+ digits)."""
    values = (*args, *kwargs.values())
    if len(values) == 1 and isinstance(values[0], (dict, tuple)):
        values = tuple(values[0].values()) if isinstance(values[0], dict) else values[0]
    return any((isinstance(v, int) and abs(v) >= _BIG_NUMBER) or (isinstance(v, str) and _BIG_WIDTH.search(v))
               for v in values)


def _format_size(fmt: Any, args: tuple, kwargs: dict, *, percent: bool) -> int:
    """Upper bound on what ``fmt % args`` / ``fmt.format(*args, **kwargs)`` prints."""
    if not isinstance(fmt, str):
        return 0
    if _BIG_WIDTH.search(fmt):
        raise LimitError("a format string asks for a field width of a million columns or more")
    nested = "*" in fmt if percent else re.search(r"\{[^{}]*\{", fmt) is not None
    if nested and _big_numbers(args, kwargs):
        raise LimitError("a format string takes a field width of a million columns or more from its arguments")
    fields = fmt.count("%" if percent else "{")
    values = (*args, *kwargs.values())
    biggest = max((_size(v) for v in values), default=0)
    return len(fmt) + fields * biggest


def _method_size(method: Any, args: tuple, kwargs: dict) -> int:
    """Size of what a str/bytes/int method would return (0 when it cannot grow)."""
    owner = getattr(method, "__self__", None)
    name = getattr(method, "__name__", "")
    wrapped = getattr(method, "__wrapped__", None)  # jinja's sandboxed str.format wrapper
    if wrapped is not None and isinstance(getattr(wrapped, "__self__", None), str):
        owner, name = wrapped.__self__, wrapped.__name__
    if isinstance(owner, str) and name in ("format", "format_map"):
        for value in (*args, *kwargs.values()):
            check_printable(value, f"str.{name}")
        return _format_size(owner, args, kwargs, percent=False)
    if isinstance(owner, int) and name == "to_bytes":
        return _width(args[0] if args else kwargs.get("length", 1))
    if not isinstance(owner, (str, bytes, bytearray)):
        return 0
    if name in ("ljust", "rjust", "center", "zfill"):
        return _width(args[0] if args else kwargs.get("width"))
    if name == "expandtabs":
        return len(owner) * max(_width(args[0] if args else kwargs.get("tabsize", 8)), 1)
    if name == "replace":
        return _replace_size(owner, *args[:3])
    if name == "join":
        return _join_size(owner, list(args[0]) if args and isinstance(args[0], (list, tuple)) else None)
    if name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        return len(owner) * max(longest, 1)
    return 0


def _json_size(value: Any, indent: Any) -> int:
    """About how long ``json.dumps(value, indent=indent)`` is: each item on its own indented line. Stops
    counting once past the value limit."""
    step = len(indent) if isinstance(indent, str) else _width(indent)
    cap, total = max_weight(), 0
    stack = [(value, 0)]
    while stack and total <= cap:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)) and depth < MAX_VALUE_DEPTH:
            children = list(item.items()) if isinstance(item, dict) else item
            total += 2 + len(children) * (2 + step * (depth + 1))
            stack.extend((child, depth + 1) for child in children)
        else:
            total += _size(item)
    return total


_FILTER_SIZE: dict[str, Callable[..., int]] = {
    "center": lambda value, width=80, *a, **k: _width(width),
    "indent": lambda value, width=4, *a, **k: _size(value) + (str(value).count("\n") + 1) * (
        len(width) if isinstance(width, str) else _width(width)),
    "replace": lambda value, old="", new="", count=None, *a, **k: _replace_size(
        str(value), old, new, -1 if count is None else count),
    "join": lambda value, d="", *a, **k: _join_size(d, value if isinstance(value, (list, tuple)) else None),
    "tojson": lambda value, *a, indent=None, **k: _json_size(value, indent) if indent else 0,
    "batch": lambda value, linecount=1, fill_with=None, *a, **k: max(
        _width(linecount) if fill_with is not None else 0, 5 * len(value) if isinstance(value, str) else 0),
    "slice": lambda value, slices=1, *a, **k: max(8 * _width(slices), 5 * len(value) if isinstance(value, str) else 0),
    "format": lambda value, *args, **kwargs: _format_size(value, args, kwargs, percent=True),
    # a string turned into a list of its characters weighs ~5 per character: refuse it before the work
    **{name: (lambda value, *a, **k: 5 * len(value) if isinstance(value, str) else 0)
       for name in ("list", "sort", "unique")},
}
# filters that turn their arguments into text: only plain data may reach them
_STRINGIFY = frozenset({"string", "join", "format", "center", "indent", "replace", "e", "escape", "forceescape",
                        "trim", "upper", "lower", "title", "capitalize", "wordcount", "truncate", "striptags",
                        "safe", "urlize", "wordwrap"})


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a filter with the time check, argument checks, its size precheck and a check of its result."""
    estimate = _FILTER_SIZE.get(name)
    check = check_printable if name in _STRINGIFY else check_value

    @wraps(func)  # keeps jinja's pass_context/pass_environment marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        check_time()
        skip = len(args) - len(_strip_context(func, args))
        if name == "join" and len(args) > skip and not isinstance(args[skip], (str, list, tuple, dict)):
            args = (*args[:skip], list(args[skip]), *args[skip + 1:])  # a generator's items, to check them
        value_args = args[skip:]
        for value in (*value_args, *kwargs.values()):
            check(value, f"filter {name}")
        if estimate is not None and value_args and estimate(*value_args, **kwargs) > max_weight():
            raise LimitError(f"filter {name} would produce more than {max_weight():,} characters")
        return check_value(func(*args, **kwargs), f"filter {name}")

    return guarded


def _strip_context(func: Callable[..., Any], args: tuple) -> tuple:
    """The filter's own arguments, without the context/environment jinja passes first."""
    return args[1:] if getattr(func, "jinja_pass_arg", None) is not None else args


@jinja2.pass_environment
def _sum(environment: jinja2.Environment, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    """jinja's ``sum``, except that summing lists (or tuples) is linear: Python's ``sum`` copies the
    growing list at every step, which is quadratic in one uninterruptible C call."""
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    items = list(iterable)
    for kind in (list, tuple):
        if isinstance(start, kind) and all(isinstance(x, kind) for x in items):
            check_value([start, *items], "filter sum")
            return kind(x for part in (start, *items) for x in part)
    return sum(items, start)


def guarded_binop(operator: str, left: Any, right: Any) -> Any:
    """``*``, ``**``, ``+``, ``%`` with their result size checked before Python computes it."""
    check_time()
    if operator == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(seq, (str, bytes, bytearray, list, tuple)) and isinstance(n, int) and n > 0 \
                and _size(seq) * n > max_weight():
            raise LimitError(f"'*' would build a value of about {_size(seq) * n:,} characters, over {max_weight():,}")
        if isinstance(left, int) and isinstance(right, int) and \
                left.bit_length() + right.bit_length() > MAX_INT_BITS:
            bits = left.bit_length() + right.bit_length()
            raise LimitError(f"'*' would compute an integer of about {bits:,} bits")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        if right > 0 and left.bit_length() * right > MAX_INT_BITS:
            raise LimitError(f"'**' would compute an integer of about {left.bit_length() * right:,} bits")
    elif operator == "+" and isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
        if _size(left) + _size(right) > max_weight():
            raise LimitError(f"'+' would build {_size(left) + _size(right):,} characters, over {max_weight():,}")
    elif operator == "%" and isinstance(left, (str, bytes)):
        check_printable(right, "'%' formatting")
        args, kwargs = ((), right) if isinstance(right, dict) else (right if isinstance(right, tuple) else (right,), {})
        if _format_size(left if isinstance(left, str) else "", args, kwargs, percent=True) > max_weight():
            raise LimitError(f"'%' formatting would produce more than {max_weight():,} characters")
    return check_value(_BINOPS[operator](left, right), f"'{operator}'")


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "*": lambda a, b: a * b, "**": lambda a, b: a ** b, "+": lambda a, b: a + b, "%": lambda a, b: a % b,
}


def guarded_join(join: Callable[[Any], str]) -> Callable[[Any], str]:
    """The ``~`` operator (jinja compiles it to str_join/markup_join) and every buffer the compiled
    template joins (macro bodies, ``{% set %}`` blocks, ``{% filter %}`` blocks): total checked first."""

    def checked(seq: Any) -> str:
        parts = list(seq)
        for part in parts:
            if not isinstance(part, str):
                check_printable(part, "'~'")
        if sum(_size(p) for p in parts) > max_weight():
            raise LimitError(f"joining text would build a string over {max_weight():,} characters")
        return join(parts)

    return checked


def finalize(value: Any) -> Any:
    """What ``{{ … }}`` prints: plain data only (no function or object repr, no memory address)."""
    return check_printable(value, "printed value")


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
        super().__setitem__(name, check_value(value, f"namespace attribute {name!r}"))


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


class _Buffer(list):
    """The list a compiled template collects a block's output in (macro bodies, ``{% set %}`` and
    ``{% filter %}`` blocks): it refuses to grow past the output limit, counting entries as well as
    characters, so a loop that appends ``''`` or ``'x'`` ten billion times stops early."""

    __slots__ = ("_size",)

    def __init__(self) -> None:
        super().__init__()
        self._size = 0

    def _grow(self, entries: int, chars: int) -> None:
        self._size += entries + chars
        if self._size > max_output():
            raise LimitError(f"a block's output would pass {max_output():,} characters")

    def append(self, item: Any) -> None:
        self._grow(1, len(item) if isinstance(item, str) else 16)
        super().append(item)

    def extend(self, items: Any) -> None:
        items = tuple(items)
        self._grow(len(items), sum(len(i) if isinstance(i, str) else 16 for i in items))
        super().extend(items)


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator, with every output buffer a :class:`_Buffer` instead of a plain list, and no
    constant folding: jinja would evaluate ``{{ ''.upper ~ '' }}`` (a method's repr, with its address)
    or a filter at compile time, outside the render budget and its checks. Only literal text is folded."""

    def buffer(self, frame: Any) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.new_buffer()")

    def _output_child_to_const(self, node: Any, frame: Any, finalize: Any) -> str:
        if not isinstance(node, jinja2.nodes.TemplateData):
            raise jinja2.nodes.Impossible()
        return super()._output_child_to_const(node, frame, finalize)


class Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox with the limit checks wired into every call, the growing operators, every buffer and
    every join."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset(_BINOPS)
    concat = staticmethod(guarded_join("".join))
    new_buffer = staticmethod(_Buffer)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        return guarded_binop(operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        check_time()
        for value in (*args, *kwargs.values()):
            check_value(value, "an argument")
        if _method_size(__obj, args, kwargs) > max_weight():
            raise LimitError(f"{getattr(__obj, '__name__', 'a call')}() would produce more than "
                             f"{max_weight():,} characters")
        result = super().call(__context, __obj, *args, **kwargs)
        return check_value(result, f"{getattr(__obj, '__name__', 'a call')}()")


def _raise_exception(message: Any) -> None:
    raise Raised(str(message))


_MAX_INDENT = 64


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: plain json.dumps, no HTML escaping (so never put it in HTML unescaped).

    The indent is capped: json.dumps builds ``' ' * indent`` before it looks at the value."""
    step = len(indent) if isinstance(indent, str) else _width(indent)
    if step > _MAX_INDENT:
        raise LimitError(f"tojson indent of {step:,} is over {_MAX_INDENT}")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@jinja2.pass_environment
def _sort(env: Any, value: Any, reverse: bool = False, case_sensitive: bool = False, attribute: Any = None) -> list:
    """Jinja's ``sort`` with its case folding done in C for a sequence of strings (Jinja calls a Python key
    function per item: ~3 µs each, a second on a 300,000-character string); the same order, since Jinja's
    key is ``str.lower`` for strings. Anything else goes to Jinja's own filter."""
    if attribute is None and not case_sensitive and isinstance(value, (str, list, tuple)):
        items = list(value)
        if all(type(x) is str for x in items):
            return sorted(items, key=str.lower, reverse=reverse)
    return jinja2.filters.do_sort(env, value, reverse=reverse, case_sensitive=case_sensitive, attribute=attribute)


def _strftime_now(fmt: Any) -> str:
    if not isinstance(fmt, str) or len(fmt) > 200:
        raise LimitError("strftime_now expects a short format string")
    return datetime.now().strftime(fmt)


def make_environment() -> Sandbox:
    env = Sandbox(
        trim_blocks=True, lstrip_blocks=True, autoescape=False, undefined=_Undefined, finalize=finalize,
        extensions=[_Generation, jinja2.ext.loopcontrols], optimized=False,  # no folding: see _CodeGenerator
    )
    env.globals.pop("lipsum", None)  # generates text on demand; no chat template uses it
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_namespace,
        dict=lambda *args, **kwargs: dict(*args, **kwargs),
    )
    env.filters["tojson"] = _tojson
    env.filters["sum"] = _sum
    env.filters["sort"] = _sort
    for name in DROPPED_FILTERS:
        env.filters.pop(name, None)
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    return env
