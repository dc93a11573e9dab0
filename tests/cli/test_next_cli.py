"""``qkv next``: the probabilities at each temperature equal a softmax of Hugging Face transformers' logits on
the same weights (a tiny random Llama written as an HF directory within 1e-5, and the real SmolLM2 GGUF within
what R7's logits bound allows at each temperature);
the tokens each sampler keeps equal transformers' logits processors (Temperature → TopK → TopP → MinP, the
order of its generation); the terminal layout, the PNG, and every bad option as one line, exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from qkv.cli.main import main
from tests.models.conftest import random_llama, tiny_tokenizer, write_hf_dir

TEXT = "The quick brown fox jumps over the lazy"
TEMPERATURES = (0.5, 1.0, 2.0)
ATOL = 1e-5
# R7: a whole real model's fp32 logits within 1e-4 of transformers' (30 layers of fp32 rounding move them by
# ~5e-5, more on some CPUs' kernels than others). Logits that move by at most d move every probability at
# temperature T by a factor within exp(+-2d/T), so a relative bound of 2d/T (rounded up) and an absolute floor.
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A tiny random transformers Llama, saved as an HF directory qkv loads; its logits after TEXT."""
    tok = tiny_tokenizer()
    model = random_llama(tok, seed=3)
    path = write_hf_dir(tmp_path_factory.mktemp("next") / "hf", model, tok)
    ids = tok.encode(TEXT).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()  # (V,)
    return SimpleNamespace(path=path, tok=tok, model=model, ids=ids, logits=logits, vocab=logits.numel())


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["next", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv: str) -> dict:
    code, out, err = _run(capsys, *argv, "--format", "json", "--device", "cpu")
    assert code == 0 and err == "", err
    return json.loads(out)


def _all(d: dict, n: int, key: str) -> torch.Tensor:
    """One value per token id (the JSON lists them by rank) for distribution n."""
    out = torch.full((d["vocab_size"],), float("nan"), dtype=torch.float64)
    for t in d["distributions"][n]["top"]:
        out[t["id"]] = float(t[key])
    return out


def _hf_filtered(logits: torch.Tensor, t: float, top_k=None, top_p=None, min_p=None) -> torch.Tensor:
    """transformers' warpers in its generation order; removed tokens are -inf."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    chain = [TemperatureLogitsWarper(t)]
    if top_k is not None:
        chain.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        chain.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        chain.append(MinPLogitsWarper(min_p))
    scores, dummy = logits[None].clone(), torch.zeros((1, 1), dtype=torch.long)
    for warp in chain:
        scores = warp(dummy, scores)
    return scores[0]


def test_probabilities_equal_softmax_of_transformers_logits(capsys, tiny):
    d = _json(capsys, TEXT, "--model", str(tiny.path), "-t", *map(str, TEMPERATURES), "--show", str(tiny.vocab))
    assert d["prompt_ids"] == tiny.ids and d["vocab_size"] == tiny.vocab
    assert d["temperatures"] == list(TEMPERATURES) and d["samplers"] == {"top_k": None, "top_p": None, "min_p": None}
    for n, t in enumerate(TEMPERATURES):
        want = torch.softmax(tiny.logits.double() / t, dim=-1)
        got = _all(d, n, "probability")
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        assert abs(float(got.sum()) - 1) < 1e-5
        ranked = [x["id"] for x in d["distributions"][n]["top"]]
        assert ranked[0] == int(tiny.logits.argmax()) == d["greedy_id"]
        assert sorted(got[ranked].tolist(), reverse=True) == got[ranked].tolist()  # listed most likely first
        assert d["distributions"][n]["kept_count"] == tiny.vocab  # no sampler: every token stays
    entropy = [x["entropy_bits"] for x in d["distributions"]]
    assert entropy == sorted(entropy)  # hotter is flatter


SAMPLERS = [
    {"top_k": 5},
    {"top_p": 0.8},
    {"min_p": 0.1},
    {"top_k": 40, "top_p": 0.9, "min_p": 0.02},
]


@pytest.mark.parametrize("samplers", SAMPLERS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_kept_tokens_equal_transformers_logits_processors(capsys, tiny, samplers):
    flags = [x for k, v in samplers.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    d = _json(capsys, TEXT, "--model", str(tiny.path), "-t", *map(str, TEMPERATURES), "--show", str(tiny.vocab),
              *flags)
    assert {k: v for k, v in d["samplers"].items() if v is not None} == samplers
    for n, t in enumerate(TEMPERATURES):
        ref = _hf_filtered(tiny.logits, t, **samplers)
        kept = torch.isfinite(ref)
        got = torch.zeros(tiny.vocab, dtype=torch.bool)
        for x in d["distributions"][n]["top"]:
            got[x["id"]] = x["kept"]
        assert torch.equal(got, kept), f"T={t}: {sorted(got.nonzero().view(-1).tolist())} vs " \
                                       f"{sorted(kept.nonzero().view(-1).tolist())}"
        assert d["distributions"][n]["kept_count"] == int(kept.sum())
        sampled = torch.softmax(ref.double(), dim=-1)  # what generation draws from: the kept, renormalised
        torch.testing.assert_close(_all(d, n, "sampled_probability"), sampled, rtol=0, atol=ATOL)


def test_the_view_uses_generations_own_filter(tiny):
    """The library function calls qkv.generate.sampling.filter_logits: its kept set is what sample() draws."""
    import qkv
    from qkv.generate.next import next_token_distribution
    from qkv.generate.sampling import SamplingOptions, sample

    loaded = qkv.load(str(tiny.path), device="cpu")
    dist = next_token_distribution(loaded, TEXT, temperatures=(1.5,), top_k=7, top_p=0.7)
    opts = SamplingOptions(temperature=1.5, top_k=7, top_p=0.7, seed=0)
    gen = opts.generator()
    draws = {int(sample(dist.logits[None], opts, gen)) for _ in range(300)}
    assert draws <= set(dist.kept[0].nonzero().view(-1).tolist())
    assert dist.probs.shape == dist.kept.shape == (1, tiny.vocab)


@pytest.mark.slow
def test_real_smollm2_matches_transformers(capsys):
    """The embedded SmolLM2 against transformers' own reading of the same GGUF (float32)."""
    from transformers import AutoModelForCausalLM

    from qkv.weights.embedded import embedded_path
    from tests.models.test_llama_parity import _fast_gguf_reads

    path = embedded_path("smollm2")
    with _fast_gguf_reads():
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    capsys.readouterr()  # transformers' progress bars
    d = _json(capsys, "The capital of France is", "-t", *map(str, TEMPERATURES), "--show", "20", "--top-p", "0.9",
              "--min-p", "0.05")
    with torch.no_grad():
        logits = hf(torch.tensor([d["prompt_ids"]])).logits[0, -1].float()
    for n, t in enumerate(TEMPERATURES):
        want = torch.softmax(logits.double() / t, dim=-1)
        top = d["distributions"][n]["top"]
        ids = [x["id"] for x in top]
        got = torch.tensor([x["probability"] for x in top], dtype=torch.float64)
        torch.testing.assert_close(got, want[ids], rtol=2.5 * LOGIT_ATOL / t, atol=1e-7)
        assert ids == want.topk(len(ids)).indices.tolist()
        kept = torch.isfinite(_hf_filtered(logits, t, top_p=0.9, min_p=0.05))
        assert [x["kept"] for x in top] == kept[ids].tolist()


def test_text_layout(capsys, tiny):
    code, out, err = _run(capsys, TEXT, "--model", str(tiny.path), "--device", "cpu", "-t", "0.7", "1.3",
                          "--show", "4", "--top-k", "3")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"hf — the next token after \"{TEXT}\" ({len(tiny.ids)} prompt tokens")
    assert lines[1].startswith("samplers: top-k 3, applied after temperature")
    assert lines[2].split() == ["rank", "token", "id", "T=0.7", "T=1.3"]
    rows = lines[3:7]
    assert [r.split()[0] for r in rows] == ["1", "2", "3", "4"]
    assert all(r.count("✓") == 2 for r in rows[:3]) and rows[3].count("✗") == 2  # top-k 3 at both temperatures
    assert lines[7].startswith("kept by the samplers") and lines[7].count("3 kept") == 2
    assert lines[8].startswith("entropy") and lines[8].count("bits") == 2 and len(lines) == 9
    code, out, _ = _run(capsys, TEXT, "--model", str(tiny.path), "--device", "cpu", "--show", "2")
    assert "samplers: none" in out and "✓" not in out and "kept by" not in out


def test_png(capsys, tiny, tmp_path):
    code, _, err = _run(capsys, TEXT, "--model", str(tiny.path), "--device", "cpu", "--top-p", "0.5",
                        "--png", str(tmp_path))
    assert code == 0 and "wrote" in err
    (png,) = tmp_path.glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize("argv,needle", [
    (["x", "-t", "0"], "temperature must be a finite number > 0"),
    (["x", "-t", "1", "-0.5"], "temperature must be a finite number > 0"),
    (["x", "-t", "nan"], "temperature"),
    (["x", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["x", "--top-k", "0"], "top-k must be an integer >= 1"),
    (["x", "--top-k", "-3"], "top-k must be an integer >= 1"),
    (["x", "--min-p", "-0.1"], "min_p must be in [0, 1]"),
    (["x", "--min-p", "1.5"], "min_p must be in [0, 1]"),
    (["x", "--show", "0"], "show must be an integer >= 1"),
    (["x", "-t", "0", "--model", "no-such-model"], "temperature"),  # options are checked before loading
    ([""], "empty"),
    (["x", "--model", "no-such-model"], "no model 'no-such-model'"),
    (["x", "--system", "hi"], "--system needs --chat"),
    (["x", "--model", "minilm"], "is an encoder"),
])
def test_user_errors_are_one_line(capsys, argv, needle):
    code, out, err = _run(capsys, *argv, "--device", "cpu")
    assert code == 2 and out == ""
    assert err.startswith("qkv: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert needle in err, err


def test_top_k_larger_than_the_vocabulary(capsys, tiny):
    code, out, err = _run(capsys, TEXT, "--model", str(tiny.path), "--device", "cpu", "--top-k", "100000")
    assert code == 2 and out == "" and err.count("\n") == 1 and "larger than the vocabulary" in err


def test_real_process_exit_code():
    p = subprocess.run([sys.executable, "-m", "qkv", "next", "x", "-t", "0"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("qkv: error:") and p.stderr.count("\n") == 1, p.stderr
