"""Faithfulness of attribution measures on SmolLM2-135M-Instruct: which one finds the evidence?

    .venv/bin/python bench/faithfulness.py [--n 100] [--seed 0] [--threads 2] [--tasks agreement ioi]
        [--measures random grad_norm ...] [--beam 1] [--out results.json] [--quick]

Items come from bench/faithfulness_data.py: subject–verb agreement ("The keys to the old cabinet" ->
" are" vs " is"; evidence = the subject noun) and indirect-object identification ("When Mary and John went
to the store, John gave a drink to" -> " Mary" vs " John"; evidence = the first mention of Mary). `train`
items only give the model's accuracy (nothing here is tuned); every metric is over `test` items.

A measure gives one score per input token, higher = more evidence for the target (over the foil, where the
measure is contrastive). Per measure and task, separately over the items the model gets right (logit of
target > logit of foil at the last position) and wrong, as Ferrando et al. 2023 report them:

  MRR        1 / rank of the best-scored evidence token among all tokens (score descending). Ties are
             broken pessimistically: every other token scoring >= the evidence ranks above it, so a
             constant measure earns 1/T, not 1. "(chance)" is the exact E[1/rank] of a uniform ranking.
  comp ↑     comprehensiveness, f(x) − f(x without the top-k tokens), mean over k = 10/20/50 % of the
             T − 1 removable tokens (rounded up, at least 1). f = softmax probability of the target at the
             last position. Removal deletes tokens from the sequence (order kept, no mask token). The
             last token is never removed nor ranked for removal: the prediction is made at it.
  suff ↓     sufficiency, f(x) − f(only the top-k tokens, plus the last), same k.

Both are normalised per item as Edin et al. 2024 (NAOPC): (AOPC − lower) / (upper − lower), where upper and
lower are the highest and lowest AOPC any removal ordering reaches for that item. Exact bounds need every
nested chain of top-k sets (exponential in T), so they are estimated by a beam search over orderings, Edin
et al.'s NAOPC_beam: one position per step, states ranked by the AOPC of the bins passed plus the current
set's value, width --beam (default 1, greedy; width w costs ~w times more). The best sufficiency is searched
twice — growing the kept set from nothing and shrinking it from the whole prompt — and the better kept.
Checked against the exact bounds (dynamic programming over all nested sets) on 6 test prompts of <= 13 tokens:
the comprehensiveness bounds and the worst sufficiency were exact in 16 of 18 cases (the two others off by
0.004 and 0.0006), the best sufficiency exact in 4 of 6 and within 0.004 of it otherwise. An estimated bound lies inside the true
one, so a measure can land a little outside [0, 1]; the count is printed, and nothing is clipped (clipping,
or widening the bounds by the measures' own values, would make one measure's number depend on which others
ran). Items whose bounds coincide (upper − lower < 1e-9) have no NAOPC and leave its mean. Un-normalised
AOPC and the mean bounds are printed too, and everything per item goes to --out.

The bound search is most of the cost: --quick took 3.3 min on 1 thread of this 2-core machine (another job
running); the default 100 items per task scale that linearly (~30 min on 1 thread, less on 2).

ms/prompt: median wall time of one measure's scores for one prompt (the deletion tests not included).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

try:  # run as a script (bench/ on sys.path) or imported as bench.faithfulness
    from . import faithfulness_data as data
except ImportError:
    import faithfulness_data as data

FRACTIONS = (0.1, 0.2, 0.5)  # of the removable tokens, for the deletion tests
MAX_ROWS = 128  # rows per forward: bounds memory on long prompts, large enough to fill the matmuls


@dataclass
class Ctx:
    """What a measure sees: one prompt, already tokenized (SmolLM2 adds no BOS: ids[0] is the first word)."""

    loaded: Any  # qkv.load(...)'s result: .model, .tokenizer
    text: str
    ids: list[int]
    target_id: int
    foil_id: int
    seed: str  # one random stream per item, for `random`


# -- the model, as the measures and the deletion tests call it ------------------------------------------

@torch.inference_mode()
def last_logits(loaded, rows: list[list[int]]) -> torch.Tensor:
    """Next-token logits (R, V) after each row of ids; rows of one length run as one batch (no padding)."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    by_len: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_len.setdefault(len(row), []).append(i)
    for idx in by_len.values():
        for start in range(0, len(idx), MAX_ROWS):
            chunk = idx[start:start + MAX_ROWS]
            ids = torch.tensor([rows[i] for i in chunk], device=loaded.device)  # (B, T)
            logits = loaded.model(ids, last_only=True)[:, -1]  # (B, V) float32
            for j, i in enumerate(chunk):
                out[i] = logits[j]
    return torch.stack(out)  # (R, V)


class TargetProb:
    """f(row) = softmax probability of the target after ``row``, memoised: the measures' deletion sets and the
    bound search often ask for the same row twice."""

    def __init__(self, loaded, target_id: int):
        self.loaded, self.target_id, self.memo = loaded, target_id, {}

    def __call__(self, rows: list[list[int]]) -> list[float]:
        todo = list(dict.fromkeys(tuple(r) for r in rows if tuple(r) not in self.memo))
        if todo:
            probs = torch.softmax(last_logits(self.loaded, [list(r) for r in todo]), -1)[:, self.target_id]  # (R,)
            self.memo.update(zip(todo, probs.tolist()))
        return [self.memo[tuple(r)] for r in rows]


def _logit_diffs(ctx: Ctx, rows: list[list[int]]) -> list[float]:
    logits = last_logits(ctx.loaded, rows)  # (R, V)
    return (logits[:, ctx.target_id] - logits[:, ctx.foil_id]).tolist()


# -- baseline measures ------------------------------------------------------------------------------------

def random_scores(ctx: Ctx) -> list[float]:
    """Uniform noise, seeded per item: the floor every measure must clear."""
    rng = random.Random(ctx.seed)
    return [rng.random() for _ in ctx.ids]


def _contrastive_grad(ctx: Ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """d(logit_target − logit_foil)/d(embedding) at the last position, and the embeddings: both (T, C).

    The model takes ids, not embeddings, so a forward hook swaps the embedding layer's output for a leaf
    tensor that requires grad; the rest of the forward is the model's own."""
    leaf: dict[str, torch.Tensor] = {}

    def swap(module, inputs, output):
        leaf["emb"] = output.detach().requires_grad_()
        return leaf["emb"]

    handle = ctx.loaded.model.model.embed_tokens.register_forward_hook(swap)
    try:
        with torch.enable_grad():
            logits = ctx.loaded.model(torch.tensor([ctx.ids], device=ctx.loaded.device), last_only=True)[0, -1]  # (V,)
            (grad,) = torch.autograd.grad(logits[ctx.target_id] - logits[ctx.foil_id], leaf["emb"])
    finally:
        handle.remove()
    return grad[0].float(), leaf["emb"][0].detach().float()  # (T, C) each


def grad_norm(ctx: Ctx) -> list[float]:
    """Contrastive gradient norm (Yin & Neubig 2022): the L1 norm over the embedding dimension, as in their
    paper. Unsigned: it says how much a token matters, not for which side."""
    grad, _ = _contrastive_grad(ctx)
    return grad.abs().sum(-1).tolist()  # (T,)


def grad_x_input(ctx: Ctx) -> list[float]:
    """Contrastive gradient × input (Yin & Neubig 2022): gradient · embedding, signed (+ favours the target)."""
    grad, emb = _contrastive_grad(ctx)
    return (grad * emb).sum(-1).tolist()  # (T,)


def erasure(ctx: Ctx) -> list[float]:
    """Leave-one-out: (logit_t − logit_f) of the whole prompt minus that of the prompt with token i deleted.
    Deleting the last token moves the prediction one position back; that is what erasing it means."""
    full = _logit_diffs(ctx, [ctx.ids])[0]
    return [full - d for d in _logit_diffs(ctx, [ctx.ids[:i] + ctx.ids[i + 1:] for i in range(len(ctx.ids))])]


# == qkv's own measures ====================================================================================
# Each is one qkv.capture of the last position's row in the same forward pass (qkv.explain.measures):
# raw weights (mean of layers and heads; last layer), norms, mixing (ALTI composed through the layers),
# rollout (the baseline), logit and alti-logit (contrastive: target vs foil; alti-logit = ALTI-Logit).

QKV_MEASURES = ("weights_mean", "weights_last", "rollout", "norms", "mixing", "logit", "alti-logit")


def qkv_scores(loaded, text: str, ids: list[int], target_id: int, foil_id: int, measure: str) -> list[float]:
    """One score per token of ``ids`` (the tokenization of ``text``) for the prediction at the last position.
    Only ``logit`` and ``alti-logit`` are contrastive; the others say what the last position draws on, whatever is predicted."""
    import qkv

    name = "weights" if measure.startswith("weights") else measure
    rec = qkv.capture(loaded, text, queries=[len(ids) - 1], measures=[name],
                      **({"target": target_id, "foil": foil_id} if name in ("logit", "alti-logit") else {}))
    if len(rec.key_tokens) != len(ids):
        raise RuntimeError(f"capture tokenized {text!r} into {len(rec.key_tokens)} tokens, the benchmark into "
                           f"{len(ids)}")
    if measure == "weights_last":
        return rec.values("weights", layer=rec.layers[-1])[0].tolist()  # last layer, mean of heads
    return rec.values(name)[0].tolist()  # (T,): the measure's model view


def _qkv_method(ctx: Ctx, measure: str) -> list[float]:
    return qkv_scores(ctx.loaded, ctx.text, ctx.ids, ctx.target_id, ctx.foil_id, measure)


# == end of qkv's measures =================================================================================

METHODS: dict[str, Callable[[Ctx], list[float]]] = {
    "random": random_scores,
    "grad_norm": grad_norm,
    "grad_x_input": grad_x_input,
    "erasure": erasure,
    **{name: functools.partial(_qkv_method, measure=name) for name in QKV_MEASURES},
}


# -- metrics ----------------------------------------------------------------------------------------------

def reciprocal_rank(scores: list[float], evidence: tuple[int, ...]) -> float:
    """1 / rank of the best evidence token; ties pessimistic (a non-evidence token scoring >= it ranks above)."""
    best = max(scores[i] for i in evidence)
    above = sum(1 for i, s in enumerate(scores) if i not in evidence and s >= best)
    return 1.0 / (1 + above)


def chance_rr(n: int, m: int) -> float:
    """E[1 / rank of the best of m evidence tokens] among n under a uniform ranking: P(rank >= r) is
    C(n − r + 1, m) / C(n, m)."""
    total = math.comb(n, m)
    return sum((math.comb(n - r + 1, m) - math.comb(n - r, m)) / total / r for r in range(1, n - m + 2))


def bin_sizes(n_removable: int) -> list[int]:
    """k for each fraction: rounded up, at least 1 (repeats kept, so every item averages three values)."""
    return [max(1, math.ceil(p * n_removable)) for p in FRACTIONS]


def _without(ids: list[int], chosen) -> list[int]:
    return [t for i, t in enumerate(ids) if i not in chosen]


def _only(ids: list[int], chosen) -> list[int]:
    return [t for i, t in enumerate(ids) if i in chosen or i == len(ids) - 1]  # the last token always stays


def aopc(prob: TargetProb, ids: list[int], ranking: list[int], sizes: list[int]) -> tuple[float, float]:
    """(comprehensiveness, sufficiency) of one removal ranking of positions 0..T−2."""
    f0 = prob([ids])[0]
    rows = [_without(ids, set(ranking[:k])) for k in sizes] + [_only(ids, set(ranking[:k])) for k in sizes]
    vals = prob(rows)
    n = len(sizes)
    return statistics.fmean(f0 - v for v in vals[:n]), statistics.fmean(f0 - v for v in vals[n:])


def removal_ranking(scores: list[float]) -> list[int]:
    """Removable positions (all but the last), highest score first; ties by position."""
    return sorted(range(len(scores) - 1), key=lambda i: (-scores[i], i))


def _beam(prob: TargetProb, ids: list[int], sizes: list[int], width: int, build, sign: float,
          backward: bool = False) -> float:
    """The most extreme (sign=+1: highest, −1: lowest) AOPC of ``build`` (_without or _only) that a beam search
    over removal orderings finds. It grows the top-k set one position at a time from empty or, ``backward``,
    shrinks it from every removable position down to the smallest bin. A state is (top-k set, AOPC summed over
    the bins passed); between bins, states are ranked by the current set's value too."""
    f0, weight, n = prob([ids])[0], {k: sizes.count(k) for k in sizes}, len(ids) - 1
    states: list[tuple[frozenset, float]] = [(frozenset(range(n)) if backward else frozenset(), 0.0)]
    steps = range(n - 1, min(sizes) - 1, -1) if backward else range(1, max(sizes) + 1)
    for size in steps:  # the size of the top-k set after this step
        cands: dict[frozenset, float] = {}
        for chosen, acc in states:
            for i in range(n):
                if (i in chosen) == backward:
                    cands.setdefault(chosen - {i} if backward else chosen | {i}, acc)
        keys = list(cands)
        vals = prob([build(ids, k) for k in keys])
        scored = []
        for key, v in zip(keys, vals):
            acc = cands[key] + weight.get(size, 0) * (f0 - v)
            scored.append((sign * (acc + (0.0 if size in weight else f0 - v)), key, acc))
        scored.sort(key=lambda x: -x[0])
        states = [(key, acc) for _, key, acc in scored[:width]]
    if backward and n in weight:  # a bin as large as the whole prompt: the full set, valued before any step
        f_all = prob([build(ids, frozenset(range(n)))])[0]
        states = [(k, acc + weight[n] * (f0 - f_all)) for k, acc in states]
    return states[0][1] / len(sizes)


def search_bounds(prob: TargetProb, ids: list[int], sizes: list[int], width: int) -> dict[str, list[float]]:
    """Beam estimates of [lower, upper] AOPC for comprehensiveness and sufficiency (Edin et al.'s NAOPC_beam).
    The best sufficiency (lowest) is searched both ways and the lower kept: growing a kept set from one token
    starts where the model is lost, so a forward search often misses what shrinking from the full prompt finds."""
    def best(build, sign, backward=False):
        return _beam(prob, ids, sizes, width, build, sign, backward)

    return {"comp": [best(_without, -1.0), best(_without, 1.0)],
            "suff": [min(best(_only, -1.0), best(_only, -1.0, backward=True)), best(_only, 1.0)]}


def normalise(value: float, bounds: list[float]) -> float | None:
    lo, hi = bounds
    return None if hi - lo < 1e-9 else (value - lo) / (hi - lo)


# -- one item ---------------------------------------------------------------------------------------------

def evaluate_item(loaded, item, seed: str, methods: list[str], width: int, deletion: bool = True) -> dict:
    """The model's verdict on ``item`` and, with ``deletion``, every measure's scores and metrics."""
    tok = loaded.tokenizer
    ids = tok.encode(item.text)
    t_id, f_id = tok.encode(item.target, add_bos=False)[0], tok.encode(item.foil, add_bos=False)[0]
    logits = last_logits(loaded, [ids])[0]  # (V,)
    diff = float(logits[t_id] - logits[f_id])
    rec = {"task": item.task, "text": item.text, "target": item.target, "foil": item.foil,
           "attractors": item.attractors, "template": item.template, "correct": diff > 0, "logit_diff": diff,
           "p_target": float(torch.softmax(logits, -1)[t_id]), "n_tokens": len(ids),
           "evidence_positions": list(item.evidence_positions)}
    if not deletion:
        return rec
    ctx = Ctx(loaded, item.text, ids, t_id, f_id, seed)
    prob, sizes = TargetProb(loaded, t_id), bin_sizes(len(ids) - 1)
    rec["tokens"] = tok.token_strings(ids)
    rec["chance_rr"] = chance_rr(len(ids), len(item.evidence_positions))
    rec["bounds"] = search_bounds(prob, ids, sizes, width)
    rec["methods"] = {name: _score_method(name, ctx, prob, sizes, rec) for name in methods}
    return rec


def _score_method(name: str, ctx: Ctx, prob: TargetProb, sizes: list[int], rec: dict) -> dict:
    start = time.perf_counter()
    scores = [float(s) for s in METHODS[name](ctx)]
    ms = (time.perf_counter() - start) * 1e3
    if len(scores) != len(ctx.ids) or not all(math.isfinite(s) for s in scores):
        raise RuntimeError(f"measure {name} gave {len(scores)} scores (finite: {all(map(math.isfinite, scores))}) "
                           f"for {len(ctx.ids)} tokens of {ctx.text!r}")
    comp, suff = aopc(prob, ctx.ids, removal_ranking(scores), sizes)
    return {"scores": scores, "ms": ms, "rr": reciprocal_rank(scores, tuple(rec["evidence_positions"])),
            "comp_raw": comp, "suff_raw": suff,
            "comp": normalise(comp, rec["bounds"]["comp"]), "suff": normalise(suff, rec["bounds"]["suff"])}


# -- the run ----------------------------------------------------------------------------------------------

def run_task(loaded, task: str, args) -> tuple[list[dict], dict]:
    """Train accuracy, then every test item with every measure. Returns (records, data-generation stats)."""
    train, train_stats = data.build(task, "train", args.n, args.seed, loaded.tokenizer)
    test, test_stats = data.build(task, "test", args.n, args.seed, loaded.tokenizer)
    records = [dict(evaluate_item(loaded, it, "", [], args.beam, deletion=False), split="train") for it in train]
    _warm_up(loaded, test[0], args.measures)
    for i, item in enumerate(test):
        rec = evaluate_item(loaded, item, f"{args.seed}/{task}/{i}", args.measures, args.beam)
        records.append(dict(rec, split="test"))
        if (i + 1) % 10 == 0 or i + 1 == len(test):
            print(f"  {task}: {i + 1}/{len(test)} test items", file=sys.stderr, flush=True)
    return records, {"train": dict(train_stats), "test": dict(test_stats)}


def _warm_up(loaded, item, methods: list[str]) -> None:
    """One untimed call of each measure: the first forward and backward of a process pay one-off costs."""
    tok = loaded.tokenizer
    ctx = Ctx(loaded, item.text, tok.encode(item.text), tok.encode(item.target, add_bos=False)[0],
              tok.encode(item.foil, add_bos=False)[0], "warm-up")
    for name in methods:
        METHODS[name](ctx)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarise(records: list[dict], tasks: list[str], methods: list[str]) -> dict:
    """Means per task and measure: MRR over right / wrong items; NAOPC and raw AOPC over all test items."""
    out: dict[str, Any] = {}
    for task in tasks:
        test = [r for r in records if r["task"] == task and r["split"] == "test"]
        groups = {"correct": [r for r in test if r["correct"]], "wrong": [r for r in test if not r["correct"]]}
        row = {"(chance)": {f"mrr_{g}": _mean(r["chance_rr"] for r in rs) for g, rs in groups.items()}}
        for m in methods:
            row[m] = {f"mrr_{g}": _mean(r["methods"][m]["rr"] for r in rs) for g, rs in groups.items()}
            for key in ("comp", "suff", "comp_raw", "suff_raw"):  # all items in the table; right/wrong in --out
                row[m][key] = _mean(r["methods"][m][key] for r in test)
                row[m].update({f"{key}_{g}": _mean(r["methods"][m][key] for r in rs) for g, rs in groups.items()})
            normed = [r["methods"][m][k] for r in test for k in ("comp", "suff") if r["methods"][m][k] is not None]
            row[m]["outside_0_1"] = sum(1 for v in normed if not -1e-9 <= v <= 1 + 1e-9)
        row["(bounds)"] = {f"{k}_{end}": _mean(r["bounds"][k][j] for r in test)
                           for k in ("comp", "suff") for j, end in enumerate(("lo", "hi"))}
        row["(bounds)"]["no_naopc"] = sum(1 for r in test if any(normalise(0.0, b) is None
                                                                 for b in r["bounds"].values()))
        out[task] = row
    test = [r for r in records if r["split"] == "test"]  # ms/prompt: one median over every task's prompts
    out["ms_median"] = {m: statistics.median(r["methods"][m]["ms"] for r in test) for m in methods}
    return out


def accuracy_lines(records: list[dict], tasks: list[str]) -> list[str]:
    lines = []
    for task in tasks:
        for split in ("test", "train"):
            rs = [r for r in records if r["task"] == task and r["split"] == split]
            line = f"- {task} {split}: {_frac(rs)}"
            if task == "agreement":
                counts = sorted({r["attractors"] for r in rs})
                line += " — by attractors: " + ", ".join(
                    f"{a}: {_frac([r for r in rs if r['attractors'] == a])}" for a in counts)
            lines.append(line)
    return lines


def _frac(rs: list[dict]) -> str:
    right = sum(r["correct"] for r in rs)
    return f"{right}/{len(rs)} ({100 * right / max(1, len(rs)):.0f} %)"


# -- the report -------------------------------------------------------------------------------------------

LABELS = {"agreement": "agreement", "ioi": "IOI"}


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown_table(summary: dict, tasks: list[str], methods: list[str]) -> str:
    head = ([f"MRR {LABELS[t]} ✓ / ✗" for t in tasks] + [f"comp {LABELS[t]} ↑" for t in tasks]
            + [f"suff {LABELS[t]} ↓" for t in tasks] + ["ms/prompt"])
    lines = ["| measure | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for m in methods + ["(chance)"]:
        cells = [f"{_f(summary[t][m]['mrr_correct'])} / {_f(summary[t][m]['mrr_wrong'])}" for t in tasks]
        if m == "(chance)":
            cells += ["—"] * (2 * len(tasks) + 1)
        else:
            cells += [_f(summary[t][m][k]) for k in ("comp", "suff") for t in tasks]
            cells.append(f"{summary['ms_median'][m]:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def raw_table(summary: dict, tasks: list[str], methods: list[str]) -> str:
    head = [f"{k} {LABELS[t]}" for k in ("comp", "suff") for t in tasks]
    lines = ["| un-normalised AOPC | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_f(summary[t][m][f"{k}_raw"], 4)
                                           for k in ("comp", "suff") for t in tasks) + " |")
    lines.append("| beam bounds [lower, upper] | " + " | ".join(
        f"[{_f(summary[t]['(bounds)'][f'{k}_lo'], 4)}, {_f(summary[t]['(bounds)'][f'{k}_hi'], 4)}]"
        for k in ("comp", "suff") for t in tasks) + " |")
    return "\n".join(lines)


def cpu_summary() -> str:
    """lscpu's model name and whether the vector/matrix extensions PyTorch's CPU kernels use are present."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    model = re.search(r"^Model name:\s*(.+)$", text, re.M)
    flags_line = re.search(r"^Flags:\s*(.+)$", text, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    have = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "amx_bf16"))
    return f"{model.group(1).strip() if model else platform.processor() or 'unknown CPU'} ({have})"


def report(args, records, summary, stats, seconds: float) -> str:
    tasks, methods = args.tasks, args.measures
    dropped = "; ".join(f"{t} {s}: drew {st['drawn']}, kept {args.n}" + "".join(
        f", {k} {v}" for k, v in st.items() if k.startswith("dropped")) for t in tasks for s, st in stats[t].items())
    outside = sum(summary[t][m]["outside_0_1"] for t in tasks for m in methods)
    no_naopc = sum(summary[t]["(bounds)"]["no_naopc"] for t in tasks)
    return "\n".join([
        f"Faithfulness of attribution measures, SmolLM2-135M-Instruct float32, {args.n} test items per task, "
        f"seed {args.seed}, beam {args.beam}",
        f"command: `.venv/bin/python bench/faithfulness.py {' '.join(args.argv)}`",
        f"date: {datetime.date.today().isoformat()}; torch {torch.__version__}; threads: {args.threads}; "
        f"CPU: {cpu_summary()}; wall time {seconds / 60:.1f} min",
        f"items: {dropped}", "", "SmolLM2 accuracy (logit of target > logit of foil):", *accuracy_lines(records, tasks),
        "", markdown_table(summary, tasks, methods), "",
        "MRR over test items the model gets right ✓ / wrong ✗; comp/suff = NAOPC over all test items "
        f"(beam bounds; {outside} normalised values fell outside [0, 1], {no_naopc} items had no NAOPC).", "",
        raw_table(summary, tasks, methods)])


# -- command line -----------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but a user's mistake is one line (no usage block), as everywhere in qkv."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="items per task and split (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", nargs="+", choices=data.TASKS, default=list(data.TASKS))
    ap.add_argument("--measures", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--beam", type=int, default=1, help="beam width of the NAOPC bound search (default 1)")
    ap.add_argument("--out", help="write every per-item result to this JSON file")
    ap.add_argument("--quick", action="store_true", help="10 items per task and split, for a smoke run")
    args = ap.parse_args(argv)
    for name in ("n", "threads", "beam"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        ap.error(f"--out {args.out}: its folder does not exist; create it or choose another path")
    if args.quick:
        args.n = 10
    args.tasks, args.measures = list(dict.fromkeys(args.tasks)), list(dict.fromkeys(args.measures))
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    import qkv

    start = time.perf_counter()
    try:
        loaded = qkv.load("smollm2", dtype="float32", device="cpu")
    except qkv.QkvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loaded.model.requires_grad_(False)  # gradients are taken w.r.t. the input embeddings only
    records, stats = [], {}
    for task in args.tasks:
        recs, stats[task] = run_task(loaded, task, args)
        records += recs
    summary = summarise(records, args.tasks, args.measures)
    text = report(args, records, summary, stats, time.perf_counter() - start)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"report": text, "summary": summary, "data": stats, "items": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
