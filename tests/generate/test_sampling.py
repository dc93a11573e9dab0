"""Sampling as pure functions (RELIABILITY A12, A13) against independent formulas."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.errors import InputError
from qkv.generate.sampling import SamplingOptions, apply_repetition_penalty, filter_logits, sample


@pytest.mark.parametrize("kw", [
    dict(temperature=-1), dict(temperature=float("nan")), dict(temperature=float("inf")), dict(top_k=-5),
    dict(top_p=0), dict(top_p=1.5), dict(min_p=-0.1), dict(min_p=2), dict(repetition_penalty=0),
    dict(seed=-1), dict(temperature=True), dict(top_k=2.5),
])
def test_invalid_options_are_typed_errors(kw):
    with pytest.raises(InputError):
        SamplingOptions(**kw)


def test_top_k_larger_than_vocab_is_an_error():
    with pytest.raises(InputError, match="larger than the vocabulary"):
        SamplingOptions(top_k=100).check_vocab(50)


def test_nan_logits_are_reported_with_the_step_never_sampled():
    logits = torch.zeros(1, 10)
    logits[0, 3] = float("nan")
    with pytest.raises(InputError, match="non-finite logits at generation step 7"):
        sample(logits, SamplingOptions(temperature=0), torch.Generator(), step=7)
    logits[0, 3] = float("inf")
    with pytest.raises(InputError, match="non-finite"):
        sample(logits, SamplingOptions(), torch.Generator())


def test_greedy_is_argmax_and_ignores_the_generator():
    logits = torch.randn(3, 50)
    out = sample(logits, SamplingOptions(temperature=0), torch.Generator().manual_seed(1))
    assert torch.equal(out, logits.argmax(-1))


def test_greedy_takes_the_first_of_equal_largest_logits_like_a_loop():
    """Greedy decoding on the CPU goes through NumPy's argmax: the first index of the largest value in each row,
    held to a plain loop on ties, on a SmolLM2-sized row, on strided and bfloat16 logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 4, (6, 49152), generator=g).float()  # many ties for the largest value
    logits[2, 40000:] = 9.0
    want = [max(range(row.numel()), key=lambda i, r=row.tolist(): (r[i], -i)) for row in logits]
    opts = SamplingOptions(temperature=0)
    assert sample(logits, opts, g).tolist() == want
    assert sample(logits.t().contiguous().t(), opts, g).tolist() == want  # a transposed copy: strided rows
    assert sample(logits.bfloat16(), opts, g).tolist() == want
    from qkv.generate.sampling import greedy
    assert greedy(logits.bfloat16()).tolist() == want  # called directly: dtypes NumPy lacks go through torch


def test_the_finite_check_looks_into_every_sum_that_is_not_finite():
    """The logits' sum decides the usual case; finite logits whose sum overflows, and a -inf logit, are still
    accepted (looked at one by one), a NaN or +inf anywhere is still refused."""
    opts, g = SamplingOptions(temperature=0), torch.Generator()
    huge = torch.full((1, 8), 3e38)  # finite, but their sum is +inf
    huge[0, 5] = 3.1e38
    assert int(sample(huge, opts, g)) == 5
    some = torch.zeros(1, 8)
    some[0, 0], some[0, 6] = float("-inf"), 1.0
    assert int(sample(some, opts, g)) == 6
    for bad in (float("nan"), float("inf")):
        both = huge.clone()
        both[0, 2] = bad
        with pytest.raises(InputError, match="non-finite logits"):
            sample(both, opts, g)
    with pytest.raises(InputError, match="-inf for every token"):
        sample(torch.full((1, 8), float("-inf")), opts, g)


def ref_probs(logits, t, k, p, m):
    """Independent loop version of temperature -> top-k -> top-p -> min-p on one row."""
    x = [v / t for v in logits.tolist()]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = set(order[:k]) if k else set(order)
    z = sum(math.exp(x[i]) for i in keep)
    cum, kept = 0.0, set()
    for i in order:
        if i not in keep:
            continue
        if cum >= p:
            break
        kept.add(i)
        cum += math.exp(x[i]) / z
    z2 = sum(math.exp(x[i]) for i in kept)
    top = max(math.exp(x[i]) / z2 for i in kept)
    final = {i for i in kept if math.exp(x[i]) / z2 >= m * top}
    z3 = sum(math.exp(x[i]) for i in final)
    return [math.exp(x[i]) / z3 if i in final else 0.0 for i in range(len(x))]


@pytest.mark.parametrize("t,k,p,m", [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0),
                                     (1.0, 0, 1.0, 0.2), (0.9, 8, 0.9, 0.05)])
def test_filters_match_independent_loop(t, k, p, m):
    g = torch.Generator().manual_seed(int(t * 100) + k)
    logits = torch.randn(1, 20, generator=g, dtype=torch.float64) * 2
    ours = torch.softmax(filter_logits(logits, SamplingOptions(temperature=t, top_k=k, top_p=p, min_p=m)), -1)
    torch.testing.assert_close(ours[0], torch.tensor(ref_probs(logits[0], t, k, p, m), dtype=torch.float64))


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    opts = SamplingOptions(temperature=0.8, top_p=0.9, seed=3)
    expected = torch.softmax(filter_logits(logits, opts), -1)[0]
    g = opts.generator()
    draws = torch.stack([sample(logits, opts, g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=6).float() / draws.numel()
    assert (freq - expected).abs().max() < 0.03
    assert freq[expected == 0].sum() == 0


def test_same_seed_same_tokens():
    logits = torch.randn(1, 100)
    a = [int(sample(logits, SamplingOptions(seed=5), g)) for g in [SamplingOptions(seed=5).generator()] for _ in range(20)]
    b = [int(sample(logits, SamplingOptions(seed=5), g)) for g in [SamplingOptions(seed=5).generator()] for _ in range(20)]
    assert a == b


def test_repetition_penalty_matches_hf_rule():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 30)
    ctx = torch.tensor([[1, 5, 5, 7], [0, 2, 29, 3]])
    ours = apply_repetition_penalty(logits, ctx, 1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ctx, logits.clone())
    torch.testing.assert_close(ours, ref)
