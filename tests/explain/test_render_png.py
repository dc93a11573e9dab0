"""PNG renderers: real files that decode, literal labels (no mathtext/TeX), defined colours for invalid
weights, atomic writes and safe file names (RELIABILITY V5-V7)."""

from __future__ import annotations

import math
import os

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from qkv.errors import InputError
from qkv.explain import render_png
from qkv.explain.render_png import (INVALID_COLOUR, bar_chart_png, heatmap_png, model_view_png, safe_filename,
                                    visible)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decoded(path) -> np.ndarray:
    """The PNG at ``path`` as an RGB array, after checking that it is a whole, valid PNG."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 200 and im.height >= 100
        return np.asarray(im.convert("RGB"))


def _has_colour(img: np.ndarray, colour, tol: int = 6) -> bool:
    rgb = np.array(matplotlib.colors.to_rgb(colour)) * 255
    return bool((np.abs(img.astype(int) - rgb).max(-1) <= tol).any())


@pytest.fixture
def no_mathtext(monkeypatch):
    """Any attempt to parse a label as mathtext fails the test; TeX is requested globally and must be
    overridden (there is no LaTeX here, so honouring it would fail too)."""
    import matplotlib.mathtext

    def refuse(*args, **kwargs):
        raise AssertionError(f"mathtext parse attempted: {args[1:2]}")

    monkeypatch.setattr(matplotlib.mathtext.MathTextParser, "parse", refuse)
    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)


def test_bar_chart_decodes(tmp_path):
    labels = ["He", "sat", "on", "the", "river's", "bank"]
    out = bar_chart_png(labels, torch.tensor([0.4, 0.1, 0.05, 0.05, 0.3, 0.1]), tmp_path / "bank.png",
                        title="'bank' attends to")
    assert out == tmp_path / "bank.png"
    _decoded(out)


def test_hostile_labels_render_literally(tmp_path, no_mathtext, hostile_labels, make_record):
    values = [0.05 * (i + 1) for i in range(len(hostile_labels))]
    _decoded(bar_chart_png(hostile_labels, values, tmp_path / "bars.png", title="$x$ attends to a_b^c \\frac"))
    rec = make_record(2, 2, hostile_labels, model="$$ \\frac{a}{b}")
    _decoded(heatmap_png(rec, tmp_path / "heat_words.png"))
    _decoded(heatmap_png(rec, tmp_path / "heat_tokens.png", layer=2, head=1, words=False))
    _decoded(model_view_png(rec, tmp_path / "model.png"))


def test_rc_params_and_pyplot_untouched(tmp_path):
    """Rendering must leave matplotlib's global settings as they were and create no pyplot figures."""
    before = dict(matplotlib.rcParams)
    bar_chart_png(["a"], [1.0], tmp_path / "a.png")
    assert dict(matplotlib.rcParams) == before
    from matplotlib._pylab_helpers import Gcf

    assert Gcf.get_num_fig_managers() == 0


@pytest.mark.parametrize("token, shown", [("", "''"), (" ", "␣"), ("\n", "↵"), ("\t ", "⇥␣"),
                                          ("a\x00b", "a\\x00b"), ("$x$", "$x$"), (" bank", " bank")])
def test_visible_labels(token, shown):
    assert visible(token) == shown


def _bad_record(make_record):
    rec = make_record(2, 2, [f"t{i}" for i in range(8)], causal=False)
    w = rec.weights.clone()
    w[0, 0, 1] = math.nan  # a whole NaN row
    w[0, 0, 2, 3] = math.inf  # one Inf cell
    w[0, 0, 4] = 0.0  # a query that sees nothing
    w[1, 1, 5, 6] = -math.inf
    return type(rec)(w, rec.query_tokens, rec.key_tokens, rec.queries, rec.layers, rec.heads, kind=rec.kind)


def test_invalid_weights_get_their_colour_and_spare_the_scale(tmp_path, make_record):
    rec = _bad_record(make_record)
    img = _decoded(heatmap_png(rec, tmp_path / "h.png", layer=0, head=1, words=False))
    assert _has_colour(img, INVALID_COLOUR)
    # Inf did not set the scale: the largest finite weight is drawn in the colour map's darkest colour.
    assert _has_colour(img, matplotlib.colormaps["Blues"](1.0), tol=3)
    img = _decoded(model_view_png(rec, tmp_path / "m.png"))
    assert _has_colour(img, INVALID_COLOUR)
    assert _has_colour(img, matplotlib.colormaps["Blues"](1.0), tol=3)
    img = _decoded(bar_chart_png(["a", "b", "c", "d"], [math.nan, math.inf, 0.0, 0.5], tmp_path / "b.png"))
    assert _has_colour(img, INVALID_COLOUR)


def test_all_zero_and_empty_inputs_render(tmp_path, make_record):
    zero = make_record(1, 1, ["a", "b", "c"])
    zero = type(zero)(torch.zeros_like(zero.weights), zero.query_tokens, zero.key_tokens, zero.queries,
                      zero.layers, zero.heads)
    _decoded(heatmap_png(zero, tmp_path / "z.png", words=False))
    _decoded(model_view_png(zero, tmp_path / "zm.png"))
    _decoded(bar_chart_png([], [], tmp_path / "empty.png", title="nothing"))
    _decoded(bar_chart_png(["a", "b"], [0.0, 0.0], tmp_path / "zeros.png"))


def test_label_value_mismatch_is_an_input_error(tmp_path):
    with pytest.raises(InputError):
        bar_chart_png(["a", "b"], [1.0], tmp_path / "x.png")


def test_no_captured_rows_is_an_input_error(tmp_path, make_record):
    rec = make_record(1, 1, ["a", "b"])
    empty = type(rec)(torch.zeros(1, 1, 0, 2), ["a", "b"], ["a", "b"], [], [0], [0])
    with pytest.raises(InputError, match="no captured query"):
        heatmap_png(empty, tmp_path / "h.png")
    _decoded(model_view_png(empty, tmp_path / "m.png"))


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    """ENOSPC at the rename: the error is reported, no partial or temp file remains, an older file with
    the same name is untouched."""
    import qkv.io as io

    target = tmp_path / "bank.png"
    target.write_bytes(b"old")

    def enospc(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", enospc)
    with pytest.raises(InputError, match="No space left"):
        bar_chart_png(["a", "b"], [0.5, 0.5], target)
    assert os.listdir(tmp_path) == ["bank.png"] and target.read_bytes() == b"old"


def test_failed_render_writes_nothing(tmp_path, monkeypatch, make_record):
    from matplotlib.figure import Figure

    def broken(*args, **kwargs):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError):
        heatmap_png(make_record(1, 1, ["a", "b"]), tmp_path / "h.png")
    assert os.listdir(tmp_path) == []


def test_missing_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        bar_chart_png(["a"], [1.0], tmp_path / "nowhere" / "a.png")


@pytest.mark.parametrize("name", ["../../x", "/etc/x", "a" * 300, "..", "", "mo del/€$x$"])
def test_safe_filename(name):
    out = safe_filename(name)
    assert out.endswith(".png") and len(out) <= 124
    assert "/" not in out and "\\" not in out and not out.startswith(".")


@pytest.mark.parametrize("model", ["../../x", "/etc/x", "m" * 300])
def test_directory_target_gets_a_sanitised_name_inside_it(tmp_path, model, make_record):
    rec = make_record(1, 2, ["a", "b", "c"], model=model)
    out = model_view_png(rec, tmp_path)
    assert out.parent == tmp_path and out.name == safe_filename(f"{model}-model-view")
    out = heatmap_png(rec, tmp_path)
    assert out.parent == tmp_path
    _decoded(out)
    assert sorted(p.parent for p in tmp_path.iterdir()) == [tmp_path, tmp_path]


def test_large_record_is_pooled_and_labels_thinned(tmp_path, make_record):
    rec = make_record(3, 4, [f"w{i}" for i in range(300)])
    img = _decoded(model_view_png(rec, tmp_path / "m.png"))
    assert img.shape[0] < 4000 and img.shape[1] < 4000
    img = _decoded(heatmap_png(rec, tmp_path / "h.png", words=False))
    assert img.shape[0] <= 2400 and img.shape[1] <= 2400
    assert render_png._MAX_TICK_LABELS < 300
