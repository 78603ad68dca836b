"""The ``fp4compile`` console script: ``quantizers`` output and one-line errors for bad flags."""

import pytest
import torch

from fp4compile.demo.cli import main
from fp4compile.demo.quantizer_report import make_data, quantizer_stats, relative_quadratic_error


def _table_rows(out: str) -> dict[tuple[str, str], list[float]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[1] in ("gaussian", "heavy-tailed"):
            rows[(parts[0], parts[1])] = [float(p) for p in parts[2:]]
    return rows


def test_quantizers_prints_a_row_per_quantizer_and_distribution(capsys):
    assert main(["quantizers", "--rows", "16", "--cols", "128", "--draws", "8", "--names", "rtn,sr"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert set(rows) == {(n, d) for n in ("rtn", "sr") for d in ("gaussian", "heavy-tailed")}
    rel, mean_err, ratio, nbytes = rows[("rtn", "gaussian")]
    assert rel == mean_err and ratio == 1.0 and nbytes == 0.5625  # deterministic: the mean is one draw
    rel, mean_err, ratio, _ = rows[("sr", "gaussian")]
    assert mean_err < rel / 4  # 8 unbiased draws average out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--names", "rtn,bogus"], "unknown quantizer 'bogus'; valid names: rtn, rtn_4over6"),
        (["--cols", "144"], "--cols must be a multiple of 128"),
    ],
)
def test_quantizers_bad_flags_give_one_line_error(capsys, argv, message):
    assert main(["quantizers", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_quantizers_cuda_without_gpu_is_an_error(capsys):
    assert main(["quantizers", "--device", "cuda"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_nonpositive_counts_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantizers", "--draws", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_relative_quadratic_error_is_mean_of_row_ratios():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x_hat = torch.tensor([[3.0, 3.0], [0.5, 0.0]])
    assert relative_quadratic_error(x, x_hat) == pytest.approx((1 / 25 + 0.25 / 1) / 2, rel=1e-12)


def test_heavy_tailed_data_has_heavier_tails_than_gaussian():
    gen = torch.Generator().manual_seed(0)
    gauss = make_data("gaussian", 256, 1024, gen)
    heavy = make_data("heavy-tailed", 256, 1024, gen)
    kurtosis = lambda t: (t**4).mean() / (t**2).mean() ** 2  # noqa: E731
    assert 2.9 < kurtosis(gauss) < 3.1
    assert kurtosis(heavy) > 6  # Student-t(3) has infinite kurtosis; samples land far above 3
    with pytest.raises(ValueError, match="valid: gaussian, heavy-tailed"):
        make_data("uniform", 2, 2, gen)


def test_quantizer_stats_of_a_deterministic_spec_do_not_depend_on_draws():
    x = make_data("gaussian", 16, 128, torch.Generator().manual_seed(1))
    one = quantizer_stats("rtn", x, distribution="gaussian", draws=1)
    many = quantizer_stats("rtn", x, distribution="gaussian", draws=16)
    assert one.rel_error == many.rel_error == many.mean_error
    with pytest.raises(ValueError, match="draws must be >= 1"):
        quantizer_stats("rtn", x, distribution="gaussian", draws=0)


def test_an_unexplained_error_keeps_its_traceback(monkeypatch):
    # Only expected failures (bad flags, I/O) become one-line errors; a bug inside the work is not swallowed.
    import fp4compile.demo.quantizer_report

    def buggy(*args, **kwargs):
        raise ValueError("a bug, not a bad flag")

    monkeypatch.setattr(fp4compile.demo.quantizer_report, "quantizer_stats", buggy)
    with pytest.raises(ValueError, match="a bug, not a bad flag"):
        main(["quantizers", "--rows", "4", "--cols", "128", "--draws", "1", "--names", "rtn"])


def test_format_table_pads_each_column_to_its_widest_cell():
    from fp4compile.demo.report import format_table

    assert format_table(["a", "bbb"], [["xx", 1], ["y", 22.5]]).splitlines() == [
        " a   bbb",
        "--  ----",
        "xx     1",
        " y  22.5",
    ]
    assert format_table(["a", "b"], [["xx", "y"]], align="<>") == "a   b\n--  -\nxx  y"


def test_format_table_with_fixed_widths_and_no_separator_is_the_quantizers_layout():
    from fp4compile.demo.report import format_row, format_table

    layout = dict(widths=(6, 4), align="<>", sep="")
    assert format_table(["name", "x"], [], **layout) == "name     x\n----------"
    assert format_row(["rtn", "1.5"], **layout) == "rtn    1.5"
    assert format_row(["longer_name", "1"], **layout) == "longer_name   1"  # a longer cell is not cut
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        format_row(["a", "b"], (1, 1, 1))
    with pytest.raises(ValueError, match="align must be"):
        format_row(["a", "b"], (1, 1), align="<^")
    with pytest.raises(ValueError, match="for 2 columns"):
        format_table(["a", "b"], [["only one"]])


def test_markdown_table():
    from fp4compile.demo.report import markdown_table

    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_median_ms_cycles_over_the_inputs():
    from fp4compile.demo.report import median_ms

    seen = []
    ms = median_ms(seen.append, n_inputs=3, warmup_ms=1, rep_ms=5)
    assert ms >= 0 and seen[:4] == [0, 1, 2, 0] and set(seen) == {0, 1, 2}
    with pytest.raises(ValueError, match="n_inputs must be at least 1"):
        median_ms(seen.append, n_inputs=0)


def test_environment_names_the_libraries_and_the_device():
    import fp4compile
    from fp4compile.demo.report import environment

    env = environment("cpu")
    assert env["torch"] == torch.__version__ and env["fp4compile"] == fp4compile.__version__
    assert env["device"] == "cpu" and env["device_name"] and env["threads"] == torch.get_num_threads()
    assert set(env) == {"torch", "triton", "fp4compile", "python", "device", "device_name", "cuda", "threads", "date"}
    assert environment()["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
