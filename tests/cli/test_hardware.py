"""``qkv info --hardware``: the JSON has every field; the capability, threads, build flags, GPU and low-bit ops
equal what torch reports itself; the CPU flags equal this machine's /proc/cpuinfo read here independently; the
parsers are unit-tested on fixed /proc/cpuinfo and lscpu samples; an ATEN_CPU_CAPABILITY override shows up;
measured rates are positive numbers (no golden of the numbers); bad options are one line, exit 2.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkv.cli.main import main
from qkv.explain.hardware import ARM_FLAGS, X86_FLAGS, parse_cpuinfo, parse_lscpu

X86_SAMPLE = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile amx_int8
"""

ARM_SAMPLE = """\
processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimddp sve i8mm bf16
CPU implementer\t: 0x41

processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimddp sve i8mm bf16
"""

LSCPU_SAMPLE = """\
Architecture:                       x86_64
CPU(s):                             8
Model name:                         AMD EPYC 7B13
Flags:                              fpu sse4_2 avx avx2 fma f16c
"""


def test_parse_cpuinfo_x86():
    info = parse_cpuinfo(X86_SAMPLE)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+" and info["processors"] == 2
    assert {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"} <= set(info["flags"])
    assert "avx512_fp16" not in info["flags"] and "spectre_v1" not in info["flags"]


def test_parse_cpuinfo_arm_and_empty():
    info = parse_cpuinfo(ARM_SAMPLE)
    assert info["processors"] == 2 and {"asimd", "sve", "bf16", "i8mm"} <= set(info["flags"])
    assert "avx2" not in info["flags"]
    assert parse_cpuinfo("") == {"model": None, "processors": None, "flags": []}


def test_parse_lscpu():
    assert parse_lscpu(LSCPU_SAMPLE) == {"model": "AMD EPYC 7B13", "processors": 8,
                                         "flags": sorted(["fpu", "sse4_2", "avx", "avx2", "fma", "f16c"])}


@pytest.fixture(scope="module")
def report() -> dict:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["info", "--hardware", "--format", "json", "--matmul-seconds", "0.05"])
    assert code == 0 and err.getvalue() == "", err.getvalue()
    return json.loads(out.getvalue())


def test_json_has_the_fields(report):
    assert set(report) == {"cpu", "torch", "capability", "environment", "threads", "sdpa_cpu", "bfloat16",
                           "low_bit", "gpu", "matmul"}
    assert set(report["cpu"]) == {"model", "machine", "logical_processors", "source", "flags"}
    assert set(report["cpu"]["flags"]) in (set(X86_FLAGS), set(ARM_FLAGS))
    assert {"math", "flash_attention"} <= set(report["sdpa_cpu"])
    assert set(report["low_bit"]) == {"int4", "int8", "qkv_matvec"}


def test_values_equal_torch_own(report):
    assert report["capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["threads"]["intra_op"] == torch.get_num_threads()
    assert report["threads"]["inter_op"] == torch.get_num_interop_threads()
    t = report["torch"]
    assert t["version"] == torch.__version__ and t["mkldnn"] == torch.backends.mkldnn.is_available()
    assert t["mkl"] == torch.backends.mkl.is_available()
    assert report["gpu"]["cuda"] == torch.cuda.is_available()
    assert report["low_bit"]["int4"]["exists"] == hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    assert report["low_bit"]["int8"]["exists"] == hasattr(torch.ops.aten, "_weight_int8pack_mm")
    from qkv.weights import matvec

    mv = report["low_bit"]["qkv_matvec"]
    assert mv["decodes"] == sorted(matvec.kernels()) and mv["works"] == matvec.available()
    assert mv["exists"] == (matvec.library_path() is not None)
    assert report["sdpa_cpu"]["math"]["float32"] is True  # the reference backend runs everywhere


def test_flags_equal_this_machines_cpuinfo(report):
    path = Path("/proc/cpuinfo")
    if not path.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set()
    for line in path.read_text().splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert report["cpu"]["flags"] == {f: f in flags for f in report["cpu"]["flags"]}
    native = [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags and f in report["cpu"]["flags"]]
    assert report["bfloat16"]["native"] == bool(native)


def test_rates_are_positive_numbers(report):
    for name in ("float32", "bfloat16"):
        m = report["matmul"][name]
        assert isinstance(m["gflops"], (int, float)) and math.isfinite(m["gflops"]) and m["gflops"] > 0
        assert m["runs"] >= 1 and m["seconds"] >= 0.05 and m["size"] == 1024


def test_environment_override_is_shown():
    """ATEN_CPU_CAPABILITY=default makes PyTorch use its scalar kernels; the report says so and shows the variable."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    p = subprocess.run([sys.executable, "-m", "qkv", "info", "--hardware", "--format", "json", "--matmul-seconds",
                        "0.01"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["environment"]["ATEN_CPU_CAPABILITY"] == "default"
    assert r["capability"] == "DEFAULT"


def test_text_view(capsys):
    code = main(["info", "--hardware", "--matmul-seconds", "0.02"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    for part in ("CPU ", "ATen       CPU capability " + torch.backends.cpu.get_cpu_capability(), "threads",
                 "SDPA (CPU)", "bfloat16", "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm", "GPU", "GFLOP/s"):
        assert part in out, part


@pytest.mark.parametrize("argv,needle", [
    (["smollm2", "--hardware"], "--hardware describes this machine"),
    (["--hardware", "--matmul-seconds", "0"], "--matmul-seconds"),
    (["--hardware", "--matmul-seconds", "nan"], "--matmul-seconds"),
])
def test_bad_input_one_line_exit_2(capsys, argv, needle):
    code = main(["info", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("qkv: error: ") and err.count("\n") == 1 and needle in err, err
