"""Training checkpoints that survive faults: safetensors + JSON, written atomically, verified on load.

A checkpoint is a directory ``checkpoints/step-00000100/`` holding

    model.safetensors      the parameters (tied weights stored once)
    optimizer.safetensors  the optimizer's tensors, keyed "<parameter name>/<slot>"
    state.json             step, optimizer hyper-parameters, metrics — everything that is not a tensor
    manifest.json          size and SHA-256 of the three files above; written last

It is built in a hidden ``.tmp-*`` directory *inside* ``checkpoints/`` (same filesystem, so the final
rename is atomic — RELIABILITY C10), each file fsynced, the manifest last, then renamed into place and
the parent directory fsynced. A checkpoint without a manifest, or whose files do not match it, is not a
checkpoint: ``newest_valid`` skips it and says why (C1, C4). No pickle anywhere: tensors go through
safetensors, the rest through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import safetensors.torch
import torch

from ..errors import CheckpointError

MANIFEST = "manifest.json"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
_NAME = re.compile(r"^step-(\d{8})$")
FORMAT = "qkv-checkpoint/1"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_bytes(tensors: dict[str, torch.Tensor], what: str) -> bytes:
    try:
        return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    except Exception as e:  # noqa: BLE001 — anything unserialisable becomes one clear error (C3)
        raise CheckpointError(f"cannot serialise the {what} tensors: {e}") from None


def encode_checkpoint(model: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor], state: dict) -> dict:
    """The three payload files as bytes (everything that can fail to serialise fails here, before disk)."""
    try:
        state_json = json.dumps(state, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot serialise the training state as JSON: {e}") from None
    return {"model.safetensors": _tensor_bytes(model, "model"),
            "optimizer.safetensors": _tensor_bytes(optimizer, "optimizer"), "state.json": state_json}


def save_checkpoint(root: str | Path, step: int, payload: dict[str, bytes], *, keep: int = 3) -> Path:
    """Write ``payload`` (from :func:`encode_checkpoint`) as checkpoint ``step``; keep the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = {}
        for name in FILES:
            _write_synced(tmp / name, payload[name])
            files[name] = {"bytes": len(payload[name]), "sha256": hashlib.sha256(payload[name]).hexdigest()}
        manifest = {"format": FORMAT, "step": step, "files": files}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
        _fsync_dir(tmp)
        if final.exists():  # a stale checkpoint past the point we resumed from: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = newest_valid(root)[0]
        kept = f"the newest valid checkpoint {prev.name} is intact" if prev else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {final}: {e.strerror or e}; {kept}") from None
    _prune(root, keep, step)
    return final


def _prune(root: Path, keep: int, newest: int) -> None:
    # Only checkpoints up to the one just written count: newer ones are leftovers past the point this run
    # resumed from (invalid, or it would have resumed there) and must not push the new one out.
    steps = [p for s, p in list_checkpoints(root) if s <= newest]
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def clean_temporaries(root: str | Path) -> list[Path]:
    """Remove what an interrupted save left behind (C1). Call with the run lock held."""
    root = Path(root)
    leftovers = sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return leftovers


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` directory, oldest first (valid or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def verify(path: str | Path) -> dict[str, bytes]:
    """The payload of checkpoint ``path`` after checking every file against the manifest (C4)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
        files = manifest["files"]
        ok = (manifest.get("format") == FORMAT and set(files) == set(FILES)
              and all(isinstance(files[name], dict) for name in FILES))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path / MANIFEST}: missing or unreadable ({e.__class__.__name__}); "
                              "the checkpoint was not completed") from None
    if not ok:
        raise CheckpointError(f"{path / MANIFEST}: not a {FORMAT} manifest")
    named = _NAME.match(path.name)
    if named and manifest.get("step") != int(named.group(1)):
        raise CheckpointError(f"{path / MANIFEST}: records step {manifest.get('step')!r} but the directory is "
                              f"{path.name}; a renamed or copied checkpoint is not trusted")
    payload = {}
    for name in FILES:
        try:
            data = (path / name).read_bytes()
        except OSError as e:
            raise CheckpointError(f"{path / name}: {e.strerror}") from None
        want = files[name]
        if len(data) != want.get("bytes") or hashlib.sha256(data).hexdigest() != want.get("sha256"):
            raise CheckpointError(f"{path / name}: {len(data)} bytes that do not match the manifest "
                                  f"({want.get('bytes')} bytes, sha256 {str(want.get('sha256'))[:12]}…); "
                                  "the file is truncated or corrupted")
        payload[name] = data
    return payload


def newest_valid(root: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and why each newer one was skipped."""
    path, _, skipped = newest_payload(root)
    return path, skipped


def newest_payload(root: str | Path) -> tuple[Path | None, dict[str, bytes] | None, list[str]]:
    """:func:`newest_valid` with the verified payload, for :func:`decode_checkpoint` (read and hashed once)."""
    skipped = []
    for _, path in reversed(list_checkpoints(root)):
        try:
            return path, verify(path), skipped
        except CheckpointError as e:
            skipped.append(str(e))
    return None, None, skipped


def decode_checkpoint(path: str | Path, payload: dict[str, bytes] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model tensors, optimizer tensors, state) of checkpoint ``path``, verified here unless ``payload`` is
    the one :func:`verify` already returned for it."""
    payload = verify(path) if payload is None else payload
    try:
        model = safetensors.torch.load(payload["model.safetensors"])
        optim = safetensors.torch.load(payload["optimizer.safetensors"])
        state = json.loads(payload["state.json"])
    except Exception as e:  # noqa: BLE001 — a manifest-consistent but malformed file
        raise CheckpointError(f"{path}: cannot be decoded ({e.__class__.__name__}: {e})") from None
    return model, optim, state


class RunLock:
    """One writer per run directory (C9): ``<out>/.lock`` made with O_EXCL, holding the owner's pid.

    A lock whose process is gone (killed mid-run) is taken over; a live one is an error.
    """

    def __init__(self, out: str | Path):
        self.path = Path(out) / ".lock"

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._owner_alive():
                    raise CheckpointError(f"{self.path.parent} is in use by another training process "
                                          f"(pid {self._owner()}); use another --out or stop it") from None
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise CheckpointError(f"cannot write in {self.path.parent} ({e.strerror}); choose a writable --out") \
                    from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise CheckpointError(f"cannot lock {self.path}; remove it if no training is running")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _owner_alive(self) -> bool:
        """Whether the pid in the lock file is a live process (ours too: a second lock in one process)."""
        pid = self._owner()
        if pid is None:
            return False  # empty or garbled: a writer killed between create and write
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __exit__(self, *exc) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)
