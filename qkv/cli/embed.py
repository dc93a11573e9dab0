"""``qkv embed`` — sentence embeddings from an encoder (minilm by default) and their cosine similarities."""

from __future__ import annotations

import argparse
import json

from .common import add_model_arguments, load_model

PREVIEW = 8  # dimensions shown per vector in the text view


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="+", metavar="TEXT", help="one or more sentences to embed")
    add_model_arguments(p, default="minilm")
    p.add_argument("--no-normalize", action="store_true", help="keep the raw pooled vectors (default: unit length)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass (default 32)")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text: the first 8 dimensions and the norm; json: the full vectors")


def run(args: argparse.Namespace) -> int:
    from ..embed import check_sentences, embed

    check_sentences(args.texts)  # before loading the model: a typo costs no load time
    loaded = load_model(args)
    vectors = embed(loaded, args.texts, normalize=not args.no_normalize, batch_size=args.batch_size).cpu()
    cosine = _cosine(vectors) if len(args.texts) > 1 else None
    if args.format == "json":
        print(json.dumps({"model": loaded.name, "dimension": vectors.shape[1], "normalized": not args.no_normalize,
                          "embeddings": [{"text": t, "norm": float(v.norm()), "vector": v.tolist()}
                                         for t, v in zip(args.texts, vectors)],
                          "cosine": None if cosine is None else cosine.tolist()}, ensure_ascii=False))
    else:
        print(_text_view(loaded.name, args.texts, vectors, cosine))
    return 0


def _cosine(vectors):
    import torch.nn.functional as F

    unit = F.normalize(vectors.double(), dim=-1)  # (N, C)
    return unit @ unit.T  # (N, N)


def _text_view(model: str, texts: list[str], vectors, cosine) -> str:
    lines = [f"{model}: {len(texts)} sentence(s), {vectors.shape[1]} dimensions"]
    for i, (t, v) in enumerate(zip(texts, vectors)):
        dims = " ".join(f"{x:+.4f}" for x in v[:PREVIEW].tolist())
        lines.append(f"[{i}] {json.dumps(t, ensure_ascii=False)}")
        lines.append(f"    {dims} …  norm {float(v.norm()):.4f}")
    if cosine is not None:
        lines.append("cosine similarity:")
        lines.append("      " + " ".join(f"[{j}]".rjust(7) for j in range(len(texts))))
        for i, row in enumerate(cosine.tolist()):
            lines.append(f"  [{i}] " + " ".join(f"{x:7.4f}" for x in row))
    return "\n".join(lines)
