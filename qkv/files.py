"""Reading the small files that come with a model — config.json, tokenizer files, chat templates — as
untrusted input: bounded size, regular files only, the symlink policy, JSON with a nesting limit.

Every refusal is the caller's typed error (``ModelFormatError`` for weights/ and load, ``TokenizerError``
for text/), one line naming the file and how to fix it. Policies (SECURITY.md):

* A file is read only when it is a regular file: a FIFO would block forever, ``/dev/zero`` or a
  ``/proc`` file never ends. At most ``limit`` bytes are read, whatever the file claims its size is.
* A file of a model directory must resolve (symlinks followed) to a place inside that directory — or,
  for a Hugging Face hub cache snapshot (``…/models--ORG--NAME/snapshots/REV/``, whose files are links
  into ``../../blobs/``), inside that same repository's cache folder ``models--ORG--NAME/``. A link
  anywhere else is refused: a model directory cannot make qkv read an arbitrary file.
* JSON is parsed by the standard library (no code, no object hooks) and then refused when nested more
  than ``MAX_JSON_DEPTH`` levels; Python's own recursion limit (deeper still) is a typed error too.
  Integers longer than Python's 4300-digit conversion limit are a typed error, not a ValueError.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import QkvError

MAX_JSON_DEPTH = 64  # real config.json / tokenizer.json files nest < 10 levels
MAX_CONFIG_BYTES = 4 * 2**20  # config.json, generation_config.json, special_tokens_map.json
MAX_TOKENIZER_CONFIG_BYTES = 16 * 2**20  # tokenizer_config.json (a 256k added_tokens_decoder is ~2 MB)
MAX_TOKENIZER_JSON_BYTES = 64 * 2**20  # tokenizer.json (Gemma 3's 262k vocabulary is 33 MB)
MAX_TEMPLATE_BYTES = 4 * 2**20  # chat_template.jinja (the template limit itself is in qkv.text.chat)

__all__ = ["MAX_JSON_DEPTH", "allowed_roots", "inside", "read_bytes", "read_text", "read_json", "parse_json"]


def _hub_repo(real_root: Path) -> Path | None:
    """``…/models--ORG--NAME`` when ``real_root`` is a snapshot of the Hugging Face hub cache."""
    snapshots = real_root.parent
    repo = snapshots.parent
    if snapshots.name == "snapshots" and repo.name.startswith("models--") and len(repo.name) > len("models--"):
        return repo
    return None


def allowed_roots(root: Path) -> tuple[Path, ...]:
    """Where the files of model directory ``root`` may resolve to: the directory itself, plus the
    repository folder of the hub cache when ``root`` is a snapshot in it."""
    real = root.resolve()
    repo = _hub_repo(real)
    return (real,) if repo is None else (real, repo)


def inside(root: Path, name: str, *, what: str, error: type[QkvError], required: bool = True) -> Path | None:
    """``root / name`` when it is a plain file name whose target lies where :func:`allowed_roots` allows.

    Returns None for an absent optional file; raises ``error`` for a missing required one, a name that
    is not a plain file name, a link that leads outside, or something that is not a regular file.
    """
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise error(f"{root}: {what} {name!r} is not a plain file name inside the model directory")
    p = root / name
    if not p.exists() and not p.is_symlink():
        if required:
            raise error(f"{p}: {what} is missing")
        return None
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling link or a link loop
        raise error(f"{p}: {what} is a broken symbolic link; replace it with the file") from None
    if not any(real == r or r in real.parents for r in allowed_roots(root)):
        raise error(f"{p}: resolves to {real}, outside the model directory; copy the file in instead")
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise error(f"{p}: cannot read {what}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{p}: {what} is not a regular file; replace it with the file itself")
    return p


def read_bytes(path: Path, *, what: str, limit: int, error: type[QkvError]) -> bytes:
    """At most ``limit`` bytes of a regular file; a larger (or endless) file is refused."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: {what} is not a regular file; replace it with the file itself")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{path}: missing ({what})") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{path}: {what} is larger than {_size(limit)}, the most qkv reads; check the file")
    return data


def read_text(path: Path, *, what: str, limit: int, error: type[QkvError]) -> str:
    """A UTF-8 text file of at most ``limit`` bytes (a leading BOM is dropped)."""
    data = read_bytes(path, what=what, limit=limit, error=error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start}); "
                    "re-save it as UTF-8") from None


def read_json(path: Path, *, what: str, limit: int, error: type[QkvError], depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON value from a file, under the size limit and the nesting limit."""
    return parse_json(read_text(path, what=what, limit=limit, error=error), where=str(path), error=error,
                      depth=depth)


def parse_json(text: str, *, where: str, error: type[QkvError], depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` whose every failure is ``error``, then refused when nested deeper than ``depth``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                    "re-download the file") from None
    except RecursionError:
        raise error(f"{where}: JSON nested deeper than {depth} levels; no model file nests like that, "
                    "check the file") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise error(f"{where}: JSON value out of range ({' '.join(str(e).split())[:120]}); check the file") from None
    if _deeper_than(value, depth):
        raise error(f"{where}: JSON nested deeper than {depth} levels; no model file nests like that, "
                    "check the file")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether lists/objects nest more than ``limit`` levels (iterative: no recursion of our own)."""
    if not isinstance(value, (dict, list)):
        return False
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (dict, list)):
                if level + 1 > limit:
                    return True
                stack.append((child, level + 1))
    return False


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 2**20 else f"{n} bytes"
