"""Chat templates from hostile model files (issue #16; qkv.text.sandbox): compile and render under limits
checked before allocation, no Python internals printed, every failure a one-line TemplateError in well
under a second (busy loops end at the render deadline). Cases the fuzz campaign found are marked "fuzz:"."""

from __future__ import annotations

import resource
import time
from typing import Any

import pytest

from qkv.errors import TemplateError
from qkv.text.chat import MAX_TEMPLATE_TOKENS, ChatTemplate
from qkv.text.sandbox import DROPPED_FILTERS

USER = {"role": "user", "content": "hi"}


def refused(source: str, match: str, *, messages: list[dict[str, Any]] | None = None, limit_s: float = 1.0) -> str:
    """The template fails with a one-line TemplateError matching ``match``, within ``limit_s`` and without
    growing this process's peak RSS by 256 MiB."""
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(TemplateError, match=match) as info:
        ChatTemplate(source).render(messages or [USER])
    elapsed = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0) / 1024
    msg = str(info.value)
    assert "\n" not in msg and " at 0x" not in msg, msg
    assert elapsed < limit_s, f"{elapsed:.2f} s: {msg}"
    assert grown < 256, f"peak RSS grew {grown:.0f} MB: {msg}"
    return msg


# --- compilation ------------------------------------------------------------------------------------------------

NESTED = {
    "120 nested ifs (IndentationError)": "{% if true %}" * 120 + "x" + "{% endif %}" * 120,
    "30 nested fors (too many statically nested blocks)": "{% for i in [1] %}" * 30 + "x" + "{% endfor %}" * 30,
    "21 nested loops with else": "{% for i in [1] %}" * 21 + "x" + "{% else %}y{% endfor %}" * 21,
    "500 parentheses": "{{ " + "(" * 500 + "1" + ")" * 500 + " }}",
    "300 nested lists": "{{ " + "[" * 300 + "1" + "]" * 300 + " }}",
    "5000 chained filters": "{{ x" + "|trim" * 5000 + " }}",
}


@pytest.mark.parametrize("source", list(NESTED.values()), ids=list(NESTED))
def test_deep_nesting_is_a_template_error(source: str) -> None:
    """Was: Python's SyntaxError / IndentationError escaping from compiling the generated code."""
    refused(source, "nests blocks too deeply|does not compile")


@pytest.mark.parametrize("source", ["{{ x }}" * 40_000, "{%- " * 250_000, "{" * 1_000_000],
                         ids=["40k expressions", "250k block starts", "1M braces"])
def test_too_many_tokens_are_refused_before_parsing(source: str) -> None:
    """Was: a 1 MB template of ``{{ x }}`` compiled for 8 s into 1.2 GB; now counted while lexing."""
    refused(source, f"more than {MAX_TEMPLATE_TOKENS:,} tokens|syntax error")


def test_a_large_template_of_plain_text_still_compiles() -> None:
    text = "Welcome. " * 100_000  # ~900 kB of data: one token
    assert ChatTemplate(text + "{{ messages[0].content }}").render([USER]) == text + "hi"


@pytest.mark.parametrize("name", DROPPED_FILTERS)
def test_superlinear_or_unneeded_filters_are_absent(name: str) -> None:
    """Was: ``urlize`` on crafted text ran super-linear regexes; these filters are not available."""
    refused("{{ ('a' * 3000 + '@')|" + name + " }}", f"No filter named '{name}'")


# --- Python internals never print ---------------------------------------------------------------------------

INTERNALS = [
    "{{ ''.format_map }}", "{{ ''.format }}", "{{ raise_exception }}", "{{ namespace }}", "{{ dict }}",
    "{{ cycler(1, 2) }}", "{{ joiner() }}", "{{ ''.upper|string }}", "{{ [''.upper]|join }}", "{{ ''.upper ~ '' }}",
    "{{ '%s' % ''.upper }}", "{{ '{}'.format(''.upper) }}", "{{ '{0}'.format_map([''.upper]) }}",
    "{{ messages|selectattr('role') }}", "{{ [range] }}", "{{ {'a': ''.upper} }}", "{{ ''|attr('upper') }}",
    "{% for i in [1] %}{{ loop }}{% endfor %}", "{% set ns = namespace(f=''.upper) %}{{ ns.f }}", "{{ ''.upper|e }}", "{{ (1).to_bytes }}",
    "{% macro m() %}{% endmacro %}{{ m }}", "{{ ''.upper|trim }}", "{{ ''.upper|center(10) }}",
]


@pytest.mark.parametrize("source", INTERNALS)
def test_internals_are_never_printed(source: str) -> None:
    """Was: ``{{ ''.format_map }}`` printed ``<function str.format_map at 0x…>`` into the prompt."""
    refused(source, "print Python internals|sandbox forbids|undefined|failed")


def test_plain_data_still_prints_as_transformers_prints_it() -> None:
    t = ChatTemplate("{{ messages[0] }}|{{ [1, 'a', none, true] }}|{{ {'k': [1.5]} }}|{{ x }}|{{ range(3)|list }}")
    assert t.render([USER]) == "{'role': 'user', 'content': 'hi'}|[1, 'a', None, True]|{'k': [1.5]}||[0, 1, 2]"


def test_error_messages_carry_no_addresses() -> None:
    msg = refused("{{ ''.upper() + (1).bit_length }}", "failed")
    assert " at 0x" not in msg


# --- size limits checked before the value is built --------------------------------------------------------------

BOMBS = {
    "batch fill": "{{ [1]|batch(10**9, 'x')|list|length }}",
    "slice count": "{{ [1]|slice(10**8)|list|length }}",
    "%* width": "{{ '%*d'|format(10**9, 1) }}",
    "%.* precision": "{{ '%.*f' % (10**9, 1.0) }}",
    "nested format width": "{{ '{:{}}'.format('x', 10**9) }}",
    "named nested width": "{{ '{:>{w}}'.format('x', w=10**9) }}",
    "string width": "{{ '{0:{1}}'.format(1, '999999999') }}",
    "repeated field": "{% set s = 'x' * 900000 %}{{ '{0}{0}{0}{0}{0}{0}'.format(s) }}",
    "repeated % key": "{% set s = 'x' * 900000 %}{{ '%(a)s%(a)s%(a)s%(a)s%(a)s' % {'a': s} }}",
    "bytes repeat": "{{ 'x'.encode() * 10**9 }}",
    "bytes ljust": "{{ 'x'.encode().ljust(10**9) }}",
    "int to_bytes": "{{ (1).to_bytes(10**9, 'big')|length }}",
    "translate table": "{% set s = 'x' * 100000 %}{{ s.translate({120: 'y' * 100000})|length }}",
    "nested repeat": "{% set a = ['x' * 1000] * 1000 %}{% set b = [a] * 1000 %}{{ b|length }}",
    "doubling tower": "{% set ns = namespace(v='x' * 1000) %}{% for i in range(64) %}{% set ns.v = [ns.v, ns.v] %}"
                      "{% endfor %}{{ ns.v|length }}",
    "macro tower": "{% macro f(n, x) %}{% if n > 0 %}{{ f(n - 1, [x, x]) }}{% else %}{{ x|length }}{% endif %}"
                   "{% endmacro %}{{ f(64, 'x' * 100) }}",
    "tojson indent": "{% set a = [[1] * 3000] * 300 %}{{ a|tojson(indent=60) }}",
    "tojson indent of a scalar": "{{ 9|tojson(indent=10**9) }}",  # fuzz (template): json.dumps makes ' ' * indent
    "block set loop": "{% set b %}{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}"
                      "{% endfor %}{% endset %}{{ b|length }}",
    "filter block loop": "{% filter upper %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                         "{{ 'x' * 100000 }}{% endfor %}{% endfilter %}",
    "macro body loop": "{% macro m() %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endmacro %}"
                       "{{ m()|length }}",
}


@pytest.mark.parametrize("source", list(BOMBS.values()), ids=list(BOMBS))
def test_size_bombs_are_refused_before_they_allocate(source: str) -> None:
    """Was: limits checked after the string/list was built (or not at all for these shapes)."""
    refused(source, "size limit")


def test_summing_lists_is_linear_and_correct() -> None:
    """Python's sum() of lists copies the growing list at every step: quadratic, in one C call."""
    t = ChatTemplate("{{ [[1, 2], [3], []]|sum(start=[0]) }}|{{ [(1,), (2,)]|sum(start=()) }}|{{ [1, 2.5]|sum }}")
    assert t.render([USER]) == "[0, 1, 2, 3]|(1, 2)|3.5"
    start = time.perf_counter()
    many = ChatTemplate("{% set a = [[0] * 100] * 5000 %}{{ (a|sum(start=[]))|length }}").render([USER])
    assert many == "500000" and time.perf_counter() - start < 1.0


def test_empty_output_in_a_loop_is_stopped_by_the_deadline_not_memory() -> None:
    refused("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
            "did not finish", limit_s=3.0)


def test_real_templates_are_unaffected(hf_render: Any) -> None:
    """The checks cost nothing a real template notices: tools, tojson(indent), loops, namespaces."""
    source = ("{%- set ns = namespace(n=0) %}{%- for m in messages %}{%- set ns.n = ns.n + 1 %}"
              "<|{{ m.role }}|>{{ m.content|trim }}{{ '\\n' }}{%- endfor %}"
              "{%- if tools %}{{ tools|tojson(indent=4) }}{%- endif %}{{ ns.n }}{{ '%s-%d' % ('a', 3) }}"
              "{{ '{:>6}'.format('r') }}{{ messages|map(attribute='role')|join(',') }}")
    messages = [{"role": "system", "content": " s "}, USER, {"role": "assistant", "content": "a"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert ChatTemplate(source).render(messages, tools=tools) == hf_render(source, messages, tools=tools)


CRAFTED = {"comment starts": "<!--<" * 60_000, "entity starts": "&#x" * 100_000, "words": "w- (" * 75_000,
           "one letter": "a" * 300_000}


def test_every_filter_is_bounded_on_crafted_text() -> None:
    """No available filter is super-linear on the shapes that break regex-based ones (``urlize`` was): each
    finishes, or refuses typed, within a second on 300,000 characters."""
    from qkv.text.sandbox import make_environment

    names = sorted(make_environment().filters)
    slowest = (0.0, "")
    for name in names:
        for label, text in CRAFTED.items():
            start = time.perf_counter()
            try:
                ChatTemplate("{{ s|" + name + " }}").render([USER], s=text)
            except TemplateError:
                pass
            slowest = max(slowest, (time.perf_counter() - start, f"{name} on {label}"))
    assert slowest[0] < 1.0, slowest
