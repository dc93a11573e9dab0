"""CMAKE_ARGS for building llama.cpp (llama-cpp-python) so that it runs on this machine *and* on the project's
other CPU kind: no -march=native (GGML_NATIVE=OFF), the x86 extensions chosen from /proc/cpuinfo, and AMX
always off — a native build on an AMX machine dies with an illegal instruction (an AMX ``tilezero``) as soon as
a prompt has more than one token. ``make llamacpp`` uses it; run it to see the flags."""

from __future__ import annotations

from pathlib import Path

# GGML option -> the /proc/cpuinfo flag it needs
OPTIONS = [("GGML_SSE42", "sse4_2"), ("GGML_AVX", "avx"), ("GGML_AVX2", "avx2"), ("GGML_FMA", "fma"),
           ("GGML_F16C", "f16c"), ("GGML_BMI2", "bmi2"), ("GGML_AVX512", "avx512f"),
           ("GGML_AVX512_VBMI", "avx512vbmi"), ("GGML_AVX512_VNNI", "avx512_vnni"),
           ("GGML_AVX512_BF16", "avx512_bf16"), ("GGML_AVX_VNNI", "avx_vnni")]


def cmake_args(flags: set[str]) -> str:
    on = [f"-D{opt}={'ON' if need in flags else 'OFF'}" for opt, need in OPTIONS]
    amx = [f"-D{opt}=OFF" for opt in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")]
    return " ".join(["-DGGML_NATIVE=OFF", *on, *amx])


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


if __name__ == "__main__":
    print(cmake_args(cpu_flags()))
