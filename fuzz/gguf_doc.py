"""A GGUF file as an editable structure: header, metadata entries, tensor table, data — and a writer that
writes whatever the structure says, consistent or not (declared counts and lengths can lie).

Seeds are written by gguf-py's ``GGUFWriter`` and read back here with gguf-py's ``GGUFReader``;
:func:`serialize` of an unmutated document reproduces gguf-py's bytes exactly (the harness checks it),
so every mutation starts from a file gguf-py itself wrote.
"""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# value type ids (GGUF spec)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
                  BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


@dataclass
class KV:
    """One metadata entry. ``value``: int/float for scalars, bytes for a string, a list for an array
    (of bytes / numbers / nested lists for an array of arrays). ``count``/``key_len`` override what
    the writer declares (None: the truth)."""

    key: bytes
    vtype: int
    value: Any
    item_type: int | None = None  # arrays: the items' type
    count: int | None = None
    key_len: int | None = None
    raw: bytes | None = None  # written instead of the value when set


@dataclass
class TensorInfo:
    name: bytes
    dims: list[int]  # ggml order (ne)
    ttype: int
    offset: int
    n_dims: int | None = None  # declared dimension count (None: len(dims))


@dataclass
class GGUFDoc:
    magic: bytes = b"GGUF"
    version: int = 3
    kvs: list[KV] = field(default_factory=list)
    tensors: list[TensorInfo] = field(default_factory=list)
    data: bytes = b""
    n_tensors: int | None = None
    n_kv: int | None = None
    alignment: int | None = None  # padding before the data section (None: from general.alignment or 32)

    def copy(self) -> GGUFDoc:
        return copy.deepcopy(self)

    def kv(self, key: str) -> KV | None:
        return next((kv for kv in self.kvs if kv.key == key.encode()), None)


def _pack(vtype: int, value: Any, item_type: int | None = None, count: int | None = None) -> bytes:
    if vtype in SCALAR_FORMATS:
        fmt = SCALAR_FORMATS[vtype]
        try:
            return struct.pack(fmt, value)
        except (struct.error, TypeError, OverflowError):
            return struct.pack(fmt.replace("f", "I").replace("d", "Q"), 0)
    if vtype == STRING:
        b = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(b) if count is None else count) + b
    if vtype == ARRAY:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        head = struct.pack("<IQ", item_type if item_type is not None else UINT8,
                           (len(items) if count is None else count) & 0xFFFFFFFFFFFFFFFF)
        if item_type == ARRAY:
            return head + b"".join(_pack(ARRAY, it, UINT8) for it in items)
        return head + b"".join(_pack(item_type if item_type in SCALAR_FORMATS or item_type == STRING else UINT8, it)
                               for it in items)
    # an unknown type id: its "value" is whatever bytes follow
    return value if isinstance(value, bytes) else b""


def serialize(doc: GGUFDoc) -> bytes:
    """The file the document describes (a lying count or length is written as it is)."""
    out = [doc.magic[:4].ljust(4, b"\0"), struct.pack("<I", doc.version & 0xFFFFFFFF),
           struct.pack("<QQ", (len(doc.tensors) if doc.n_tensors is None else doc.n_tensors) & (2**64 - 1),
                       (len(doc.kvs) if doc.n_kv is None else doc.n_kv) & (2**64 - 1))]
    for kv in doc.kvs:
        out.append(struct.pack("<Q", (len(kv.key) if kv.key_len is None else kv.key_len) & (2**64 - 1)) + kv.key)
        out.append(struct.pack("<I", kv.vtype & 0xFFFFFFFF))
        out.append(kv.raw if kv.raw is not None else _pack(kv.vtype, kv.value, kv.item_type, kv.count))
    for t in doc.tensors:
        n_dims = len(t.dims) if t.n_dims is None else t.n_dims
        out.append(struct.pack("<Q", len(t.name)) + t.name + struct.pack("<I", n_dims & 0xFFFFFFFF))
        out.append(b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in t.dims))
        out.append(struct.pack("<IQ", t.ttype & 0xFFFFFFFF, t.offset & (2**64 - 1)))
    body = b"".join(out)
    align = doc.alignment or _declared_alignment(doc) or 32
    return body + b"\0" * ((-len(body)) % max(align, 1)) + doc.data


def _declared_alignment(doc: GGUFDoc) -> int | None:
    kv = doc.kv("general.alignment")
    if kv is not None and kv.vtype == UINT32 and isinstance(kv.value, int) and 0 < kv.value <= 1 << 16 \
            and not kv.value & (kv.value - 1):
        return kv.value
    return None


def read_doc(path: Path) -> GGUFDoc:
    """A gguf-py-written file as a document (gguf-py's reader does the parsing)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    doc = GGUFDoc(version=int(reader.fields["GGUF.version"].parts[0][0]))
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        vtype = int(f.types[0])
        if vtype == ARRAY:
            item = int(f.types[-1])
            if item == STRING:
                value = [f.parts[i].tobytes() for i in f.data]
            else:
                value = [p for i in f.data for p in f.parts[i].tolist()]
            doc.kvs.append(KV(name.encode(), ARRAY, value, item))
        elif vtype == STRING:
            doc.kvs.append(KV(name.encode(), STRING, f.parts[-1].tobytes()))
        else:
            doc.kvs.append(KV(name.encode(), vtype, f.parts[-1].tolist()[0]))
    data_start = min((t.data_offset for t in reader.tensors), default=len(reader.data))
    for t in reader.tensors:
        parts = t.field.parts
        doc.tensors.append(TensorInfo(parts[1].tobytes(), [int(d) for d in parts[3].tolist()], int(parts[4][0]),
                                      int(parts[5][0])))
    doc.data = bytes(reader.data[data_start:])
    return doc
