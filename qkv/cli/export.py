"""``qkv export`` — write a Llama-architecture model (a trained run, a GGUF, an HF dir) as an HF directory or GGUF."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a qkv train run directory (text task), an embedded name, a .gguf or an HF directory")
    p.add_argument("--hf", metavar="DIR", help="write a Hugging Face directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--gguf", metavar="FILE", help="write one GGUF file")
    p.add_argument("--gguf-type", choices=["f32", "f16"], default="f32", help="GGUF tensor type (default f32)")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..load import load
    from ..weights.export import save_gguf, save_hf_dir

    if not args.hf and not args.gguf:
        raise InputError("say where to write: --hf DIR and/or --gguf FILE")
    loaded = load(args.model, dtype="float32", device="cpu")  # a non-Llama model is refused by the writers
    template = loaded.chat_template.source if loaded.chat_template is not None else None
    if args.hf:
        print(f"wrote {save_hf_dir(loaded.model, loaded.tokenizer, args.hf, chat_template=template)}")
    if args.gguf:
        print(f"wrote {save_gguf(loaded.model, loaded.tokenizer, args.gguf, chat_template=template, dtype=args.gguf_type)}")
    return 0
