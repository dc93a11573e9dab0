"""The ``qkv`` command: one module per subcommand, each with add_arguments(parser) and run(args).

Errors a user can fix (every ``QkvError``) print one line — ``qkv: error: …`` — and exit with 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys

from ..errors import QkvError
from .common import pause_gc, resume_gc

SUBCOMMANDS = {
    "explain": "how much a word attends to each word of a sentence in a real model (bar chart, PNG, HTML)",
    "byhand": "self-attention by hand: every number of one head (or two), exact and approximated",
    "generate": "continue a prompt (or answer one chat message) with a language model, streaming",
    "chat": "a multi-turn conversation with a language model",
    "tokenize": "the tokens of a text: ids, vocabulary pieces, bytes, special tokens; --chat: through the "
                "chat template",
    "next": "the next-token distribution after a text at several temperatures, and what top-k/top-p/min-p keep",
    "info": "architecture, sizes, quantisation, context, tokenizer and chat template of a model",
    "embed": "sentence embeddings from an encoder (minilm) and their cosine similarities",
    "train": "train the 2017 encoder–decoder on a built-in task, or a decoder LM on a text file",
    "eval": "held-out metrics of a training run (exact match, or loss and perplexity)",
    "compile": "build for this machine a model's compiled decode step and the native dequantiser (once; used from then on)",
    "export": "write a Llama-architecture model (e.g. a trained run) as a Hugging Face directory or a GGUF file",
    "serve": "the live attention explorer in the browser: any text, every row on demand, exports",
    "rope": "a model's RoPE: each pair's frequency and wavelength, and q·k against relative distance (text, PNG)",
    "embed-space": "a token's nearest tokens in the input embedding, and its hidden state in a text after layer L "
                   "against the same rows",
    "layers": "what each layer does to one position: stream norms, attention/MLP shares, RMSNorm, gate, logit lens",
    "daemon": "start, stop or ask about a warm background process that runs the quick commands without their "
              "imports of torch (start it once; they find it)",
}


def build_parser(only: str | None = "*") -> argparse.ArgumentParser:
    """The whole parser (``only="*"``), or one whose only complete subcommand is ``only`` (None: none) — the
    others keep their names and help lines. A command imports only its own module: `qkv explain` does not
    pay for the training package's imports (seconds of `torch.distributed`)."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="qkv", description="qkv — run, trust and see the attention mechanism.")
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        if only in ("*", name):
            module = importlib.import_module(f"qkv.cli.{name.replace('-', '_')}")
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)  # options before it are qkv's own


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        code = args._run(args)
        sys.stdout.flush()
        return int(code or 0)
    except QkvError as e:
        print(f"qkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): nothing more to say
        return 0


# Commands whose run() has closed everything it wrote when it returns, and starts no process or server of its
# own: after them the process may skip the interpreter's teardown (see entry()).
QUICK_EXIT = {"explain", "byhand", "generate", "chat", "tokenize", "next", "info", "embed", "eval", "rope",
              "embed-space", "layers"}


def entry() -> None:
    """The ``qkv`` console script and ``python -m qkv``: main(), then exit with its code.

    After the commands of QUICK_EXIT the process leaves through ``os._exit`` once the standard streams and
    logging are flushed, skipping the interpreter's teardown: with torch imported, Python's shutdown walks
    thousands of modules and objects — 0.4–0.55 s measured after every command, a sixth of `qkv explain`.
    Nothing is lost: those commands write their files (PNG, HTML, JSON) with their own closes and renames
    before run() returns. ``QKV_CLEAN_EXIT=1`` keeps the ordinary shutdown; so does every other command
    (train, compile, serve, export: their workers, servers and files finish the usual way).

    A quick command first looks for a running ``qkv daemon`` (qkv/daemon/), which runs it in a fork that has
    torch imported already, and exits with that fork's code; without one, or when it declines, the command
    runs here."""
    argv = sys.argv[1:]
    clean = os.environ.get("QKV_CLEAN_EXIT", "0")
    if clean not in ("0", "1"):
        print(f"qkv: error: QKV_CLEAN_EXIT={clean!r} is not 0 or 1; fix: set one of those or unset it", file=sys.stderr)
        sys.exit(2)
    if _command(argv) in QUICK_EXIT:
        from ..daemon import run_in_daemon

        code = run_in_daemon(argv)  # None: no daemon runs, or it declined; the command runs here
        if code is not None:
            sys.exit(code)
        pause_gc()  # until the model (or tokenizer) is loaded: startup_done; a command that loads none is short
    try:
        code = main(argv)
    except BaseException:  # argparse's exit, an unexpected error: leave the collector as it was
        resume_gc()
        raise
    if _command(argv) not in QUICK_EXIT or clean == "1":
        gc.unfreeze()  # an ordinary shutdown: the frozen start-up objects are the collector's again
        sys.exit(code)
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), or a stream already closed
            pass
    logging.shutdown()
    os._exit(code)
