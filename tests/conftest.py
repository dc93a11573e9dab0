"""Shared fixtures: the embedded models are loaded once per test session (they are small)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# The compact mode's disk cache (qkv.weights.cache) of this test session, also for the CLI processes the tests
# start: never the user's ~/.cache. The first load of each process re-packs (~2 s); later ones map the file.
if "QKV_CACHE_DIR" not in os.environ:
    os.environ["QKV_CACHE_DIR"] = tempfile.mkdtemp(prefix="qkv-test-cache-")
    atexit.register(shutil.rmtree, os.environ["QKV_CACHE_DIR"], True)
# Every test runs the eager decode step unless it opts in (tests/models/test_compiled.py): a compiled package
# in a preset QKV_CACHE_DIR must not change what the other tests compare.
os.environ.setdefault("QKV_COMPILE", "0")
# ... and torch's int4/int8 kernels, whatever this CPU's kind and whatever library a test built: qkv's native
# operators (tests/weights/test_matvec.py) are opted into where they are tested.
os.environ.setdefault("QKV_MATVEC", "torch")
# A `qkv daemon` the user started is never what a test's `qkv` process runs in: tests/test_daemon.py starts its
# own, under its own XDG_RUNTIME_DIR.
os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="qkv-test-run-")
atexit.register(shutil.rmtree, os.environ["XDG_RUNTIME_DIR"], True)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the embedded GGUF, float32 (the exact dequantised weights)."""
    import qkv

    return qkv.load("smollm2", dtype="float32", device="cpu")
