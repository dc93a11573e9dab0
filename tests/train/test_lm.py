"""Decoder LMs: from scratch on a text file (byte-level), fine-tuning SmolLM2, loading back, export."""

from __future__ import annotations

import json
import random

import pytest
import torch

import qkv
from qkv.train import TrainConfig, train
from qkv.train.evaluate import evaluate_run
from qkv.weights.export import save_gguf, save_hf_dir

WORDS = "the cat dog sat ran on under a mat rug and saw heard big small red blue".split()


def corpus(path, n_sentences=1500, seed=0):
    """A UTF-8 text with structure to learn (and a non-ASCII word, so bytes > 127 occur)."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + rng.choice([".", "!", " — ok."])
             for _ in range(n_sentences)]
    path.write_text("\n".join(lines) + "\nnaïve café\n", encoding="utf-8")
    return path


def lm_config(tmp_path, **changes) -> TrainConfig:
    base = dict(task="text", data=str(corpus(tmp_path / "text.txt")), out=str(tmp_path / "run"), max_steps=150,
                batch_size=16, block_size=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=128,
                lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=75, save_every=75, eval_size=64, samples=1,
                log_every=1)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    cfg = lm_config(tmp)
    return cfg, train(cfg, progress=False)


def test_byte_level_lm_learns_the_text(lm_run):
    cfg, result = lm_run
    records = [json.loads(x) for x in open(f"{cfg.out}/metrics.jsonl")]
    first = next(r["loss"] for r in records if "loss" in r)
    assert first > 5.0  # ~ln(258): it starts knowing nothing
    assert result["eval"]["loss"] < first - 2.5 and result["eval"]["perplexity"] < 8
    held = evaluate_run(cfg.out, limit=cfg.eval_size)  # the windows the training run evaluated on
    assert held["split"] == "held-out" and held["loss"] == pytest.approx(result["eval"]["loss"], rel=1e-5)


def test_run_loads_back_generates_and_exports_equal(lm_run, tmp_path):
    cfg, _ = lm_run
    loaded = qkv.load(cfg.out, dtype="float32")
    assert loaded.format == "qkv-run" and loaded.tokenizer.encode("café") == list("café".encode())
    text = "".join(p.text for p in qkv.generate(loaded, "The cat", max_new_tokens=20, temperature=0))
    assert text and set(text.split()) & set(WORDS + [w.capitalize() for w in WORDS])
    ids = torch.tensor([loaded.tokenizer.encode("The big dog ran under a red rug.")])
    want = loaded.model(ids)
    hf_dir = save_hf_dir(loaded.model, loaded.tokenizer, tmp_path / "hf")
    gguf = save_gguf(loaded.model, loaded.tokenizer, tmp_path / "lm.gguf")
    for path in (hf_dir, gguf):
        other = qkv.load(path, dtype="float32")
        assert other.tokenizer.encode("naïve café") == loaded.tokenizer.encode("naïve café")
        assert torch.equal(other.model(ids), want), path
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_fine_tune_smollm2(tmp_path, smollm2):
    """A few steps on a small text: the held-out loss falls, the run keeps SmolLM2's tokenizer and chat template."""
    text = tmp_path / "facts.txt"
    text.write_text("The qkv library shows every attention weight. " * 200, encoding="utf-8")
    cfg = TrainConfig(task="text", data=str(text), init="smollm2", out=str(tmp_path / "ft"), max_steps=3,
                      batch_size=2, block_size=32, lr=1e-4, min_lr=1e-5, warmup_steps=1, eval_every=3, save_every=3,
                      eval_size=4, samples=0)
    from qkv.train.jobs import LMJob

    before = LMJob(cfg, loaded=smollm2).evaluate(smollm2.model, limit=4)["loss"]
    result = train(cfg, progress=False)
    assert result["eval"]["loss"] < before - 0.3, (before, result["eval"])
    tuned = qkv.load(cfg.out, dtype="float32")
    assert tuned.config.num_hidden_layers == 30 and tuned.chat_template is not None
    sentence = "Attention is all you need."
    assert tuned.tokenizer.encode(sentence) == smollm2.tokenizer.encode(sentence)
    w0 = smollm2.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(tuned.model.model.layers[0].self_attn.q_proj.weight, w0)


def test_eval_limit_counts_windows(lm_run):
    cfg, _ = lm_run
    one = evaluate_run(cfg.out, limit=1)
    three = evaluate_run(cfg.out, limit=3)
    assert (one["windows"], one["tokens"]) == (1, cfg.block_size) and three["windows"] == 3
