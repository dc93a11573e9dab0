"""``qkv generate`` — stream a continuation (or a chat reply) to standard output."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from .common import add_model_arguments, add_sampling_arguments, load_model, sampling_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text to continue (with --chat: your message); - reads standard input")
    add_model_arguments(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    p.add_argument("--system", help="a system message (with --chat)")
    p.add_argument("--show-template", action="store_true", help="print the rendered chat prompt and its template hash "
                   "to standard error first")
    p.add_argument("--show-prompt", action="store_true", help="print the prompt the model reads, control tokens "
                   "marked ⟨like this⟩, to standard error first")
    p.add_argument("--html", metavar="FILE", help="also write an HTML explorer of each generated token's attention "
                   "over the prompt and the tokens before it (all layers and heads)")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..generate import generate, prompt_ids

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise InputError("the prompt is empty: give some text")
    loaded = load_model(args)
    ids = prompt_ids(loaded, prompt, chat=args.chat, system=args.system)
    if args.show_template and loaded.chat_template is not None:
        print(f"[template sha256 {loaded.chat_template.sha256[:16]}]", file=sys.stderr)
        print(loaded.tokenizer.decode(ids), file=sys.stderr)
    if args.show_prompt:
        from ..text.inspect import marked_prompt

        print(marked_prompt(loaded.tokenizer, ids), file=sys.stderr, flush=True)
    out = sys.stdout
    if args.html:
        return _generate_with_html(loaded, prompt, args, out)
    for piece in generate(loaded, prompt, ids=ids, **sampling_kwargs(args)):
        out.write(piece.text)
        out.flush()
    out.write("\n")
    return 0


def _generate_with_html(loaded, prompt, args, out) -> int:
    """Stream as usual while recording each new token's attention row; write the explorer at the end."""
    from ..explain.capture import capture_generation
    from ..explain.render_html import explorer_html
    from ..io import write_text

    conversation = [{"role": "system", "content": args.system}] if args.system else []
    source = conversation + [{"role": "user", "content": prompt}] if args.chat else prompt
    record = None
    for piece, rec in capture_generation(loaded, source, **sampling_kwargs(args)):
        if piece is not None:
            out.write(piece.text)
            out.flush()
        record = rec or record
    out.write("\n")
    if record is not None and record.queries:
        write_text(args.html, explorer_html(record, title=f"qkv generate — {loaded.name}"))
    return 0
