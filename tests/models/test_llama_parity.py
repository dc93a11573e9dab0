"""Parity with Hugging Face transformers on the real embedded SmolLM2-135M-Instruct (Q4_1 GGUF).

transformers reads the same GGUF file with its own code (gguf-py's dequantisation, its own inverse of
llama.cpp's Q/K permutation, its own Llama) into float32: the independent oracle of DESIGN.md.
RELIABILITY R6 (cached decode = full forward) and R7 (logits rtol/atol 1e-4, mean KL ≤ 1e-6 in fp32, greedy
tokens identical; in bf16 at most 2x the KL of transformers' own bf16 model plus bf16 rounding noise, R1's
derived rule, since bf16 kernels round differently on AVX2, AVX512-BF16 and AMX) are checked here. Each test prints its measured numbers
(``pytest -s`` shows them). The tokenizer's own parity suite is tests/text; here only what the model
needs: the tokenizer and chat template wired by qkv.load agree with transformers'.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from qkv.load import load
from qkv.nn.observer import AttentionObserver
from qkv.weights.embedded import embedded_path
from tests.models.conftest import mean_kl

RTOL = ATOL = 1e-4  # R7, fp32
KL_FP32 = 1e-6  # R7
KL_BF16_GROSS = 1e-2  # R3's absolute backstop for bf16; the real bound is derived in the bf16 test
N_GREEDY = 64  # R7 greedy tokens; R6 asks for 32 cached steps, all 64 are checked

PROMPTS = {
    "english": "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
}
CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
CONVERSATIONS = [
    CHAT,
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Where is the treasure?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about cats — in français, s'il vous plaît."}],
]
TOKEN_CORPUS = [
    "Attention is all you need.",
    "for (int i = 0; i < 10; ++i) { sum += a[i] * b[i]; }",
    "Emoji: 🤖🎨✨ and a flag 🇫🇷",
    "日本語のテキストと中文文本",
    "Accents: naïve café, Ångström, São Paulo, Żółć",
    "spaces   and\ttabs\n\n\nand    newlines  ",
    "<|im_start|>user typed this<|im_end|>",
]


@contextlib.contextmanager
def _fast_gguf_reads() -> Iterator[None]:
    """Speed up transformers' GGUF loading without changing what it computes.

    transformers parses the 49k-token GGUF twice per load (config, then tensors) and rebuilds gguf-py's
    tensor-name table once per submodule (~400 times). Both are pure functions of their arguments, so
    one read-only reader per path and a cached name table give identical results in a third of the time.
    """
    import gguf

    readers: dict[tuple[str, str], Any] = {}
    original = gguf.GGUFReader

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return embedded_path("smollm2")  # the embedded model is part of the default suite: no skip


@pytest.fixture(scope="module")
def oracle(gguf_path: Path) -> SimpleNamespace:
    """transformers' model (dequantised to float32) and tokenizer from the same GGUF, loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _fast_gguf_reads():
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return SimpleNamespace(model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ours(smollm2: Any) -> Any:
    """qkv.load("smollm2", dtype="float32") — the session's shared copy (tests/conftest.py)."""
    assert smollm2.dtype == torch.float32 and smollm2.format == "gguf"
    return smollm2


@pytest.fixture(scope="module")
def prompt_ids(ours: Any) -> dict[str, list[int]]:
    ids = {name: ours.tokenizer.encode(text) for name, text in PROMPTS.items()}
    ids["chat"] = ours.chat_template.encode(ours.tokenizer, CHAT)
    return ids


@pytest.fixture(scope="module")
def fp32_logits(oracle: SimpleNamespace, ours: Any, prompt_ids: dict[str, list[int]]) -> dict[str, tuple]:
    """(transformers, qkv) float32 logits (T, V) per prompt, computed once."""
    out = {}
    with torch.no_grad():
        for name, ids in prompt_ids.items():
            x = torch.tensor([ids])
            out[name] = (oracle.model(x).logits[0].float(), ours.model(x)[0])
    return out


def _errors(ref: torch.Tensor, got: torch.Tensor) -> str:
    return f"max |Δlogit| = {(got - ref).abs().max().item():.3e}, mean KL = {mean_kl(ref, got):.3e}"


# --- R7: fp32 logits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["english", "code", "chat"])
def test_fp32_logits_match_transformers(fp32_logits: dict[str, tuple], prompt: str) -> None:
    ref, got = fp32_logits[prompt]
    print(f"fp32 {prompt} ({ref.shape[0]} tokens): {_errors(ref, got)}")
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("prompt", ["english", "code", "chat"])
def test_fp32_mean_kl_and_argmax_match_transformers(fp32_logits: dict[str, tuple], prompt: str) -> None:
    ref, got = fp32_logits[prompt]
    assert mean_kl(ref, got) <= KL_FP32, _errors(ref, got)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # R7: argmax must agree wherever the reference is decided
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


# --- R7 greedy, R6 cached decode ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy(ours: Any, prompt_ids: dict[str, list[int]]) -> SimpleNamespace:
    """qkv's greedy decode written out: prefill the chat prompt into a KV cache, then one token a step."""
    model, prompt = ours.model, prompt_ids["chat"]
    cache = model.make_cache(1, len(prompt) + N_GREEDY)
    tokens, steps = [], []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache=cache, last_only=True)  # (1, 1, V)
        for _ in range(N_GREEDY):
            steps.append(logits[0, -1])
            tokens.append(int(logits[0, -1].argmax()))
            if len(tokens) < N_GREEDY:
                logits = model(torch.tensor([[tokens[-1]]]), cache=cache)
    assert cache[0].offset == len(prompt) + N_GREEDY - 1
    return SimpleNamespace(prompt=prompt, tokens=tokens, steps=torch.stack(steps))


def test_greedy_64_tokens_match_transformers_generate(greedy: SimpleNamespace, oracle: SimpleNamespace,
                                                      ours: Any) -> None:
    with torch.no_grad():
        out = oracle.model.generate(torch.tensor([greedy.prompt]), do_sample=False, max_new_tokens=N_GREEDY,
                                    pad_token_id=oracle.model.generation_config.eos_token_id)
    theirs = out[0, len(greedy.prompt):].tolist()
    top2 = greedy.steps.topk(2, dim=-1).values
    print(f"greedy: {N_GREEDY} tokens, smallest top-2 margin {(top2[:, 0] - top2[:, 1]).min().item():.3f}; "
          f"text: {ours.tokenizer.decode(greedy.tokens)!r}")
    assert len(theirs) == N_GREEDY, "the reference stopped early: choose a prompt with a longer answer"
    assert greedy.tokens == theirs


def test_cached_decode_equals_full_forward(greedy: SimpleNamespace, ours: Any) -> None:
    """R6: every cached step's logits equal the full forward's at that position; greedy identical."""
    seq = greedy.prompt + greedy.tokens[:-1]
    with torch.no_grad():
        full = ours.model(torch.tensor([seq]))[0, len(greedy.prompt) - 1:]  # (N_GREEDY, V)
    err = (greedy.steps - full).abs().max().item()
    print(f"cached vs full forward over {N_GREEDY} steps: max |Δlogit| = {err:.3e}")
    # 1e-4: through 30 layers fp32 rounding alone moves logits of size ~20 by ~5e-5 (R2's atol 1e-5 is
    # for one attention output, not a whole model's logits)
    torch.testing.assert_close(greedy.steps, full, rtol=RTOL, atol=ATOL)
    # greedy by full recompute picks the same tokens (R6 asks for 32 steps; all 64 are checked)
    assert full.argmax(-1).tolist() == greedy.tokens


def test_left_padded_batch_equals_single_prompts(ours: Any, prompt_ids: dict[str, list[int]]) -> None:
    """R6: a left-padded batch gives each prompt's own logits on its real positions."""
    a, b = prompt_ids["english"], prompt_ids["code"]
    n = max(len(a), len(b))
    ids = torch.tensor([[0] * (n - len(a)) + a, [0] * (n - len(b)) + b])
    mask = torch.tensor([[0] * (n - len(a)) + [1] * len(a), [0] * (n - len(b)) + [1] * len(b)])
    with torch.no_grad():
        batch = ours.model(ids, attention_mask=mask)
        singles = [ours.model(torch.tensor([p]))[0] for p in (a, b)]
    for row, single in zip(batch, singles):
        torch.testing.assert_close(row[n - single.shape[0]:], single, rtol=RTOL, atol=ATOL)


# --- what the model is fed: tokenizer and chat template ------------------------------------------------


def test_tokenizer_ids_match_transformers(ours: Any, oracle: SimpleNamespace) -> None:
    """The tokenizer qkv.load wires to the model encodes like transformers' from the same GGUF.

    transformers' GGUF converter ignores ``tokenizer.ggml.pre = "smollm"`` (digits split one by one,
    as llama.cpp and SmolLM2's own tokenizer.json do), so digits are compared against its backend
    with that split restored; see tests/text for the full tokenizer suite.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    digits = Backend.from_str(oracle.tokenizer.backend_tokenizer.to_str())
    digits.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TOKEN_CORPUS + list(PROMPTS.values()):
        got = ours.tokenizer.encode(text)
        if any(c.isdigit() for c in text):
            assert got == digits.encode(text, add_special_tokens=False).ids, text
        else:
            assert got == oracle.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True), text


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(ours: Any, oracle: SimpleNamespace, conversation: int) -> None:
    messages = CONVERSATIONS[conversation]
    expected = oracle.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.chat_template.render(messages, add_generation_prompt=True) == expected
    ids = oracle.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ours.chat_template.encode(ours.tokenizer, messages) == ids


# --- R7: bfloat16 -------------------------------------------------------------------------------------


def test_bf16_logits_stay_close_to_the_fp32_reference(fp32_logits: dict[str, tuple], oracle: SimpleNamespace,
                                                      prompt_ids: dict[str, list[int]]) -> None:
    """R1/R7 with a derived bound: qkv's bf16 model may be at most 2x as far (mean KL) from the fp32
    reference as an independent bf16 model on the same machine — transformers' Llama cast to bf16, the
    same-dtype naive baseline — plus the rounding noise of bf16 itself (the KL of the exact logits merely
    stored in bf16). Both run on this CPU's bf16 kernels (AVX2 emulation, AVX512-BF16 or AMX round
    differently), so the bound follows the machine instead of being tuned to one of them."""
    bf16 = load("smollm2", dtype="bfloat16", device="cpu")
    assert bf16.dtype == torch.bfloat16
    naive = copy.deepcopy(oracle.model).to(torch.bfloat16)
    with torch.no_grad():
        for name, ids in prompt_ids.items():
            ref = fp32_logits[name][0]
            got = bf16.model(torch.tensor([ids]))[0]
            base = naive(torch.tensor([ids])).logits[0].float()
            noise = mean_kl(ref, ref.bfloat16().float())
            agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"bf16 {name}: {_errors(ref, got)}, top-1 agreement {agree:.1%}; transformers bf16: "
                  f"{_errors(ref, base)}; noise {noise:.2e}")
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            assert mean_kl(ref, got) <= 2 * mean_kl(ref, base) + noise, name
            assert mean_kl(ref, got) <= KL_BF16_GROSS, name  # R3: a gross error even if the baseline were bad


# --- capture: exact weights while the model runs its fast path (issue: see attention) --------------------

CAPTURE_TEXTS = ["He sat on the river's bank", "The bank raised its interest rates again.",
                 "def f(x):\n    return x * 2  # double"]


@pytest.mark.parametrize("text", CAPTURE_TEXTS)
def test_capture_equals_transformers_eager_weights(oracle: SimpleNamespace, ours: Any, text: str) -> None:
    """qkv.explain.capture on the SDPA path vs transformers' eager attentions, every layer and head.

    The two models' hidden states differ by float32 rounding (logits by < 1e-4), so their weights may
    differ by a few 1e-6; the exactness of capture itself, on the same q and k, is the next test."""
    from qkv.explain.capture import capture

    rec = capture(ours, text)
    ids = ours.tokenizer.encode(text)
    oracle.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = oracle.model(torch.tensor([ids]), output_attentions=True).attentions
    finally:
        oracle.model.set_attn_implementation("sdpa")
    ref = torch.stack([a[0] for a in ref]).float()  # (L, H, T, T)
    assert rec.weights.shape == ref.shape
    err = (rec.weights - ref).abs().max().item()
    print(f"{text[:20]!r}: max |Δw| = {err:.2e}")
    assert err <= 1e-5
    torch.testing.assert_close(rec.weights.sum(-1), torch.ones(ref.shape[:-1]), atol=1e-6, rtol=0)


class _KeepQK(AttentionObserver):
    """An observer that keeps each layer's q and k as the attention core received them."""

    def __init__(self):
        self.layer, self.qk = 0, {}

    def __call__(self, q, k, *, mask=None, causal=False, **_):
        self.qk[self.layer] = (q.clone(), k.clone(), causal)


@pytest.mark.parametrize("text", CAPTURE_TEXTS)
def test_capture_equals_eager_softmax_of_the_same_q_and_k(ours: Any, text: str) -> None:
    """Exactness of capture: its rows == eager softmax(q kᵀ/√d + causal mask) of the same q, k.

    Against eager in float32 (what an eager attention computes) within 1e-6; against float64 within
    5e-6 — float32 scores of size ~30 carry ~2e-6 of rounding whichever way they are computed."""
    from qkv.explain.capture import capture

    keep = _KeepQK()
    ids = torch.tensor([ours.tokenizer.encode(text)])
    with torch.no_grad():
        ours.model(ids, observer=keep)
    rec = capture(ours, text)
    for layer, (q, k, causal) in keep.qk.items():
        assert causal
        for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 5e-6)):
            h, kh, t = q.shape[1], k.shape[1], q.shape[2]
            kk = k.to(dtype).repeat_interleave(h // kh, dim=1)
            scores = q.to(dtype) @ kk.transpose(-2, -1) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            eager = torch.softmax(scores, dim=-1)[0]  # (H, T, T)
            err = (rec.weights[layer].to(dtype) - eager).abs().max().item()
            assert err <= tol, f"layer {layer}, {dtype}: {err:.2e}"


def test_capture_of_one_row_is_the_same_row_and_small(ours: Any) -> None:
    """One query row across all layers and heads: O(L·H·T) numbers, equal to that row of the full capture."""
    from qkv.explain.capture import capture

    text = CAPTURE_TEXTS[1]
    full = capture(ours, text)
    one = capture(ours, text, queries=[3])
    assert one.weights.shape == (*full.weights.shape[:2], 1, full.weights.shape[-1])
    torch.testing.assert_close(one.weights[:, :, 0], full.weights[:, :, 3], rtol=0, atol=1e-6)


def test_capture_does_not_change_the_model_output(ours: Any) -> None:
    from qkv.explain.capture import RowObserver

    ids = torch.tensor([ours.tokenizer.encode(CAPTURE_TEXTS[0])])
    with torch.no_grad():
        plain = ours.model(ids)
        watched = ours.model(ids, observer=RowObserver())
    assert torch.equal(plain, watched)
