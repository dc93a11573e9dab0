"""The record, the word view, the terminal renderers (golden), and `qkv explain` on the real model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qkv.cli.main import main
from qkv.errors import InputError
from qkv.explain.record import AttentionRecord, sum_over_words, word_spans
from qkv.explain.render_text import bar, bar_chart, heatmap

GOLDEN = Path(__file__).parent / "golden"
TOKENS = ["He", " sat", " on", " the", " river", "'s", " bank"]
TEXT = "He sat on the river's bank"


def fixed_record() -> AttentionRecord:
    g = torch.Generator().manual_seed(0)
    w = torch.rand(2, 3, 7, 7, generator=g).tril()  # causal
    w = w / w.sum(-1, keepdim=True)
    offsets = [(0, 2), (2, 6), (6, 9), (9, 13), (13, 19), (19, 21), (21, 26)]
    spans = word_spans(TEXT, offsets, [False] * 7)
    return AttentionRecord(w, TOKENS, TOKENS, list(range(7)), [0, 5], [0, 1, 2], kind="causal", model="fixture",
                           key_words=spans, query_words=spans)


def test_word_spans_merge_pieces_not_separated_by_spaces():
    rec = fixed_record()
    assert rec.key_words == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6), (6, 7)]
    assert rec.word_labels() == ["He", "sat", "on", "the", "river's", "bank"]
    specials = word_spans("[CLS] a", [(0, 0), (0, 1), (0, 0)], [True, False, True])
    assert specials == [(0, 1), (1, 2), (2, 3)]


def test_word_row_is_mean_over_query_pieces_and_sum_over_key_pieces():
    rec = fixed_record()
    qw = rec.find_word("river's")
    row = rec.word_row(qw)  # query word = tokens 4 and 5
    expected = sum_over_words((rec.row(4) + rec.row(5)) / 2, rec.key_words)
    torch.testing.assert_close(row, expected)
    assert abs(float(row.sum()) - 1) < 1e-6


def test_without_sink_renormalises_and_labels():
    rec = fixed_record().without_sink()
    assert rec.key_tokens == TOKENS[1:] and rec.sink_removed and "sink" in rec.note
    sums = rec.weights.sum(-1)
    nonzero = sums > 0
    torch.testing.assert_close(sums[nonzero], torch.ones_like(sums[nonzero]))
    assert rec.word_labels() == ["sat", "on", "the", "river's", "bank"]


def test_find_word_errors_list_the_words():
    rec = fixed_record()
    with pytest.raises(InputError, match="'money' is not a word of the text; its words are: 'He', 'sat'"):
        rec.find_word("money")
    with pytest.raises(InputError, match="occurs 1 time"):
        rec.find_word("bank", occurrence=2)


def test_record_validation():
    with pytest.raises(InputError, match="do not match"):
        AttentionRecord(torch.zeros(1, 1, 2, 3), ["a", "b"], ["a", "b"], [0, 1], [0], [0])
    with pytest.raises(InputError, match="kind"):
        AttentionRecord(torch.zeros(1, 1, 1, 2), ["a", "b"], ["a", "b"], [0], [0], [0], kind="weird")
    with pytest.raises(InputError, match="consecutive spans"):
        AttentionRecord(torch.zeros(1, 1, 1, 2), ["a", "b"], ["a", "b"], [0], [0], [0], key_words=[(0, 1)])


def test_bar_resolution_and_bounds():
    assert bar(1.0, 4) == "████" and bar(0.0, 4) == "" and bar(0.5, 4) == "██"
    assert bar(1 / 32, 4) == "▏" and bar(2.0, 3) == "███"


@pytest.mark.parametrize("name,make", [
    ("bar_chart", lambda r: bar_chart(r.word_labels(), r.word_row(5, layer=5, head=1), title="t", highlight=5)),
    ("heatmap", lambda r: heatmap(r.query_tokens, r.key_tokens, r.weights[0, 0], title="h")),
])
def test_terminal_goldens(name, make):
    got = make(fixed_record())
    golden = GOLDEN / f"explain_{name}.txt"
    if os.environ.get("QKV_REGEN_GOLDEN"):
        golden.write_text(got, encoding="utf-8")
    assert got == golden.read_text(encoding="utf-8")


def test_heatmap_marks_non_finite_cells_and_ignores_them_for_the_scale():
    m = torch.tensor([[0.5, float("nan")], [float("inf"), 0.25]])
    out = heatmap(["a", "b"], ["x", "y"], m)
    assert out.count("?") == 2 and "0.500" in out


def test_labels_escape_control_characters():
    out = bar_chart(["a\nb", "\t", ""], torch.tensor([0.5, 0.25, 0.25]))
    assert "a\\nb" in out and "\\t" in out and "''" in out and out.count("\n") == 3


def run_cli(capsys, *argv):
    code = main(["explain", *argv, "--threads", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_bank_on_smollm2(capsys):
    code, out, err = run_cli(capsys, TEXT, "--token", "bank", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["keys"] == ["He", "sat", "on", "the", "river's", "bank"]
    assert abs(sum(d["weights"]) - 1) < 1e-4
    code, out, _ = run_cli(capsys, TEXT, "--token", "bank", "--measure", "weights")
    assert code == 0 and "'bank' attends to — smollm2, mean of 30 layers, mean of 9 heads, word view" in out
    assert "▶ bank" in out


@pytest.mark.parametrize("argv,match", [
    ([TEXT, "--token", "money"], "'money' is not a word of the text; its words are: 'He'"),
    ([TEXT, "--token", "bank", "--layer", "30"], "layer 30 is out of range: smollm2 has 30 layers, numbered 0..29"),
    ([TEXT, "--token", "bank", "--head", "-1"], "head -1 is out of range"),
    (["", "--token", "bank"], "the text is empty"),
    ([TEXT, "--token", "bank", "--occurrence", "2"], "occurs 1 time"),
    (["word " * 9000, "--token", "word"], "context window is 8192"),
])
def test_explain_bad_input_exits_2_with_one_line(capsys, argv, match):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("qkv: error: ") and err.count("\n") == 1 and match in err, err


def test_explain_heatmap_png_and_html_outputs(capsys, tmp_path):
    png, page = tmp_path / "bank.png", tmp_path / "bank.html"
    code, out, err = run_cli(capsys, TEXT, "--token", "bank", "--layer", "3", "--heatmap", "--png", str(png),
                             "--html", str(page), "--measure", "weights")
    assert code == 0, err
    assert "heatmap — smollm2, layer 3, mean of 9 heads; rows = queries" in out and "keys: 0=He" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text(encoding="utf-8")
    bare = html.replace('"http://www.w3.org/2000/svg"', "")  # the SVG export's namespace: a name, never fetched
    assert 'id="qkv-data"' in html and "http://" not in bare and "https://" not in bare


def test_generation_capture_rows_roles_and_html(smollm2, tmp_path, capsys):
    """Each generated token's row covers exactly the keys that existed at its step; roles are marked."""
    from qkv.explain.capture import capture_generation

    msgs = [{"role": "user", "content": "Name a colour."}]
    pieces, record = [], None
    for piece, rec in capture_generation(smollm2, msgs, temperature=0, max_new_tokens=5, layers=[0, 29]):
        pieces.append(piece) if piece is not None else None
        record = rec or record
    n_new = sum(p.token_id is not None for p in pieces)
    assert record.weights.shape[:3] == (2, 9, n_new) and record.layers == [0, 29]
    for i, q in enumerate(record.queries):
        row = record.weights[:, :, i]
        torch.testing.assert_close(row[..., :q + 1].sum(-1), torch.ones(2, 9), atol=1e-5, rtol=0)
        assert torch.all(row[..., q + 1:] == 0)  # keys that did not exist yet
    assert {"system", "user", "assistant", "generated"} <= set(record.key_roles)
    assert record.key_roles[record.queries[0] + 1] == "generated"
    page = tmp_path / "gen.html"
    code = main(["generate", "Name a colour.", "--chat", "-t", "0", "-n", "4", "--html", str(page),
                 "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err and out.strip()
    assert 'id="qkv-data"' in page.read_text(encoding="utf-8")


def test_bar_chart_top_keeps_the_largest_in_text_order_and_counts_the_rest():
    vals = torch.tensor([0.05, 0.30, 0.01, 0.02, 0.40, 0.03, 0.19])
    out = bar_chart(list("abcdefg"), vals, top=3, highlight=6, marks={0: "sink"}).splitlines()
    drawn = [line.split()[1] if line.startswith("▶") else line.split()[0] for line in out if "⋮" not in line]
    assert drawn == ["a", "b", "e", "g"]  # b, e, g the largest; a marked (sink); text order
    gaps = [line for line in out if "⋮" in line]
    assert [g.split()[1:4] for g in gaps] == [["2", "more", "keys"], ["1", "more", "key"]]
    assert [float(g.split()[-3]) for g in gaps] == [0.03, 0.03]  # c + d, then f
    assert bar_chart(list("abcdefg"), vals, top=7) == bar_chart(list("abcdefg"), vals)  # nothing left out


def test_explain_long_text_draws_top_n_and_all_on_request(capsys):
    text = "He sat on the river's bank and " * 20 + "the boat"
    assert main(["explain", text, "--token", "boat", "--format", "json"]) == 0
    full = json.loads(capsys.readouterr().out)
    values = full["measures"]["norms"]["values"]
    assert len(values) > 100
    assert main(["explain", text, "--token", "boat", "--top", "10"]) == 0
    out = capsys.readouterr().out.splitlines()
    bars = [line for line in out[1:] if "█" in line or line.rstrip().endswith(("0.000", "sink"))]
    assert 10 <= len(bars) <= 12  # the 10 largest, and the query's own and the sink when not among them
    shown = sorted(float(line.split()[-1] if "◀" not in line else line.split()[-3]) for line in bars)
    assert shown[-10:] == sorted(round(v, 3) for v in sorted(values)[-10:])
    gaps = sum(float(line.split()[-3]) for line in out if "⋮" in line)
    assert gaps + sum(shown) == pytest.approx(1.0, abs=0.05)  # (each printed value is rounded to 3 decimals)
    assert main(["explain", text, "--token", "boat", "--all"]) == 0
    assert "⋮" not in capsys.readouterr().out
    assert main(["explain", text, "--token", "boat", "--top", "0"]) == 2
    assert "--top must be >= 1" in capsys.readouterr().err
