"""``qkv compile`` — build, for this machine, the compiled decode step of a model (AOTInductor), the native
dequantiser its prompts and exact analyses use and the native matrix-vector operators its decoding uses (C++);
all cached.

Generation, long prompts and exact analyses use them from then on (``QKV_COMPILE=auto``, the default); see
qkv.models.compiled, qkv.weights.native and qkv.weights.matvec.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..errors import InputError
from .common import add_model_arguments, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("name", nargs="?", help="model (same as --model)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if a package is cached, and measure the prompt crossover again")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed, compiled and eager (0: none)")
    p.add_argument("--dequantizer-only", action="store_true",
                   help="build only the native dequantiser (about a second; no model is loaded): what long prompts "
                        "and the exact analyses (explain) use; make setup runs this")
    p.add_argument("--native-only", action="store_true",
                   help="build only the native libraries (no model is loaded): the dequantiser and the "
                        "matrix-vector operators decoding uses (~12 s); make setup runs this")
    p.add_argument("--format", choices=["text", "json"], default="text")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models import compiled
    from ..weights import native
    from ..weights.cache import compile_mode
    from ..weights.compact import prompt_dtype

    off = compile_mode() == "0"  # a mistyped QKV_COMPILE is refused before a minute of compiling
    if args.name and args.model not in ("smollm2", args.name):
        raise InputError(f"two models named: {args.name!r} and --model {args.model!r}; give one")
    if args.name:
        args.model = args.name
    wanted = dict.fromkeys((torch.float32, prompt_dtype()))  # exact analyses', prompts'
    if args.dequantizer_only or args.native_only:
        flag = "--native-only" if args.native_only else "--dequantizer-only"
        if args.model != "smollm2":
            raise InputError(f"{flag} builds no model's step: give no model (got {args.model!r})")
        d = _build_native(args, sorted(native.KINDS), wanted)
        if args.native_only:
            d.update(_build_matvec(args))
        if args.format == "json":
            print(json.dumps(d))
        else:
            _report_native(d, off)
        return _dequantizer_code(d, off)
    if args.steps < 0:
        raise InputError(f"--steps must be >= 0, got {args.steps}")
    mv = _build_matvec(args)  # before the load: the model decodes with them, and its step calls them
    model = load_model(args).model
    context = model.config.max_position_embeddings
    if args.steps + 4 > context:
        raise InputError(f"--steps {args.steps} does not fit {args.model}'s context of {context} positions; "
                         f"give at most {context - 4}")
    d = compiled.build(model, force=args.force)
    d.update(mv)
    d.update(_build_native(args, getattr(model, "compact_block_types", ()), wanted))
    if args.steps:
        d["step_ms"] = compiled.step_times(model, args.steps)
    d["crossover"] = _crossover(model, args.force)
    if args.format == "json":
        print(json.dumps(d))
        return _dequantizer_code(d, off)
    how = f"built in {d['compile_seconds']:.1f} s" if d["built"] else "cached"
    print(f"compiled decode step: {d['path']} ({d['bytes'] / 1e6:.1f} MB, {how})")
    print(f"check against the eager step (logits and cache writes): largest difference {d['self_check']:.3g} "
          "of their size")
    _report_native(d, off)
    _report_crossover(d["crossover"])
    if args.steps:
        ms = d["step_ms"]
        print(f"one decode step (median of {args.steps}): compiled {ms['compiled']:.1f} ms "
              f"({1000 / ms['compiled']:.0f} tokens/s), eager {ms['eager']:.1f} ms ({1000 / ms['eager']:.0f} tokens/s)")
    return _dequantizer_code(d, off)


def _crossover(model, force: bool) -> dict:
    """How many prompt rows the compact matrices serve on this machine: measured (~16 s for SmolLM2 on 2 cores)
    unless cached, then used by this and every later load (qkv.weights.crossover)."""
    from ..weights import crossover

    rows = None if force else crossover.cached(model)
    if rows is not None:
        crossover.apply(model, rows)
        return {"rows": rows, "measured": False, "path": str(crossover.path_for(crossover.signature(model)))}
    t0 = time.perf_counter()
    timed = crossover.measure(model)
    rows = crossover.choose(timed)
    crossover.apply(model, rows)
    d = {"rows": rows, "measured": True, "seconds": time.perf_counter() - t0, "path": None, "error": None,
         "ms": {n: [1000 * a, 1000 * b] for n, (a, b) in timed.items()}}
    try:
        path = crossover.save(model, rows, timed)
        d["path"] = path and str(path)
    except InputError as e:  # a read-only cache folder: this process uses it, later ones the defaults
        d["error"] = str(e)
    return d


def _report_crossover(c: dict) -> None:
    if not c["measured"]:
        print(f"prompts on the compact matrices: up to {c['rows']} tokens (measured before; {c['path']})")
        return
    ratios = ", ".join(f"{a / b:.2f} at {n}" for n, (a, b) in c["ms"].items())
    where = c["path"] or f"not cached: {c['error']}"
    print(f"prompts on the compact matrices: up to {c['rows']} tokens, measured in {c['seconds']:.1f} s "
          f"(their time over the dequantised weights': {ratios}); {where}")


def _build_native(args, types, dtypes) -> dict:
    """The native dequantiser built (unless cached), and which of ``types`` x ``dtypes`` it serves."""
    from ..models.compiled import compiling
    from ..weights import native

    seconds = compiling("the native dequantiser", lambda: native.build(force=args.force),
                        fallback="prompts dequantise in eager")
    found = native.library_path()
    return {"dequantizer": {"path": str(found) if found else None, "built": seconds is not None,
                            "compile_seconds": seconds},
            "dequantizers": native.status(types, dtypes)}


def _build_matvec(args) -> dict:
    """The native matrix-vector operators built (unless cached), whether they pass their check, and which of the
    compact kinds decode with them here (QKV_MATVEC)."""
    from ..errors import ConfigError
    from ..models.compiled import compiling
    from ..weights import matvec

    error = None
    try:  # optional: without them decoding runs torch's kernels, so their failure stops nothing else
        seconds = compiling(matvec.WHAT, lambda: matvec.build(force=args.force), fallback=matvec.MEANWHILE)
    except ConfigError as e:
        seconds, error = None, str(e)
        print(f"qkv: {e}", file=sys.stderr)
    found = matvec.library_path()
    return {"matvec": {"path": str(found) if found else None, "built": seconds is not None,
                       "compile_seconds": seconds, "passes_check": matvec.available(),
                       "decodes": sorted(matvec.kernels()), "error": error}}


def _dequantizer_code(d: dict, off: bool) -> int:
    """1 where a kind of the dequantiser (or the matrix-vector operators) is built but not used (it failed its
    check), or the operators could not be built: everything runs, on the other kernels, but a script should
    know."""
    mv = d.get("matvec")
    failed = mv and (mv["error"] or (mv["path"] and not mv["passes_check"]))
    return 1 if not off and (not all(d["dequantizers"].values()) or failed) else 0


def _report_native(d: dict, off: bool) -> None:
    seconds = d["dequantizer"]["compile_seconds"]
    print(f"native dequantiser: {d['dequantizer']['path']} "
          f"({'cached' if seconds is None else f'built in {seconds:.1f} s'})")
    mv = d.get("matvec")
    if mv:
        seconds = mv["compile_seconds"]
        state = "off (QKV_COMPILE=0)" if off else "checked" if mv["passes_check"] else \
            "NOT built (see above)" if mv["error"] else "NOT used (failed its check)"
        uses = {"q4": "the 4-bit matrices", "q8": "the int8 unembedding"}
        print(f"native matrix-vector operators: {mv['path']} "
              f"({'cached' if seconds is None else f'built in {seconds:.1f} s'}; {state}); one-token steps use them "
              f"for {' and '.join(uses[k] for k in mv['decodes']) or 'nothing'} here (QKV_MATVEC)")
    if d["dequantizers"]:
        print("  for prompts and exact analyses (checked bitwise against the eager one): " + ", ".join(
            f"{name} {'in use' if ok else 'off (QKV_COMPILE=0)' if off else 'NOT used'}"
            for name, ok in d["dequantizers"].items()))
