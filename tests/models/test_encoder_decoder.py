"""The 2017 encoder-decoder against torch.nn.Transformer with copied weights, and cached greedy decoding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv.errors import ConfigError
from qkv.models.encoder_decoder import EncoderDecoder, Seq2SeqConfig, sinusoidal_positions


def _copy_mha(ours, theirs):
    d = ours.o_proj.in_features
    w, b = theirs.in_proj_weight, theirs.in_proj_bias
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        getattr(ours, name).weight.copy_(w[i * d:(i + 1) * d])
        getattr(ours, name).bias.copy_(b[i * d:(i + 1) * d])
    ours.o_proj.weight.copy_(theirs.out_proj.weight)
    ours.o_proj.bias.copy_(theirs.out_proj.bias)


def _copy_ff_norms(ours, theirs, blocks):
    ours.ff.linear1.load_state_dict(theirs.linear1.state_dict())
    ours.ff.linear2.load_state_dict(theirs.linear2.state_dict())
    for block, norm in zip(blocks, (theirs.norm1, theirs.norm2, getattr(theirs, "norm3", None))):
        block.norm.load_state_dict(norm.state_dict())


def copy_from_torch(model: EncoderDecoder, ref: nn.Transformer) -> None:
    with torch.no_grad():
        for ours, theirs in zip(model.encoder, ref.encoder.layers):
            _copy_mha(ours.self_attn, theirs.self_attn)
            _copy_ff_norms(ours, theirs, (ours.block1, ours.block2))
        for ours, theirs in zip(model.decoder, ref.decoder.layers):
            _copy_mha(ours.self_attn, theirs.self_attn)
            _copy_mha(ours.cross_attn, theirs.multihead_attn)
            _copy_ff_norms(ours, theirs, (ours.block1, ours.block2, ours.block3))
        model.encoder_norm.load_state_dict(ref.encoder.norm.state_dict())
        model.decoder_norm.load_state_dict(ref.decoder.norm.state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
def test_stack_equals_torch_transformer(norm_first):
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(src_vocab_size=50, tgt_vocab_size=40, d_model=32, n_heads=4, n_encoder_layers=2,
                        n_decoder_layers=2, d_ff=64, norm_first=norm_first)
    model = EncoderDecoder(cfg).eval()
    ref = nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    ref.encoder.enable_nested_tensor = False  # keep PyTorch on its plain path
    ref.eval()
    copy_from_torch(model, ref)
    src, tgt = torch.randint(0, 50, (3, 9)), torch.randint(0, 40, (3, 6))
    src_mask = torch.arange(9)[None, :] < torch.tensor([9, 5, 7])[:, None]
    with torch.no_grad():
        logits = model(src, tgt, src_mask)
        x = model._embed(model.src_embed, src)
        y = model._embed(model.tgt_embed, tgt)
        out = ref(x, y, tgt_mask=nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.bool),
                  src_key_padding_mask=~src_mask, memory_key_padding_mask=~src_mask)
    torch.testing.assert_close(logits, model.out(out), rtol=1e-4, atol=1e-5)


def test_cached_greedy_equals_full_recompute():
    torch.manual_seed(1)
    model = EncoderDecoder(Seq2SeqConfig(src_vocab_size=30, tgt_vocab_size=30, d_model=32, n_heads=4)).eval()
    src = torch.randint(3, 30, (2, 7))
    cached = model.greedy(src, bos=1, eos=2, max_new_tokens=10)
    for i in range(2):
        seq = [1]
        with torch.no_grad():
            for _ in range(10):
                nxt = int(model(src[i:i + 1], torch.tensor([seq]))[0, -1].argmax())
                if nxt == 2:
                    break
                seq.append(nxt)
        assert cached[i] == seq[1:]


def test_sinusoidal_table_and_config_errors():
    table = sinusoidal_positions(50, 8)
    assert torch.allclose(table[0], torch.tensor([0.0, 1.0] * 4))
    torch.testing.assert_close(table[7, 2], torch.tensor(float(torch.sin(torch.tensor(7 / 10000 ** (2 / 8))))))
    with pytest.raises(ConfigError, match="divisible"):
        Seq2SeqConfig(src_vocab_size=5, tgt_vocab_size=5, d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="positive integer"):
        Seq2SeqConfig(src_vocab_size=0, tgt_vocab_size=5)
