"""Checkpoint and training fault injection: RELIABILITY §9.6, C1–C5 and C7–C10 (C6 is in test_trainer.py).

Every fault is injected for real — a process SIGKILLed between two bytes, ``OSError(ENOSPC)`` from the
write, a flipped bit, a NaN loss at a chosen step, a second writer holding the lock — and the test then
asserts what must have happened on disk and in the trainer, not merely that nothing raised.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from qkv.errors import CheckpointError, ModelFormatError
from qkv.train import TrainConfig, Trainer, TrainingError
from qkv.train import checkpoint as ckpt
from qkv.train import trainer as trainer_mod

from .conftest import step_records, tiny


def config(out, **changes) -> TrainConfig:
    """The tiny run of the conftest without sample outputs: checkpoints at steps 3 and 6."""
    return tiny(out, **{"samples": 0, **changes})


def trainer(cfg: TrainConfig, resume: bool = False) -> tuple[Trainer, list[str]]:
    logs: list[str] = []
    return Trainer(cfg, resume=resume, progress=False, log=logs.append), logs


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative name -> sha256): what 'nothing changed on disk' means."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def steps_of(root: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(root)]


def logged_steps(out: Path) -> list[int]:
    return [r["step"] for r in step_records(out)]


def assert_finite(path: Path) -> None:
    model, optim, state = ckpt.decode_checkpoint(path)
    for name, t in {**model, **optim}.items():
        assert torch.isfinite(t).all(), f"{path.name}: {name} is not finite"
    assert state["step"] == int(path.name.split("-")[1])


def temporaries(root: Path) -> list[Path]:
    return sorted(root.glob(".tmp-*"))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One finished run (steps 1–6, checkpoints step-3 and step-6), trained once and copied by each test."""
    out = tmp_path_factory.mktemp("base") / "run"
    t, _ = trainer(config(out))
    t.run()
    assert steps_of(out / "checkpoints") == [3, 6]
    return out


@pytest.fixture
def run_dir(base, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# C1: SIGKILL at every stage of a checkpoint write

# The child process imports qkv once, then forks one grandchild per trial. Each grandchild instruments the
# checkpoint module's file writes (in chunks), fsyncs and the rename as numbered events, and SIGKILLs
# itself just before event k — so the trials cover every byte range, every file boundary, the manifest,
# the rename and the final directory fsync, deterministically. k == len(events) is killed after the save
# returned.
KILL_DRIVER = r"""
import json, os, shutil, signal, sys
from pathlib import Path
from qkv.train import checkpoint as ckpt

template, payload_dir, trials, chunk = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
payload = {name: (payload_dir / name).read_bytes() for name in ckpt.FILES}
real_open, real_fsync, real_rename = open, os.fsync, os.rename

def label(fd):
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}")).name
    except OSError:
        return "?"

def instrument(kill_at):
    events = []
    def event(what):
        if len(events) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        events.append(what)
    class Chunked:
        def __init__(self, f, name):
            self.f, self.name = f, name
        def write(self, data):
            for i in range(0, len(data), chunk):
                event(f"write {self.name} [{i}:{min(len(data), i + chunk)}] of {len(data)}")
                self.f.write(data[i:i + chunk])
                self.f.flush()
            return len(data)
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)
    ckpt.open = lambda path, mode="r", *a, **k: Chunked(real_open(path, mode, *a, **k), Path(path).name)
    os.fsync = lambda fd: (event(f"fsync {label(fd)}"), real_fsync(fd))[1]
    os.rename = lambda a, b: (event(f"rename {Path(a).name} -> {Path(b).name}"), real_rename(a, b))[1]
    return events

shutil.copytree(template, trials / "count")
events = instrument(None)
ckpt.save_checkpoint(trials / "count" / "checkpoints", 6, payload, keep=3)
ckpt.open, os.fsync, os.rename = real_open, real_fsync, real_rename
shutil.rmtree(trials / "count")

results = []
for k in range(len(events) + 1):
    out = trials / f"kill-{k:02d}"
    shutil.copytree(template, out)
    pid = os.fork()
    if pid == 0:
        try:
            instrument(k)
            ckpt.save_checkpoint(out / "checkpoints", 6, payload, keep=3)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    results.append({"k": k, "dir": str(out), "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None})
print(json.dumps({"events": events, "trials": results}))
"""


@pytest.fixture(scope="module")
def kill_trials(base, tmp_path_factory):
    """Run the driver once: a run dir holding step-3 whose step-6 save is killed at each of ~24 points."""
    work = tmp_path_factory.mktemp("sigkill")
    template, payload = work / "template", work / "payload"
    shutil.copytree(base, template)
    shutil.move(template / "checkpoints" / "step-00000006", payload)
    trials = work / "trials"
    trials.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(template), str(payload), str(trials), "24576"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report, {name: (payload / name).read_bytes() for name in ckpt.FILES}


def test_sigkill_covers_every_stage_of_a_save(kill_trials):
    report, payload = kill_trials
    events, trials = report["events"], report["trials"]
    assert len(trials) >= 20
    assert all(t["signal"] == signal.SIGKILL for t in trials)
    # every stage is hit: mid-file, each file, the manifest, the rename, the directory fsync after it
    joined = "\n".join(events)
    for what in ("write model.safetensors [24576:", "write optimizer.safetensors", "write state.json",
                 "write manifest.json", "fsync manifest.json", "rename .tmp-step-00000006", "fsync checkpoints"):
        assert what in joined, (what, events)
    assert events[-1] == "fsync checkpoints", "the last act of a save is the parent directory's fsync"


def test_sigkill_leaves_the_previous_checkpoint_loadable(kill_trials):
    report, payload = kill_trials
    events = report["events"]
    rename = next(i for i, e in enumerate(events) if e.startswith("rename"))
    manifest_write = next(i for i, e in enumerate(events) if e.startswith("write manifest.json"))
    for t in report["trials"]:
        k, root = t["k"], Path(t["dir"]) / "checkpoints"
        stage = events[k] if k < len(events) else "after the save returned"
        renamed = k > rename
        want = 6 if renamed else 3
        assert steps_of(root) == ([3, 6] if renamed else [3]), (k, stage)
        path, skipped = ckpt.newest_valid(root)
        assert path == ckpt.step_dir(root, want) and skipped == [], (k, stage, skipped)
        model, _, state = ckpt.decode_checkpoint(path)
        assert state["step"] == want and model, (k, stage)
        if renamed:
            assert ckpt.verify(path) == payload, (k, stage)
        leftovers = temporaries(root)
        assert bool(leftovers) != renamed, (k, stage, leftovers)
        for tmp in leftovers:
            if k <= manifest_write:  # the manifest is written last: nothing before it is a checkpoint
                with pytest.raises(CheckpointError, match="manifest.json"):
                    ckpt.verify(tmp)


def test_sigkill_leftovers_are_cleaned_and_the_run_resumes(kill_trials, base):
    report, _ = kill_trials
    events = report["events"]
    rename = next(i for i, e in enumerate(events) if e.startswith("rename"))
    trials = report["trials"]
    resumed = {0, 3, rename, rename + 1}  # before any byte, mid-model, just before / just after the rename
    for t in trials:
        out = Path(t["dir"])
        root = out / "checkpoints"
        leftovers = temporaries(root)
        if t["k"] not in resumed:
            assert ckpt.clean_temporaries(root) == leftovers
            assert temporaries(root) == [] and ckpt.newest_valid(root)[0] is not None
            continue
        tr, logs = trainer(config(out), resume=True)
        result = tr.run()
        assert result["start"] == (6 if t["k"] > rename else 3), t
        assert temporaries(root) == []
        for tmp in leftovers:
            assert f"removed {tmp.name}: an interrupted checkpoint write" in logs
        assert steps_of(root) == [3, 6]
        assert_finite(ckpt.step_dir(root, 6))
        assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------------------------
# C2: ENOSPC mid-save; C3: unserialisable state

def fail_on(monkeypatch, nth: int, exc: Exception) -> list[Path]:
    """Make the nth file write of a checkpoint raise ``exc``; returns the paths written (or attempted)."""
    real, seen = ckpt._write_synced, []

    def write(path, data):
        seen.append(Path(path))
        if len(seen) == nth:
            raise exc
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_synced", write)
    return seen


def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("nth", [1, 2, 3, 4], ids=["model", "optimizer", "state", "manifest"])
def test_enospc_mid_save_reports_and_keeps_the_previous_checkpoint(run_dir, monkeypatch, nth):
    root = run_dir / "checkpoints"
    payload = ckpt.verify(ckpt.step_dir(root, 6))
    before = snapshot(root)
    seen = fail_on(monkeypatch, nth, enospc())
    with pytest.raises(CheckpointError) as e:
        ckpt.save_checkpoint(root, 9, payload, keep=3)
    msg = str(e.value)
    assert "step-00000009" in msg and "No space left on device" in msg
    assert "step-00000006 is intact" in msg
    assert len(seen) == nth  # the save stopped at the failure
    assert snapshot(root) == before and temporaries(root) == []
    assert ckpt.newest_valid(root) == (ckpt.step_dir(root, 6), [])


def test_enospc_stops_the_trainer_cleanly_and_the_run_continues(run_dir, monkeypatch):
    root = run_dir / "checkpoints"
    cfg = config(run_dir, max_steps=9)
    seen = fail_on(monkeypatch, 2, enospc())
    tr, _ = trainer(cfg, resume=True)
    with pytest.raises(CheckpointError, match="step-00000009.*No space left.*step-00000006 is intact"):
        tr.run()
    assert [p.name for p in seen] == ["model.safetensors", "optimizer.safetensors"]
    assert steps_of(root) == [3, 6] and temporaries(root) == []
    assert ckpt.newest_valid(root)[0] == ckpt.step_dir(root, 6)
    assert not (run_dir / ".lock").exists(), "the run lock is released on the error"
    monkeypatch.undo()  # the disk has space again: the same command continues the run
    tr, _ = trainer(cfg, resume=True)
    assert tr.run()["start"] == 6
    assert steps_of(root) == [3, 6, 9]
    assert_finite(ckpt.step_dir(root, 9))


def test_unserialisable_values_fail_before_anything_is_written(tmp_path, monkeypatch):
    seen = fail_on(monkeypatch, 0, enospc())  # a spy: records every write, fails none
    tensors = {"w": torch.ones(2, 3)}
    bad = [({"w": 3.0}, {}, {"step": 1}, "model tensors"),
           (tensors, {"m": [1, 2]}, {"step": 1}, "optimizer tensors"),
           (tensors, {}, {"step": 1, "groups": {1, 2}}, "JSON"),
           (tensors, {}, {"step": 1, "loss": float("nan")}, "JSON"),
           (tensors, {}, {1: "a", "b": 2}, "JSON")]
    for model, optim, state, what in bad:
        with pytest.raises(CheckpointError, match=what):
            ckpt.save_checkpoint(tmp_path / "checkpoints", 1, ckpt.encode_checkpoint(model, optim, state))
    assert seen == [] and list(tmp_path.iterdir()) == []


def test_unserialisable_state_stops_the_trainer_and_writes_nothing(run_dir, monkeypatch):
    root = run_dir / "checkpoints"
    real = trainer_mod.D.full_optimizer_state

    def with_a_set(model, opt):
        tensors, groups = real(model, opt)
        groups[0]["betas_seen"] = {0.9, 0.98}  # not JSON
        return tensors, groups

    monkeypatch.setattr(trainer_mod.D, "full_optimizer_state", with_a_set)
    seen = fail_on(monkeypatch, 0, enospc())
    before = snapshot(root)
    tr, _ = trainer(config(run_dir, max_steps=9), resume=True)
    with pytest.raises(CheckpointError, match="cannot serialise the training state"):
        tr.run()
    assert seen == [], "nothing reaches the disk"
    assert snapshot(root) == before and temporaries(root) == []
    assert not (run_dir / ".lock").exists()


# ---------------------------------------------------------------------------------------------------------
# C4: corrupt checkpoints are refused by name; --resume picks the newest valid one

def _flip(p: Path) -> str:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    return p.name


def _rewrite_manifest(d: Path, change) -> None:
    m = json.loads((d / ckpt.MANIFEST).read_text())
    change(m)
    (d / ckpt.MANIFEST).write_text(json.dumps(m))


def corrupt(d: Path, how: str) -> str:
    """Damage checkpoint ``d``; returns the file name the error must name."""
    if how == "truncated":
        p = d / "model.safetensors"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return p.name
    if how == "bit-flip":
        return _flip(d / "model.safetensors")
    if how == "bit-flip-state":
        return _flip(d / "state.json")
    if how == "zero-length":
        (d / "optimizer.safetensors").write_bytes(b"")
        return "optimizer.safetensors"
    if how == "missing-file":
        (d / "state.json").unlink()
        return "state.json"
    if how == "hash-mismatch":
        _rewrite_manifest(d, lambda m: m["files"]["state.json"].update(sha256="0" * 64))
        return "state.json"
    if how == "size-mismatch":
        _rewrite_manifest(d, lambda m: m["files"]["model.safetensors"].update(bytes=1))
        return "model.safetensors"
    if how == "missing-manifest":
        (d / ckpt.MANIFEST).unlink()
        return ckpt.MANIFEST
    if how == "garbage-manifest":
        (d / ckpt.MANIFEST).write_bytes(b"\x00\xff{garbage")
        return ckpt.MANIFEST
    if how == "manifest-not-an-object":
        (d / ckpt.MANIFEST).write_text("[1, 2, 3]")
        return ckpt.MANIFEST
    if how == "manifest-wrong-shape":
        _rewrite_manifest(d, lambda m: m.update(files={name: "x" for name in ckpt.FILES}))
        return ckpt.MANIFEST
    if how == "manifest-files-a-list":
        _rewrite_manifest(d, lambda m: m.update(files=list(ckpt.FILES)))
        return ckpt.MANIFEST
    if how == "manifest-other-format":
        _rewrite_manifest(d, lambda m: m.update(format="other/9"))
        return ckpt.MANIFEST
    raise AssertionError(how)


CORRUPTIONS = ["truncated", "bit-flip", "bit-flip-state", "zero-length", "missing-file", "hash-mismatch",
               "size-mismatch", "missing-manifest", "garbage-manifest", "manifest-not-an-object",
               "manifest-wrong-shape", "manifest-files-a-list", "manifest-other-format"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_checkpoint_is_refused_naming_the_file(run_dir, how):
    root = run_dir / "checkpoints"
    bad = ckpt.step_dir(root, 6)
    name = corrupt(bad, how)
    with pytest.raises(CheckpointError) as e:
        ckpt.verify(bad)
    assert str(bad / name) in str(e.value)
    with pytest.raises(CheckpointError):
        ckpt.decode_checkpoint(bad)
    path, skipped = ckpt.newest_valid(root)
    assert path == ckpt.step_dir(root, 3)
    assert len(skipped) == 1 and str(bad / name) in skipped[0]


@pytest.mark.parametrize("how", ["truncated", "bit-flip", "zero-length", "hash-mismatch", "missing-manifest",
                                 "garbage-manifest"])
def test_resume_picks_the_newest_valid_checkpoint(run_dir, how):
    root = run_dir / "checkpoints"
    name = corrupt(ckpt.step_dir(root, 6), how)
    tr, logs = trainer(config(run_dir), resume=True)
    result = tr.run()
    assert result["start"] == 3
    assert any(m.startswith("skipping invalid checkpoint") and name in m for m in logs), logs
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6], "metrics past step 3 were dropped, then redone"
    assert ckpt.newest_valid(root) == (ckpt.step_dir(root, 6), [])  # the bad one was replaced
    assert_finite(ckpt.step_dir(root, 6))


def test_manifest_consistent_but_undecodable_file_is_a_typed_error(run_dir):
    bad = ckpt.step_dir(run_dir / "checkpoints", 6)
    junk = b"\x08\x00\x00\x00\x00\x00\x00\x00not json"
    (bad / "model.safetensors").write_bytes(junk)
    _rewrite_manifest(bad, lambda m: m["files"]["model.safetensors"].update(
        bytes=len(junk), sha256=hashlib.sha256(junk).hexdigest()))
    ckpt.verify(bad)  # the manifest matches: only decoding can tell
    with pytest.raises(CheckpointError, match="cannot be decoded"):
        ckpt.decode_checkpoint(bad)
    tr, _ = trainer(config(run_dir), resume=True)
    with pytest.raises(CheckpointError):
        tr.run()


def test_pruning_never_removes_the_checkpoint_just_written(run_dir):
    """Resumed below a newer, corrupt checkpoint: keeping the newest N must not count the corrupt ones."""
    root = run_dir / "checkpoints"
    payload = ckpt.verify(ckpt.step_dir(root, 6))
    for stale in (10, 11):  # newer than anything this run will write, and not valid
        ckpt.step_dir(root, stale).mkdir()
    for keep in (1, 2):
        path = ckpt.save_checkpoint(root, 7 + keep, payload, keep=keep)
        assert path.is_dir() and ckpt.newest_valid(root)[0] == path, keep
    assert steps_of(root) == [8, 9, 10, 11]


# ---------------------------------------------------------------------------------------------------------
# C5: no valid checkpoint; an existing run without --resume

def test_resume_without_a_valid_checkpoint_starts_from_step_0(run_dir):
    root = run_dir / "checkpoints"
    corrupt(ckpt.step_dir(root, 3), "missing-manifest")
    corrupt(ckpt.step_dir(root, 6), "bit-flip")
    tr, logs = trainer(config(run_dir), resume=True)
    result = tr.run()
    assert result["start"] == 0
    assert f"no valid checkpoint in {root}: starting from step 0" in logs
    assert sum(m.startswith("skipping invalid checkpoint") for m in logs) == 2
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert steps_of(root) == [3, 6] and all(ckpt.verify(p) for _, p in ckpt.list_checkpoints(root))


def test_resume_in_an_empty_directory_starts_from_step_0(tmp_path):
    tr, logs = trainer(config(tmp_path / "new", max_steps=3), resume=True)
    assert tr.run()["start"] == 0
    assert any(m.startswith("no valid checkpoint in") for m in logs)
    assert steps_of(tmp_path / "new" / "checkpoints") == [3]


def test_existing_run_without_resume_is_refused_untouched(run_dir):
    before = snapshot(run_dir)
    tr, _ = trainer(config(run_dir), resume=False)
    with pytest.raises(CheckpointError, match=r"already holds a run \(checkpoint step-00000006\); pass --resume"):
        tr.run()
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------------------------
# C7: another configuration

@pytest.mark.parametrize("change", [dict(d_model=64), dict(task="sort"), dict(n_layers=2), dict(precision="bf16"),
                                    dict(seed=1), dict(n_train=300)], ids=lambda c: next(iter(c)))
def test_resume_with_another_config_names_the_field(run_dir, change):
    before = snapshot(run_dir)
    field, value = next(iter(change.items()))
    tr, _ = trainer(config(run_dir, **change), resume=True)
    with pytest.raises(CheckpointError) as e:
        tr.run()
    msg = str(e.value)
    assert str(run_dir / "run.json") in msg and f"{field}: " in msg and repr(value) in msg
    assert snapshot(run_dir) == before


def test_settings_outside_the_identity_may_change_on_resume(run_dir):
    tr, _ = trainer(config(run_dir, max_steps=7, lr=5e-4, eval_every=7, save_every=7, keep=5), resume=True)
    assert tr.run()["start"] == 6
    assert steps_of(run_dir / "checkpoints") == [3, 6, 7]


# ---------------------------------------------------------------------------------------------------------
# C8: a non-finite loss or gradient at step k

def poison(monkeypatch, bad_steps, how: str = "loss") -> list[int]:
    """Make the training loss (or its gradient) NaN at the given 1-based micro-steps of this process."""
    real, calls = trainer_mod._loss_sum, []

    def loss_sum(job, model, batch):
        calls.append(len(calls) + 1)
        loss = real(job, model, batch)
        if calls[-1] not in bad_steps:
            return loss
        if how == "loss":
            return loss * float("nan")
        loss.register_hook(lambda g: g * float("nan"))  # a finite loss whose gradients are NaN
        return loss

    monkeypatch.setattr(trainer_mod, "_loss_sum", loss_sum)
    return calls


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_nan_stop_policy_stops_and_keeps_good_checkpoints(tmp_path, monkeypatch, how):
    out = tmp_path / "run"
    poison(monkeypatch, {5}, how)
    tr, _ = trainer(config(out, save_every=2, eval_every=2, nan_policy="stop"))
    what = "loss" if how == "loss" else "gradient norm"
    with pytest.raises(TrainingError, match=rf"non-finite {what} \(nan\) at step 5; stopped"):
        tr.run()
    root = out / "checkpoints"
    assert steps_of(root) == [2, 4], "nothing saved after the last good save"
    assert ckpt.newest_valid(root) == (ckpt.step_dir(root, 4), [])
    for _, p in ckpt.list_checkpoints(root):
        assert_finite(p)
    assert logged_steps(out) == [1, 2, 3, 4]
    assert not (out / ".lock").exists()


def test_nan_skip_policy_drops_the_step_and_finishes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison(monkeypatch, {2, 6})  # 6 is the last step and a save step
    tr, logs = trainer(config(out, nan_policy="skip"))
    result = tr.run()
    assert result["steps"] == 6 and result["eval"]
    assert "non-finite loss (nan) at step 2: step skipped (1 in a row)" in logs
    assert "non-finite loss (nan) at step 6: step skipped (1 in a row)" in logs
    assert logged_steps(out) == [1, 3, 4, 5]
    root = out / "checkpoints"
    assert steps_of(root) == [3, 6], "the final weights are saved even when the last step was skipped"
    for _, p in ckpt.list_checkpoints(root):
        assert_finite(p)
    tr, _ = trainer(config(out, nan_policy="skip"), resume=True)
    assert tr.run()["start"] == 6, "a finished run resumes at its end"


def test_nan_skip_policy_gives_up_after_max_skipped_in_a_row(tmp_path, monkeypatch):
    m = trainer_mod.MAX_SKIPPED
    out = tmp_path / "run"
    poison(monkeypatch, set(range(1, 100)))
    tr, logs = trainer(config(out, max_steps=m + 5, save_every=100, eval_every=100, nan_policy="skip"))
    with pytest.raises(TrainingError, match=rf"at step {m}: {m} steps in a row were not finite"):
        tr.run()
    assert sum("step skipped" in x for x in logs) == m
    assert steps_of(out / "checkpoints") == []


def test_nan_skip_counter_resets_after_a_good_step(tmp_path, monkeypatch):
    m = trainer_mod.MAX_SKIPPED
    out = tmp_path / "run"
    bad = set(range(1, m)) | set(range(m + 1, 2 * m))  # m-1 bad, one good, m-1 bad, one good
    poison(monkeypatch, bad)
    tr, logs = trainer(config(out, max_steps=2 * m, save_every=m, eval_every=m, nan_policy="skip"))
    assert tr.run()["steps"] == 2 * m
    assert logged_steps(out) == [m, 2 * m]
    assert f"non-finite loss (nan) at step {2 * m - 1}: step skipped ({m - 1} in a row)" in logs
    assert_finite(ckpt.step_dir(out / "checkpoints", 2 * m))


def test_non_finite_weights_are_never_saved_over_a_good_checkpoint(run_dir, monkeypatch):
    root = run_dir / "checkpoints"
    real = trainer_mod.D.full_model_state

    def with_nan(model):
        weights = real(model)
        name = sorted(weights)[0]
        weights[name] = weights[name].clone().fill_(float("nan"))
        return weights

    monkeypatch.setattr(trainer_mod.D, "full_model_state", with_nan)
    before = snapshot(root)
    tr, _ = trainer(config(run_dir, max_steps=9), resume=True)
    with pytest.raises(TrainingError, match="not saving step 9: non-finite weights"):
        tr.run()
    assert snapshot(root) == before
    assert ckpt.newest_valid(root) == (ckpt.step_dir(root, 6), [])


# ---------------------------------------------------------------------------------------------------------
# C9: one writer per run directory

def test_a_held_lock_refuses_a_second_trainer(run_dir):
    before = snapshot(run_dir)
    with ckpt.RunLock(run_dir):
        tr, _ = trainer(config(run_dir, max_steps=9), resume=True)
        with pytest.raises(CheckpointError, match=rf"is in use by another training process \(pid {os.getpid()}\)"):
            tr.run()
        assert (run_dir / ".lock").read_text() == str(os.getpid()), "the holder keeps its lock"
        with pytest.raises(CheckpointError, match="in use"):
            ckpt.RunLock(run_dir).__enter__()
    assert not (run_dir / ".lock").exists()
    assert {k: v for k, v in snapshot(run_dir).items() if k != ".lock"} == before


def test_a_live_process_holding_the_lock_refuses_the_trainer(run_dir):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(str(holder.pid))
        before = snapshot(run_dir)
        tr, _ = trainer(config(run_dir, max_steps=9), resume=True)
        with pytest.raises(CheckpointError, match=rf"in use by another training process \(pid {holder.pid}\)"):
            tr.run()
        assert snapshot(run_dir) == before, "no file written, the other process's lock untouched"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("content", ["dead", "", "not a pid"])
def test_a_stale_lock_is_taken_over(run_dir, content):
    if content == "dead":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        content = str(gone.pid)
    (run_dir / ".lock").write_text(content)
    tr, _ = trainer(config(run_dir, max_steps=9), resume=True)
    assert tr.run()["start"] == 6
    assert steps_of(run_dir / "checkpoints") == [3, 6, 9]
    assert not (run_dir / ".lock").exists(), "released at the end"


# ---------------------------------------------------------------------------------------------------------
# C10: the temporary directory is made next to the target, never in the system temp dir

def test_temporaries_are_made_inside_the_checkpoint_dir(tmp_path, monkeypatch):
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    written = fail_on(monkeypatch, 0, enospc())  # a spy on every checkpoint file write
    renames, real_rename = [], os.rename

    def rename(a, b):
        renames.append((Path(a), Path(b)))
        real_rename(a, b)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    out = tmp_path / "run"
    tr, _ = trainer(config(out, max_steps=3))
    tr.run()
    root = out / "checkpoints"
    assert [p.name for p in written] == [*ckpt.FILES, ckpt.MANIFEST]
    assert {p.parent.parent for p in written} == {root}
    assert all(p.parent.name.startswith(".tmp-step-00000003-") for p in written)
    assert [(a.parent, b) for a, b in renames if b.parent == root] == [(root, ckpt.step_dir(root, 3))]
    stray = [p for p in system_tmp.iterdir() if not p.name.startswith("torchinductor_")]  # torch's own cache dir
    assert stray == [], "nothing went through the system temp dir"
    assert math.isfinite(ckpt.decode_checkpoint(ckpt.step_dir(root, 3))[2]["eval"]["loss"])


def test_a_renamed_checkpoint_is_not_trusted(tmp_path):
    """A step-N directory whose manifest records another step (copied or renamed by hand) is skipped."""
    from qkv.train.checkpoint import encode_checkpoint, newest_valid, save_checkpoint

    root = tmp_path / "checkpoints"
    payload = encode_checkpoint({"w": torch.zeros(2)}, {}, {"step": 3})
    save_checkpoint(root, 3, payload)
    save_checkpoint(root, 6, payload)
    (root / "step-00000006").rename(root / "step-00000009")
    path, skipped = newest_valid(root)
    assert path.name == "step-00000003" and "records step 6" in skipped[0]


def test_resume_checks_the_checkpoint_settings_even_without_run_json(tmp_path):
    """C7 when run.json is gone: the checkpoint's own state.json still refuses other settings."""
    cfg = config(tmp_path / "run", max_steps=3)
    Trainer(cfg, progress=False).run()
    (tmp_path / "run" / "run.json").unlink()
    with pytest.raises(CheckpointError, match="d_model: 32 in the run, 64 now"):
        Trainer(cfg.replace(d_model=64, max_steps=6), resume=True, progress=False).run()
    assert not (tmp_path / "run" / "run.json").exists()  # nothing rewritten on the way to the error


def test_a_checkpoint_whose_tensors_do_not_fit_the_model_is_refused_by_name(run_dir):
    """A checkpoint that verifies (its manifest was rewritten to match) but lacks a tensor: resume names it."""
    root = run_dir / "checkpoints"
    model, optim, state = ckpt.decode_checkpoint(ckpt.step_dir(root, 6))
    dropped = sorted(model)[0]
    del model[dropped]
    shutil.rmtree(ckpt.step_dir(root, 6))
    ckpt.save_checkpoint(root, 6, ckpt.encode_checkpoint(model, optim, state))
    tr, _ = trainer(config(run_dir, max_steps=9, save_every=9, eval_every=9), resume=True)
    with pytest.raises(ModelFormatError, match=f"missing: {dropped}"):
        tr.run()
