"""``qkv info`` — what a model is: architecture, sizes, quantisation, context, tokenizer, chat template.

``--tree``: every component with its shape, parameters and bytes (file and runtime dtypes) and the
architecture diagram with this model's numbers (qkv.explain.anatomy). ``--hardware``: which kernels this
machine runs, with a short measured matmul rate — no model needed (qkv.explain.hardware)."""

from __future__ import annotations

import argparse
import json

from .common import add_model_arguments, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("name", nargs="?", help="model (same as --model)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--tree", action="store_true",
                      help="the architecture as a tree (shapes, parameters, bytes per dtype) and as a diagram")
    view.add_argument("--hardware", action="store_true",
                      help="this machine: CPU flags, PyTorch build and kernels, GPU, a measured matmul rate "
                           "(no model)")
    p.add_argument("--matmul-seconds", type=float, default=0.3, metavar="S",
                   help="with --hardware: time each matmul dtype for about S seconds (default 0.3)")


ARCHITECTURES = {  # config class -> one line on what the model is
    "LlamaConfig": "llama (decoder, RMSNorm, RoPE, grouped-query attention, SwiGLU)",
    "BertConfig": "bert (encoder, post-norm LayerNorm, learned positions, bidirectional attention, GELU)",
}


def describe(loaded) -> dict:
    c = loaded.config
    if not hasattr(c, "num_hidden_layers"):  # a `qkv train` encoder–decoder run: its own config fields
        return _describe_other(loaded)
    tok = loaded.tokenizer
    scaling = getattr(c, "rope_scaling", None)  # encoders have no RoPE fields: shown as "—"
    d = {
        "name": loaded.name, "source": str(loaded.source), "format": loaded.format,
        "architecture": ARCHITECTURES.get(type(c).__name__, type(c).__name__),
        "parameters": loaded.info.get("parameters"), "layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "context": c.max_position_embeddings, "rope_theta": getattr(c, "rope_theta", None),
        "rope_scaling": None if scaling is None else vars(scaling),
        "tied_embeddings": getattr(c, "tie_word_embeddings", None), "vocab_size": c.vocab_size,
        "tensor_types": loaded.info.get("tensor_types"), "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device), "load_seconds": loaded.info.get("load_seconds"),
        "tokenizer": {"vocab_size": tok.vocab_size, "bos": _tok(tok, tok.bos_id),
                      "eos": [_tok(tok, i) for i in tok.eos_ids]},
        "chat_template": None,
    }
    if loaded.chat_template is not None:
        src = loaded.chat_template.source
        d["chat_template"] = {"sha256": loaded.chat_template.sha256, "characters": len(src),
                              "first_line": src.strip().splitlines()[0][:100]}
    return d


def _describe_other(loaded) -> dict:
    import dataclasses

    c = loaded.config
    params = {id(p): p for p in loaded.model.parameters()}.values()
    return {"name": loaded.name, "source": str(loaded.source), "format": loaded.format,
            "architecture": type(loaded.model).__name__, "parameters": sum(p.numel() for p in params),
            "config": dataclasses.asdict(c) if dataclasses.is_dataclass(c) else None,
            "checkpoint": loaded.info.get("checkpoint"), "dtype": str(loaded.dtype).replace("torch.", ""),
            "device": str(loaded.device), "load_seconds": loaded.info.get("load_seconds")}


def _tok(tok, i):
    return None if i is None else f"{tok.id_to_token(i)} ({i})"


def run(args: argparse.Namespace) -> int:
    if args.hardware:
        return _hardware(args)
    if args.name:
        args.model = args.name
    if args.tree:
        return _tree(args)
    d = describe(load_model(args))
    if args.format == "json":
        print(json.dumps(d, indent=2, ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for k, v in d.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, list):
            v = ", ".join(map(str, v))
        t.add_row(f"[bold]{k}[/bold]", "—" if v is None else str(v), )
    Console().print(t)
    return 0


def _tree(args: argparse.Namespace) -> int:
    from ..explain.anatomy import anatomy, render_diagram, render_tree

    a = anatomy(load_model(args))
    if args.format == "json":
        print(json.dumps(a.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(render_tree(a))
        print(render_diagram(a), end="")
    return 0


def _hardware(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..explain.hardware import hardware_report, render_hardware

    if args.name:
        raise InputError(f"--hardware describes this machine, not a model: drop {args.name!r} "
                         "(or use --tree for a model's anatomy)")
    if not 0 < args.matmul_seconds <= 60:
        raise InputError(f"--matmul-seconds must be in (0, 60], got {args.matmul_seconds}")
    r = hardware_report(seconds=args.matmul_seconds)
    if args.format == "json":
        print(json.dumps(r, indent=2))
    else:
        print(render_hardware(r), end="")
    return 0
