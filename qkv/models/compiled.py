"""A compiled one-token decode step for the compact CPU mode: the whole step as one AOTInductor library.

At 135M parameters an eager decode step spends about as long in Python and small kernels (~800 of them:
norms, RoPE, casts, adds) as in its 4-bit matmuls. ``qkv compile MODEL`` exports :func:`decode_layers` for
one row — every layer, the final norm and the unembedding — with ``torch.export`` and compiles it ahead of
time with AOTInductor into a shared library: elementwise work fused into C++ loops, the int4/int8 kernels
called directly, no Python between layers. The weights are the library's *inputs*, not constants in it, so
it holds no copy of the model and serves every model of the same shapes and kinds.

The KV cache is static: the step writes the new key and value into the cache's preallocated buffer at the
position it is given and attends over the whole buffer with the positions after it masked; the buffer's
length is a dynamic dimension, so one library serves every cache size without recompiling.

Packages are cached at ``<cache root>/decode/<key>.pt2`` (the cache root of qkv.weights.cache). The key names
everything the library depends on: this file's format version, the torch version and build, ATen's CPU
capability, the CPU's flags (the C++ is compiled for this CPU), the source of the step's code, the model's
dimensions and the kinds, shapes and dtypes of its weights. A package is written to a temporary name and
renamed into place; before a process uses one it runs one step on a small synthetic cache through both the
library and the eager step and compares the logits and the cache writes. A package that does not load is
deleted; one that disagrees is not used; one that fails during generation hands over to the eager step —
it is always there and always correct. (A prompt's weights are dequantised by qkv.weights.native.)

``QKV_COMPILE``: ``auto`` (default) uses a cached package and never builds one; ``1`` builds one when missing
(about a minute on 2 cores for SmolLM2); ``0`` always runs the eager step.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, one_line
from ..weights.cache import cache_root, compile_mode, machine_key, sweep_temporaries
from ..nn.mlp import glu
from ..nn.quant import small_matmul
from .llama import appending, decode_layers

FORMAT = 1
# The check's largest difference, relative to the largest eager logit (or cached value): both paths send their
# activations through bfloat16, so a rounding that flips upstream moves a result by an ulp or two (2^-7).
TOLERANCE = 0.02
_LOCK = threading.Lock()  # one lookup (and build) per model object, whatever the threads


class DecodeGraph(nn.Module):
    """What is exported: (x (1, C), position (1,), cos, signed sin (1, D), keys and values of every layer
    (1, K, L, D), the weights' tensors) -> logits (1, V). Keys and values are written in place."""

    def __init__(self, dims: tuple, spec: list):
        super().__init__()
        self.dims, self.spec = dims, spec

    def forward(self, x, pos, cos, signed_sin, ks: list, vs: list, tensors: list):
        length = ks[0].shape[2]
        visible = (torch.arange(length, device=x.device) <= pos)[None, None, None, :]  # (1, 1, 1, L)

        def attend(i: int, q, new_k, new_v):
            ks[i].index_copy_(2, pos, new_k)
            vs[i].index_copy_(2, pos, new_v)
            return F.scaled_dot_product_attention(q, ks[i], vs[i], attn_mask=visible, dropout_p=0.0,
                                                  enable_gqa=q.shape[1] != ks[i].shape[1])
        return decode_layers(self.dims, x, cos, signed_sin, unflatten(self.spec, tensors), attend)


def flatten(weights: list) -> tuple[list, list[torch.Tensor]]:
    """decode_weights() -> (spec: the structure with kinds and groups, tensors: every tensor in order)."""
    spec, tensors = [], []
    for row in weights:
        srow = []
        for item in row:
            if isinstance(item, torch.Tensor):
                srow.append("t")
                tensors.append(item)
            else:
                kind, group, ts = item
                srow.append([kind, group, len(ts)])
                tensors.extend(ts)
        spec.append(srow)
    return spec, tensors


def unflatten(spec: list, tensors: list) -> list:
    out, at = [], 0
    for srow in spec:
        row = []
        for s in srow:
            if s == "t":
                row.append(tensors[at])
                at += 1
            else:
                kind, group, n = s
                row.append((kind, group, tuple(tensors[at:at + n])))
                at += n
        out.append(row)
    return out


def _package(prefix: str, code: tuple, **what) -> Path:
    """``<cache>/decode/<prefix><digest>.pt2`` for ``what`` compiled from ``code`` by this torch for this CPU."""
    key = {"format": FORMAT, **machine_key(),
           "code": hashlib.sha256("".join(inspect.getsource(f) for f in code).encode()).hexdigest(), **what}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
    return cache_root() / "decode" / f"{prefix}{digest}.pt2"


def package_path(model, spec: list, tensors: list[torch.Tensor]) -> Path:
    """Where the package for this model's shapes and kinds, this torch, this CPU and this code lives."""
    return _package("", (decode_layers, small_matmul, glu, DecodeGraph), dims=list(model.decode_dims()),
                    context=model.config.max_position_embeddings, spec=spec,
                    tensors=[[list(t.shape), str(t.dtype)] for t in tensors])


class CompiledStep:
    """A loaded package: ``step(x, pos, cos, signed_sin, cache, weights)`` -> logits (1, V) and the caches
    advanced, or None (nothing touched) where the call is not exactly one the package was built for: weights
    of other kinds, shapes or dtypes, caches that are not all (1, K, L, D) float32 at one offset with
    2 <= L <= the context. The library itself checks none of that."""

    def __init__(self, runner, spec: list, tensors: list[torch.Tensor], model, path: Path):
        self.runner, self.spec, self.path = runner, spec, path
        self.signature = [(t.shape, t.dtype) for t in tensors]
        _, self.kv_heads, self.head_dim, _, _ = model.decode_dims()
        self.context = model.config.max_position_embeddings
        self.broken = False
        self._checked: list[int] = []  # ids of the tensors last found to match the signature

    def _serves(self, spec: list, tensors: list[torch.Tensor], cache) -> bool:
        ids = [id(t) for t in tensors]
        if ids != self._checked:
            if spec != self.spec or [(t.shape, t.dtype) for t in tensors] != self.signature:
                return False
            self._checked = ids
        c0 = cache[0]
        shape = (1, self.kv_heads, c0.k.shape[2], self.head_dim)
        return 2 <= shape[2] <= self.context and all(
            c.k.shape == shape and c.v.shape == shape and c.k.dtype == torch.float32 and c.v.dtype == torch.float32
            and c.offset == c0.offset and not c.cross for c in cache)

    def __call__(self, x, pos, cos, signed_sin, cache, weights):
        spec, tensors = flatten(weights)
        if self.broken or not self._serves(spec, tensors, cache):
            return None
        try:
            out = self.runner.run([x, pos, cos, signed_sin, *(c.k for c in cache), *(c.v for c in cache),
                                   *tensors])
        except Exception as e:  # noqa: BLE001 — the eager step takes over (no offset was advanced)
            self.broken = True
            print(f"qkv: the compiled decode step failed ({one_line(f'{type(e).__name__}: {e}', 200)}); "
                  "running the eager step from here", file=sys.stderr)
            return None
        for c in cache:
            c.offset += 1
        return out[0]


def step_for(model) -> CompiledStep | None:
    """The model's compiled step: looked up (and with QKV_COMPILE=1 built) once per model object."""
    found = model.__dict__.get("_compiled_step", False)
    if found is False:
        with _LOCK:
            found = model.__dict__.get("_compiled_step", False)
            if found is False:
                found = None
                if compile_mode() != "0":
                    try:
                        found, _ = load(model, build=compile_mode() == "1")
                    except Exception as e:  # noqa: BLE001 — any failure means: run the eager step
                        print(f"qkv: compiled decode step unavailable ({one_line(f'{type(e).__name__}: {e}', 200)}); "
                              "running the eager step", file=sys.stderr)
                model.__dict__["_compiled_step"] = found
    return None if found is None or found.broken else found


def load(model, *, build: bool = False) -> tuple[CompiledStep | None, float]:
    """The model's cached package and its check's relative difference from the eager step (built first with
    ``build``), or (None, why-not as inf). A package that does not load is deleted; one that loads but
    disagrees is not used (it may serve another model of the same shapes that checks fine)."""
    spec, tensors = flatten(model.decode_weights())
    path = package_path(model, spec, tensors)
    if not path.exists():
        if not build:
            return None, float("inf")
        print("qkv: compiling the decode step for this model and machine (once; about a minute for SmolLM2 on "
              "2 cores) …", file=sys.stderr, flush=True)
        print(f"qkv: compiled in {compile_package(model, path):.1f} s -> {path}", file=sys.stderr)
    try:
        step = CompiledStep(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1), spec, tensors,
                            model, path)
    except Exception as e:  # noqa: BLE001 — a package this torch cannot load is as good as a damaged one
        print(f"qkv: the compiled decode step {path} does not load ({one_line(f'{type(e).__name__}: {e}', 160)}); "
              "deleted, running the eager step", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None, float("inf")
    err = self_check(model, step)
    if err <= TOLERANCE:
        return step, err
    why = "the eager step's own logits are not finite" if err != err else \
        f"its logits or cache writes differ from the eager step's by {err:.3g} of their size"
    print(f"qkv: the compiled decode step {path} is not used for this model ({why}); running the eager step",
          file=sys.stderr)
    return None, float("inf")


def compile_package(model, path: Path) -> float:
    """Export and compile the step for ``model`` into ``path`` (atomically); returns the seconds it took."""
    t0 = time.perf_counter()
    weights = model.decode_weights()
    spec, tensors = flatten(weights)
    x, pos, cos, signed_sin, ks, vs = _example(model, 16)
    length = torch.export.Dim("cache_length", min=2, max=max(3, model.config.max_position_embeddings))
    shapes = {"x": None, "pos": None, "cos": None, "signed_sin": None, "ks": [{2: length}] * len(ks),
              "vs": [{2: length}] * len(vs), "tensors": [None] * len(tensors)}
    _export_and_compile(DecodeGraph(model.decode_dims(), spec), (x, pos, cos, signed_sin, ks, vs, tensors), shapes,
                        path)
    return time.perf_counter() - t0


def _export_and_compile(module: nn.Module, args: tuple, shapes: dict, path: Path) -> None:
    """torch.export + AOTInductor into ``path``, written under a temporary name and renamed into place."""
    with warnings.catch_warnings():  # importing inductor warns about torch's own deprecated internals
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch._inductor import aoti_compile_and_package
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation notices, not the user's
        program = torch.export.export(module, args, dynamic_shapes=shapes)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt2", dir=path.parent)  # never matched as a package
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _example(model, length: int, seed: int = 0):
    """A one-row step's inputs on a synthetic cache of ``length`` positions, half of them filled."""
    cfg = model.config
    _, k, d, c, _ = model.decode_dims()
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(1, k, length, d, generator=g) for _ in range(cfg.num_hidden_layers)]
    vs = [torch.randn(1, k, length, d, generator=g) for _ in range(cfg.num_hidden_layers)]
    pos = torch.tensor([length // 2])
    cos, signed_sin = model.model.layers[0].self_attn.rope.rotation(pos, torch.device("cpu"))
    x = model.model.embed_tokens(torch.tensor([[min(7, cfg.vocab_size - 1)]])).float().view(1, c)
    return x, pos, cos, signed_sin, ks, vs


def self_check(model, step: CompiledStep) -> float:
    """One step through the package and through the eager step on the same synthetic 8-position cache (half
    filled, the rest random, so the mask is tested too): the larger of the logits' and the written keys' and
    values' largest differences, each relative to the largest eager value; NaN where the eager step's own
    logits are not finite (nothing to check against), inf where the package refused or gave non-finite ones."""
    from ..nn import KVCache

    x, pos, cos, signed_sin, ks, vs = _example(model, 8, seed=1)
    _, k, d, _, _ = model.decode_dims()

    def cache():
        out = []
        for kk, vv in zip(ks, vs):
            kv = KVCache(1, k, 8, d)
            kv.k.copy_(kk)
            kv.v.copy_(vv)
            kv.offset = int(pos)
            out.append(kv)
        return out
    weights = model.decode_weights()
    compiled_cache, eager_cache = cache(), cache()
    with torch.inference_mode():
        compiled = step(x, pos, cos, signed_sin, compiled_cache, weights)
        eager = decode_layers(model.decode_dims(), x, cos, signed_sin, weights, appending(eager_cache))
    if not bool(torch.isfinite(eager).all()):
        return float("nan")
    if compiled is None or not bool(torch.isfinite(compiled).all()):
        return float("inf")
    errs = [float((compiled - eager).abs().max()) / max(float(eager.abs().max()), 1e-30)]
    for a, b in zip(compiled_cache, eager_cache):
        if a.offset != b.offset:
            return float("inf")
        for got, want in ((a.k, b.k), (a.v, b.v)):
            errs.append(float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30))
    return max(errs)


def build(model, *, force: bool = False) -> dict:
    """``qkv compile``: the model's package, built when missing (or with ``force``), loaded and checked.
    Returns {path, built, compile_seconds, bytes, self_check}; raises ConfigError (one line) where nothing can
    be compiled (no compact weights, no C++ compiler, an export that fails) or the package fails its check."""
    weights = model.decode_weights(1) if hasattr(model, "decode_weights") else None
    if weights is None:
        raise ConfigError("this model has no compact weights to compile a decode step for: load a GGUF model "
                          "on the CPU with dtype auto (the default)")
    spec, tensors = flatten(weights)
    path = package_path(model, spec, tensors)
    seconds, built = 0.0, False
    if force or not path.exists():
        seconds, built = seconds + compiling("the decode step", compile_package, model, path), True
    step, err = load(model)
    if step is None:
        raise ConfigError(f"the compiled decode step at {path} failed its check against the eager step "
                          "(details above); generation runs the eager step")
    model.__dict__["_compiled_step"] = step
    return {"path": str(path), "built": built, "compile_seconds": seconds if built else None,
            "bytes": path.stat().st_size, "self_check": err}


def compiling(what: str, fn, *args, fallback: str = "generation runs the eager step"):
    """``fn(*args)``, its failures as one line: an unwritable cache folder, a compiler's error; ``fallback`` says
    what runs meanwhile."""
    try:
        return fn(*args)
    except ConfigError:  # already one line
        raise
    except OSError as e:  # the cache folder, not the compiler
        raise ConfigError(f"could not write {what} ({one_line(f'{e.strerror or e}: {e.filename or cache_root()}', 240)}); "
                          "fix: make the cache folder writable or set QKV_CACHE_DIR to one that is") from None
    except Exception as e:  # noqa: BLE001 — inductor's errors carry a compiler's whole output
        raise ConfigError(f"could not compile {what} ({one_line(f'{type(e).__name__}: {e}', 240)}); fix: install a "
                          f"C++ compiler (g++) or report it; {fallback}") from None


def step_times(model, steps: int = 32) -> dict[str, float]:
    """Median milliseconds of one decode step through the model's forward, compiled and eager (greedy tokens
    after a short prompt, ``steps`` each)."""
    saved = model.__dict__.get("_compiled_step", False)
    out = {}
    try:
        for name, step in (("compiled", saved), ("eager", None)):
            if name == "compiled" and not saved:
                continue
            model.__dict__["_compiled_step"] = step
            cache = model.make_cache(1, steps + 4)
            times = []
            with torch.inference_mode():
                logits = model(torch.tensor([[1, 2, 3]]), cache=cache, last_only=True)[:, -1]
                for _ in range(steps):
                    ids = logits.argmax(-1).view(1, 1)
                    t0 = time.perf_counter()
                    logits = model(ids, cache=cache, last_only=True)[:, -1]
                    times.append(time.perf_counter() - t0)
            out[name] = 1000 * sorted(times)[len(times) // 2]
    finally:
        model.__dict__["_compiled_step"] = saved
    return out
