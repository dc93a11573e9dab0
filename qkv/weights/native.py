"""The native dequantiser: a prompt's (and an exact analysis's) weights from the file's blocks in one pass.

A prompt longer than a few dozen tokens, and every exact analysis (``qkv explain``, ``qkv.capture``), runs on
the file's exact weights, dequantised per call from the mapped GGUF blocks: ~106 million values for
SmolLM2, every layer, every time. ``dequant.cpp`` (next to this file) does it in one pass on every core —
Q4_0, Q4_1 and Q8_0 blocks into float32 or bfloat16 — with the same IEEE operations in the same order as
the eager ``qkv.weights.int4.dequantize_into`` (so bitwise the same numbers; bfloat16 rounded to nearest even
as torch's cast; a NaN's payload aside, where torch's own casts differ among CPUs). Measured per 576 x 1536 Q4_1 matrix on 2 threads (AVX-512 + AMX machine): 0.07 ms built
for this CPU, 0.11 ms with AVX2 code only; the eager dequantiser 1.2 ms; inductor's loop (what ``qkv
compile`` built before) 0.12 ms with AVX-512 code but 1.22 ms with AVX2 code.

``qkv compile`` builds it with the C++ compiler (``$CXX``, else ``g++``, else ``c++``; about a second) into

    <cache root>/native/dequant-<key>-<digest>.so

where ``key`` names the source, the compiler, the flags and the CPU's feature flags (``-march=native`` code
must not run on another kind of CPU sharing the folder) and ``digest`` is the start of the file's own SHA-256. It is written
under a temporary name and renamed into place. A file whose contents do not match its digest is deleted
unloaded (loading a truncated library would crash the process); before a process uses the library, it
dequantises 4,096 blocks of every kind it is asked for and compares them bit for bit with the eager
dequantiser: a library that does not load is deleted, one that disagrees is not used; the eager
dequantiser is always there. ``QKV_COMPILE``: ``auto`` uses a cached library; ``1`` also builds a
missing one on first use; ``0`` never loads one. It runs on torch.get_num_threads() threads of torch's own
OpenMP runtime (one libgomp in the process).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from ..errors import ConfigError, one_line
from .cache import cache_root, compile_mode, cpu_flags, sweep_temporaries
from .int4 import TORCH_DEQUANT, dequantize_into

SOURCE = Path(__file__).with_name("dequant.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")
KINDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}  # dequant.cpp's kind numbers; bytes per block: int4.TORCH_DEQUANT
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
CHECK_BLOCKS = 4096
BUILD_SECONDS = 300  # a compiler that takes longer than this is stuck
WHAT = "native dequantiser"
LINK = ("-l", "-L", "-Wl,")  # options that go after the source

_LOCK = threading.RLock()  # build() may run under a lookup (QKV_COMPILE=1)
_FOUND: dict = {}  # (file stem, QKV_COMPILE) -> the verified library file, or None (none); cleared by build()
_UNSET = object()
_LIBS: dict = {}  # library file -> its loaded entry point
_CHECKED: dict = {}  # (library file, type, dtype) -> passed the bitwise check


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _stem(source: Path | None = None, flags: tuple | None = None) -> Path | None:
    """``<cache>/native/<source's stem>-<key>`` (``dequant-<key>`` for this module's library): the library's name
    for this source, compiler, these flags and this CPU; the file is ``<stem>-<digest>.so``, ``digest`` the
    start of its own SHA-256 (checked before it is loaded: loading a truncated library would crash the
    process, not raise). None when the source is not installed or there is no cache folder."""
    env = os.environ
    return _stem_for(env.get("QKV_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"), env.get("CXX"),
                     env.get("PATH"), source or SOURCE, flags or FLAGS)


@functools.cache
def _stem_for(*what) -> Path | None:  # a prompt asks once per matrix part: remembered per environment
    source, flags = what[-2:]
    try:
        code = source.read_bytes()
    except OSError:
        return None
    try:
        root = cache_root()
    except RuntimeError:  # no home folder and no cache folder named: nothing is cached
        return None
    key = hashlib.sha256(code + "\0".join([*flags, str(compiler()), cpu_flags()]).encode()).hexdigest()[:24]
    return root / "native" / f"{source.stem}-{key}"


def _file_name(stem: Path, data: bytes) -> str:
    return f"{stem.name}-{hashlib.sha256(data).hexdigest()[:16]}.so"


def library_path(source: Path | None = None, flags: tuple | None = None, what: str = WHAT) -> Path | None:
    """The cached library for this source (the dequantiser's unless given), these flags and this CPU, if one is
    there whole; a file whose contents do not match its name is deleted (one line on stderr)."""
    stem = _stem(source, flags)
    if stem is None:
        return None
    try:
        candidates = sorted(stem.parent.glob(stem.name + "-*.so"))
    except OSError:
        return None
    for path in candidates:
        try:
            whole = _file_name(stem, path.read_bytes()) == path.name
        except OSError:
            whole = False
        if whole:
            return path
        print(f"qkv: the {what} {path} is damaged (its contents do not match its name); "
              f"{_delete(path)}", file=sys.stderr)
    return None


def build(*, force: bool = False, source: Path | None = None, flags: tuple | None = None, what: str = WHAT,
          meanwhile: str = "prompts dequantise in eager meanwhile",
          fix: str = "install g++ or set CXX to a working compiler") -> float | None:
    """Compile the library (the dequantiser's unless ``source`` and its ``flags`` are given) into the cache
    unless it is there (or ``force``); the seconds it took, or None when it was cached. ConfigError (one
    line) with no compiler or a failed compile; OSError where the cache folder cannot be written. Written
    under a temporary name, then renamed to its digest's name."""
    source, flags = source or SOURCE, flags or FLAGS
    if not force and library_path(source, flags, what) is not None:
        return None
    cxx = compiler()
    if cxx is None:
        raise ConfigError(f"no C++ compiler for the {what} (g++ or c++, or $CXX); fix: install g++ "
                          f"(make setup does); {meanwhile}")
    stem = _stem(source, flags)
    if stem is None:
        raise ConfigError(f"{source} is missing from this installation of qkv; fix: reinstall qkv (pip install -e .) "
                          f"— {meanwhile}")
    t0 = time.perf_counter()
    stem.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(stem.parent)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=stem.parent)  # never matched as a library
    os.close(fd)
    try:
        try:  # the linker's options (a library's -l) go after the source
            args = [a for a in flags if not a.startswith(LINK)]
            done = subprocess.run([cxx, *args, str(source), "-o", tmp, *[a for a in flags if a.startswith(LINK)]],
                                  capture_output=True, text=True, errors="replace", timeout=BUILD_SECONDS)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ConfigError(f"could not run the C++ compiler {cxx} ({one_line(str(e), 200)}); fix: install "
                              "g++ or set CXX to a working compiler") from None
        if done.returncode != 0:
            raise ConfigError(f"{cxx} could not compile {source.name} ({one_line(done.stderr or done.stdout, 240)}); "
                              f"fix: {fix}")
        os.replace(tmp, stem.parent / _file_name(stem, Path(tmp).read_bytes()))
    finally:
        Path(tmp).unlink(missing_ok=True)
    with _LOCK:
        _FOUND.clear()
        _CHECKED.clear()
    return time.perf_counter() - t0


def dequantizer(ggml_type: str, dtype: torch.dtype):
    """``fast(blocks, out) -> bool``: the native dequantiser for this block type into ``dtype``, if a library
    is cached (``qkv compile``) and gives bitwise the eager dequantiser's numbers on a check, else None.
    ``fast`` returns False (and writes nothing) for inputs it does not take: non-contiguous blocks or output,
    other shapes or dtypes."""
    if ggml_type not in KINDS or dtype not in DTYPES:
        return None
    how = compile_mode()
    stem = _stem()
    if how == "0" or stem is None:
        return None
    found = (stem, how)
    path = _FOUND.get(found, _UNSET)
    if path is _UNSET:
        with _LOCK:
            path = _FOUND.get(found, _UNSET)
            if path is _UNSET:
                path = _FOUND[found] = _find(build_missing=how == "1")
    if path is None:
        return None
    key = (path, ggml_type, dtype)
    ok = _CHECKED.get(key)
    if ok is None:
        with _LOCK:
            ok = _CHECKED.get(key)
            if ok is None:
                fn = _library(path)
                ok = _CHECKED[key] = fn is not None and _agrees(fn, path, ggml_type, dtype)
    if not ok:
        return None
    fn, kind, bf16, width = _LIBS[path], KINDS[ggml_type], DTYPES[dtype], TORCH_DEQUANT[ggml_type]

    def fast(blocks: torch.Tensor, out: torch.Tensor) -> bool:
        n = blocks.shape[0]
        if not (blocks.dtype == torch.uint8 and out.dtype == dtype and blocks.dim() == out.dim() == 2
                and blocks.shape[1] == width and out.shape == (n, 32) and blocks.is_contiguous()
                and out.is_contiguous() and blocks.device.type == out.device.type == "cpu"):
            return False
        return n == 0 or fn(kind, bf16, blocks.data_ptr(), out.data_ptr(), n, torch.get_num_threads()) == 0
    return fast


def status(types, dtypes) -> dict[str, bool]:
    """{"Q4_1->float32": in use, ...} for each block type the library covers and each dtype."""
    return {f"{t}->{str(d).removeprefix('torch.')}": dequantizer(t, d) is not None
            for t in types if t in KINDS for d in dtypes}


def _find(*, build_missing: bool) -> Path | None:
    path = library_path()
    if path is None and build_missing:
        try:
            build()
        except (ConfigError, OSError) as e:  # once per process: the memo holds the None
            print(f"qkv: {one_line(str(e), 300)}", file=sys.stderr)
        path = library_path()
    return path


def _library(path: Path):
    """The library's entry point (kept per file once loaded); None when it does not load (then it is deleted,
    to be rebuilt by the next ``qkv compile``)."""
    if path not in _LIBS:
        try:
            fn = ctypes.CDLL(str(path)).qkv_dequant
        except (OSError, AttributeError) as e:
            print(f"qkv: the native dequantiser {path} does not load ({one_line(str(e), 160)}); {_delete(path)}, "
                  "dequantising in eager", file=sys.stderr)
            _LIBS[path] = None  # said once per process, whatever the kinds asked for
            return None
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        _LIBS[path] = fn
    return _LIBS[path]


def _delete(path: Path) -> str:
    try:
        path.unlink(missing_ok=True)
        return "deleted"
    except OSError as e:  # a read-only cache folder: not used, left where it is
        return f"not deleted ({e.strerror or e})"


def example_blocks(ggml_type: str, n: int, seed: int = 0) -> torch.Tensor:
    """(n, block bytes) uint8 blocks: random codes, float16 factors from a normal distribution."""
    g = torch.Generator().manual_seed(seed)
    width = TORCH_DEQUANT[ggml_type]
    blocks = torch.randint(0, 256, (n, width), dtype=torch.uint8, generator=g)
    halves = 2 if ggml_type == "Q4_1" else 1  # d (and m)
    blocks[:, :2 * halves] = torch.randn(n, halves, generator=g).half().view(torch.uint8)
    return blocks


def _agrees(fn, path: Path, ggml_type: str, dtype: torch.dtype) -> bool:
    blocks = example_blocks(ggml_type, CHECK_BLOCKS, seed=1)
    out = torch.empty(CHECK_BLOCKS, 32, dtype=dtype)
    ref = dequantize_into(blocks, ggml_type, torch.empty(CHECK_BLOCKS, 32)).to(dtype)
    if fn(KINDS[ggml_type], DTYPES[dtype], blocks.data_ptr(), out.data_ptr(), CHECK_BLOCKS, torch.get_num_threads()) == 0 and \
            torch.equal(out.view(torch.uint8), ref.view(torch.uint8)):  # bits, not values
        return True
    print(f"qkv: the native dequantiser {path} is not used (its {ggml_type} -> {str(dtype).removeprefix('torch.')} "
          "values differ from the eager dequantiser's); dequantising in eager", file=sys.stderr)
    return False
