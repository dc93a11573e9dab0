"""A validating GGUF reader: every count, length and offset is checked before it is trusted.

GGUF files come from the internet, so the reader treats each number in the header as hostile:
it is a plain Python int (no fixed-width wrap-around), compared with what the rest of the file
could possibly hold before anything is allocated, looped over or multiplied further
(RELIABILITY.md §9.1, G1–G13). Any malformed file raises :class:`ModelFormatError` with one line
naming the file, the field or tensor, the byte offset and, where there is one, the fix.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, metadata
count u64; metadata entries (key string, value type u32, value); tensor infos (name string,
n_dims u32, ne[n_dims] u64, ggml type u32, offset u64 relative to the data section); padding to
``general.alignment``; the data section. A string is a u64 byte length then UTF-8 bytes.

Policies where the format leaves room (each has a test):

* Big-endian files are rejected with a message saying so; only little-endian is supported.
* Tensor data: each tensor must start at an aligned offset and lie wholly inside the file, and no
  two tensors may overlap. Gaps between tensors and tensors stored out of table order are
  accepted (llama.cpp wants an exact running sum; the bytes we read are checked either way).
* Zero-sized dimensions are rejected: no model tensor has them and the spec does not define them.
* Arrays of arrays are rejected (nesting depth limit 1): no model uses them and unbounded nesting
  is a known denial-of-service shape.
* Counts a file could hold but no model needs are refused from the header, so that parsing stays
  within about a second and a few hundred MB of Python objects: at most ``MAX_TENSORS`` tensors,
  ``MAX_ARRAY_ITEMS`` items in one metadata array and ``MAX_METADATA_ITEMS`` array items in all
  (the largest vocabularies have ~262k tokens).
* The file is memory-mapped read-only. Its size and modification time are recorded at open and
  checked again before each tensor read; a file changed since then raises instead of being read.
  A file truncated by another process *while* a returned :meth:`GGUFFile.raw` view is in use can
  still fault (SIGBUS); :meth:`GGUFFile.tensor` reads the bytes only while it dequantises them
  into new memory, which keeps that window to one call.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from qkv.errors import ModelFormatError
from qkv.weights.quants import GGML_TYPES, can_dequantize, dequantize

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20  # real files use 32; anything past 1 MiB is a corrupt field
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL (keys are unlimited)
MAX_ELEMENTS = (1 << 63) - 1  # ggml counts elements in int64_t
HEADER_BYTES = 24  # magic, version, tensor count, metadata count
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, >= 1 key byte, value type, >= 1 value byte
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, >= 1 byte, n_dims, 1 dim, type, offset
MAX_TENSORS = 1 << 16  # real models: a few thousand (405B Llama: ~1,100)
MAX_ARRAY_ITEMS = 1 << 21  # one metadata array (tokens, merges, scores: < 300k in real files)
MAX_METADATA_ITEMS = 1 << 23  # all metadata array items together

# scalar value type id -> (name, struct/numpy format, byte size); 8 is STRING and 9 is ARRAY
SCALAR_TYPES: dict[int, tuple[str, str, int]] = {
    0: ("UINT8", "<B", 1), 1: ("INT8", "<b", 1), 2: ("UINT16", "<H", 2), 3: ("INT16", "<h", 2),
    4: ("UINT32", "<I", 4), 5: ("INT32", "<i", 4), 6: ("FLOAT32", "<f", 4), 7: ("BOOL", "<B", 1),
    10: ("UINT64", "<Q", 8), 11: ("INT64", "<q", 8), 12: ("FLOAT64", "<d", 8),
}
BOOL_TYPE, STRING_TYPE, ARRAY_TYPE = 7, 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives: ``shape`` in torch order (ggml's ``ne`` reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file, tracking the byte offset."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)
        self.key_offsets: dict[str, int] = {}  # where each metadata entry starts, for messages
        self.items_left = MAX_METADATA_ITEMS  # array items the rest of the metadata may still hold

    def fail(self, what: str, problem: str, at: int | None = None,
             fix: str = "") -> ModelFormatError:
        """The one-line error: file, field, byte offset, problem, and the fix if there is one."""
        where = self.pos if at is None else at
        tail = f"; {fix}" if fix else ""
        return ModelFormatError(f"{self.path}: {what} at byte {where}: {problem}{tail}")

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str, at: int | None = None) -> None:
        if n > self.remaining():
            raise self.fail(what, f"needs {n} bytes but only {self.remaining()} remain "
                            "(file truncated or field corrupt)", at=at, fix="re-download the file")

    def unpack(self, fmt: str, size: int, what: str) -> int | float:
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", 8, what))

    def string(self, what: str, max_bytes: int | None = None) -> str:
        start = self.pos
        n = self.u64(f"{what} length")
        if max_bytes is not None and n > max_bytes:
            raise self.fail(what, f"is {n} bytes long, at most {max_bytes} allowed", at=start)
        self.need(n, what, at=start)
        raw = self.buf[self.pos:self.pos + n]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(what, f"invalid UTF-8 ({e.reason} at string byte {e.start})",
                            at=start) from None
        self.pos += n
        return text


# ---------------------------------------------------------------------------------------------
# header and metadata


def _check_magic_and_version(cur: _Cursor) -> int:
    """Magic and version, with the messages a user can act on (G1, G2)."""
    magic = bytes(cur.buf[0:4])
    if magic == GGUF_MAGIC[::-1]:
        raise cur.fail("magic", "magic is 'FUGG' (byte-swapped 'GGUF'): a big-endian file; "
                       "qkv reads little-endian GGUF only", at=0,
                       fix="use a little-endian conversion")
    if magic != GGUF_MAGIC:
        raise cur.fail("magic", f"not a GGUF file (starts with {magic!r}, expected b'GGUF')", at=0)
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS and version > 0xFFFF:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        raise cur.fail("version", f"version {version:#x} looks byte-swapped (would be {swapped} "
                       "big-endian): wrong endianness or corrupt; qkv reads little-endian GGUF "
                       "v2/v3 only", at=4)
    if version not in SUPPORTED_VERSIONS:
        fix = "re-convert the model with a current llama.cpp" if version < 2 else ""
        raise cur.fail("version", f"unsupported GGUF version {version} (supported: 2, 3)",
                       at=4, fix=fix)
    return version


def _read_counts(cur: _Cursor) -> tuple[int, int]:
    """Tensor and metadata counts, refused if the file could not hold that many entries (G3)."""
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    least = n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES
    if least > cur.remaining():
        raise cur.fail("header counts", f"{n_kv} metadata entries and {n_tensors} tensors need at "
                       f"least {least} bytes but the file has {cur.remaining()} left", at=8)
    if n_tensors > MAX_TENSORS:
        raise cur.fail("header counts", f"{n_tensors} tensors, more than the {MAX_TENSORS} qkv reads (real models "
                       "have a few thousand)", at=8)
    return n_tensors, n_kv


def _read_scalar(cur: _Cursor, vtype: int, what: str) -> object:
    name, fmt, size = SCALAR_TYPES[vtype]
    at = cur.pos
    v = cur.unpack(fmt, size, what)
    if name == "BOOL":
        if v not in (0, 1):
            raise cur.fail(what, f"BOOL value is {v}, must be 0 or 1", at=at)
        return bool(v)
    return v


def _read_array(cur: _Cursor, what: str) -> tuple[list[object], str]:
    """An array of scalars or strings; arrays of arrays are refused (G5)."""
    at = cur.pos
    itype = cur.u32(f"{what} array item type")
    if itype == ARRAY_TYPE:
        raise cur.fail(what, "array of arrays (nesting deeper than 1) is not supported", at=at)
    if itype != STRING_TYPE and itype not in SCALAR_TYPES:
        raise cur.fail(what, f"unknown array item type {itype}", at=at)
    count = cur.u64(f"{what} array length")
    if count > min(MAX_ARRAY_ITEMS, cur.items_left):
        limit = "one array" if count > MAX_ARRAY_ITEMS else "all arrays together"
        raise cur.fail(what, f"array length {count} is more than qkv reads in {limit} "
                       f"({min(MAX_ARRAY_ITEMS, MAX_METADATA_ITEMS)} / {MAX_METADATA_ITEMS})", at=at + 4)
    cur.items_left -= count
    type_name, fmt, item = ("STRING", "", 8) if itype == STRING_TYPE else SCALAR_TYPES[itype]
    # item is a lower bound for a string (its length field), so this is checked before looping
    if count * item > cur.remaining():
        raise cur.fail(what, f"array length {count} needs at least {count * item} bytes but "
                       f"only {cur.remaining()} remain", at=at + 4)
    if itype == STRING_TYPE:
        values: list[object] | None = _strings_fast(cur, count)
        if values is None:  # something is wrong: the careful loop finds what and says where
            values = [cur.string(f"{what}[{i}]") for i in range(count)]
    else:
        values = np.frombuffer(cur.buf, dtype=np.dtype(fmt), count=count, offset=cur.pos).tolist()
        if itype == BOOL_TYPE and any(v > 1 for v in values):
            raise cur.fail(what, "BOOL array holds a value other than 0 or 1", at=cur.pos)
        values = [bool(v) for v in values] if itype == BOOL_TYPE else values
        cur.pos += count * item
    return values, f"ARRAY[{type_name}]"


_U64 = struct.Struct("<Q").unpack_from


def _strings_fast(cur: _Cursor, count: int) -> list[object] | None:
    """``count`` strings from the cursor, as :meth:`_Cursor.string` reads them, in one tight loop (a
    vocabulary has ~50k-250k of them); None, with the cursor unmoved, at the first thing that is not a
    well-formed UTF-8 string inside the file."""
    buf, pos, size, out = cur.buf, cur.pos, cur.size, []
    append = out.append
    try:
        for _ in range(count):
            if pos + 8 > size:
                return None
            (n,) = _U64(buf, pos)
            pos += 8
            if n > size - pos:
                return None
            append(buf[pos:pos + n].decode("utf-8"))
            pos += n
    except UnicodeDecodeError:
        return None
    cur.pos = pos
    return out


def _read_value(cur: _Cursor, vtype: int, what: str, at: int) -> tuple[object, str]:
    """One metadata value and its type name (G4, G7)."""
    if vtype in SCALAR_TYPES:
        return _read_scalar(cur, vtype, what), SCALAR_TYPES[vtype][0]
    if vtype == STRING_TYPE:
        return cur.string(what), "STRING"
    if vtype == ARRAY_TYPE:
        return _read_array(cur, what)
    raise cur.fail(what, f"unknown value type {vtype}", at=at)


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, object], dict[str, str]]:
    """All metadata entries; keys must be non-empty, valid UTF-8 and unique (G6)."""
    metadata: dict[str, object] = {}
    types: dict[str, str] = {}
    for i in range(n_kv):
        at = cur.pos
        key = cur.string(f"metadata key #{i}")
        if not key:
            raise cur.fail(f"metadata key #{i}", "empty key", at=at)
        if key in metadata:
            raise cur.fail(f"metadata key {key!r}", "duplicate key", at=at)
        cur.key_offsets[key] = at
        type_at = cur.pos
        vtype = cur.u32(f"metadata {key!r} value type")
        metadata[key], types[key] = _read_value(cur, vtype, f"metadata {key!r}", type_at)
    return metadata, types


def _alignment(cur: _Cursor, metadata: dict[str, object], types: dict[str, str]) -> int:
    """``general.alignment``: a UINT32 power of two up to 1 MiB, default 32 (G8)."""
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value, vtype = metadata["general.alignment"], types["general.alignment"]
    what, at = "metadata 'general.alignment'", cur.key_offsets["general.alignment"]
    if vtype != "UINT32":
        raise cur.fail(what, f"type is {vtype}, must be UINT32", at=at)
    assert isinstance(value, int)
    if value <= 0 or value & (value - 1) or value > MAX_ALIGNMENT:
        raise cur.fail(what, f"value {value} is not a power of two between 1 and {MAX_ALIGNMENT}",
                       at=at)
    return value


# ---------------------------------------------------------------------------------------------
# tensor table


@dataclass(frozen=True)
class _RawTensor:
    """A tensor-table entry before the data section's position is known."""

    name: str
    ne: tuple[int, ...]
    type_name: str
    rel_offset: int
    nbytes: int
    at: int  # byte offset of the entry, for messages


def _tensor_nbytes(cur: _Cursor, name: str, ne: tuple[int, ...], type_id: int, at: int) -> int:
    """Byte size from dims, with every limit checked on Python ints (G7, G10, G11, G13)."""
    what = f"tensor {name!r}"
    gt = GGML_TYPES.get(type_id)
    if gt is None:
        raise cur.fail(what, f"unknown ggml tensor type {type_id}", at=at)
    for i, d in enumerate(ne):
        if d == 0 or d > MAX_ELEMENTS:
            raise cur.fail(what, f"dimension ne[{i}] = {d} is not in 1..{MAX_ELEMENTS}", at=at)
    n = 1
    for d in ne:
        n *= d
    if n > MAX_ELEMENTS:
        raise cur.fail(what, f"element count {n} of dims {list(ne)} is not representable "
                       "(exceeds int64)", at=at)
    if ne[0] % gt.block_size:
        raise cur.fail(what, f"row length ne[0] = {ne[0]} is not a multiple of the {gt.name} "
                       f"block size {gt.block_size}", at=at)
    nbytes = n // gt.block_size * gt.type_size
    if nbytes > cur.size:
        raise cur.fail(what, f"{gt.name} data of {nbytes} bytes is larger than the whole file "
                       f"({cur.size} bytes)", at=at)
    return nbytes


def _read_tensor_info(cur: _Cursor, index: int) -> _RawTensor:
    """One tensor-table entry; name < 64 bytes, 1..4 dims (G6, G9)."""
    at = cur.pos
    name = cur.string(f"tensor #{index} name", max_bytes=MAX_NAME_BYTES)
    if not name:
        raise cur.fail(f"tensor #{index} name", "empty tensor name", at=at)
    n_dims = cur.u32(f"tensor {name!r} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r}", f"n_dims = {n_dims}, must be 1..{MAX_DIMS}",
                       at=cur.pos - 4)
    ne = tuple(cur.u64(f"tensor {name!r} ne[{i}]") for i in range(n_dims))
    type_id = cur.u32(f"tensor {name!r} type")
    rel = cur.u64(f"tensor {name!r} offset")
    nbytes = _tensor_nbytes(cur, name, ne, type_id, at)
    return _RawTensor(name, ne, GGML_TYPES[type_id].name, rel, nbytes, at)


def _read_tensor_table(cur: _Cursor, n_tensors: int) -> list[_RawTensor]:
    entries: list[_RawTensor] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        t = _read_tensor_info(cur, i)
        if t.name in seen:
            raise cur.fail(f"tensor {t.name!r}", "duplicate tensor name", at=t.at)
        seen.add(t.name)
        entries.append(t)
    return entries


def _place_tensors(cur: _Cursor, entries: list[_RawTensor], alignment: int,
                   data_start: int) -> dict[str, GGUFTensorInfo]:
    """Absolute offsets: aligned, inside the file, not overlapping; gaps allowed (G12)."""
    tensors: dict[str, GGUFTensorInfo] = {}
    for t in entries:
        what = f"tensor {t.name!r}"
        if t.rel_offset % alignment:
            raise cur.fail(what, f"data offset {t.rel_offset} is not a multiple of the alignment "
                           f"{alignment}", at=t.at)
        start = data_start + t.rel_offset
        if start + t.nbytes > cur.size:
            raise cur.fail(what, f"data [{start}, {start + t.nbytes}) runs past the end of the "
                           f"file ({cur.size} bytes)", at=t.at, fix="the download is probably "
                           "truncated; re-download it")
        shape = tuple(reversed(t.ne))
        tensors[t.name] = GGUFTensorInfo(t.name, shape, t.type_name, start, t.nbytes)
    _check_no_overlap(cur, list(tensors.values()))
    return tensors


def _check_no_overlap(cur: _Cursor, infos: list[GGUFTensorInfo]) -> None:
    ordered = sorted(infos, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.nbytes > b.offset:
            raise cur.fail(f"tensor {b.name!r}", f"data at byte {b.offset} overlaps tensor "
                           f"{a.name!r} [{a.offset}, {a.offset + a.nbytes})", at=b.offset)


# ---------------------------------------------------------------------------------------------
# the file object


@dataclass(frozen=True)
class _Parsed:
    version: int
    metadata: dict[str, object]
    field_types: dict[str, str]
    alignment: int
    data_offset: int
    tensors: dict[str, GGUFTensorInfo]


def _parse(cur: _Cursor) -> _Parsed:
    version = _check_magic_and_version(cur)
    n_tensors, n_kv = _read_counts(cur)
    metadata, types = _read_metadata(cur, n_kv)
    alignment = _alignment(cur, metadata, types)
    entries = _read_tensor_table(cur, n_tensors)
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = _place_tensors(cur, entries, alignment, data_offset)
    return _Parsed(version, metadata, types, alignment, data_offset, tensors)


def _stamp(fh: BinaryIO) -> tuple[int, int]:
    """Size and modification time: what must not change while the file is mapped (G17)."""
    st = os.fstat(fh.fileno())
    return st.st_size, st.st_mtime_ns


class GGUFFile:
    """A parsed, validated GGUF file whose tensor data stays memory-mapped until asked for.

    Build it with :func:`read_gguf`. Use it as a context manager (or call :meth:`close`) to
    release the file handle and the mapping.
    """

    def __init__(self, path: Path, fh: BinaryIO, buf: mmap.mmap, stamp: tuple[int, int],
                 parsed: _Parsed) -> None:
        self.path = path
        self.version = parsed.version
        self.metadata = parsed.metadata
        self.field_types = parsed.field_types
        self.alignment = parsed.alignment
        self.data_offset = parsed.data_offset
        self.tensors = parsed.tensors
        self._fh = fh
        self._buf: mmap.mmap | None = buf
        self._bytes = np.frombuffer(buf, dtype=np.uint8)
        self._stamp = stamp

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # an unclosed GGUFFile must not leak its handle (or warn) when it is collected
        if getattr(self, "_buf", None) is not None:
            self.close()

    def __deepcopy__(self, memo: dict) -> GGUFFile:
        # read-only: a copied model (copy.deepcopy of a compact one) shares the open file and its mapping
        return self

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.tensors)} tensors)"

    def close(self) -> None:
        """Close the file; views from :meth:`raw` keep the mapping alive until they are dropped."""
        if self._buf is not None:
            self._bytes = np.empty(0, dtype=np.uint8)
            _close_quietly(self._buf, self._fh)
            self._buf = None

    def _info(self, name: str) -> GGUFTensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: no tensor named {name!r} "
                                   f"(the file has {len(self.tensors)} tensors)")
        if self._buf is None:
            raise ModelFormatError(f"{self.path}: file is closed; open it again with read_gguf")
        now = _stamp(self._fh)
        if now != self._stamp:
            raise ModelFormatError(f"{self.path}: tensor {name!r}: file changed on disk since it "
                                   f"was opened (size {self._stamp[0]} -> {now[0]} bytes); "
                                   "open it again with read_gguf")
        return info

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapping (no copy)."""
        info = self._info(name)
        return self._bytes[info.offset:info.offset + info.nbytes]

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantised to float32 (then cast to ``dtype``), in torch shape order."""
        info = self._info(name)
        if not can_dequantize(info.ggml_type):
            raise ModelFormatError(f"{self.path}: tensor {name!r}: ggml type {info.ggml_type} "
                                   "cannot be dequantised by qkv; re-quantise the model to "
                                   "Q8_0, Q4_K or another supported type")
        raw = self._bytes[info.offset:info.offset + info.nbytes]
        out = torch.from_numpy(dequantize(raw, info.ggml_type).reshape(info.shape))
        return out if dtype == torch.float32 else out.to(dtype)


def _close_quietly(buf: mmap.mmap, fh: BinaryIO) -> None:
    try:
        buf.close()
    except BufferError:  # a raw() view (or a traceback holding one) still uses the mapping
        pass
    fh.close()


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open, map and validate a GGUF file. Raises :class:`ModelFormatError` if it is malformed."""
    p = Path(path)
    try:
        fh = open(p, "rb")
    except OSError as e:
        raise ModelFormatError(f"{p}: cannot open GGUF file: {e.strerror}") from None
    stamp = _stamp(fh)
    if stamp[0] < HEADER_BYTES:
        fh.close()
        raise ModelFormatError(f"{p}: header at byte 0: file is {stamp[0]} bytes, a GGUF header "
                               f"needs {HEADER_BYTES}; the file is empty or truncated")
    try:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        fh.close()
        raise ModelFormatError(f"{p}: cannot memory-map the file: {e}") from None
    try:
        parsed = _parse(_Cursor(buf, p))
    except BaseException:
        _close_quietly(buf, fh)
        raise
    return GGUFFile(p, fh, buf, stamp, parsed)
