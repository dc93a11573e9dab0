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
it is always there and always correct. The same holds for the prompts' compiled dequantisers (bitwise).

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
from ..weights.cache import cache_root
from ..weights.int4 import INT4_TYPES
from ..nn.mlp import glu
from ..nn.quant import small_matmul
from .llama import appending, decode_layers

FORMAT = 1
MODES = ("auto", "1", "0")
# The check's largest difference, relative to the largest eager logit (or cached value): both paths send their
# activations through bfloat16, so a rounding that flips upstream moves a result by an ulp or two (2^-7).
TOLERANCE = 0.02
_LOCK = threading.Lock()  # one lookup (and build) per model object, whatever the threads


def mode() -> str:
    choice = os.environ.get("QKV_COMPILE", "auto")
    if choice not in MODES:
        raise ConfigError(f"QKV_COMPILE={choice!r} is not auto, 1 or 0; fix: set one of those or unset it")
    return choice


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


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform
    return platform.machine() + " " + platform.processor()


def _package(prefix: str, code: tuple, **what) -> Path:
    """``<cache>/decode/<prefix><digest>.pt2`` for ``what`` compiled from ``code`` by this torch for this CPU."""
    key = {"format": FORMAT, "torch": [torch.__version__, torch.version.git_version],
           "capability": torch.backends.cpu.get_cpu_capability(),
           "cpu": hashlib.sha256(_cpu_flags().encode()).hexdigest()[:16],
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
                if mode() != "0":
                    try:
                        found, _ = load(model, build=mode() == "1")
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
    for old in path.parent.glob(".tmp-*"):  # left by a build that was killed (an hour is far past any build)
        try:
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt2", dir=path.parent)  # never matched as a package
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # the dequantiser reads float16 factors and writes bfloat16: inductor's notice, nothing to act on
            warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")
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


# -- compiled dequantisers: a prompt's weights from the file's 4-bit blocks in one pass ---------------------


class DequantGraph(nn.Module):
    """(n, block bytes) uint8 Q4_0/Q4_1 blocks, the same bytes viewed as float16 halves -> ``out`` (n, 32)
    float32 or bfloat16, written in place: the operations of ``qkv.weights.int4.dequantize_into`` in its
    order (``(q - 8) · d``, ``q · d + m``) as one fused loop — the nibbles taken by a broadcast shift, the
    factors read as halves — instead of passes through temporaries (a check holds the two bitwise equal)."""

    def __init__(self, ggml_type: str):
        super().__init__()
        self.head = 4 if ggml_type == "Q4_1" else 2
        self.register_buffer("shift", torch.tensor([0, 4], dtype=torch.uint8).view(1, 2, 1))

    def forward(self, blocks, halves, out):
        qs = blocks[:, self.head:].unsqueeze(1)  # (n, 1, 16)
        q = ((qs >> self.shift) & 0x0F).float()  # (n, 2, 16): weights 0..15 in the low nibbles, 16..31 high
        d = halves[:, 0:1].unsqueeze(-1).float()  # (n, 1, 1)
        res = (q - 8) * d if self.head == 2 else q * d + halves[:, 1:2].unsqueeze(-1).float()
        out.view(-1, 2, 16).copy_(res)


_DEQUANT: dict = {}  # (type, dtype, cache root) -> loaded runner, or None (none cached, disagreed, or QKV_COMPILE=0)


def dequant_path(ggml_type: str, dtype: torch.dtype) -> Path:
    return _package("dequant-", (DequantGraph,), type=ggml_type, dtype=str(dtype))


def compile_dequant(ggml_type: str, dtype: torch.dtype) -> float:
    """Build the dequantiser package of one block type and output dtype; the seconds it took."""
    t0 = time.perf_counter()
    blocks, out = _dequant_example(ggml_type, 64, dtype)
    n = torch.export.Dim("blocks", min=2, max=1 << 28)
    _export_and_compile(DequantGraph(ggml_type), (blocks, blocks.view(torch.float16), out),
                        {"blocks": {0: n}, "halves": {0: n}, "out": {0: n}},
                        dequant_path(ggml_type, dtype))
    _DEQUANT.pop((ggml_type, dtype, _root()), None)
    return time.perf_counter() - t0


def _dequant_example(ggml_type: str, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, INT4_TYPES[ggml_type]), dtype=torch.uint8, generator=g)
    factors = torch.randn(n, (INT4_TYPES[ggml_type] - 16) // 2, generator=g).half()  # d (and m)
    blocks[:, :factors.shape[1] * 2] = factors.view(torch.uint8).view(n, -1)
    return blocks, torch.empty(n, 32, dtype=dtype)


def dequantizer(ggml_type: str, dtype: torch.dtype):
    """``fast(blocks, out) -> bool``: the compiled dequantiser of this block type into ``dtype`` if one is cached
    (``qkv compile``) and gives bitwise the eager dequantiser's numbers on a check, else None. ``fast`` returns
    False (and writes nothing) for inputs it was not built for: non-contiguous blocks or output."""
    if mode() == "0":
        return None
    key = (ggml_type, dtype, _root())
    if key not in _DEQUANT:
        with _LOCK:
            if key not in _DEQUANT:
                _DEQUANT[key] = _load_dequant(ggml_type, dtype)
    runner = _DEQUANT[key]
    if runner is None:
        return None

    def fast(blocks: torch.Tensor, out: torch.Tensor) -> bool:
        if not (blocks.is_contiguous() and out.is_contiguous() and blocks.dtype == torch.uint8
                and blocks.shape[0] == out.shape[0] >= 2 and blocks.shape[1] == INT4_TYPES[ggml_type]
                and out.shape[1] == 32 and out.dtype == dtype):
            return False
        runner.run([blocks, blocks.view(torch.float16), out])
        return True
    return fast


_ROOTS: dict = {}


def _root() -> Path:
    """cache_root(), remembered per value of the variables it reads (a prompt asks once per matrix part)."""
    env = (os.environ.get("QKV_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME"), os.environ.get("HOME"))
    root = _ROOTS.get(env)
    if root is None:
        root = _ROOTS[env] = cache_root()
    return root


def _load_dequant(ggml_type: str, dtype: torch.dtype):
    from ..weights.int4 import dequantize_into

    path = dequant_path(ggml_type, dtype)
    if not path.exists():
        return None
    try:
        runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        blocks, out = _dequant_example(ggml_type, 4096, dtype, seed=1)
        runner.run([blocks, blocks.view(torch.float16), out])
    except Exception as e:  # noqa: BLE001 — a package this torch cannot load is as good as a damaged one
        print(f"qkv: the compiled dequantiser {path} does not load ({one_line(f'{type(e).__name__}: {e}', 160)}); "
              "deleted, dequantising in eager", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None
    ref = torch.empty(4096, 32)
    dequantize_into(blocks, ggml_type, ref)
    if not torch.equal(out, ref.to(dtype)):
        print(f"qkv: the compiled dequantiser {path} is not used (its values differ from the eager "
              "dequantiser's); dequantising in eager", file=sys.stderr)
        return None
    return runner


def build(model, *, force: bool = False) -> dict:
    """``qkv compile``: the model's package, built when missing (or with ``force``), loaded and checked.
    Also builds the prompts' compiled dequantisers. Returns {path, built, compile_seconds, bytes, self_check,
    dequantizers}; raises ConfigError (one line) where nothing can
    be compiled (no compact weights, no C++ compiler, an export that fails) or the package fails its check."""
    weights = model.decode_weights(1) if hasattr(model, "decode_weights") else None
    if weights is None:
        raise ConfigError("this model has no compact weights to compile a decode step for: load a GGUF model "
                          "on the CPU with dtype auto (the default)")
    spec, tensors = flatten(weights)
    path = package_path(model, spec, tensors)
    seconds, built = 0.0, False
    if force or not path.exists():
        seconds, built = seconds + _compiling("the decode step", compile_package, model, path), True
    wanted = [(t, d) for t in getattr(model, "compact_block_types", INT4_TYPES) if t in INT4_TYPES
              for d in dict.fromkeys((torch.float32, _prompt_dtype()))]  # exact analyses', and prompts' dtype
    for ggml_type, dtype in wanted:
        if force or not dequant_path(ggml_type, dtype).exists():
            seconds, built = seconds + _compiling("a dequantiser", compile_dequant, ggml_type, dtype), True
    step, err = load(model)
    if step is None:
        raise ConfigError(f"the compiled decode step at {path} failed its check against the eager step "
                          "(details above); generation runs the eager step")
    model.__dict__["_compiled_step"] = step
    dequant = {f"{t}->{str(d).removeprefix('torch.')}": dequantizer(t, d) is not None for t, d in wanted}
    return {"path": str(path), "built": built, "compile_seconds": seconds if built else None,
            "bytes": path.stat().st_size, "self_check": err, "dequantizers": dequant}


def _compiling(what: str, fn, *args) -> float:
    try:
        return fn(*args)
    except OSError as e:  # the cache folder, not the compiler
        raise ConfigError(f"could not write {what} ({one_line(f'{e.strerror or e}: {e.filename or cache_root()}', 240)}); "
                          "fix: make the cache folder writable or set QKV_CACHE_DIR to one that is") from None
    except Exception as e:  # noqa: BLE001 — inductor's errors carry a compiler's whole output
        raise ConfigError(f"could not compile {what} ({one_line(f'{type(e).__name__}: {e}', 240)}); fix: install a "
                          "C++ compiler (g++) or report it; generation runs the eager step") from None


def _prompt_dtype() -> torch.dtype:
    from ..weights.compact import prompt_dtype
    return prompt_dtype()


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
