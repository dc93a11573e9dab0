"""``qkv train``, ``qkv eval``, ``qkv export`` and ``qkv explain`` on a trained encoder–decoder, as a user runs them."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest

import qkv
from qkv.cli.main import main

TINY = ["--max-steps", "4", "--batch-size", "8", "--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--d-ff",
        "64", "--n-train", "200", "--n-val", "20", "--n-test", "20", "--eval-every", "2", "--save-every", "2",
        "--eval-size", "20", "--warmup-steps", "1", "--quiet"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def reverse_run(tmp_path_factory):
    """A tiny reversal run, trained once through the CLI, that the tests below only read."""
    out = tmp_path_factory.mktemp("cli") / "r"
    assert main(["train", "--task", "reverse", "--out", str(out), *TINY]) == 0
    return out


def test_train_then_eval_with_flags(tmp_path, capsys):
    code, out, err = cli(capsys, "train", "--task", "sort", "--out", tmp_path / "run", *TINY)
    assert code == 0 and "trained sort to step 4" in out and "eval at step 4" in err
    code, out, _ = cli(capsys, "eval", tmp_path / "run", "--format", "json")
    result = json.loads(out)
    assert code == 0 and result["task"] == "sort" and result["split"] == "test" and result["examples"] == 20
    assert 0 <= result["exact_match"] <= 1 and result["checkpoint"] == "step-00000004"
    code, out, _ = cli(capsys, "eval", tmp_path / "run")
    assert code == 0 and "exact_match" in out


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file_and_flags_override_it(tmp_path, capsys, suffix):
    settings = {"task": "reverse", "d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64, "max_steps": 99,
                "n_train": 200, "n_val": 20, "n_test": 20, "batch_size": 8, "eval_size": 20, "eval_every": 2}
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(settings))
    else:
        path.write_text("[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    code, out, _ = cli(capsys, "train", "--config", path, "--max-steps", "2", "--out", tmp_path / "run", "--quiet")
    assert code == 0 and "to step 2" in out  # the flag won over the file's 99
    saved = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert saved["d_model"] == 32 and saved["max_steps"] == 2


def test_resume_continues_a_finished_run_to_more_steps(tmp_path, capsys):
    assert cli(capsys, "train", "--task", "reverse", "--out", tmp_path / "r", *TINY)[0] == 0
    code, _, err = cli(capsys, "train", "--task", "reverse", "--out", tmp_path / "r", *TINY)
    assert code == 2 and "pass --resume" in err and err.count("\n") == 1
    code, out, _ = cli(capsys, "train", "--task", "reverse", "--out", tmp_path / "r", *TINY[:-1], "--max-steps", "6",
                       "--resume", "--quiet")
    assert code == 0 and "to step 6" in out


def test_explain_shows_the_cross_attention_of_a_trained_run(reverse_run, tmp_path, capsys):
    code, out, _ = cli(capsys, "explain", "abc", "--model", reverse_run, "--png", tmp_path / "x.png",
                       "--html", tmp_path / "x.html")
    assert code == 0 and "cross-attention" in out and "rows = output tokens, columns = input tokens" in out
    assert (tmp_path / "x.png").stat().st_size > 1000 and "qkv-data" in (tmp_path / "x.html").read_text()
    code, out, _ = cli(capsys, "explain", "abc", "--model", reverse_run, "--format", "json", "--layer", "0")
    data = json.loads(out)
    assert data["kind"] == "cross" and data["keys"] == ["a", "b", "c", "<eos>"]
    assert all(abs(sum(row) - 1) < 1e-4 for row in data["weights"]) and len(data["weights"]) == len(data["queries"])
    assert data["measure"] == "norms" and set(data["measures"]) == {"norms"}  # the default measure


def test_live_explorer_refuses_an_encoder_decoder_in_one_line(reverse_run):
    import qkv
    from qkv.errors import InputError
    from qkv.serve.state import TextState

    with pytest.raises(InputError, match="is an encoder–decoder: the live explorer shows self-attention models"):
        TextState(qkv.load(str(reverse_run)), "abc")


def test_cross_attention_norms_and_refused_measures(reverse_run, capsys):
    """Cross-attention gives weights, norms (‖α·W_O v‖ over the source tokens) and mixing (ALTI+: the source
    shares and the target prefix's rest sum to 1); rollout and logit are refused: one line, exit 2."""
    code, out, err = cli(capsys, "explain", "abc", "--model", reverse_run, "--format", "json",
                         "--measure", "norms,weights", "--head", "1")
    assert code == 0, err
    data = json.loads(out)
    norms, weights = data["measures"]["norms"]["values"], data["measures"]["weights"]["values"]
    assert weights == data["weights"] and len(norms) == len(weights) == len(data["queries"])
    assert all(abs(sum(row) - 1) < 1e-4 for row in norms) and norms != weights
    code, out, err = cli(capsys, "explain", "abc", "--model", reverse_run, "--measure", "norms")
    assert code == 0 and "norms ‖α·W_O v‖ as shares, layer 0, norm of the sum over heads" in out, out
    code, out, err = cli(capsys, "explain", "abc", "--model", reverse_run, "--measure", "mixing", "--format", "json")
    assert code == 0, err
    mixing = json.loads(out)["measures"]["mixing"]
    assert all(abs(sum(row) + rest - 1) < 1e-4 for row, rest in zip(mixing["values"], mixing["target_share"]))
    for measure in ("rollout", "logit"):
        code, out, err = cli(capsys, "explain", "abc", "--model", reverse_run, "--measure", measure)
        assert code == 2 and out == "" and "gives weights, norms and mixing" in err and err.count("\n") == 1, err


def test_export_a_trained_lm_and_generate_from_it(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello attention world. " * 300, encoding="utf-8")
    code, _, err = cli(capsys, "train", "--task", "text", "--data", text, "--out", tmp_path / "lm", "--max-steps", "3",
                       "--batch-size", "4", "--block-size", "32", "--d-model", "32", "--n-heads", "2", "--n-layers", "1",
                       "--d-ff", "64", "--eval-size", "8", "--quiet")
    assert code == 0, err
    code, out, err = cli(capsys, "export", tmp_path / "lm", "--hf", tmp_path / "hf", "--gguf", tmp_path / "lm.gguf")
    assert code == 0 and out.count("wrote") == 2, err
    for model in (tmp_path / "lm", tmp_path / "hf", tmp_path / "lm.gguf"):
        code, out, err = cli(capsys, "generate", "hello", "--model", model, "-n", "5", "-t", "0")
        assert code == 0, err
    assert qkv.load(tmp_path / "hf").config.num_hidden_layers == qkv.load(tmp_path / "lm.gguf").config.num_hidden_layers == 1


@pytest.mark.parametrize("argv, message", [
    (["train", "--task", "translate"], "task must be one of"),
    (["train", "--task", "text"], "needs --data FILE"),
    (["train", "--task", "reverse", "--lr", "-1"], "lr must be a finite number"),
    (["train", "--task", "reverse", "--batch-size", "0"], "batch_size must be a positive integer"),
    (["train", "--config", "missing.toml"], "--config missing.toml"),
    (["eval", "no/such/run"], "not a qkv training run"),
    (["export", "minilm", "--hf", "x"], "writes Llama-architecture decoders (qkv.models.llama.LlamaForCausalLM), got a BertModel"),
    (["export", "smollm2"], "say where to write"),
    (["train", "--task", "text", "--data", "t.txt", "--init", "minilm"], "BertModel cannot start a decoder LM"),
    (["train", "--task", "text", "--data", "t.txt", "--tokenizer", "minilm"], "cannot start a decoder LM"),
    (["train", "--task", "reverse", "--max-len", "200"], "use --max-len 120 or less"),
    (["train", "--task", "reverse", "--seed", str(2**40)], "seed must be below 2^32"),
    (["train", "--task", "reverse", "--device", "bogus"], "is not a device name"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some text to learn from. " * 400, encoding="utf-8")
    code, out, err = cli(capsys, *argv)
    assert code == 2 and err.startswith("qkv: error: ") and err.count("\n") == 1 and message in err


def test_bad_data_files(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1") * 100)
    code, _, err = cli(capsys, "train", "--task", "text", "--data", tmp_path / "latin1.txt", "--out", tmp_path / "o",
                       "--quiet")
    assert code == 2 and "not UTF-8" in err and "byte 3" in err
    (tmp_path / "short.txt").write_text("tiny", encoding="utf-8")
    code, _, err = cli(capsys, "train", "--task", "text", "--data", tmp_path / "short.txt", "--out", tmp_path / "p",
                       "--quiet")
    assert code == 2 and "too few" in err and "--block-size" in err
    (tmp_path / "bad.json").write_text('{"task": "reverse", "colour": "red"}')
    code, _, err = cli(capsys, "train", "--config", tmp_path / "bad.json", "--quiet")
    assert code == 2 and "unknown setting(s) colour" in err
    (tmp_path / "bad.toml").write_text("task = ")
    code, _, err = cli(capsys, "train", "--config", tmp_path / "bad.toml", "--quiet")
    assert code == 2 and "not valid TOML" in err


def test_progress_lines_and_samples(tmp_path, capsys):
    """Without --quiet (and not on a terminal): a line per --log-every steps with loss, lr, tokens/s, ETA."""
    argv = [a for a in TINY if a != "--quiet"]
    code, _, err = cli(capsys, "train", "--task", "reverse", "--out", tmp_path / "r", *argv, "--log-every", "2")
    lines = [x for x in err.splitlines() if x.startswith("step ")]
    assert code == 0 and [x.split()[1] for x in lines] == ["2/4", "4/4"]
    assert all(" loss " in x and " lr " in x and "tok/s" in x and "ETA" in x for x in lines)
    assert "eval at step 2: exact_match" in err and " -> " in err  # evaluation with a sample output
    code, out, _ = cli(capsys, "eval", tmp_path / "r", "--beam", "2", "--format", "json")
    assert code == 0 and json.loads(out)["decoding"] == "beam 2"


def test_wrong_uses_of_a_trained_run(reverse_run, tmp_path, capsys):
    code, _, err = cli(capsys, "export", reverse_run, "--hf", tmp_path / "hf")
    assert code == 2 and "EncoderDecoder" in err and "Llama-architecture" in err
    code, _, err = cli(capsys, "explain", "abc", "--model", reverse_run, "--no-sink")
    assert code == 2 and "no sink" in err
    code, out, _ = cli(capsys, "explain", "abc", "--model", reverse_run, "--dtype", "bfloat16", "--format", "json")
    assert code == 0 and json.loads(out)["kind"] == "cross"
    text = tmp_path / "t.txt"
    text.write_text("hello attention world. " * 300, encoding="utf-8")
    cli(capsys, "train", "--task", "text", "--data", text, "--out", tmp_path / "lm", "--max-steps", "2", "--batch-size",
        "4", "--block-size", "16", "--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--d-ff", "64", "--quiet")
    code, _, err = cli(capsys, "eval", tmp_path / "lm", "--beam", "3")
    assert code == 2 and "text run" in err


def test_settings_bind_only_once_something_was_saved(tmp_path, capsys):
    """A run that failed before its first checkpoint does not lock its settings in."""
    code, _, _ = cli(capsys, "train", "--task", "text", "--data", tmp_path / "missing.txt", "--out", tmp_path / "r")
    assert code == 2
    (tmp_path / "r").mkdir(exist_ok=True)
    (tmp_path / "r" / "run.json").write_text(json.dumps({"format": "qkv-run/1", "config": {"task": "sort"}}))
    code, out, err = cli(capsys, "train", "--task", "reverse", "--out", tmp_path / "r", *TINY)
    assert code == 0, err


@pytest.mark.parametrize("damage, message", [
    (lambda spec: spec["model"].update(colour="red"), "unexpected keyword argument 'colour'"),
    (lambda spec: spec.pop("chars"), "KeyError: 'chars'"),
    (lambda spec: spec.update(kind="translation"), "unknown kind of run 'translation'"),
    (lambda spec: spec["model"].update(d_model="wide"), "d_model must be a positive integer"),
    (lambda spec: spec.update(model=[1, 2]), "unreadable training run"),
], ids=["unknown-field", "no-chars", "unknown-kind", "bad-value", "not-a-table"])
def test_a_damaged_run_json_is_one_line_for_every_reader(reverse_run, tmp_path, capsys, damage, message):
    run = tmp_path / "r"
    shutil.copytree(reverse_run, run)
    data = json.loads((run / "run.json").read_text())
    damage(data["spec"])
    (run / "run.json").write_text(json.dumps(data))
    for argv in (["explain", "abc", "--model", run], ["eval", run], ["generate", "abc", "--model", run]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and err.startswith("qkv: error: ") and err.count("\n") == 1 and message in err, (argv, err)


def test_unreadable_inputs_and_outputs_of_train(tmp_path, capsys, monkeypatch):
    (tmp_path / "cfg.json").write_text(json.dumps({"train": 5}))
    code, _, err = cli(capsys, "train", "--config", tmp_path / "cfg.json")
    assert code == 2 and "[train] must be a table" in err and err.count("\n") == 1
    text = tmp_path / "t.txt"
    text.write_text("some text to learn from. " * 400, encoding="utf-8")
    real_read = pathlib.Path.read_text

    def unreadable(self, *a, **k):  # root reads any file, so the refusal is simulated where it happens
        if self == text:
            raise PermissionError(13, "Permission denied")
        return real_read(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "read_text", unreadable)
        code, _, err = cli(capsys, "train", "--task", "text", "--data", text, "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "cannot read it (Permission denied)" in err and err.count("\n") == 1
    real_open = os.open

    def no_lock(path, *a, **k):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", no_lock)
    code, _, err = cli(capsys, "train", "--task", "reverse", "--out", tmp_path / "locked", *TINY)
    assert code == 2 and "choose a writable --out" in err and err.count("\n") == 1
