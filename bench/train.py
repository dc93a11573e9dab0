"""Training throughput (tokens/s): qkv's models vs their peers with the same size and the same weights.

    .venv/bin/python bench/train.py [--threads 2] [--rounds 5] [--steps 5] [--s2s-steps 40]

seq2seq: the 2017 encoder–decoder (qkv.models.encoder_decoder) vs ``torch.nn.Transformer`` with the same
d_model/heads/layers/d_ff, pre-norm, wrapped in the same embeddings · √C + sinusoidal positions and output
linear (equal parameter counts, asserted; qkv's initial weights copied in). Both train on the ``date`` task's
batches exactly as ``qkv train`` runs a step: Seq2SeqJob.loss_sum / target tokens, backward, clip_grad_norm_,
AdamW of trainer.make_optimizer, zero_grad. tokens = real source + target tokens.
lm: qkv's LlamaForCausalLM vs transformers' (attn_implementation="sdpa"), same config and weights, random
(B, T + 1) byte batches, LMJob.loss_sum / (B·T) and the same step; tokens = B·T.
Both sides see the same batches; their losses on the first batch must agree (1e-4) before timing. After
``--warmup`` steps each, ``--rounds`` interleaved rounds (qkv, peer, qkv, peer, …) of ``--s2s-steps`` / ``--steps``
steps each are timed in this one process; a figure is the median over rounds, the ratio is qkv / peer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

MODELS = ("seq2seq", "lm")


class TorchSeq2Seq(nn.Module):
    """nn.Transformer inside qkv's embeddings and output layer: forward(src, tgt, src_mask) -> logits."""

    def __init__(self, cfg):
        super().__init__()
        from qkv.models.encoder_decoder import sinusoidal_positions

        self.d = cfg.d_model
        self.src_embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab_size, cfg.d_model)
        self.register_buffer("positions", sinusoidal_positions(cfg.max_len, cfg.d_model), persistent=False)
        with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first": not used in training
            warnings.simplefilter("ignore")
            self.transformer = nn.Transformer(cfg.d_model, cfg.n_heads, cfg.n_encoder_layers, cfg.n_decoder_layers,
                                              cfg.d_ff, dropout=cfg.dropout, batch_first=True,
                                              norm_first=cfg.norm_first)
        self.out = nn.Linear(cfg.d_model, cfg.tgt_vocab_size)

    def forward(self, src, tgt, src_mask):
        x = self.src_embed(src) * math.sqrt(self.d) + self.positions[:src.shape[1]]  # (B, S, C)
        y = self.tgt_embed(tgt) * math.sqrt(self.d) + self.positions[:tgt.shape[1]]  # (B, T, C)
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=torch.bool)  # True = hidden
        pad = ~src_mask  # torch: True = padding key
        h = self.transformer(x, y, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=pad,
                             memory_key_padding_mask=pad)
        return self.out(h)  # (B, T, V)


@torch.no_grad()
def copy_into_torch(ours, ref: TorchSeq2Seq) -> None:
    """qkv's weights into the nn.Transformer wrapper (q/k/v rows stack into in_proj)."""
    def mha(a, b):
        b.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        b.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        b.out_proj.load_state_dict(a.o_proj.state_dict())

    def layer(a, b, attns, blocks):
        for x, y in attns:
            mha(x, y)
        b.linear1.load_state_dict(a.ff.linear1.state_dict())
        b.linear2.load_state_dict(a.ff.linear2.state_dict())
        for i, block in enumerate(blocks):
            getattr(b, f"norm{i + 1}").load_state_dict(block.norm.state_dict())

    for a, b in zip(ours.encoder, ref.transformer.encoder.layers):
        layer(a, b, [(a.self_attn, b.self_attn)], (a.block1, a.block2))
    for a, b in zip(ours.decoder, ref.transformer.decoder.layers):
        layer(a, b, [(a.self_attn, b.self_attn), (a.cross_attn, b.multihead_attn)], (a.block1, a.block2, a.block3))
    for name in ("src_embed", "tgt_embed", "out"):
        getattr(ref, name).load_state_dict(getattr(ours, name).state_dict())
    ref.transformer.encoder.norm.load_state_dict(ours.encoder_norm.state_dict())
    ref.transformer.decoder.norm.load_state_dict(ours.decoder_norm.state_dict())


class HFLogits(nn.Module):
    """transformers' LlamaForCausalLM as ids -> logits, so LMJob.loss_sum runs it as it runs ours."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, ids):
        return self.hf(input_ids=ids, use_cache=False).logits


def seq2seq_setup(args):
    """(qkv model, peer, batch(m), loss_sum, n_targets, n_tokens, cfg) for the date task."""
    from qkv.train.config import TrainConfig
    from qkv.train.jobs import Seq2SeqJob

    cfg = TrainConfig(task="date", batch_size=args.s2s_batch)  # qkv train's defaults
    job = Seq2SeqJob(cfg)
    torch.manual_seed(cfg.seed)
    ours = job.build()
    peer = TorchSeq2Seq(job.model_config)
    copy_into_torch(ours, peer)
    return ours, peer, job.batch, job.loss_sum, job.n_targets, job.n_processed, cfg


def lm_setup(args):
    """The same for the Llama decoder on random byte-level batches (B, T + 1)."""
    import transformers

    from qkv.config import LlamaConfig
    from qkv.models.llama import LlamaForCausalLM
    from qkv.train.config import TrainConfig
    from qkv.train.jobs import LMJob, init_weights
    from qkv.weights.export import hf_config

    lc = LlamaConfig(vocab_size=258, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(256, args.seq),
                     tie_word_embeddings=True, name="bench-lm")
    torch.manual_seed(0)
    ours = LlamaForCausalLM(lc)
    init_weights(ours)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(lc), attn_implementation="sdpa"))
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # still tied

    def batch(m):
        g = torch.Generator().manual_seed(1000 + m)
        return torch.randint(0, lc.vocab_size, (args.batch, args.seq + 1), generator=g)

    count = LMJob.n_targets
    return ours, HFLogits(hf), batch, LMJob.loss_sum, count, count, TrainConfig()


def train_step(model, opt, batch, loss_sum, n_targets, cfg) -> float:
    """One optimizer step as qkv.train.trainer takes it (one micro-batch, one process, fp32)."""
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = loss_sum(model, batch) / n_targets(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return float(loss.detach())


def bench_pair(name, setup, args) -> dict:
    from qkv.train.trainer import make_optimizer

    ours, peer, batch, loss_sum, n_targets, n_tokens, cfg = setup(args)
    n_params = [sum(p.numel() for p in m.parameters()) for m in (ours, peer)]
    assert n_params[0] == n_params[1], f"{name}: parameter counts differ {n_params}"
    with torch.no_grad():
        first = [float(loss_sum(m.train(), batch(0)) / n_targets(batch(0))) for m in (ours, peer)]
    assert abs(first[0] - first[1]) < 1e-4, f"{name}: initial losses differ {first}"
    engines = {"qkv": ours, "peer": peer}
    opts = {k: make_optimizer(m, cfg) for k, m in engines.items()}
    rates = {k: [] for k in engines}
    for k, m in engines.items():
        for s in range(args.warmup):
            train_step(m, opts[k], batch(s), loss_sum, n_targets, cfg)
    steps = args.s2s_steps if name == "seq2seq" else args.steps
    for r in range(args.rounds):
        micro = [args.warmup + r * steps + s for s in range(steps)]
        for k, m in engines.items():
            batches = [batch(i) for i in micro]
            t0 = time.perf_counter()
            for b in batches:
                train_step(m, opts[k], b, loss_sum, n_targets, cfg)
            rates[k].append(sum(n_tokens(b) for b in batches) / (time.perf_counter() - t0))
        print(f"{name} round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in rates.items()),
              file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"params": n_params[0], "initial_loss": first, "tok_s": rates, "median": med,
            "ratio": med["qkv"] / med["peer"]}


PEERS = {"seq2seq": ("torch.nn.Transformer", seq2seq_setup), "lm": ("transformers LlamaForCausalLM (sdpa)", lm_setup)}


def print_table(results: dict, args) -> None:
    print(f"\nfp32 training, {args.threads} threads, {args.warmup} warm-up steps, {args.rounds} interleaved rounds "
          f"of {args.s2s_steps} (seq2seq) / {args.steps} (lm) steps; tokens/s = median over rounds\n")
    print("| model | params | peer | initial loss qkv / peer | qkv tok/s | peer tok/s | qkv / peer |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        a, b = r["initial_loss"]
        print(f"| {name} | {r['params']:,} | {PEERS[name][0]} | {a:.6f} / {b:.6f} | {r['median']['qkv']:,.0f} "
              f"| {r['median']['peer']:,.0f} | {r['ratio']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per engine first")
    ap.add_argument("--steps", type=int, default=5, help="lm: timed steps per engine per round")
    ap.add_argument("--s2s-steps", type=int, default=40, help="seq2seq: timed steps per engine per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="lm: sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="lm: tokens per sequence (T)")
    ap.add_argument("--s2s-batch", type=int, default=64, help="seq2seq: examples per step (qkv train's default)")
    ap.add_argument("--json", help="also write raw results to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {name: bench_pair(name, PEERS[name][1], args) for name in args.models}
    print_table(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
