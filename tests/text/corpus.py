"""Test data: the text the tokenizer tests run on, and gguf-py as the oracle metadata reader.

Each corpus entry says why it is here. Expected ids are never written down: the tests compare with
an oracle (transformers' tokenizer for the same file) or with a round trip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

CORPUS: tuple[str, ...] = (
    "Hello world",  # plain English
    "He sat on the river's bank",  # the course sentence; contraction 's
    "I'm sure they'll say we've done it, didn't we? You'd know. THEY'RE here",  # all contractions, upper case
    "def f(x):\n    return x ** 2  # square\n\tprint(f'{x!r}')\n",  # code, tabs, indentation
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",  # C-like punctuation runs
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1e-9 1,000,000 2024-06-01",  # digit runs
    "x²+y³ = ¼ · ½ ⅔ ①②③ ٣٤٥ ०१२",  # non-ASCII digits (\\p{N}: No, Nd)
    "a  1  22   333",  # whitespace runs before digits (the smollm digit split shows here)
    "spaces   between    words     and\ttabs\t\tand\n\nnewlines\n\n\n",  # whitespace runs
    "   leading and trailing   ",  # edge whitespace
    "\r\nWindows\r\nline endings\r\n",  # CR LF
    "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷",  # emoji, skin tone, ZWJ sequences, flags
    "中文分词测试，日本語のテキスト、한국어 텍스트",  # CJK
    "café naïve résumé Ångström Straße ÆØÅ",  # precomposed accents
    "cafe\u0301 n\u0303 a\u0308\u0304 Z\u0351\u0352\u0357",  # combining marks (NFD)
    "مرحبا بالعالم שלום עולם",  # RTL Arabic and Hebrew
    "\u202eRTL override\u202c and \u200bzero\u200cwidth\u200d",  # bidi and zero-width controls
    "Ünïcödé “quotes” ‘single’ — en–dash … ellipsis",  # typographic punctuation
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",  # markup
    "!!!???...;;;:::---___===+++***&&&%%%$$$###@@@",  # punctuation runs
    "URL https://example.com/a?b=c&d=e#frag e-mail a.b@c.org",  # URLs
    "ALLCAPS camelCase snake_case kebab-case PascalCase",  # casing
    "\x00null\x01\x02\x07bell\x1bescape\x7f",  # control characters the vocabulary has
    "Привет, мир! Γειά σου Κόσμε",  # Cyrillic, Greek
    "ไทย हिन्दी தமிழ் ქართული",  # Thai, Devanagari, Tamil, Georgian
    "<|im_start|> looks special but is text",  # special-token text in user input
    "a" * 300,  # a long run of one letter
    "",  # empty
)


def gguf_metadata(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Metadata as Python values and the stored type of each key, read with gguf-py (the oracle reader).

    Strings are decoded from the raw parts: ``ReaderField.contents()`` is ~50x slower on 100k strings.
    """
    reader = gguf.GGUFReader(str(path))
    metadata: dict[str, Any] = {}
    types: dict[str, str] = {}
    for key, f in reader.fields.items():
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            item = f.types[-1]
            types[key] = f"ARRAY[{item.name}]"
            if item == gguf.GGUFValueType.STRING:
                metadata[key] = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            else:
                metadata[key] = [f.parts[i].tolist()[0] for i in f.data]
        else:
            types[key] = f.types[0].name
            metadata[key] = f.contents()
    return metadata, types
