"""dtype="auto" (the compact mode: int4 matrices, int8 unembedding, embedding rows from the file) against the
exact float32 model."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.nn.quant import CompactEmbedding, CompactLinear

from tests.decode_check import steps_against_float32


@pytest.fixture(scope="module")
def fast():
    return qkv.load("smollm2", dtype="auto", device="cpu")


def test_auto_is_compact_and_keeps_no_float32_matrix(fast, smollm2):
    m = fast.model
    layer = m.model.layers[0]
    for fused in (layer.mlp.gate_up_proj, layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert isinstance(fused, CompactLinear) and fused.kind == "int4"
    assert not hasattr(layer.mlp, "up_proj") and not hasattr(layer.self_attn, "q_proj")  # fused, not duplicated
    assert isinstance(m.lm_head, CompactLinear) and m.lm_head.kind == "int8"
    assert isinstance(m.model.embed_tokens, CompactEmbedding)
    assert fast.info["mode"] == "compact" and "int4" in fast.info["decode_weights"]
    # resident: norms only (float32), the rest is packed codes and scales
    resident = {id(t): t for t in list(m.parameters()) + list(m.buffers())}.values()
    assert all(t.dim() == 1 for t in m.parameters()), [tuple(t.shape) for t in m.parameters() if t.dim() > 1]
    total = sum(t.numel() * t.element_size() for t in resident)
    assert total < 110e6, total  # float32 would be 538 MB
    assert fast.info["parameters"] == smollm2.info["parameters"]  # the compact matrices are counted too


def test_prompt_logits_are_the_exact_ones_or_bfloat16_on_amx(fast, smollm2):
    """A prompt of more than COMPACT_ROWS tokens runs on the weights dequantised from the file: exactly the
    float32 model's logits, or on AMX CPUs in bfloat16 (error printed and bounded); inside exact_weights()
    always the exact ones."""
    from qkv.nn.quant import COMPACT_ROWS, exact_weights

    text = "Attention is all you need, they said. Queries meet keys, and values are mixed by the weights. " * 6
    ids = torch.tensor([smollm2.tokenizer.encode(text)])
    assert ids.shape[1] > COMPACT_ROWS
    with torch.inference_mode():
        ref = smollm2.model(ids)
        with exact_weights(fast.model):
            torch.testing.assert_close(fast.model(ids), ref, rtol=0, atol=0)
        got = fast.model(ids)
    if fast.info["prompt_dtype"] == "float32":
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    else:
        p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
        kl = (p.exp() * (p - q)).sum(-1)
        print(f"bfloat16 prompt: logits max error {float((got - ref).abs().max()):.3f}, mean KL {float(kl.mean()):.2e}")
        assert float(kl.mean()) < 5e-3 and bool((got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9)


def test_short_prompts_run_on_the_compact_kernels_close_to_float32(fast, smollm2):
    """Up to COMPACT_ROWS tokens a prompt multiplies through the int4/int8 kernels (4x faster than dequantising
    every matrix at 16 tokens): its logits as close to the float32 model's as a decode step's, inside
    exact_weights() the exact ones."""
    from qkv.nn.quant import COMPACT_ROWS, exact_weights

    ids = torch.tensor([smollm2.tokenizer.encode("Attention is all you need, they said. Queries meet keys.")])
    assert 8 < ids.shape[1] <= COMPACT_ROWS
    with torch.inference_mode():
        ref = smollm2.model(ids)
        with exact_weights(fast.model):
            torch.testing.assert_close(fast.model(ids), ref, rtol=0, atol=0)
        got = fast.model(ids)
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    print(f"{ids.shape[1]}-token prompt on the compact kernels: logits max error {float((got - ref).abs().max()):.3f}, "
          f"mean KL {float(kl.mean()):.2e}")
    assert float(kl.mean()) < 2e-2 and not torch.equal(got, ref)


def test_decode_steps_stay_close_to_float32(fast, smollm2):
    """Each cached one-token step: KL(fp32 || fast) small; greedy tokens agree where fp32 is not near a tie."""
    ids = smollm2.tokenizer.encode("The history of science shows that")
    kls, agree, clear, _ = steps_against_float32(smollm2, fast, ids, 24)
    print(f"mean KL {sum(kls) / len(kls):.2e}, max {max(kls):.2e}; greedy agreement {agree}/{clear}")
    assert sum(kls) / len(kls) < 2e-2 and agree == clear


def test_compact_decode_step_is_bitwise_the_module_path(fast):
    """One-token steps take LlamaForCausalLM._decode_step; it must be the layers' own computation, bit for bit.
    The module path is forced by passing positions explicitly (which the shortcut does not take)."""
    m = fast.model
    assert m._compact_decode(2) and not m._compact_decode(65)  # more rows than small_m: the exact weights
    prompts = torch.tensor([fast.tokenizer.encode(s)[:4] for s in ("Queries meet keys", "Values are mixed!")])  # (2, 4)
    a, b = m.make_cache(2, 16), m.make_cache(2, 16)
    with torch.inference_mode():
        m(prompts, cache=a)
        m(prompts, cache=b)
        nxt = torch.tensor([[11], [4096]])
        for step in range(5):
            fast_logits = m(nxt, cache=a)
            module_logits = m(nxt, cache=b, positions=torch.arange(b[0].offset, b[0].offset + 1))
            assert fast_logits.shape == (2, 1, m.config.vocab_size)
            assert torch.equal(fast_logits, module_logits), step
            assert torch.equal(a[5].k[:, :, :a[5].offset], b[5].k[:, :, :b[5].offset])
            nxt = fast_logits[:, -1].argmax(-1, keepdim=True)


def test_exact_float32_model_never_takes_the_compact_step(smollm2):
    assert not smollm2.model._compact_decode(1)


def test_a_swapped_unembedding_leaves_the_compact_step(fast):
    """Modules replaced after loading: the shortcut notices (the module path then runs as written)."""
    import copy

    m = copy.deepcopy(fast.model)
    cache = m.make_cache(1, 8)
    with torch.inference_mode():
        m(torch.tensor([[1, 2]]), cache=cache)
        m(torch.tensor([[3]]), cache=cache)
        m.lm_head = torch.nn.Linear(576, m.config.vocab_size, bias=False)
        assert not m._compact_decode(1) and m(torch.tensor([[4]]), cache=cache).shape == (1, 1, m.config.vocab_size)
