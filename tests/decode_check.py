"""One-token decode steps of a model against the float32 model's, on the float32 model's own greedy tokens."""

from __future__ import annotations

import torch

from qkv.generate import SamplingOptions, generate_ids


def steps_against_float32(ref, model, ids: list[int], new_tokens: int) -> tuple[list[float], int, int, list[int]]:
    """Both loaded models step through ``ids`` + the float32 model's ``new_tokens`` greedy tokens, one cached
    token at a time: (KL(float32 || model) of every step, steps whose greedy token agrees among those where
    float32's top two logits are more than 0.5 apart, how many such steps, float32's tokens)."""
    ref_tokens = list(generate_ids(ref.model, ids, SamplingOptions(temperature=0), max_new_tokens=new_tokens))
    seq = torch.tensor([ids + ref_tokens])
    caches = [m.model.make_cache(1, seq.shape[1] + 8) for m in (ref, model)]
    kls, agree, clear = [], 0, 0
    with torch.inference_mode():
        for m, c in zip((ref, model), caches):
            m.model(seq[:, :len(ids)], cache=c)
        for i in range(len(ids), seq.shape[1]):
            want, got = (m.model(seq[:, i:i + 1], cache=c)[0, -1] for m, c in zip((ref, model), caches))
            p, q = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
            kls.append(float((p.exp() * (p - q)).sum()))
            top2 = torch.topk(want, 2).values
            if top2[0] - top2[1] > 0.5:
                clear += 1
                agree += int(want.argmax() == got.argmax())
    return kls, agree, clear, ref_tokens
