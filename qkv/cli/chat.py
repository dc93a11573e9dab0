"""``qkv chat`` — a multi-turn conversation; interactive on a terminal, one message per line from a pipe."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from .common import add_model_arguments, add_sampling_arguments, load_model, sampling_kwargs

HELP = "commands: /reset forgets the conversation, /exit (or Ctrl-D) quits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", help="a system message for the whole conversation")
    p.add_argument("--show-prompt", action="store_true", help="before each reply, print the whole prompt the model "
                   "reads, control tokens marked ⟨like this⟩, to standard error")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..generate import generate, prompt_ids
    from ..text.inspect import marked_prompt

    loaded = load_model(args)
    if loaded.chat_template is None:
        raise InputError(f"{loaded.name} has no chat template; use `qkv generate` with a plain prompt")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"qkv chat — {loaded.name}. {HELP}", file=sys.stderr)
    history: list[dict] = []
    opts = sampling_kwargs(args)
    n_ctx = loaded.config.max_position_embeddings
    while True:
        line = _read(interactive)
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = _fit(loaded, history, args.system, opts["max_new_tokens"], n_ctx, prompt_ids)
        if args.show_prompt:
            print(marked_prompt(loaded.tokenizer, ids), file=sys.stderr, flush=True)
        reply = []
        for piece in generate(loaded, history, system=args.system, ids=ids, **opts):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            reply.append(piece.text)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})


def _read(interactive: bool) -> str | None:
    try:
        line = input("> ") if interactive else sys.stdin.readline()
    except EOFError:
        return None
    if not interactive and line == "":
        return None
    return line.rstrip("\n")


def _fit(loaded, history: list[dict], system, max_new: int, n_ctx: int, prompt_ids) -> list[int]:
    """Drop the oldest turns until the prompt + the reply budget fit the context window."""
    while True:
        ids = prompt_ids(loaded, history, system=system)
        if len(ids) + max_new <= n_ctx or len(history) <= 1:
            return ids
        del history[:2]
        print("[qkv: dropped the oldest turn to fit the context window]", file=sys.stderr)
