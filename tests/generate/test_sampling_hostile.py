"""Sampling from logits a broken model produced (issue #16, RELIABILITY A13): no silent token 0, no untyped
RuntimeError from torch.multinomial — a typed InputError naming the step."""

from __future__ import annotations

import pytest
import torch

from qkv.errors import InputError
from qkv.generate.sampling import SamplingOptions, sample

NEG = float("-inf")


@pytest.mark.parametrize("opts", [SamplingOptions(temperature=0), SamplingOptions(temperature=0.8, seed=0),
                                  SamplingOptions(temperature=1.0, top_k=5, top_p=0.9, min_p=0.1, seed=0)],
                         ids=["greedy", "sampled", "all filters"])
def test_all_minus_inf_logits_are_a_typed_error(opts: SamplingOptions) -> None:
    """Was: greedy took argmax (token 0, often EOS: empty output, silently); sampling raised torch's
    RuntimeError "invalid multinomial distribution"."""
    logits = torch.full((1, 10), NEG)
    with pytest.raises(InputError, match=r"non-finite logits at generation step 3: .*-inf for every token"):
        sample(logits, opts, torch.Generator(), step=3)


def test_one_bad_row_in_a_batch_is_named() -> None:
    logits = torch.zeros(3, 10)
    logits[1] = NEG
    with pytest.raises(InputError, match=r"row 1"):
        sample(logits, SamplingOptions(temperature=0), torch.Generator())


def test_some_minus_inf_is_a_normal_mask() -> None:
    logits = torch.full((1, 10), NEG)
    logits[0, 7] = -3.0
    assert int(sample(logits, SamplingOptions(temperature=0), torch.Generator())) == 7
    assert int(sample(logits, SamplingOptions(temperature=0.8, seed=1), SamplingOptions(seed=1).generator())) == 7


def test_a_temperature_that_overflows_the_logits_is_typed() -> None:
    logits = torch.tensor([[1e30, -1e30, 0.0]])
    with pytest.raises(InputError, match="temperature 1e-20 overflows"):
        sample(logits, SamplingOptions(temperature=1e-20, seed=0), torch.Generator())


def test_a_repetition_penalty_that_removes_every_token_is_typed() -> None:
    logits = torch.tensor([[-3e38, -3e38]])
    with pytest.raises(InputError, match="repetition_penalty"):
        sample(logits, SamplingOptions(temperature=0, repetition_penalty=10.0), torch.Generator(),
               context=torch.tensor([[0, 1]]))


def test_generation_from_a_model_with_minus_inf_logits_is_typed() -> None:
    """End to end: the decode loop surfaces the sampler's error instead of stopping with nothing."""
    from qkv.config import LlamaConfig
    from qkv.generate.loop import generate_ids
    from qkv.models.llama import LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      eos_token_id=(0,))
    model = LlamaForCausalLM(cfg).eval()
    real = model.forward
    model.forward = lambda *a, **k: torch.full_like(real(*a, **k), NEG)  # a model whose every logit is -inf
    for opts in (SamplingOptions(temperature=0), SamplingOptions(temperature=0.7, seed=0)):
        with pytest.raises(InputError, match="non-finite logits at generation step 0"):
            list(generate_ids(model, [1, 2, 3], opts, max_new_tokens=4, stop_ids=[0]))
