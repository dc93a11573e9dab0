"""``qkv rope`` — a model's rotary position embedding: each pair's frequency and wavelength, and how the dot
product of a fixed query and key changes with their distance once both are rotated (terminal, PNG, JSON)."""

from __future__ import annotations

import argparse

from .common import add_model_arguments, emit, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--max-distance", "-n", type=int, default=256, metavar="N",
                   help="relative distances 0..N for the dot product (default 256)")
    p.add_argument("--vectors", choices=["ones", "random"], default="ones",
                   help="the fixed query and key: all ones (default) or a seeded random pair")
    p.add_argument("--seed", type=int, default=0, help="seed of --vectors random (default 0)")
    p.add_argument("--offset", type=int, default=0, metavar="P",
                   help="the key's position; the query sits at P + r (the dot product does not depend on it)")
    p.add_argument("--png", metavar="FILE",
                   help="also draw the frequencies and the dot product as a PNG (FILE or a directory)")
    p.add_argument("--format", choices=["text", "json"], default="text")


def run(args: argparse.Namespace) -> int:
    from ..explain.rope_view import check_options, render_rope, rope_png, rope_view

    check_options(args.max_distance, args.vectors, args.offset)  # before the model loads
    if args.dtype == "auto":
        args.dtype = "float32"  # RoPE needs no decode copies
    loaded = load_model(args)
    view = rope_view(loaded, max_distance=args.max_distance, vectors=args.vectors, seed=args.seed,
                     offset=args.offset)
    return emit(args, view, render_rope, rope_png)
