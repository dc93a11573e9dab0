"""The on-disk cache of compact weights: tensors re-packed once from a GGUF file, mapped on later loads.

Re-packing a GGUF's 4-bit blocks into PyTorch's int4 kernel layout (and its 8-bit matrices into per-row
int8) costs seconds; mapping the result costs milliseconds. One cache file holds every re-packed tensor
of one model for one torch build and one CPU kernel selection:

    $QKV_CACHE_DIR | $XDG_CACHE_HOME/qkv | ~/.cache/qkv   /compact/<sha256 of the GGUF>-<key>.qkvc

The GGUF's hash is remembered under ``sha256/`` by the file's identity (path, inode, size, modification and
change times: :func:`known_sha256`), so a warm load does not read the whole file to find its cache.
``key`` names what changes the packed bytes: the format version, the torch version and ATen's CPU
capability (the int4 layout differs between AVX2 and AVX-512 builds). A file is used only after it is
validated: magic, version, a bounded JSON header that must name the same GGUF hash, torch version and
capability, every tensor inside the file and 64-byte aligned, the file's exact size, and a CRC-32 of
the data. Anything else (corrupted, truncated, stale, unreadable) is rebuilt, never used. Files are
written to a temporary name in the same folder and renamed into place (atomic on POSIX), so a process
loading while another one writes sees either no file or a whole one.

Layout: ``QKVC`` magic (8 bytes), version (u32), header length (u32), the header (UTF-8 JSON), zero
padding to 64 bytes, then each tensor's bytes at its recorded offset (relative to the data start).
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path

import torch

from ..errors import ConfigError

MAGIC = b"QKVCACHE"
VERSION = 1
ALIGN = 64
MAX_HEADER = 1 << 20  # a few hundred entries of JSON; a larger "header" is not ours
DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float32": torch.float32}


def cache_root() -> Path:
    """Where qkv keeps caches: $QKV_CACHE_DIR, else $XDG_CACHE_HOME/qkv, else ~/.cache/qkv."""
    if os.environ.get("QKV_CACHE_DIR"):
        return Path(os.environ["QKV_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qkv"


COMPILE_MODES = ("auto", "1", "0")


def compile_mode() -> str:
    """``QKV_COMPILE``: ``auto`` (default) uses what ``qkv compile`` built and cached, never builds; ``1`` builds
    what is missing when first needed; ``0`` uses nothing compiled (the eager paths)."""
    choice = os.environ.get("QKV_COMPILE", "auto")
    if choice not in COMPILE_MODES:
        raise ConfigError(f"QKV_COMPILE={choice!r} is not auto, 1 or 0; fix: set one of those or unset it")
    return choice


@functools.cache
def cpu_flags() -> str:
    """The CPU's feature flags, sorted (what code compiled for this CPU may use); read once per process."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform
    return platform.machine() + " " + platform.processor()


def sweep_temporaries(folder: Path, prefix: str = ".tmp-", age: float = 3600.0) -> None:
    """Delete ``prefix*`` files in ``folder`` older than ``age`` seconds: left by a build that was killed (an
    hour is far past any build; a younger one may belong to a build running now)."""
    for old in folder.glob(prefix + "*"):
        try:
            if time.time() - old.stat().st_mtime > age:
                old.unlink()
        except OSError:
            pass


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB chunks (the file is not mapped, so its pages do not count as ours)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


RACY_SECONDS = 2.0  # a file changed this recently may change again within its timestamps' resolution


def known_sha256(path: Path) -> str:
    """file_sha256(path), remembered in the cache folder under the file's identity — device, inode, size and
    the modification and change times in nanoseconds (ctime cannot be set back by a program: any rewrite of
    the file changes it) — so that a warm load does not read the whole file again (~0.1 s for a 100 MB
    GGUF). As git does with its index, nothing is remembered for a file changed less than RACY_SECONDS
    before the hash was taken: file systems stamp times from a coarse clock (a few ms; FAT 2 s), and a
    same-size rewrite within one tick would keep the identity. The note is written atomically; an
    unreadable or malformed one is recomputed and rewritten."""
    st = os.stat(path)
    ident = f"{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    note = cache_root() / "sha256" / hashlib.sha256(ident.encode()).hexdigest()[:40]
    try:
        known = note.read_text(encoding="ascii").strip()
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            return known
    except (OSError, UnicodeDecodeError):
        pass
    sha = file_sha256(path)
    if time.time() - max(st.st_mtime, st.st_ctime) < RACY_SECONDS:
        return sha
    try:
        note.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=note.name + ".", suffix=".tmp", dir=note.parent)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(sha)
        os.replace(tmp, note)
    except OSError:  # a read-only cache folder: hash again next time
        pass
    return sha


def machine_key() -> dict:
    """What code compiled or measured here depends on, besides itself: torch's build, ATen's CPU capability and
    the CPU's flags (hashed)."""
    return {"torch": [torch.__version__, torch.version.git_version],
            "capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": hashlib.sha256(cpu_flags().encode()).hexdigest()[:16]}


def build_key() -> dict[str, str]:
    """What the packed bytes depend on, besides the GGUF itself."""
    return {"format": str(VERSION), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability()}


def cache_path(gguf_sha: str, kind: str) -> Path:
    k = build_key()
    tag = f"{kind}-v{k['format']}-torch{k['torch']}-{k['capability']}".replace("/", "_").replace("+", "_")
    return cache_root() / "compact" / f"{gguf_sha[:40]}-{tag}.qkvc"


class CacheInvalid(Exception):
    """The cache file is not one this process may use (the reason is the message)."""


def write(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` (contiguous CPU tensors of the DTYPES) and ``meta`` to ``path`` atomically. Each
    tensor's bytes are written as they are (no copy of the whole data), each padded to ALIGN."""
    inv = {v: k for k, v in DTYPES.items()}
    entries, chunks, offset, crc = {}, [], 0, 0
    for name, t in tensors.items():
        raw = memoryview(t.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy())
        pad = b"\0" * (-len(raw) % ALIGN)
        entries[name] = {"dtype": inv[t.dtype], "shape": list(t.shape), "offset": offset, "nbytes": len(raw)}
        chunks += [raw, pad]
        crc = zlib.crc32(pad, zlib.crc32(raw, crc))
        offset += len(raw) + len(pad)
    header = json.dumps({"meta": meta, "key": build_key(), "entries": entries, "data_bytes": offset,
                         "crc32": crc}, sort_keys=True).encode()
    head = MAGIC + struct.pack("<II", VERSION, len(header)) + header
    head += b"\0" * (-len(head) % ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Map ``path`` and return its tensors (views of a private mapping), after validating everything;
    raises CacheInvalid (or OSError) otherwise. ``meta`` must equal the file's recorded meta."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(MAGIC) + 8:
            raise CacheInvalid("shorter than its header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: pages shared until written
    if buf[:len(MAGIC)] != MAGIC:
        raise CacheInvalid("not a qkv cache file")
    version, hlen = struct.unpack_from("<II", buf, len(MAGIC))
    if version != VERSION:
        raise CacheInvalid(f"format version {version}, expected {VERSION}")
    start = len(MAGIC) + 8
    if hlen > MAX_HEADER or start + hlen > size:
        raise CacheInvalid("header length out of range")
    try:
        header = json.loads(bytes(buf[start:start + hlen]))
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheInvalid(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CacheInvalid("header is not an object")
    if header.get("key") != build_key():
        raise CacheInvalid(f"built for {header.get('key')}, this process is {build_key()}")
    if header.get("meta") != meta:
        raise CacheInvalid("built from another file or with other options")
    data_start = start + hlen + (-(start + hlen) % ALIGN)
    data_bytes = header.get("data_bytes")
    if not isinstance(data_bytes, int) or data_start + data_bytes != size:
        raise CacheInvalid(f"file is {size} bytes, its header says {data_start} + {data_bytes}")
    if zlib.crc32(memoryview(buf)[data_start:]) != header.get("crc32"):
        raise CacheInvalid("data does not match its checksum")
    whole = torch.frombuffer(buf, dtype=torch.uint8)
    out = {}
    entries = header.get("entries")
    if not isinstance(entries, dict):
        raise CacheInvalid("no tensor table")
    for name, e in entries.items():
        try:
            dt, shape, off, nbytes = DTYPES[e["dtype"]], [int(s) for s in e["shape"]], int(e["offset"]), int(e["nbytes"])
        except (KeyError, TypeError, ValueError):
            raise CacheInvalid(f"bad entry {name!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dt).element_size()
        if off % ALIGN or off < 0 or nbytes != numel * itemsize or off + nbytes > data_bytes or min(shape, default=1) < 0:
            raise CacheInvalid(f"entry {name!r} lies outside the data or disagrees with its shape")
        out[name] = whole[data_start + off:data_start + off + nbytes].view(dt).view(shape)
    return out
