"""``qkv embed-space``: the neighbours equal a float64 cosine computed here from transformers'
``get_input_embeddings()`` on the same weights (a tiny random Llama written as an HF directory), and the word's
hidden state after layer L equals transformers' ``output_hidden_states[L + 1]`` (the last layer: its decoder
layer's output, before the final norm, which transformers' last entry includes); the side-by-side layout, and
bad input as one line with exit 2.
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

WORD = " the"  # one token of the tiny tokenizer ("Ġthe")
TEXTS = ("I sat in the shade and the sun was warm", "put the money in the box and go")
N_LAYERS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    tok = tiny_tokenizer()
    model = random_llama(tok, seed=5, num_hidden_layers=N_LAYERS)
    path = write_hf_dir(tmp_path_factory.mktemp("embed_space") / "hf", model, tok)
    emb = model.get_input_embeddings().weight.detach().double()  # (V, C)
    return SimpleNamespace(path=path, tok=tok, model=model, emb=emb, vocab=emb.shape[0],
                           word_id=tok.token_to_id("Ġthe"))


def _cosines(emb: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return (emb @ v) / (emb.norm(dim=-1) * v.norm())


def _hf_states(model, ids: list[int]) -> list[torch.Tensor]:
    """(T, C) leaving each decoder layer, before the final norm: transformers' hidden_states[L + 1] for all but
    the last layer, whose entry is after the final norm, so that one comes from a hook on the layer."""
    last = {}
    layer = model.model.layers[-1]
    h = layer.register_forward_hook(lambda m, a, o: last.setdefault("out", (o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        h.remove()
    out = [x[0] for x in hs[1:-1]] + [last["out"][0]]
    with torch.no_grad():  # transformers' own last entry is its final norm of that output
        torch.testing.assert_close(model.model.norm(last["out"])[0], hs[-1][0], rtol=1e-5, atol=1e-5)
    return out


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["embed-space", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv: str) -> dict:
    code, out, err = _run(capsys, *argv, "--format", "json", "--device", "cpu")
    assert code == 0 and err == "", err
    return json.loads(out)


def _check_neighbours(listed: list[dict], cos: torch.Tensor, k: int) -> None:
    want = cos.topk(k)
    assert [x["id"] for x in listed] == want.indices.tolist()
    torch.testing.assert_close(torch.tensor([x["cosine"] for x in listed], dtype=torch.float64), want.values,
                               rtol=0, atol=1e-7)


def test_neighbours_equal_float64_cosine_of_transformers_embeddings(capsys, tiny):
    k = 12
    d = _json(capsys, WORD, "--model", str(tiny.path), "-k", str(k))
    assert d["token_id"] == tiny.word_id and d["rows_compared"] == tiny.vocab and d["contexts"] == []
    cos = _cosines(tiny.emb, tiny.emb[tiny.word_id])
    cos[tiny.word_id] = float("-inf")  # the token itself is left out of its own list
    _check_neighbours(d["embedding"]["neighbours"], cos, k)
    for x in d["embedding"]["neighbours"]:  # readable text; a byte that is part of a character as <0xNN>
        text = tiny.tok.decode([x["id"]])
        assert x["token"] == text or ("\ufffd" in text and x["token"].startswith("<0x")), (x, text)


@pytest.mark.parametrize("layer", list(range(N_LAYERS)) + [-1])
def test_hidden_state_equals_transformers_hidden_states(tiny, layer):
    import qkv
    from qkv.explain.embedding_view import embedding_space

    loaded = qkv.load(str(tiny.path), device="cpu")
    space = embedding_space(loaded, WORD, texts=TEXTS, layer=layer, k=5, occurrence=2)
    for text, ctx in zip(TEXTS, space.contexts):
        ids = tiny.tok.encode(text).ids
        pos = [i for i, t in enumerate(ids) if t == tiny.word_id][1]  # the second " the"
        assert ctx.position == pos and ctx.token_id == tiny.word_id and ctx.layer == layer % N_LAYERS
        states = _hf_states(tiny.model, ids)
        torch.testing.assert_close(ctx.state, states[layer][pos], rtol=1e-4, atol=1e-4)
        by_layer = torch.tensor([float(_cosines(tiny.emb[tiny.word_id:tiny.word_id + 1], s[pos])[0]) for s in states],
                                dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(ctx.self_by_layer, dtype=torch.float64), by_layer, rtol=0, atol=1e-4)


def test_context_neighbours_equal_float64_cosine_of_transformers_states(capsys, tiny):
    k, layer = 7, 1
    d = _json(capsys, WORD, "--model", str(tiny.path), "-k", str(k), "--layer", str(layer),
              "--text", TEXTS[0], "--text", TEXTS[1])
    assert len(d["contexts"]) == 2
    states = []
    for text, ctx in zip(TEXTS, d["contexts"]):
        ids = tiny.tok.encode(text).ids
        pos = ids.index(tiny.word_id)  # the first " the"
        assert ctx["position"] == pos and ctx["layer"] == layer and ctx["text"] == text
        state = _hf_states(tiny.model, ids)[layer][pos]
        states.append(state.double())
        cos = _cosines(tiny.emb, state)
        # float32 hidden states (qkv's and transformers' differ by rounding): cosines agree to ~1e-5
        assert [x["id"] for x in ctx["neighbours"]] == cos.topk(k).indices.tolist()
        torch.testing.assert_close(torch.tensor([x["cosine"] for x in ctx["neighbours"]], dtype=torch.float64),
                                   cos.topk(k).values, rtol=0, atol=1e-4)
        assert ctx["self_rank"] == int((cos > cos[tiny.word_id]).sum()) + 1
        assert abs(ctx["self_cosine"] - float(cos[tiny.word_id])) < 1e-4
    between = float(states[0] @ states[1] / (states[0].norm() * states[1].norm()))
    assert abs(d["cosine_between_contexts"][0][1] - between) < 1e-4
    # the static list is the same word's row, itself left out
    cos = _cosines(tiny.emb, tiny.emb[tiny.word_id])
    cos[tiny.word_id] = float("-inf")
    _check_neighbours(d["embedding"]["neighbours"], cos, k)


def test_word_without_its_space_is_found_in_the_text(capsys, tiny):
    """'the' (typed without its space) finds the text's ' the' token; alone, 'the' is several tokens."""
    d = _json(capsys, "the", "--model", str(tiny.path), "--text", TEXTS[0], "-k", "3")
    assert d["token_id"] == tiny.word_id and d["contexts"][0]["layer"] == N_LAYERS // 2  # the middle layer


def test_side_by_side_layout(capsys, tiny):
    code, out, err = _run(capsys, WORD, "--model", str(tiny.path), "--device", "cpu", "-k", "4",
                          "--text", TEXTS[0], "--text", TEXTS[1], "--layer", "2")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"hf — nearest tokens by cosine similarity among {tiny.vocab:,} input embedding rows")
    assert lines[2].count("after layer 2") == 2 and "input embedding of '␣the'" in lines[2]
    rows = lines[3:7]
    assert [r.split()[0] for r in rows] == ["1", "2", "3", "4"]
    assert all(r.count("+") + r.count("-") >= 3 for r in rows)  # three signed cosines per row
    assert lines[7].startswith("self") and lines[7].count("rank") == 2
    assert "1/√C" in lines[8] and lines[9].startswith("cosine between")
    assert len(lines) == 10


@pytest.mark.parametrize("argv,needle", [
    (["bank", "-k", "0"], "-k must be an integer >= 1"),
    (["bank", "--layer", "3"], "--layer needs --text"),
    (["bank"] + ["--text", "a"] * 5, "at most 4 texts"),
    (["bank", "--model", "no-such-model"], "no model 'no-such-model'"),
    (["bank", "--model", "minilm"], "is an encoder"),
])
def test_user_errors_are_one_line(capsys, argv, needle):
    code, out, err = _run(capsys, *argv, "--device", "cpu")
    assert code == 2 and out == ""
    assert err.startswith("qkv: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert needle in err, err


@pytest.mark.parametrize("argv,needle", [
    ([" attention"], "' attention' is not one token: it tokenizes as [' att', 'ention']"),
    (["", ], "the token is empty"),
    ([" attention", "--text", "the attention here"], "'attention' is 2 tokens in the text ([' att', 'ention'])"),
    (["cat", "--text", TEXTS[0]], "'cat' is not a word of the text"),
    ([WORD, "--text", TEXTS[0], "--layer", "3"], "layer 3 is out of range: hf has 3 layers, numbered 0..2"),
    ([WORD, "--text", TEXTS[0], "--layer", "-4"], "layer -4 is out of range"),
    ([WORD, "--text", "   "], "the text is empty"),
    ([WORD, "--text", TEXTS[0], "--occurrence", "3"], "occurs 2 time(s)"),
])
def test_model_errors_are_one_line(capsys, tiny, argv, needle):
    code, out, err = _run(capsys, *argv, "--model", str(tiny.path), "--device", "cpu")
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert needle in err, err


def test_real_process_exit_code():
    p = subprocess.run([sys.executable, "-m", "qkv", "embed-space", "bank", "-k", "0"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("qkv: error:") and p.stderr.count("\n") == 1, p.stderr
