"""Fixtures for the weights tests: a byte-level GGUF builder, a tiny valid GGUF, the real model.

The byte builder packs GGUF structures with ``struct`` so tests can write files that no
well-behaved writer would produce (the bad-input cases of RELIABILITY.md §9.1). Valid files come
from ``gguf.GGUFWriter`` (gguf-py is a test-only oracle).
"""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import pytest

import gguf  # a dev dependency: a missing install must fail, not skip

# value type ids of the GGUF spec
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = range(10)
UINT64, INT64, FLOAT64 = 10, 11, 12


def gstr(s: str | bytes) -> bytes:
    """A GGUF string: u64 length then the bytes."""
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One metadata entry with an already packed value."""
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, UINT32, struct.pack("<I", value))


def kv_str(key: str, value: str | bytes) -> bytes:
    return kv(key, STRING, gstr(value))


def tinfo(name: str | bytes, ne: list[int], type_id: int, offset: int,
          n_dims: int | None = None) -> bytes:
    """One tensor-table entry; ``n_dims`` may disagree with ``ne`` on purpose."""
    nd = len(ne) if n_dims is None else n_dims
    return gstr(name) + struct.pack("<I", nd) + b"".join(struct.pack("<Q", d) for d in ne) + \
        struct.pack("<IQ", type_id, offset)


def assemble(kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, version: int = 3,
             n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32,
             magic: bytes = b"GGUF") -> bytes:
    """Header + metadata + tensor table, padded to ``alignment``, then ``data``."""
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    pad = (-len(body)) % alignment
    return body + b"\0" * pad + data


def f32_file(n: int = 2, ne: tuple[int, ...] = (8,), extra_kvs: tuple[bytes, ...] = ()) -> bytes:
    """A small valid file of ``n`` F32 tensors laid out back to back."""
    size = 4 * int(np.prod(ne))
    step = -(-size // 32) * 32
    infos = [tinfo(f"t{i}", list(ne), 0, i * step) for i in range(n)]
    one = np.arange(size // 4, dtype="<f4").tobytes().ljust(step, b"\0")
    data = one * n
    return assemble([kv_str("general.architecture", "llama"), *extra_kvs], infos, data)


@pytest.fixture
def gg() -> SimpleNamespace:
    """The byte builder, as one namespace."""
    return SimpleNamespace(gstr=gstr, kv=kv, kv_u32=kv_u32, kv_str=kv_str, tinfo=tinfo,
                           assemble=assemble, f32_file=f32_file, UINT8=UINT8, INT8=INT8,
                           UINT16=UINT16, INT16=INT16, UINT32=UINT32, INT32=INT32,
                           FLOAT32=FLOAT32, BOOL=BOOL, STRING=STRING, ARRAY=ARRAY,
                           UINT64=UINT64, INT64=INT64, FLOAT64=FLOAT64)


@pytest.fixture
def write(tmp_path: Path) -> Callable[[bytes], Path]:
    """Write bytes to a fresh file and return its path."""
    counter = iter(range(1_000_000))

    def _write(data: bytes, name: str | None = None) -> Path:
        p = tmp_path / (name or f"case{next(counter)}.gguf")
        p.write_bytes(data)
        return p

    return _write


def _random_kquant_blocks(rng: np.random.Generator, type_name: str, n_blocks: int) -> np.ndarray:
    """Random bytes for a k-quant block with finite, modest f16 scales where the format has them."""
    from qkv.weights.quants import GGML_TYPES_BY_NAME

    t = GGML_TYPES_BY_NAME[type_name]
    b = rng.integers(0, 256, (n_blocks, t.type_size), dtype=np.uint8)
    halves = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    for off in halves[type_name]:
        scale = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16)
        b[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return b


def write_tiny_gguf(path: Path, endianess: object = None) -> dict[str, np.ndarray]:
    """A valid tiny GGUF from ``gguf.GGUFWriter``: every metadata kind and several tensor types.

    Returns the raw payload written for each tensor, for byte-level checks.
    """
    rng = np.random.default_rng(1234)
    kwargs = {} if endianess is None else {"endianess": endianess}
    w = gguf.GGUFWriter(str(path), "llama", **kwargs)
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_int64("test.int64", -(1 << 40))
    w.add_float64("test.float64", 1.0 / 3.0)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "é", "日本", ""])
    w.add_array("tokenizer.ggml.token_type", [1, 2, 3, -4, 5])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.25, 3.0, 1e-8, 7.0])
    w.add_array("test.bools", [True, False, True])
    payloads: dict[str, np.ndarray] = {}
    x = rng.standard_normal((4, 64)).astype(np.float32)
    payloads["f32"] = x
    payloads["f16"] = x.astype(np.float16)
    payloads["bf16"] = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16)
    for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        payloads[name.lower()] = gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
    for name in ("Q4_K", "Q6_K"):
        payloads[name.lower()] = _random_kquant_blocks(rng, name, 2).reshape(2, -1)
    for key, arr in payloads.items():
        qtype = None if key in ("f32", "f16") else gguf.GGMLQuantizationType[key.upper()]
        w.add_tensor(f"{key}.weight", arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return payloads


@pytest.fixture
def make_tiny() -> Callable[..., dict[str, np.ndarray]]:
    """The tiny-file writer itself, for tests that need their own copy (or a big-endian one)."""
    return write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny valid GGUF (written once per session; tests must not modify it)."""
    p = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(p)
    return p


@pytest.fixture(scope="session")
def real_gguf_path() -> Path:
    """The embedded SmolLM2 GGUF (installed by `make setup`; its absence is a failure, not a skip)."""
    from qkv.weights.embedded import embedded_path

    return embedded_path("smollm2")


@pytest.fixture(scope="session")
def real_reader(real_gguf_path: Path) -> object:
    """gguf-py's own reader of the real file: the oracle (slow to build, so built once)."""
    return gguf.GGUFReader(str(real_gguf_path))


@pytest.fixture(scope="session")
def real_file(real_gguf_path: Path) -> Iterator[object]:
    """Our reader of the real file, shared by the tests that only read it."""
    from qkv.weights.gguf import read_gguf

    f = read_gguf(real_gguf_path)
    yield f
    f.close()
