"""fp4compile.plot: reading the per-layer numerics log and drawing its heatmaps."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fp4compile.plot import heatmap, plot_numerics, read_rows, stat_matrix
from fp4compile.recipe import SLOTS

LAYERS = ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "lm_head"]
STEPS = [0, 10, 20, 30]


def _snr(li, step, si):
    return 20.0 + li + step / 10 + si / 100


def _rows():
    rows = []
    for step in reversed(STEPS):  # written out of order: the plots sort the steps
        for li, layer in enumerate(LAYERS):
            for si, slot in enumerate(SLOTS):
                exact = (layer, step, slot) == ("blocks.0.mlp.fc1", 20, "dgrad.w")
                rows.append(
                    dict(step=step, layer=layer, slot=slot, stat="snr_db", value=None if exact else _snr(li, step, si))
                )
                rows.append(dict(step=step, layer=layer, slot=slot, stat="scale_zero", value=0.0 if li else step / 100))
                rows.append(dict(step=step, layer=layer, slot=slot, stat="top_channels", value=[li, 3, 17]))
                rows.append(dict(step=step, layer=layer, slot=slot, stat="mystery", value="n/a"))
    return rows


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "numerics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    return path


def test_read_rows_round_trip(log):
    assert read_rows(str(log)) == _rows()


def test_read_rows_csv(tmp_path):
    path = tmp_path / "numerics.csv"
    path.write_text(
        "step,layer,slot,stat,value\n3,lm_head,fwd.x,snr_db,12.5\n3,lm_head,fwd.x,snr_db,\n"
        "3,lm_head,fwd.x,top_channels,4 9 11\n"
    )
    assert [r["value"] for r in read_rows(str(path))] == [12.5, None, [4, 9, 11]]
    assert read_rows(str(path))[0]["step"] == 3


def test_stat_matrix_values_and_nan(log):
    rows = read_rows(str(log))
    layers, steps, matrix = stat_matrix(rows, "snr_db", "dgrad.w")
    assert layers == LAYERS
    assert steps == STEPS
    assert matrix.shape == (3, 4)
    assert np.isnan(matrix[1, 2])
    assert np.isnan(matrix).sum() == 1
    expected = np.array([[_snr(li, step, 3) for step in STEPS] for li in range(3)])
    mask = ~np.isnan(matrix)
    np.testing.assert_allclose(matrix[mask], expected[mask])
    _, _, zero = stat_matrix(rows, "scale_zero", "fwd.x")
    np.testing.assert_allclose(zero, [[0.0, 0.1, 0.2, 0.3], [0.0] * 4, [0.0] * 4])
    assert stat_matrix(rows, "top_channels", "fwd.x")[2].size == 0  # list values are not plotted


def test_heatmap_writes_png(log, tmp_path):
    out = tmp_path / "sub" / "snr.png"
    assert heatmap(read_rows(str(log)), "snr_db", str(out)) == str(out)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_unknown_stat_lists_available(log, tmp_path):
    rows = read_rows(str(log))
    for stat in ("bogus", "top_channels", "mystery"):
        with pytest.raises(ValueError, match="available stats: snr_db, scale_zero") as info:
            heatmap(rows, stat, str(tmp_path / "x.png"))
        assert repr(stat) in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_plot_numerics_skips_missing_stat(log, tmp_path):
    with pytest.warns(UserWarning, match="amax"):
        paths = plot_numerics(str(log), str(tmp_path / "out"), stats=("amax", "scale_zero"))
    assert paths == [str(tmp_path / "out" / "numerics_scale_zero.png")]
    with pytest.raises(ValueError, match="available stats"):
        plot_numerics(str(log), str(tmp_path / "out"), stats=("amax",))


@pytest.mark.parametrize(
    "bad, line",
    [
        ("not json", 3),
        ('{"step": 1, "layer": "a"}', 3),
        ("[1, 2]", 3),
        ('{"step": "x", "layer": "a", "slot": "fwd.x", "stat": "amax", "value": 1}', 3),
    ],
)
def test_malformed_line_is_named(tmp_path, bad, line):
    good = json.dumps(dict(step=0, layer="a", slot="fwd.x", stat="amax", value=1.0))
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{bad}\n{good}\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:{line}:"):
        read_rows(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_rows(str(tmp_path / "nope.jsonl"))


def _cli(*args):
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "fp4compile.plot", *args], capture_output=True, text=True, env=env)


def test_cli(log, tmp_path):
    result = _cli(str(log))
    assert result.returncode == 0, result.stderr
    for stat in ("snr_db", "scale_zero"):
        png = tmp_path / f"numerics_{stat}.png"
        assert png.read_bytes().startswith(b"\x89PNG")
        assert str(png) in result.stdout.split()
    result = _cli(str(log), "--out", str(tmp_path / "o"), "--stats", "scale_zero")
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path / "o") == ["numerics_scale_zero.png"]


def test_cli_errors(log, tmp_path):
    missing = _cli(str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2
    assert "nope.jsonl" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    unknown = _cli(str(log), "--out", str(tmp_path / "u"), "--stats", "snr_db,bogus")
    assert unknown.returncode == 2
    assert "bogus" in unknown.stderr and "snr_db, scale_zero" in unknown.stderr
    assert not (tmp_path / "u").exists()


def test_fractions_are_coloured_from_zero():
    """A flush-to-zero panel of zeros must read as "none", not as the middle of an arbitrary scale."""
    import numpy as np

    from fp4compile.plot import color_limits

    zeros = np.zeros((3, 4))
    some = np.array([[0.0, 0.002], [np.nan, 0.004]])
    assert color_limits("scale_zero", zeros) == (0.0, 1.0)
    assert color_limits("scale_zero", some) == (0.0, 0.004)
    assert color_limits("snr_db", np.array([[18.0, 19.0]])) is None  # the data's own range
    assert color_limits("snr_db", np.full((2, 2), np.nan)) == (0.0, 1.0)
