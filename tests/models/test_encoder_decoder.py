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


# --- beam search -------------------------------------------------------------------------------------------

BOS, EOS = 0, 1


def _beam_model(seed: int, tgt_vocab: int) -> EncoderDecoder:
    """Random weights, every matrix N(0, 0.3²): with the default init the scaled target embedding drowns the
    sublayers, so every source gives the same output; this way the source matters and the next-token
    distributions are peaked but not one-hot."""
    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(src_vocab_size=20, tgt_vocab_size=tgt_vocab, d_model=32, n_heads=4, d_ff=64)
    model = EncoderDecoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
    return model


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(2, 20, (3, 7), generator=g)
    return src, torch.arange(7)[None, :] < torch.tensor([7, 4, 6])[:, None]  # (3, 7): rows 1, 2 padded


def _full_logp(model, src, src_mask, row: int, seq: list[int]) -> torch.Tensor:
    """log p(next | bos + seq) for one source row, by a full forward pass without any cache: (V,)."""
    with torch.no_grad():
        logits = model(src[row:row + 1], torch.tensor([[BOS] + seq]), src_mask[row:row + 1])
    return logits[0, -1].float().log_softmax(-1)


def _search(seed: int, tgt_vocab: int, *, max_new: int, k: int, alpha: float):
    """The seeded model and batch, and its beam-search and greedy outputs: (model, src, src_mask, beam, greedy)."""
    model = _beam_model(seed, tgt_vocab)
    src, src_mask = _batch(seed)
    beam = model.beam_search(src, bos=BOS, eos=EOS, max_new_tokens=max_new, beam_size=k, length_penalty=alpha,
                             src_mask=src_mask)
    greedy = model.greedy(src, bos=BOS, eos=EOS, max_new_tokens=max_new, src_mask=src_mask)
    return model, src, src_mask, beam, greedy


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_beam_size_one_is_greedy(seed):
    *_, beam, greedy = _search(seed, 8, max_new=8, k=1, alpha=0.0)
    assert beam == greedy


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_is_exhaustive_search(length_penalty):
    """With 4 target tokens and 3 steps there are 13 finished hypotheses (and at most 36 candidates a step):
    a beam of 40 keeps them all, so beam search must return the argmax of scoring every one of them by
    full recompute — which it cannot if a beam ever reads another beam's self-attention cache."""
    differs_from_greedy = False
    for seed in range(4):
        model, src, src_mask, beam, greedy = _search(seed, 4, max_new=3, k=40, alpha=length_penalty)
        bodies = [[]] + [[a] for a in (0, 2, 3)] + [[a, b] for a in (0, 2, 3) for b in (0, 2, 3)]
        for row in range(3):
            def score(body):  # one uncached forward pass over bos + body scores every token of body + eos
                with torch.no_grad():
                    logits = model(src[row:row + 1], torch.tensor([[BOS] + body]), src_mask[row:row + 1])
                logp = logits[0].float().log_softmax(-1)  # (len(body) + 1, V)
                seq = body + [EOS]
                return float(logp[torch.arange(len(seq)), seq].sum()) / len(seq) ** length_penalty
            best = max(bodies, key=score)
            assert beam[row] == best, (seed, row)
            differs_from_greedy |= best != greedy[row]
    assert differs_from_greedy  # the test would prove little if every row were greedy's anyway


def _uncached_beam(model, src, src_mask, row, *, max_new, k, alpha) -> list[int]:
    """The same beam search for one source row, in plain Python, re-running the whole decoder every step."""
    live, pool = [([], 0.0)], []  # (tokens, summed log-prob); pool: (normalised score, tokens)
    for step in range(max_new):
        cands = []
        for seq, s in live:
            logp = _full_logp(model, src, src_mask, row, seq)
            cands += [(s + float(logp[t]), seq, t) for t in range(logp.shape[0])]
        cands = sorted(cands, key=lambda c: -c[0])[:2 * k]
        for rank, (s, seq, t) in enumerate(cands):
            if t == EOS and rank < k:
                pool = sorted(pool + [(s / (step + 1) ** alpha, seq)], key=lambda h: -h[0])[:k]
        live = [(seq + [t], s) for s, seq, t in cands if t != EOS][:k]
        length = max_new if alpha > 0 else step + 2
        if len(pool) == k and live[0][1] / length ** alpha <= pool[-1][0]:
            break
    return pool[0][1] if pool else live[0][0]


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0])
def test_cached_beam_equals_uncached(length_penalty):
    differs_from_greedy = False
    for seed in range(3):
        model, src, src_mask, beam, greedy = _search(seed, 10, max_new=6, k=3, alpha=length_penalty)
        slow = [_uncached_beam(model, src, src_mask, r, max_new=6, k=3, alpha=length_penalty) for r in range(3)]
        assert beam == slow, seed
        differs_from_greedy |= beam != greedy
    assert differs_from_greedy


def test_stopping_bound_looks_ahead_to_max_new_tokens():
    """With length_penalty > 0 a longer hypothesis divides by more, so its normalised score can still rise: a full
    pool closes a row only if the best live sum / max_new_tokens**α cannot beat its worst. On this model, stopping
    at the current length instead (the usual heuristic) returns the empty hypothesis for row 0."""
    model, src, src_mask, beam, _ = _search(6, 10, max_new=20, k=1, alpha=2.0)
    assert beam == [_uncached_beam(model, src, src_mask, r, max_new=20, k=1, alpha=2.0) for r in range(3)]
    assert beam[0] != []


def test_beam_search_arguments():
    model = _beam_model(0, tgt_vocab=8)
    src, _ = _batch(0)
    assert model.beam_search(src, bos=BOS, eos=EOS, max_new_tokens=0) == [[], [], []]
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ConfigError, match="beam_size"):
            model.beam_search(src, bos=BOS, eos=EOS, max_new_tokens=3, beam_size=bad)
    for bad in (-1, 1.5, False, None):
        with pytest.raises(ConfigError, match="max_new_tokens"):
            model.beam_search(src, bos=BOS, eos=EOS, max_new_tokens=bad)
    for bad in (float("nan"), float("inf"), "1"):
        with pytest.raises(ConfigError, match="length_penalty"):
            model.beam_search(src, bos=BOS, eos=EOS, max_new_tokens=3, length_penalty=bad)
