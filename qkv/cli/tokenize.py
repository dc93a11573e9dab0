"""``qkv tokenize`` — the tokens of a text: ids, vocabulary pieces, bytes, special and byte-fallback tokens.

With ``--chat`` the text goes through the model's chat template as one user message, and the table shows
the whole prompt the model would read: which tokens the template adds, and which of them are special.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the text to tokenize; - reads standard input")
    p.add_argument("--model", "-m", default="smollm2",
                   help="embedded model name (smollm2, minilm), a .gguf file or a Hugging Face directory "
                        "(default smollm2)")
    p.add_argument("--chat", action="store_true",
                   help="tokenize the prompt the model's chat template makes of the text as one user message")
    p.add_argument("--system", help="a system message before it (with --chat)")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text: a table, one row per token; json: the same as structured data")


def run(args: argparse.Namespace) -> int:
    from ..load import load_tokenizer
    from ..text.inspect import inspect_tokens, render_tokens
    from .common import startup_done

    text = sys.stdin.read() if args.text == "-" else args.text
    if not text:
        raise InputError("the text is empty: give some text to tokenize")
    if args.system and not args.chat:
        raise InputError("--system needs --chat")
    name, tokenizer, template = load_tokenizer(args.model)  # no weights: only the tokenizer and template are used
    startup_done()
    if args.chat and template is None:
        raise InputError(f"{name} has no chat template; tokenize the plain text (without --chat)")
    report = inspect_tokens(tokenizer, text, template=template if args.chat else None, chat=args.chat,
                            system=args.system)
    if args.format == "json":
        print(json.dumps({"model": name, **report.to_dict()}, ensure_ascii=False))
    else:
        sys.stdout.write(render_tokens(report, model=name))
    return 0
