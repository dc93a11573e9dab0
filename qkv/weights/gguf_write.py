"""GGUF v3 bytes, written: the layout qkv.weights.gguf reads and validates, little-endian.

Header (magic ``GGUF``, version u32, tensor count u64, metadata count u64), metadata entries (key
string, value type u32, value), tensor infos (name string, n_dims u32, ne[n_dims] u64 with the
fastest-varying dimension first, ggml type u32, offset u64 into the data section), zero padding to the
alignment, then each tensor's data, each padded to the alignment. A string is a u64 byte length then
UTF-8. Only what an F32/F16 Llama export needs is here; the caller streams the data tensor by tensor.
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

import numpy as np
import torch

from .gguf import ARRAY_TYPE, DEFAULT_ALIGNMENT, GGUF_MAGIC, SCALAR_TYPES, STRING_TYPE
from .quants import GGML_TYPES_BY_NAME

GGUF_VERSION = 3
ALIGNMENT = DEFAULT_ALIGNMENT  # so the general.alignment key is not written
# the ggml tensor types written here -> (type id, numpy dtype of the stored little-endian values)
GGML_TENSOR_TYPES = {name: (GGML_TYPES_BY_NAME[name].type_id, dt) for name, dt in (("F32", "<f4"), ("F16", "<f2"))}
# metadata value type name -> (type id, numpy dtype), from the reader's table; STRING is written by hand
GGUF_VALUE_TYPES = {**{name: (tid, fmt) for tid, (name, fmt, _) in SCALAR_TYPES.items()}, "STRING": (STRING_TYPE, None)}


def _gguf_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw  # u64 byte length, then UTF-8


def _gguf_value(vtype: str, v: Any) -> bytes:
    """Type id then value; an array ("ARRAY[INT32]", …) is item type, count, items."""
    if vtype.startswith("ARRAY["):
        item = vtype[len("ARRAY["):-1]
        tid, np_dtype = GGUF_VALUE_TYPES[item]
        body = b"".join(map(_gguf_str, v)) if item == "STRING" else np.asarray(v, dtype=np_dtype).tobytes()
        return struct.pack("<IIQ", ARRAY_TYPE, tid, len(v)) + body
    tid, np_dtype = GGUF_VALUE_TYPES[vtype]
    return struct.pack("<I", tid) + (_gguf_str(v) if vtype == "STRING" else np.asarray(v, dtype=np_dtype).tobytes())


def gguf_header(kvs: list[tuple[str, str, Any]], tensors: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """Everything before the data: ``kvs`` as (key, value type, value), ``tensors`` as (name, ggml type,
    torch shape) in the order :func:`write_tensor` will write them; padded so the data starts aligned."""
    out = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs))]
    out += [_gguf_str(k) + _gguf_value(vtype, v) for k, vtype, v in kvs]
    offset = 0  # relative to the data section; every tensor starts aligned
    for name, ggml_type, shape in tensors:
        ne = tuple(reversed(shape))  # ggml lists the fastest-varying dimension first
        tid, np_dtype = GGML_TENSOR_TYPES[ggml_type]
        out.append(_gguf_str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, tid, offset))
        offset += _aligned(int(np.prod(shape)) * np.dtype(np_dtype).itemsize)
    head = b"".join(out)
    return head + b"\0" * (_aligned(len(head)) - len(head))


def write_tensor(f: BinaryIO, t: torch.Tensor, ggml_type: str) -> None:
    """One tensor's data as ``ggml_type`` (F32 or F16), then the padding to the next aligned offset."""
    data = t.to(torch.float16 if ggml_type == "F16" else torch.float32).contiguous().numpy()
    data = data.astype(GGML_TENSOR_TYPES[ggml_type][1], copy=False)  # little-endian on any host
    f.write(memoryview(data).cast("B"))
    f.write(b"\0" * (_aligned(data.nbytes) - data.nbytes))


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT
