"""Which kernels this machine runs: the CPU's vector/matrix extensions as PyTorch sees them, the build,
the attention backends, the low-bit matmul paths qkv uses, any GPU — and a short measured matmul rate.

    from qkv.explain.hardware import hardware_report, render_hardware
    r = hardware_report()          # dict (JSON-ready); r["matmul"]["float32"]["gflops"] …
    print(render_hardware(r))

Everything is read from this process (``/proc/cpuinfo`` or ``lscpu``, ``torch.backends``, the environment)
or tried on a tiny input (an SDPA backend, the int4/int8 ops), never assumed from a name. Nothing here
changes a setting: SDPA backends are tried inside ``torch.nn.attention.sdpa_kernel`` only.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time

import torch

# x86 and Arm extensions that decide which PyTorch / oneDNN kernels run (vector width, bf16/int8 dot products)
X86_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
ARM_FLAGS = ("asimd", "asimdhp", "asimddp", "sve", "sve2", "bf16", "i8mm", "sme")
BF16_NATIVE = ("amx_bf16", "avx512_bf16", "bf16")  # instructions that multiply bfloat16 directly
ENV_OVERRIDES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS",
                 "MKL_NUM_THREADS", "KMP_AFFINITY", "ONEDNN_DEFAULT_FPMATH_MODE", "QKV_MATVEC", "QKV_COMPILE",
                 "QKV_PROMPT_DTYPE")
SDPA_BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def parse_cpuinfo(text: str) -> dict:
    """The CPU model, logical processor count and flag set from ``/proc/cpuinfo`` text (x86 "flags",
    Arm "Features"). The first processor's entry is taken: the flags are the same on every core."""
    model, flags, processors = None, None, 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
        elif key in ("model name", "cpu model", "hardware") and model is None and value:
            model = value
        elif key in ("flags", "features") and flags is None:
            flags = value.split()
    return {"model": model, "processors": processors or None, "flags": sorted(set(flags or ()))}


def parse_lscpu(text: str) -> dict:
    """The same from ``lscpu`` output ("Model name:", "CPU(s):", "Flags:")."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    cpus = fields.get("cpu(s)", "")
    return {"model": fields.get("model name") or None, "processors": int(cpus) if cpus.isdigit() else None,
            "flags": sorted(set(fields.get("flags", "").split()))}


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """CPU model and flags from ``/proc/cpuinfo``, else ``lscpu``, else only what ``platform`` knows."""
    info, source = None, None
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            info, source = parse_cpuinfo(f.read()), cpuinfo
    except OSError:
        pass
    if (info is None or not info["flags"]) and shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, check=False).stdout
            info, source = parse_lscpu(out), "lscpu"
        except (OSError, subprocess.SubprocessError):
            pass
    if info is None:
        info, source = {"model": None, "processors": None, "flags": []}, "platform"
    flags = set(info["flags"])
    relevant = X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64", "i686") else ARM_FLAGS
    return {"model": info["model"] or platform.processor() or None, "machine": platform.machine(),
            "logical_processors": info["processors"] or os.cpu_count(), "source": source,
            "flags": {f: f in flags for f in relevant}}


def hardware_report(*, seconds: float = 0.3, size: int = 1024) -> dict:
    """Everything :func:`render_hardware` shows, as data; ``seconds`` of timing per matmul dtype."""
    cpu = cpu_info()
    return {
        "cpu": cpu,
        "torch": _torch_build(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "environment": {k: os.environ[k] for k in ENV_OVERRIDES if k in os.environ},
        "threads": _threads(),
        "sdpa_cpu": sdpa_backends(torch.device("cpu")),
        "bfloat16": _bf16(cpu),
        "low_bit": {"int4": _int4_path(), "int8": _int8_path(), "qkv_matvec": _matvec_path()},
        "gpu": _gpu(),
        "matmul": {name: measure_matmul(dt, size=size, seconds=seconds)
                   for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))},
    }


def _torch_build() -> dict:
    b = torch.backends
    return {"version": torch.__version__, "mkl": b.mkl.is_available(), "mkldnn": b.mkldnn.is_available(),
            "openmp": b.openmp.is_available(), "cuda_build": torch.version.cuda,
            "onednn_version": _onednn_version()}


def _onednn_version() -> str | None:
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            parts = [p for p in line.split() if p[:1].lower() == "v" and p[1:2].isdigit()]
            return parts[0] if parts else line.strip(" -")
    return None


def _threads() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
            "usable_cpus": usable}


def sdpa_backends(device: torch.device) -> dict:
    """backend -> {dtype: usable}: each of PyTorch's SDPA backends tried alone on a tiny causal input."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name in SDPA_BACKENDS:
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        out[name.lower()] = {str(dt).replace("torch.", ""): _try_sdpa(backend, dt, device, sdpa_kernel)
                             for dt in (torch.float32, torch.bfloat16)}
    return out


def _try_sdpa(backend, dtype, device, sdpa_kernel) -> bool:
    import warnings

    q = torch.randn(1, 2, 8, 16, dtype=dtype, device=device)  # (B, H, T, D)
    try:
        with warnings.catch_warnings(), sdpa_kernel([backend]):
            warnings.simplefilter("ignore")  # "backend not available because …": the answer is the False
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return bool(torch.isfinite(out).all())
    except RuntimeError:
        return False


def _bf16(cpu: dict) -> dict:
    have = [f for f in BF16_NATIVE if cpu["flags"].get(f)]
    onednn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        onednn_ok = bool(onednn()) if onednn is not None else None
    except RuntimeError:
        onednn_ok = None
    return {"native": bool(have), "instructions": have, "onednn_bf16": onednn_ok}


def _int4_path() -> dict:
    """qkv's one-token path for GGUF Q4 weights: ``_weight_int4pack_mm_for_cpu``, tried on a 1×32 × 32×16 case."""
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if op is None:
        return {"op": "aten._weight_int4pack_mm_for_cpu", "exists": False, "works": False}
    try:
        codes = torch.randint(0, 16, (16, 32), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.ones(1, 16, 2, dtype=torch.bfloat16)  # (K/group, N, scale & zero)
        out = op(torch.randn(1, 32, dtype=torch.bfloat16), packed, 32, sz)
        works = tuple(out.shape) == (1, 16)
    except RuntimeError:
        works = False
    return {"op": "aten._weight_int4pack_mm_for_cpu", "exists": True, "works": works}


def _matvec_path() -> dict:
    """qkv's native matrix-vector operators (qkv.weights.matvec): whether they are built and pass their check,
    and which compact kinds a model loaded now multiplies with them (QKV_MATVEC)."""
    from ..errors import ConfigError
    from ..weights import matvec
    from ..weights.cache import compile_mode

    try:  # the report builds nothing, whatever QKV_COMPILE: what a process finds now
        mode, works, decodes = compile_mode(), matvec.available(build=False), sorted(matvec.kernels(build=False))
    except ConfigError as e:  # a mistyped QKV_MATVEC or QKV_COMPILE: said, not a crash of the report
        mode, works, decodes = "?", False, [f"none ({e})"]
    return {"op": "qkv.q4_mv, qkv.q8_mv", "exists": matvec.library_path() is not None, "works": works,
            "off": mode == "0", "decodes": decodes}


def _int8_path() -> dict:
    """PyTorch's int8-weight matmul (``_weight_int8pack_mm``, per-channel scales): the compact mode's unembedding."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return {"op": "aten._weight_int8pack_mm", "exists": False, "works": False}
    try:
        w = torch.randint(-128, 127, (16, 32), dtype=torch.int8)
        out = op(torch.randn(1, 32, dtype=torch.bfloat16), w, torch.ones(16, dtype=torch.bfloat16))
        works = tuple(out.shape) == (1, 16)
    except RuntimeError:
        works = False
    return {"op": "aten._weight_int8pack_mm", "exists": True, "works": works}


def _gpu() -> dict:
    out = {"cuda": torch.cuda.is_available(), "mps": bool(getattr(torch.backends, "mps", None)
                                                           and torch.backends.mps.is_available()), "devices": []}
    if out["cuda"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                   "memory_bytes": p.total_memory, "bf16": torch.cuda.is_bf16_supported()})
        out["sdpa"] = sdpa_backends(torch.device("cuda"))
    return out


def measure_matmul(dtype: torch.dtype, *, size: int = 1024, seconds: float = 0.3,
                   device: str | torch.device = "cpu") -> dict:
    """GFLOP/s of (size × size) @ (size × size) in ``dtype``, repeated for about ``seconds`` after one warm-up
    (2·size³ floating-point operations per product)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        runs += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return {"size": size, "runs": runs, "seconds": round(elapsed, 4),
            "gflops": round(2 * size**3 * runs / elapsed / 1e9, 1)}


# --- the terminal view --------------------------------------------------------------------------------------


def _yes(v) -> str:
    return "—" if v is None else "yes" if v else "no"


def render_hardware(r: dict) -> str:
    cpu, t, th = r["cpu"], r["torch"], r["threads"]
    on = [f for f, v in cpu["flags"].items() if v]
    off = [f for f, v in cpu["flags"].items() if not v]
    lines = [f"CPU        {cpu['model'] or 'unknown'} ({cpu['machine']}, {cpu['logical_processors']} logical CPUs; "
             f"flags from {cpu['source']})",
             f"  has      {' '.join(on) or '—'}",
             f"  lacks    {' '.join(off) or '—'}",
             f"ATen       CPU capability {r['capability']} (the vector kernels PyTorch dispatches to)"]
    for k, v in r["environment"].items():
        lines.append(f"  env      {k}={v}")
    lines += [
        f"threads    {th['intra_op']} intra-op, {th['inter_op']} inter-op; "
        f"{th['usable_cpus']} CPUs usable by this process",
        f"torch      {t['version']}; MKL {_yes(t['mkl'])}, oneDNN {_yes(t['mkldnn'])}"
        + (f" {t['onednn_version']}" if t["onednn_version"] else "") + f", OpenMP {_yes(t['openmp'])}"
        + (f", CUDA {t['cuda_build']}" if t["cuda_build"] else ""),
        "SDPA (CPU) " + ", ".join(f"{k}: {'/'.join(d for d, ok in v.items() if ok) or 'no'}"
                                 for k, v in r["sdpa_cpu"].items()),
    ]
    b = r["bfloat16"]
    lines.append("bfloat16   " + (f"native ({', '.join(b['instructions'])}): bf16 matmuls run on bf16 hardware"
                                  if b["native"] else "no bf16 instructions: bf16 matmuls convert to float32")
                 + f"; oneDNN bf16 {_yes(b['onednn_bf16'])}")
    for name, p in r["low_bit"].items():
        if name == "qkv_matvec":
            state = "works" if p["works"] else "off (QKV_COMPILE=0)" if p["off"] else \
                "built but not used (failed its check)" if p["exists"] else "not built (qkv compile)"
            uses = {"q4": "4-bit matrices", "q8": "int8 unembedding"}
            lines.append(f"{'qkv':<10} {p['op']}: {state}; one-token steps use them for "
                         f"{', '.join(uses.get(k, k) for k in p['decodes']) or 'nothing'}")
            continue
        state = "works" if p["works"] else "exists but failed on a tiny input" if p["exists"] else "missing"
        use = (" (qkv: GGUF Q4 one-token steps, where q4_mv is not used)" if name == "int4" else
               " (qkv: the compact mode's unembedding, where q8_mv is not used)")
        lines.append(f"{name:<10} {p['op']}: {state}{use}")
    lines.append("GPU        " + _gpu_text(r["gpu"]))
    mm = r["matmul"]
    f32, bf = mm["float32"], mm["bfloat16"]
    lines.append(f"matmul     {f32['size']}×{f32['size']} @ {f32['size']}×{f32['size']} on the CPU: "
                 f"float32 {f32['gflops']:,.1f} GFLOP/s, bfloat16 {bf['gflops']:,.1f} GFLOP/s "
                 f"({bf['gflops'] / f32['gflops']:.2f}× float32; timed ~{f32['seconds']:.2g} s each)")
    return "\n".join(lines) + "\n"


def _gpu_text(g: dict) -> str:
    if g["devices"]:
        return "; ".join(f"cuda:{d['index']} {d['name']} (compute {d['capability']}, "
                         f"{d['memory_bytes'] / 2**30:.0f} GiB, bf16 {_yes(d['bf16'])})" for d in g["devices"])
    return "Apple MPS" if g["mps"] else "none (torch.cuda.is_available() is False)"
