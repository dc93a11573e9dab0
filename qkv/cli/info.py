"""``qkv info`` — what a model is: architecture, sizes, quantisation, context, tokenizer, chat template."""

from __future__ import annotations

import argparse
import json

from .common import add_model_arguments, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("name", nargs="?", help="model (same as --model)")
    p.add_argument("--format", choices=["text", "json"], default="text")


ARCHITECTURES = {  # config class -> one line on what the model is
    "LlamaConfig": "llama (decoder, RMSNorm, RoPE, grouped-query attention, SwiGLU)",
    "BertConfig": "bert (encoder, post-norm LayerNorm, learned positions, bidirectional attention, GELU)",
}


def describe(loaded) -> dict:
    c = loaded.config
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


def _tok(tok, i):
    return None if i is None else f"{tok.id_to_token(i)} ({i})"


def run(args: argparse.Namespace) -> int:
    if args.name:
        args.model = args.name
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
