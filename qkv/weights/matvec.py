"""The native matrix-vector products ``qkv::q4_mv`` and ``qkv::q8_mv``: decoding's matrices on AVX2 CPUs.

On CPUs whose ATen kernels are AVX2 (no AVX-512), PyTorch's int4 and int8 kernels run at about half their
AVX-512 speed and bound decoding. ``matvec.cpp`` (next to this file) multiplies the GGUF file's own Q4_0/Q4_1
blocks (``q4_mv``) and the compact mode's int8 unembedding rows (``q8_mv``) by activations rounded to int8,
one scale per block of 32, as llama.cpp does (see the source for the arithmetic). They are PyTorch operators
(``torch.ops.qkv.*``), so the compiled decode step (AOTInductor) calls them like any ATen kernel.

``qkv compile`` (and ``make setup``) builds them with the C++ compiler against the installed torch's headers
(~12 s) into ``<cache root>/native/matvec-<key>-<digest>.so``, cached and named as qkv.weights.native's
dequantiser (the key names the source, the flags, the torch build and the CPU's flags; the digest is checked
before the file is loaded). Before a process uses them, it multiplies random blocks and rows and compares the
results with :func:`reference` and :func:`reference8` (the same arithmetic in float64 sums): a library that
does not load is deleted, one that disagrees is not used, and torch's kernels serve instead.

``QKV_MATVEC``: ``auto`` (default) uses ``q8_mv`` for the unembedding where ATen's CPU capability is AVX2 or
AVX-512 and the library is there (faster than ATen's int8 kernel with either code, measured) and ``q4_mv`` for
the 4-bit matrices where it is AVX2 (with AVX-512 code torch's int4 kernel is as fast, and its bfloat16
activations are closer); ``native`` uses both whatever the CPU; ``torch`` neither. ``QKV_COMPILE=0`` never
loads them. The library is looked for in the cache folder of the moment; a process registers the operators
once, from the first library it loads.
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

SOURCE = Path(__file__).with_name("matvec.cpp")
# -ffp-contract=off: no multiply-add fused where the source did not write one, so that the portable loops give
# each row of x the same bits whatever tile it is in, on any CPU (the AVX2 loops write their FMAs explicitly)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-std=c++20", "-shared", "-fPIC", "-w")
WHAT = "native matrix-vector operators"
MEANWHILE = "decoding uses torch's int4/int8 kernels meanwhile"
KINDS = {"Q4_0": 0, "Q4_1": 1}  # q4_mv's kind numbers
BLOCK_BYTES = {0: 18, 1: 20}
CHOICES = ("auto", "native", "torch")
ALL = frozenset({"q4", "q8"})  # the compact kinds these operators multiply

_LOCK = threading.RLock()
_STATE: dict = {}  # (the library's name in the cache folder, build if missing) -> loaded and agreeing
_LOADED: dict[Path, bool] = {}  # the one library this process registered the operators from (a namespace registers
# once) -> whether it agrees with the references


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
    seconds = native.build(force=force, source=SOURCE, flags=flags(), what=WHAT, meanwhile=MEANWHILE,
                           fix="install g++ 10 or newer (it is built against torch's headers, C++20) or set CXX to "
                               "one; or set QKV_MATVEC=torch")
    if seconds is not None:
        with _LOCK:
            _STATE.clear()
    return seconds


def kernels(*, build: bool = True) -> frozenset[str]:
    """The compact kinds a model loaded now multiplies with these operators (QKV_MATVEC): ``q4`` (the 4-bit
    matrices, as the file's blocks) and ``q8`` (the int8 unembedding); the rest uses torch's kernels.
    ``build=False``: never build the library, even under QKV_COMPILE=1 (a report of what is there)."""
    choice = os.environ.get("QKV_MATVEC", "auto")
    if choice not in CHOICES:
        raise ConfigError(f"QKV_MATVEC={choice!r} is not auto, native or torch; fix: set one of those or unset it")
    if choice == "torch":
        return frozenset()
    if available(build=build):
        if choice == "native":
            return ALL
        capability = torch.backends.cpu.get_cpu_capability()  # elsewhere the operators run their portable loops
        return ALL if capability == "AVX2" else frozenset({"q8"}) if capability == "AVX512" else frozenset()
    if choice == "native" and not _STATE.get("said"):
        _STATE["said"] = True
        print(f"qkv: QKV_MATVEC=native, but the {WHAT} are not available (build them: qkv compile); "
              "decoding uses torch's int4/int8 kernels", file=sys.stderr)
    return frozenset()


def available(*, build: bool = True) -> bool:
    """Whether ``torch.ops.qkv.q4_mv`` and ``q8_mv`` are loaded (from the cached library; with QKV_COMPILE=1 and
    ``build`` built first) and agree with :func:`reference` and :func:`reference8`; looked up once per process
    and cache folder."""
    how = compile_mode()
    if how == "0":
        return False
    key = (native._stem(SOURCE, flags()), build and how == "1")
    ok = _STATE.get(key)
    if ok is None:
        with _LOCK:
            ok = _STATE.get(key)
            if ok is None:
                ok = _STATE[key] = _load(build_missing=key[1])
    return ok


def _load(*, build_missing: bool) -> bool:
    path = library_path()
    if path is None and build_missing:
        try:
            build()
        except (ConfigError, OSError) as e:
            print(f"qkv: {one_line(str(e), 300)}", file=sys.stderr)
        path = library_path()
    if path is None:  # this cache folder has none (one loaded from another folder is not used for it)
        return False
    if _LOADED:  # one registration of the namespace per process: the library already loaded serves
        return next(iter(_LOADED.values()))
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        print(f"qkv: the {WHAT} {path} do not load ({one_line(str(e), 160)}); {native._delete(path)}, "
              "decoding uses torch's int4/int8 kernels", file=sys.stderr)
        return False
    _LOADED[path] = _agrees(path)
    return _LOADED[path]


def _agrees(path: Path) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 96, generator=g)
    w8, scales = torch.randint(-127, 128, (37, 96), dtype=torch.int8, generator=g), torch.rand(37).bfloat16()
    try:
        pairs = []
        for name, kind in KINDS.items():
            blocks = example(name, 37, 96, seed=kind)
            pairs.append((name, torch.ops.qkv.q4_mv(x, blocks, kind), reference(x, blocks, kind)))
        pairs.append(("int8", torch.ops.qkv.q8_mv(x, w8, scales), reference8(x, w8, scales)))
    except (RuntimeError, AttributeError) as e:  # an operator missing from the library, or one that refuses
        print(f"qkv: the {WHAT} {path} are not used ({one_line(str(e), 160)}); decoding uses torch's int4/int8 "
              "kernels", file=sys.stderr)
        return False
    for name, got, want in pairs:
        if not bool(torch.isfinite(got).all()) or \
                float((got.double() - want).abs().max()) > 1e-5 * float(want.abs().max()):
            print(f"qkv: the {WHAT} {path} are not used (their {name} products differ from the reference); "
                  "decoding uses torch's int4/int8 kernels", file=sys.stderr)
            return False
    return True


def example(ggml_type: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, k / 32 * block bytes) uint8: n rows of random blocks (random codes, normal float16 factors)."""
    return native.example_blocks(ggml_type, n * (k // 32), seed=seed).view(n, -1).contiguous()


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) float32 rounded as the C++ rounds it: (codes (M, K/32, 32) as floats, d_x, d_x * sum(codes)),
    d_x = max|x| / 127 of each block and x / d_x to nearest even, in float32."""
    m, k = x.shape
    xb = x.float().reshape(m, k // 32, 32)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    tiny = ~torch.isfinite(inv)  # a block below ~1e-36: zero, as the C++ (1 / d would overflow)
    d, inv = d.masked_fill(tiny, 0), inv.masked_fill(tiny, 0)
    xq = torch.round(xb * inv[..., None]).clamp_(-127, 127)
    return xq, d, d * xq.sum(-1)  # float32, as the C++ (the sum is an exact integer)


def reference(x: torch.Tensor, blocks: torch.Tensor, kind: int) -> torch.Tensor:
    """What ``q4_mv(x, blocks, kind)`` computes, in float64 sums: x rounded to int8 per block of 32, then per block
    ``d_w d_x sum(q xq) + m d_x sum(xq)`` (Q4_0: ``m = -8 d_w``) -> (M, N) float64."""
    nb, width = x.shape[1] // 32, BLOCK_BYTES[kind]
    xq, d, s = _int8_rows(x)
    raw = blocks.reshape(-1, nb, width)
    dw = raw[..., 0:2].contiguous().view(torch.float16).float()[..., 0]  # (N, nb)
    mw = raw[..., 2:4].contiguous().view(torch.float16).float()[..., 0] if kind == 1 else -8 * dw
    codes = raw[..., width - 16:]
    q = torch.cat([codes & 0x0F, codes >> 4], dim=-1).double()  # (N, nb, 32): low nibbles first
    dots = torch.einsum("mbj,nbj->mnb", xq.double(), q)  # exact integers
    scale = (dw[None] * d[:, None]).double()  # the float32 product d_w d_x, as the C++
    return (scale * dots).sum(-1) + (mw[None].double() * s[:, None].double()).sum(-1)


def reference8(x: torch.Tensor, w8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What ``q8_mv(x, w8, scales)`` computes, in float64 sums: ``s_r sum_b d_x sum(q xq)`` -> (M, N) float64."""
    xq, d, _ = _int8_rows(x)
    dots = torch.einsum("mbj,nbj->mnb", xq.double(), w8.reshape(w8.shape[0], -1, 32).double())  # exact integers
    return scales.double()[None] * (d[:, None].double() * dots).sum(-1)


def q4_mv(x: torch.Tensor, blocks: torch.Tensor, kind: int) -> torch.Tensor:
    """x (M, K) -> (M, N) float32 through the operator (load it first: :func:`available`)."""
    return torch.ops.qkv.q4_mv(x.float(), blocks, kind)


def q8_mv(x: torch.Tensor, w8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> (M, N) float32 through the int8 operator (int8 rows (N, K), bfloat16 row scales (N,))."""
    return torch.ops.qkv.q8_mv(x.float(), w8, scales)
