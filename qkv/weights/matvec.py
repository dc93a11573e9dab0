"""The native 4-bit matrix-vector product ``qkv::q4_mv``: decoding's matrices straight from GGUF Q4_0/Q4_1 blocks.

On CPUs whose ATen kernels are AVX2 (no AVX-512), PyTorch's int4 kernel is about twice as slow as its AVX-512
code and bounds decoding. ``q4mv.cpp`` (next to this file) multiplies the file's own blocks by int8-rounded
activations, one scale per block of 32, as llama.cpp does (see the source for the arithmetic). It is a PyTorch
operator (``torch.ops.qkv.q4_mv``), so the compiled decode step (AOTInductor) calls it like any ATen kernel.

``qkv compile`` (and ``make setup``) builds it with the C++ compiler against the installed torch's headers
(~12 s) into ``<cache root>/native/q4mv-<key>-<digest>.so``, cached and named as qkv.weights.native's
dequantiser (the key names the source, the flags, the torch build and the CPU's flags; the digest is checked
before the file is loaded). Before a process uses it, it multiplies random blocks of both kinds and compares
the result with :func:`reference` (the same arithmetic in float64 sums): a library that does not load is
deleted, one that disagrees is not used, and torch's int4 kernel serves instead.

``QKV_INT4_KERNEL``: ``auto`` (default) uses this operator where ATen's CPU capability is AVX2 and the library
is there (on AVX-512 CPUs torch's own kernel is as fast, measured, and its activations are closer: bfloat16);
``native`` uses it whatever the CPU; ``torch`` never. ``QKV_COMPILE=0`` never loads it.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

from ..errors import ConfigError, one_line
from . import native
from .cache import compile_mode

SOURCE = Path(__file__).with_name("q4mv.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-w")
WHAT = "native 4-bit matrix-vector op"
MEANWHILE = "decoding uses torch's int4 kernel meanwhile"
KINDS = {"Q4_0": 0, "Q4_1": 1}  # q4mv.cpp's kind numbers
BLOCK_BYTES = {0: 18, 1: 20}
CHOICES = ("auto", "native", "torch")

_LOCK = threading.RLock()
_STATE: dict = {}  # (library flags, QKV_COMPILE) -> whether the operator is loaded and agrees with the reference
_LOADED: list[Path] = []  # the one library this process registered qkv::q4_mv from (a namespace is registered once)


def flags() -> tuple[str, ...]:
    """The compiler's options: ours, then where this torch's headers and libraries are (and which build it is,
    so that the library's name changes with torch)."""
    root = Path(torch.__file__).parent
    lib = root / "lib"
    return (*FLAGS, f"-I{root / 'include'}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DQKV_TORCH_BUILD=\"{torch.__version__}-{torch.version.git_version}\"",
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}")


def library_path() -> Path | None:
    return native.library_path(SOURCE, flags(), WHAT)


def build(*, force: bool = False) -> float | None:
    """Compile it into the cache unless there (or ``force``); seconds, or None when cached (see native.build)."""
    seconds = native.build(force=force, source=SOURCE, flags=flags(), what=WHAT, meanwhile=MEANWHILE)
    if seconds is not None:
        with _LOCK:
            _STATE.clear()
    return seconds


def kernel() -> str:
    """``native`` or ``torch``: which 4-bit kernel a compact model loaded now decodes with (QKV_INT4_KERNEL)."""
    choice = os.environ.get("QKV_INT4_KERNEL", "auto")
    if choice not in CHOICES:
        raise ConfigError(f"QKV_INT4_KERNEL={choice!r} is not auto, native or torch; fix: set one of those or unset it")
    if choice == "torch" or (choice == "auto" and torch.backends.cpu.get_cpu_capability() != "AVX2"):
        return "torch"
    if available():
        return "native"
    if choice == "native" and not _STATE.get("said"):
        _STATE["said"] = True
        print(f"qkv: QKV_INT4_KERNEL=native, but the {WHAT} is not available (build it: qkv compile); "
              "decoding uses torch's int4 kernel", file=sys.stderr)
    return "torch"


def available() -> bool:
    """Whether ``torch.ops.qkv.q4_mv`` is loaded (from the cached library; with QKV_COMPILE=1 built first) and
    agrees with :func:`reference`; looked up once per process."""
    how = compile_mode()
    if how == "0":
        return False
    key = (flags(), how)
    ok = _STATE.get(key)
    if ok is None:
        with _LOCK:
            ok = _STATE.get(key)
            if ok is None:
                ok = _STATE[key] = _load(build_missing=how == "1")
    return ok


def _load(*, build_missing: bool) -> bool:
    path = library_path()
    if path is None and build_missing:
        try:
            build()
        except (ConfigError, OSError) as e:
            print(f"qkv: {one_line(str(e), 300)}", file=sys.stderr)
        path = library_path()
    if _LOADED:  # one registration of the namespace per process: the library already loaded serves
        return _agrees(_LOADED[0])
    if path is None:
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        print(f"qkv: the {WHAT} {path} does not load ({one_line(str(e), 160)}); {native._delete(path)}, "
              "decoding uses torch's int4 kernel", file=sys.stderr)
        return False
    _LOADED.append(path)
    return _agrees(path)


def _agrees(path: Path) -> bool:
    for name, kind in KINDS.items():
        g = torch.Generator().manual_seed(kind)
        blocks = example(name, 37, 96, seed=kind)
        x = torch.randn(3, 96, generator=g)
        got, want = torch.ops.qkv.q4_mv(x, blocks, kind), reference(x, blocks, kind)
        if not bool(torch.isfinite(got).all()) or \
                float((got.double() - want).abs().max()) > 1e-5 * float(want.abs().max()):
            print(f"qkv: the {WHAT} {path} is not used (its {name} products differ from the reference); "
                  "decoding uses torch's int4 kernel", file=sys.stderr)
            return False
    return True


def example(ggml_type: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k / 32 * block bytes) uint8: n rows of random blocks (random codes, normal float16 factors)."""
    return native.example_blocks(ggml_type, n * (k // 32), seed=seed).view(n, -1).contiguous()


def reference(x: torch.Tensor, blocks: torch.Tensor, kind: int) -> torch.Tensor:
    """What ``q4_mv(x, blocks, kind)`` computes, in float64 sums: x (M, K) float32 rounded to int8 per block of 32
    (d = max|x| / 127 and x / d to nearest even, in float32 as the C++ does), then per block
    ``d_w d_x sum(q xq) + m d_x sum(xq)`` (Q4_0: ``m = -8 d_w``) -> (M, N) float64."""
    m, k = x.shape
    nb, width = k // 32, BLOCK_BYTES[kind]
    xb = x.float().reshape(m, nb, 32)
    d = xb.abs().amax(-1) / 127
    xq = torch.round(xb * torch.where(d != 0, 1 / d, torch.zeros_like(d))[..., None])
    s = d * xq.sum(-1)  # float32, as the C++ (the sum is an exact integer)
    raw = blocks.reshape(-1, nb, width)
    dw = raw[..., 0:2].contiguous().view(torch.float16).float()[..., 0]  # (N, nb)
    mw = raw[..., 2:4].contiguous().view(torch.float16).float()[..., 0] if kind == 1 else -8 * dw
    codes = raw[..., width - 16:]
    q = torch.cat([codes & 0x0F, codes >> 4], dim=-1).double()  # (N, nb, 32): low nibbles first
    dots = torch.einsum("mbj,nbj->mnb", xq.double(), q)  # exact integers
    scale = (dw[None] * d[:, None]).double()  # the float32 product d_w d_x, as the C++
    return (scale * dots).sum(-1) + (mw[None].double() * s[:, None].double()).sum(-1)


def q4_mv(x: torch.Tensor, blocks: torch.Tensor, kind: int) -> torch.Tensor:
    """x (M, K) -> (M, N) float32 through the operator (load it first: :func:`available`)."""
    return torch.ops.qkv.q4_mv(x.float(), blocks, kind)
