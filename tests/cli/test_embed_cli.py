"""``qkv embed``: vectors and cosine similarities on stdout; user errors are one line on stderr, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import qkv
from qkv.cli.main import main

SENTENCES = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply today."]


@pytest.fixture(scope="module")
def minilm():
    return qkv.load("minilm", device="cpu")


def _run(capsys, *argv):
    code = main(["embed", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_is_the_embeddings_and_their_cosines(capsys, minilm):
    code, out, err = _run(capsys, *SENTENCES, "--format", "json", "--device", "cpu")
    assert code == 0 and err == ""
    d = json.loads(out)
    vectors = torch.tensor([e["vector"] for e in d["embeddings"]])
    assert d["model"] == "minilm" and d["dimension"] == 384 and d["normalized"] is True
    assert [e["text"] for e in d["embeddings"]] == SENTENCES
    torch.testing.assert_close(vectors, qkv.embed(minilm, SENTENCES))
    cos = torch.tensor(d["cosine"])
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    torch.testing.assert_close(cos, unit @ unit.T, rtol=1e-5, atol=1e-6)
    assert cos[0, 1] > cos[0, 2]  # the two sentences about cats are the closest pair


def test_text_output(capsys):
    code, out, err = _run(capsys, *SENTENCES[:2], "--device", "cpu")
    assert code == 0 and err == ""
    assert "384 dimensions" in out and "norm 1.0000" in out and "cosine similarity" in out
    assert json.dumps(SENTENCES[0]) in out


def test_one_sentence_has_no_cosine_matrix(capsys):
    code, out, _ = _run(capsys, SENTENCES[0], "--format", "json", "--no-normalize", "--device", "cpu")
    d = json.loads(out)
    assert code == 0 and d["cosine"] is None and d["normalized"] is False
    assert abs(d["embeddings"][0]["norm"] - 1) > 1e-3


@pytest.mark.parametrize("argv", [
    [""],
    ["ok", "   "],
    ["ok", "--batch-size", "0"],
    ["ok", "--model", "no-such-model"],
    ["ok", "--device", "nonsense"],
])
def test_user_errors_are_one_line(capsys, argv):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("qkv: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_model_directory_without_weights(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = _run(capsys, "ok", "--model", str(tmp_path), "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and "model.safetensors" in err


def test_real_process_exit_code():
    """The installed entry point: exit 2, one line on stderr, no traceback."""
    p = subprocess.run([sys.executable, "-m", "qkv", "embed", ""], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("qkv: error:") and p.stderr.count("\n") == 1, p.stderr
