"""Chat templates: a model's Jinja2 template rendered the way Hugging Face renders it, in a sandbox.

A chat template comes with the model file, so it is untrusted code (RELIABILITY.md §9.3). It runs in
Jinja2's ``ImmutableSandboxedEnvironment`` (jinja2 ≥ 3.1.6, which closes the ``str.format`` escapes
CVE-2024-56326 / CVE-2025-27516), with the settings and helpers of transformers'
``apply_chat_template``: ``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension
(``{% break %}``), a no-op ``{% generation %}`` block, ``tojson`` (no HTML escaping),
``raise_exception`` and ``strftime_now``.

On top of the sandbox (qkv.text.sandbox has the environment and its size checks):

* Unsafe attribute access (``''.__class__``) is an error even when only printed; the stock sandbox
  prints it as an empty string. Only plain data prints: a function, method or object never does.
* Limits: template size (characters and lexer tokens, checked before parsing; nesting too deep for
  Python to compile is a TemplateError too), output size, value sizes, and render time. Rendering runs
  in a worker thread; at the deadline the thread gets an exception injected, so even a loop that calls
  nothing (nested ``range`` loops with an empty body) stops. Operations that could allocate a huge
  value in one C call (``'x' * 10**9``, ``'x'|center(10**9)``, ``a.replace(...)``, ``~`` chains,
  9**9**9) are checked before they run.
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
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.sandbox import SecurityError

from qkv.errors import TemplateError, one_line
from qkv.text.sandbox import (MAX_OUTPUT_CHARS, Budget, LimitError, OutputTooLong, Raised, RenderTimeout, Unprintable,
                              activate, guarded_join, make_environment)

if TYPE_CHECKING:
    from qkv.text.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "MAX_TEMPLATE_CHARS", "MAX_TEMPLATE_TOKENS", "MAX_OUTPUT_CHARS", "TIME_LIMIT_S"]

MAX_TEMPLATE_CHARS = 1_000_000  # real templates are < 50 kB; plain text is cheap to compile
MAX_TEMPLATE_TOKENS = 32_768  # lexer tokens: compiling costs ~15 µs and ~3 kB each (real templates: < 5,000)
TIME_LIMIT_S = 0.75  # real templates render in milliseconds; a refusal stays within 1 s
_GRACE_S = 0.5  # how long an interrupted render may take to unwind
_MAX_DEPTH = 32  # nesting of message data
_MIN_JINJA = (3, 1, 6)
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
        env = make_environment()
        try:
            _count_tokens(env, source, self.name)
            template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template {self.name} has a syntax error at line {exc.lineno}: "
                                f"{one_line(exc.message or '')}; fix: correct the template") from None
        except SyntaxError as exc:  # IndentationError too: Python's limits on the compiled code's nesting
            raise TemplateError(f"chat template {self.name} nests blocks too deeply to compile "
                                f"({one_line(exc.msg or type(exc).__name__)}); fix: flatten the template") from None
        except (LimitError, RecursionError, MemoryError, ValueError, TypeError, OverflowError,
                SystemError) as exc:
            raise TemplateError(f"chat template {self.name} does not compile: "
                                f"{one_line(str(exc) or type(exc).__name__)}; fix: correct the template") from None
        names = template.root_render_func.__globals__  # the compiled module: `~` goes through these
        for join in ("str_join", "markup_join"):
            if join in names:
                names[join] = guarded_join(names[join])
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
        budget = Budget(time.monotonic() + self.time_limit_s, self.max_output_chars)
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

    def _work(self, context: dict[str, Any], budget: Budget, outcome: dict[str, Any]) -> None:
        activate(budget)
        try:
            parts, size = [], 0
            for chunk in self._template.generate(context):
                size += len(chunk)
                if size > budget.max_output:
                    raise OutputTooLong(f"output passed {budget.max_output:,} characters")
                if chunk:
                    parts.append(chunk)
            outcome["text"] = "".join(parts)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller's thread
            outcome["error"] = exc
        finally:
            activate(None)

    def _timeout(self) -> TemplateError:
        return TemplateError(f"chat template {self.name} did not finish within {self.time_limit_s:g} s; "
                             "fix: inspect the template (qkv --show-template) or override it")

    def _error(self, exc: BaseException) -> TemplateError:
        """One line for whatever went wrong inside the template, with its line number when known."""
        if isinstance(exc, RenderTimeout):
            return self._timeout()
        line = _template_line(exc)
        at = f" (line {line})" if line else ""
        if isinstance(exc, Raised):
            return TemplateError(f"chat template {self.name}{at} refused the conversation: {one_line(str(exc))}; "
                                 "fix: change the messages as the message says")
        if isinstance(exc, SecurityError):
            return TemplateError(f"chat template {self.name}{at} tried something the sandbox forbids: "
                                 f"{one_line(str(exc))}; fix: do not use this template (or override it)")
        if isinstance(exc, OutputTooLong):
            return TemplateError(f"chat template {self.name}: rendered {one_line(str(exc))}; fix: shorten the "
                                 "conversation, raise max_output_chars, or inspect the template")
        if isinstance(exc, LimitError):
            return TemplateError(f"chat template {self.name}{at} broke a size limit: {one_line(str(exc))}; "
                                 "fix: inspect the template (qkv --show-template) or override it")
        if isinstance(exc, Unprintable):
            return TemplateError(f"chat template {self.name}{at} tried to print Python internals: "
                                 f"{one_line(str(exc))}; fix: print only message text and plain values")
        if isinstance(exc, MemoryError):
            return TemplateError(f"chat template {self.name}{at} ran out of memory; fix: inspect the template")
        if isinstance(exc, RecursionError):
            return TemplateError(f"chat template {self.name}{at} recursed too deep; fix: inspect the template")
        detail = one_line(str(exc)) or type(exc).__name__
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
    """Raise RenderTimeout inside ``worker`` at its next bytecode (CPython's async exception)."""
    if worker.ident is not None and worker.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(RenderTimeout))


def _assert_no_forged_tokens(tokenizer: Tokenizer, segments: list[tuple[str, bool]]) -> None:
    """User text must never become a special token, however the tokenizer merges it (T7)."""
    for text, parse_special in segments:
        if parse_special:
            continue
        forged = set(tokenizer.encode_segments([(text, False)])) & tokenizer.special_ids
        if forged:
            raise TemplateError(f"user text {text[:40]!r} encodes to special token id {min(forged)}; fix: remove "
                                "that text from the message")


def _count_tokens(env: jinja2.Environment, source: str, name: str) -> None:
    """Refuse a template with more lexer tokens than MAX_TEMPLATE_TOKENS before parsing it: compiling
    costs time and memory per token (a 1 MB template of ``{{ x }}`` takes 8 s and 1.2 GB)."""
    for n, _ in enumerate(env.lex(source), start=1):
        if n > MAX_TEMPLATE_TOKENS:
            raise LimitError(f"it has more than {MAX_TEMPLATE_TOKENS:,} tokens (real chat templates have a few "
                             "thousand)")


def _require_jinja() -> None:
    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < _MIN_JINJA:
        raise TemplateError(f"jinja2 {jinja2.__version__} has known sandbox escapes; fix: pip install 'jinja2>=3.1.6'")
