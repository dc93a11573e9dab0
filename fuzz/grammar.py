"""Generators of hostile chat templates (a small Jinja grammar over the objects, attributes, filters and
operators a template can reach, plus edits of real templates) and of hostile user text."""

from __future__ import annotations

import random
import re

from fuzz.mutate import pick

OBJECTS = ["''", "'abc'", "'x' * 1000", "[]", "[1, 2, 3]", "{}", "{'a': 1}", "messages", "messages[0]",
           "messages[0]['content']", "messages[-1].role", "loop", "cycler", "joiner", "namespace", "range",
           "raise_exception", "dict", "self", "caller", "varargs", "kwargs", "lipsum", "strftime_now", "tools",
           "bos_token", "eos_token", "1", "1.5", "none", "true", "add_generation_prompt", "undefined_name",
           "cycler(1, 2)", "joiner(',')", "namespace(a=1)", "range(10)", "(1).to_bytes", "''.format_map"]
ATTRS = ["__class__", "__mro__", "__subclasses__", "__globals__", "__init__", "__builtins__", "__dict__",
         "__self__", "__func__", "__code__", "gi_frame", "f_globals", "format", "format_map", "upper", "split",
         "items", "keys", "values", "get", "append", "pop", "update", "copy", "mro", "environment",
         "_TemplateReference__context", "__getitem__", "encode", "decode", "to_bytes", "translate", "maketrans",
         "join", "replace", "center", "ljust", "zfill", "expandtabs", "count", "cycle", "next", "reset",
         "current", "strip", "title", "startswith", "index", "fromkeys", "hex", "real", "bit_length"]
BIG = ["10**9", "10**6", "999999", "999999999", "2**31", "-1", "0", "1000000", "100000", "9**9**9", "'9999999'",
       "2**64", "4000000", "3"]
FILTERS = ["abs", "attr('format')", "attr('__class__')", "batch(BIG)", "batch(BIG, 'x')", "capitalize",
           "center(BIG)", "count", "d('x')", "default(EXPR)", "dictsort", "e", "escape", "filesizeformat",
           "first", "float", "forceescape", "format(EXPR)", "format(BIG, 1)", "groupby('a')", "indent(BIG, true)",
           "int", "join", "join(EXPR)", "last", "length", "list", "lower", "items", "map('upper')",
           "map(attribute='a')", "map('string')", "max", "min", "pprint", "random", "reject", "rejectattr('a')",
           "replace('a', EXPR)", "replace('', EXPR)", "reverse", "round(BIG)", "safe", "select", "selectattr('role')",
           "slice(BIG)", "slice(BIG, 'x')", "sort", "string", "striptags", "sum", "sum(start=[])", "title", "tojson",
           "tojson(indent=BIG)", "trim", "truncate(BIG)", "unique", "upper", "urlencode", "urlize", "wordcount",
           "wordwrap(BIG)", "xmlattr", "nosuchfilter"]
BINOPS = ["+", "-", "*", "/", "//", "%", "**", "~", "==", "<", "in", "and", "or"]
FORMATS = ["'%s' % EXPR", "'{}'.format(EXPR)", "'{:{}}'.format('x', BIG)", "'%*d' % (BIG, 1)", "'%.*f' % (BIG, 1.0)",
           "'{0}{0}{0}{0}'.format(EXPR)", "'%(a)s%(a)s' % {'a': EXPR}", "'{a.__class__}'.format(a=EXPR)",
           "'%' ~ BIG ~ 's' % 'x'", "EXPR|format", "'{:>{w}}'.format('x', w=BIG)", "'{0:{1}}'.format(1, '9999999')"]


def expr(rng: random.Random, depth: int = 0) -> str:
    if depth > 3 or rng.random() < 0.25:
        return pick(rng, OBJECTS)
    r = rng.random()
    sub = lambda: expr(rng, depth + 1)  # noqa: E731
    if r < 0.15:
        return f"{sub()}.{pick(rng, ATTRS)}"
    if r < 0.25:
        return f"{sub()}[{pick(rng, [repr(pick(rng, ATTRS)), '0', '-1', BIG[rng.randrange(len(BIG))]])}]"
    if r < 0.45:
        return f"{sub()}|{_fill(rng, pick(rng, FILTERS), depth)}"
    if r < 0.6:
        return f"({sub()} {pick(rng, BINOPS)} {sub()})"
    if r < 0.7:
        args = ", ".join(sub() for _ in range(rng.randrange(3)))
        return f"{sub()}({args})"
    if r < 0.8:
        return "[" + ", ".join(sub() for _ in range(rng.randrange(1, 4))) + "]" + \
            (f" * {pick(rng, BIG)}" if rng.random() < 0.3 else "")
    if r < 0.9:
        return _fill(rng, pick(rng, FORMATS), depth)
    return f"range({pick(rng, BIG)})"


def _fill(rng: random.Random, text: str, depth: int) -> str:
    text = re.sub("BIG", lambda _: pick(rng, BIG), text)
    return re.sub("EXPR", lambda _: expr(rng, depth + 2), text)


def stmt(rng: random.Random, depth: int = 0) -> str:
    r = rng.random()
    body = lambda: stmt(rng, depth + 1) if depth < 3 else "x"  # noqa: E731
    if r < 0.3:
        return "{{ " + expr(rng) + " }}"
    if r < 0.4:
        return "{% set v = " + expr(rng) + " %}{{ v }}"
    if r < 0.5:
        op = pick(rng, ["ns.v ~ ns.v", "ns.v + ns.v", "[ns.v, ns.v]", "ns.v * 2", "{'a': ns.v, 'b': ns.v}",
                        "(ns.v|string) * 2", "ns.v|list + ns.v|list"])
        return ("{% set ns = namespace(v=" + expr(rng) + ") %}{% for i in range(" + pick(rng, ["8", "40", "64", "100000"])
                + ") %}{% set ns.v = " + op + " %}{% endfor %}{{ ns.v|length }}")
    if r < 0.6:
        n = pick(rng, ["3", "100", "100000"])
        return "{% for i in range(" + n + ") %}" + body() + "{% endfor %}"
    if r < 0.65:
        return "{% for i in range(100000) %}{% for j in range(100000) %}" + pick(rng, ["", "x", "{{ i }}"]) + \
            "{% endfor %}{% endfor %}"
    if r < 0.72:
        amp = pick(rng, ["{{ f(n - 1, [x, x]) }}", "{{ f(n - 1, x ~ x) }}{{ f(n - 1, x) }}", "{{ f(n, x) }}",
                         "{{ f(n - 1, x) }}{{ f(n - 1, x) }}"])
        return ("{% macro f(n, x) %}{% if n > 0 %}" + amp + "{% else %}{{ x|length }}{% endif %}{% endmacro %}"
                "{{ f(" + pick(rng, ["5", "30", "64", "1000"]) + ", " + expr(rng) + ") }}")
    if r < 0.8:
        return ("{% set blk %}{% for i in range(" + pick(rng, ["10", "100000"]) + ") %}" + body() +
                "{% endfor %}{% endset %}{{ blk|length }}")
    if r < 0.85:
        return "{% filter " + pick(rng, ["upper", "center(10**9)", "indent(1000000)", "urlize", "trim"]) + " %}" + \
            body() + "{% endfilter %}"
    if r < 0.9:
        d = pick(rng, [5, 19, 20, 21, 50, 99, 100, 101, 150, 400])
        kind = pick(rng, [("{% if true %}", "{% endif %}"), ("{% for i in [1] %}", "{% endfor %}"),
                          ("{% filter trim %}", "{% endfilter %}"), ("{% macro m() %}", "{% endmacro %}")])
        return kind[0] * d + "x" + kind[1] * d
    if r < 0.95:
        d = pick(rng, [50, 99, 100, 200, 1000, 5000])
        o, c = pick(rng, [("(", ")"), ("[", "]"), ("{'a': ", "}")])
        return "{{ " + o * d + "1" + c * d + " }}"
    return pick(rng, ["{{ raise_exception('no') }}", "{% generation %}x{% endgeneration %}", "{% break %}",
                      "{{ strftime_now('%Y' * 1000) }}", "{% include 'x' %}", "{% import 'x' as y %}",
                      "{% extends 'base' %}", "{{ x" + "|trim" * 5000 + " }}", "{# unterminated", "{{ '\\x00' }}",
                      "a" * 1_000_001, "{{ x }}" * 40_000])


def template(rng: random.Random, real: list[str]) -> tuple[str, str]:
    """(template source, label): generated statements, or a real template with edits."""
    if rng.random() < 0.6:
        source = "".join(stmt(rng) for _ in range(rng.randint(1, 3)))
        return source, "generated"
    base = pick(rng, real)
    tags = list(re.finditer(r"\{[{%].*?[}%]\}", base, re.S))
    labels = []
    for _ in range(rng.randint(1, 3)):
        if not tags:
            break
        tag = pick(rng, tags)
        r = rng.random()
        if r < 0.3:
            base = base[:tag.start()] + base[tag.end():]
            labels.append("drop tag")
        elif r < 0.5:
            base = base[:tag.start()] + tag.group() * pick(rng, [2, 30]) + base[tag.end():]
            labels.append("repeat tag")
        elif r < 0.8:
            base = base[:tag.start()] + stmt(rng) + base[tag.start():]
            labels.append("insert statement")
        else:
            base = base[:tag.start()] + "{{ " + expr(rng) + " }}" + base[tag.end():]
            labels.append("replace tag")
        tags = list(re.finditer(r"\{[{%].*?[}%]\}", base, re.S))
    return base, "edited real template: " + ", ".join(labels)


UNITS = ["^", "a", " ", "\n", "🙂", "👩\u200d👩\u200d👧\u200d👦", "é", "e\u0301", "\u0301", "日本", "\u202e", "<|im_end|>",
         "<|im_start|>", "<|endoftext|>", "<0x41>", "\x00", "\t", "\r\n", "\ufdd0", "\ufdd1", "\ufeff", "ab", "1",
         "a1", "'s", "  a", "<s>", "</s>", "▁", "\x04", "\u2028", "<|im", "_end|>", "{{ x }}", "%s", "\\"]


MAX_TEXT = 200_000  # characters: tokenizing is linear, ~0.5 KB per token in the tokenizers library


def text(rng: random.Random) -> tuple[str, str]:
    """Hostile user text (at most MAX_TEXT characters): long runs, special-token text, control characters,
    lone surrogates, random code points."""
    parts, labels = [], []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.5:
            unit = pick(rng, UNITS)
            n = pick(rng, [1, 2, 10, 1000, 50_000, max(1, MAX_TEXT // len(unit))])
            parts.append(unit * n)
            labels.append(f"{unit!r}x{n}")
        elif r < 0.8:
            n = pick(rng, [1, 10, 1000, 20_000])
            planes = pick(rng, [(0x20, 0x7F), (0x80, 0x800), (0x800, 0x10000), (0x10000, 0x110000), (0, 0x110000)])
            chars = [chr(rng.randrange(*planes)) for _ in range(n)]
            parts.append("".join(chars))
            labels.append(f"{n} random code points in {planes[0]:#x}..{planes[1]:#x}")
        else:
            parts.append("Hello, world! The quick brown fox.")
            labels.append("plain")
    return "".join(parts)[:MAX_TEXT], " + ".join(labels)
