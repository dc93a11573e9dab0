"""The training loop: AdamW, warmup + cosine, clipping, accumulation, autocast, eval, checkpoints, resume.

Determinism (RELIABILITY C6): everything random in a step is a function of (seed, rank, micro-step) —
the batch (qkv.train.data) and the dropout noise (the global generator is re-seeded before each
micro-step) — and the learning rate is a function of the step. So a checkpoint needs only the step,
the parameters and the optimizer's tensors, and resuming at step N on the CPU continues with
bit-identical parameters and losses.

Run directory::

    run.json         what was trained (settings + the model's spec) — written once
    tokenizer.json   (+ tokenizer_config.json) text runs: the tokenizer, so the run loads back alone
    metrics.jsonl    one JSON object per logged step and per evaluation
    checkpoints/     step-00000500/ … (qkv.train.checkpoint)
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, QkvError
from ..io import write_text
from . import checkpoint as ckpt
from . import distributed as D
from .config import TrainConfig, mismatches
from .data import shard
from .jobs import make_job

RUN_FORMAT = "qkv-run/1"
MAX_SKIPPED = 10  # nan_policy "skip": this many non-finite steps in a row stop the run anyway


class TrainingError(QkvError, RuntimeError):
    """Training cannot go on (a non-finite loss under nan_policy "stop", too many skipped steps)."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps`` (at most half the run, so a short run still reaches
    ``lr`` and decays), then cosine decay to ``min_lr`` at ``max_steps``."""
    warmup = min(cfg.warmup_steps, cfg.max_steps // 2)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, cfg.max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def _seed(cfg: TrainConfig, rank: int, micro_step: int) -> int:
    return ((cfg.seed * 1_000_003 + micro_step) * 257 + rank) % (2**63 - 1)


class Trainer:
    """One run: ``Trainer(cfg).run()``. ``resume=True`` continues from the newest valid checkpoint."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None, quiet: bool = False,
                 log=None):
        """``progress``: a one-line progress bar (default: when stderr is a terminal), else a line every
        ``log_every`` steps; ``quiet``: neither (evaluations are still reported)."""
        self.cfg, self.resume, self.quiet = cfg, resume, quiet
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._verified: dict[str, bytes] | None = None  # the resume checkpoint's payload, once rank 0 verified it

    # -- set-up --

    def run(self) -> dict:
        d = D.setup(self.cfg.device, self.cfg.distributed)
        try:
            if self.cfg.batch_size % d.world:
                raise ConfigError(f"batch_size {self.cfg.batch_size} does not split over {d.world} processes")
            torch.manual_seed(self.cfg.seed)
            self.job = make_job(self.cfg)
            with ckpt.RunLock(self._prepared_out()) if d.is_main else nullcontext():
                result = self._run(d)
            d.barrier()  # a normal end: every process is done before the group is torn down (gloo aborts otherwise)
            return result
        finally:
            d.close()

    def _prepared_out(self) -> Path:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {self.out}: cannot create the directory ({e.strerror})") from None
        return self.out

    def _run(self, d: D.Dist) -> dict:
        start, state = self._agreed_start(d), None
        model = self.job.build()
        if start:
            payload, self._verified = self._verified, None  # rank 0 verified it when opening the run
            weights, opt_tensors, state = ckpt.decode_checkpoint(ckpt.step_dir(self.ckpt_root, start), payload)
            self._load_weights(model, weights)
        model = D.wrap(model.to(d.device), d, self.job.blocks(model))
        opt = make_optimizer(model, self.cfg)
        if start:
            D.load_optimizer_state(model, opt, opt_tensors, state["param_groups"])
        return self._loop(d, model, opt, start)

    def _open_run_dir(self) -> int:
        """Check or write run.json, clean what an interrupted save left, find where to start (rank 0)."""
        spec = {"format": RUN_FORMAT, "config": self.cfg.to_dict(), "spec": self.job.spec()}
        run_json = self.out / "run.json"
        for leftover in ckpt.clean_temporaries(self.ckpt_root):
            self.log(f"removed {leftover.name}: an interrupted checkpoint write")
        path, payload, skipped = ckpt.newest_payload(self.ckpt_root)
        if run_json.exists() and path is not None:  # settings bind once something was trained with them
            diff = mismatches(_read_run_json(run_json).get("config", {}), self.cfg)
            if diff:
                raise CheckpointError(f"{run_json}: this run was made with other settings ({'; '.join(diff)}); "
                                      "use another --out or the same settings")
        for why in skipped:
            self.log(f"skipping invalid checkpoint: {why}")
        if path is not None and not self.resume:
            raise CheckpointError(f"{self.out} already holds a run (checkpoint {path.name}); pass --resume to "
                                  "continue it or choose another --out")
        if self.resume and path is None:
            self.log(f"no valid checkpoint in {self.ckpt_root}: starting from step 0")
        if path is not None:  # the checkpoint's own record too, in case run.json was lost or replaced
            diff = mismatches(json.loads(payload["state.json"]).get("config", {}), self.cfg)
            if diff:
                raise CheckpointError(f"{path}: this checkpoint was made with other settings ({'; '.join(diff)}); "
                                      "use another --out or the same settings")
        write_text(run_json, json.dumps(spec, indent=1))
        self._write_tokenizer()
        self._verified = payload
        start = int(path.name.split("-")[1]) if path is not None else 0
        self._truncate_metrics(start)
        return start

    def _write_tokenizer(self) -> None:
        if self.job.kind == "lm":
            from ..weights.export import save_tokenizer

            save_tokenizer(self.job.tokenizer, self.out)

    def _agreed_start(self, d: D.Dist) -> int:
        """Rank 0 opens the run directory; every rank learns the start step — or that rank 0 failed."""
        if d.world == 1:
            return self._open_run_dir()
        box, error = torch.tensor([-1], dtype=torch.long, device=d.device), None
        if d.is_main:
            try:
                box[0] = self._open_run_dir()
            except QkvError as e:
                error = e
        torch.distributed.broadcast(box, src=0)
        if error is not None:
            raise error
        if int(box[0]) < 0:
            raise CheckpointError(f"rank 0 could not open {self.out} (its error says why)")
        return int(box[0])

    def _load_weights(self, model: torch.nn.Module, weights: dict) -> None:
        from ..load import check_state

        check_state(model, weights, source=f"{self.ckpt_root}: the checkpoint")  # names and shapes, listed
        model.load_state_dict(weights, strict=False)

    # -- the loop --

    def _loop(self, d: D.Dist, model, opt, start: int) -> dict:
        cfg = self.cfg
        autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        t0, seen, skipped, last = time.perf_counter(), 0, 0, {}
        for step in range(start, cfg.max_steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            model.train()
            opt.zero_grad(set_to_none=True)
            loss, n_proc = self._accumulate(d, model, step, autocast)
            seen += n_proc
            if not math.isfinite(loss):
                skipped = self._non_finite(step, loss, opt, skipped)
                last = self._eval_and_save(d, model, opt, step + 1, last)
                continue
            skipped = 0
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            if not math.isfinite(float(norm)):
                skipped = self._non_finite(step, float(norm), opt, skipped, what="gradient norm")
                last = self._eval_and_save(d, model, opt, step + 1, last)
                continue
            opt.step()
            done = step + 1
            rate = seen / max(1e-9, time.perf_counter() - t0)
            record = {"step": done, "loss": loss, "lr": lr_at(step, cfg), "grad_norm": float(norm), "tokens_per_s": rate}
            if d.is_main and (done % cfg.log_every == 0 or done == cfg.max_steps):
                self._metric(record)
            self._show(d, done, loss, rate, time.perf_counter() - t0, start)
            last = self._eval_and_save(d, model, opt, done, last)
        if self.progress and not self.quiet and d.is_main:
            print(file=sys.stderr)
        return {"steps": cfg.max_steps, "start": start, "eval": last, "out": str(self.out), "rank": d.rank}

    def _eval_and_save(self, d: D.Dist, model, opt, done: int, last: dict) -> dict:
        """Evaluate and checkpoint on schedule — also after a skipped step, so the final weights are saved."""
        save = done % self.cfg.save_every == 0 or done == self.cfg.max_steps
        if done % self.cfg.eval_every == 0 or done == self.cfg.max_steps:
            try:
                last = self._evaluate(d, model, done)
            except Exception:
                if save:  # an evaluation that fails must not cost the trained weights
                    self._save(d, model, opt, done, last)
                raise
        if save:
            self._save(d, model, opt, done, last)
        return last

    def _accumulate(self, d: D.Dist, model, step: int, autocast) -> tuple[float, int]:
        """Forward + backward over ``grad_accum`` micro-batches; returns the global mean loss.

        Each process scales its summed loss by world / (global target tokens · accum): after DDP's
        gradient average this is exactly the gradient of the mean over the whole global batch.
        """
        cfg, job = self.cfg, self.job
        total, processed = 0.0, 0
        for a in range(cfg.grad_accum):
            micro = step * cfg.grad_accum + a
            torch.manual_seed(_seed(cfg, d.rank, micro))
            batch = job.batch(micro)
            n_global = job.n_targets(batch)
            local = shard(batch, d.rank, d.world).to(d.device)
            with D.no_sync(model, a < cfg.grad_accum - 1), autocast:
                loss_sum = _loss_sum(job, model, local)
            (loss_sum * (d.world / (n_global * cfg.grad_accum))).backward()
            total += float(loss_sum.detach()) / n_global
            processed += job.n_processed(batch)
        total = d.sum(total)[0] / cfg.grad_accum
        return total, processed

    def _non_finite(self, step: int, value: float, opt, skipped: int, what: str = "loss") -> int:
        """RELIABILITY C8: stop, or drop this step's update; never let NaN reach the weights."""
        opt.zero_grad(set_to_none=True)
        msg = f"non-finite {what} ({value}) at step {step + 1}"
        if self.cfg.nan_policy == "stop":
            raise TrainingError(f"{msg}; stopped with the weights of the last good step (lower --lr, or "
                                "nan_policy=skip); resume from the newest checkpoint with --resume")
        skipped += 1
        self.log(f"{msg}: step skipped ({skipped} in a row)")
        if skipped >= MAX_SKIPPED:
            raise TrainingError(f"{msg}: {skipped} steps in a row were not finite; stopping")
        return skipped

    # -- evaluation, logging, checkpoints --

    def _eval_model(self, d: D.Dist, model):
        """A plain model with the current weights: DDP's module, or a full copy of an FSDP-sharded one."""
        if d.mode != "fsdp":
            return D.unwrap(model)
        plain = self.job.build().to(d.device)
        plain.load_state_dict(D.full_model_state(model), strict=False)
        return plain

    def _evaluate(self, d: D.Dist, model, step: int) -> dict:
        plain = self._eval_model(d, model)
        plain.eval()
        result = self.job.evaluate(plain, "val", limit=self.cfg.eval_size, device=d.device)
        samples = self.job.samples(plain, result, self.cfg.samples) if self.cfg.samples else []
        summary = {k: v for k, v in result.items() if k != "predictions"}
        if d.is_main:
            self._metric({"step": step, "eval": summary, "samples": samples})
            shown = ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float))
            self.log(f"{'' if not self.progress else chr(10)}eval at step {step}: {shown}")
            for s in samples:
                self.log(f"  {s}")
        return summary

    def _save(self, d: D.Dist, model, opt, step: int, last_eval: dict) -> None:
        weights = D.full_model_state(model)
        if getattr(D.unwrap(model).config, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)  # one tensor, stored once
        opt_tensors, groups = D.full_optimizer_state(model, opt)
        error = None
        if d.is_main:
            try:
                self._write_checkpoint(d, step, weights, opt_tensors, groups, last_eval)
            except QkvError as e:
                error = e
        if d.any(error is not None):  # every process stops together instead of waiting on a dead rank 0
            raise error or CheckpointError(f"rank 0 could not save checkpoint step {step} (its error says why)")

    def _write_checkpoint(self, d: D.Dist, step: int, weights, opt_tensors, groups, last_eval) -> None:
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise TrainingError(f"not saving step {step}: non-finite weights in {', '.join(bad[:3])}")
        state = {"step": step, "param_groups": groups, "eval": last_eval, "world_size": d.world,
                 "config": self.cfg.to_dict()}
        payload = ckpt.encode_checkpoint(weights, opt_tensors, state)
        ckpt.save_checkpoint(self.ckpt_root, step, payload, keep=self.cfg.keep)

    def _metric(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, start: int) -> None:
        """On resume, drop records past the checkpoint: the log then reads as one uninterrupted run."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _record_step(line) <= start]
        write_text(path, "".join(line + "\n" for line in keep))

    def _show(self, d: D.Dist, done: int, loss: float, rate: float, elapsed: float, start: int) -> None:
        cfg = self.cfg
        if not d.is_main:
            return
        eta = elapsed / max(1, done - start) * (cfg.max_steps - done)
        frac = done / cfg.max_steps
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        line = (f"step {done}/{cfg.max_steps} [{bar}] loss {loss:.4f} lr {lr_at(done - 1, cfg):.2e} "
                f"{rate:,.0f} tok/s ETA {_clock(eta)}")
        if self.quiet:
            return
        if self.progress:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif done % cfg.log_every == 0 or done == cfg.max_steps:
            self.log(line)


def _loss_sum(job, model, batch):
    """Summed target-token loss of one micro-batch (a seam for fault-injection tests)."""
    return job.loss_sum(model, batch)


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 1 << 62  # an unreadable line (the run was killed mid-write): dropped


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _read_run_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); the run directory is damaged") from None
    if not isinstance(d, dict) or d.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path}: not a qkv training run ({RUN_FORMAT})")
    return d


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None, quiet: bool = False) -> dict:
    """Train as ``cfg`` says; returns the last evaluation. See :class:`Trainer`."""
    return Trainer(cfg, resume=resume, progress=progress, quiet=quiet).run()
