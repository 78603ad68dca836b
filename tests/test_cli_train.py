"""``fp4compile train``, ``bench`` and ``explain``: outputs, determinism, the corpus split and flag errors (CPU)."""

import contextlib
import dataclasses
import io
import json
import math
import os
import re

import pytest
import torch

from fp4compile.demo import plot, train
from fp4compile.demo.cli import main
from fp4compile.demo.corpus import load_corpus, train_batch, val_batches
from fp4compile.demo.plot import moving_average, plot_results
from fp4compile.recipe import Recipe

# A tiny model and run: seconds per recipe on a CPU.
TINY = ["--steps", "5", "--d-model", "32", "--layers", "1", "--heads", "2", "--batch", "2", "--seq", "32",
        "--val-batches", "2", "--eval-every", "0", "--corpus-mb", "0.3", "--no-progress"]  # fmt: skip


def _train(out_dir, *flags) -> tuple[str, dict]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["train", *TINY, "--out", str(out_dir), *flags]) == 0
    with open(out_dir / "results.json") as f:
        return stdout.getvalue(), json.load(f)


@pytest.fixture(scope="module")
def two_recipes(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("train")
    printed, results = _train(out_dir, "--recipes", "bf16,naive")
    return out_dir, printed, results


def test_train_writes_results_json_with_the_documented_keys(two_recipes):
    _, _, results = two_recipes
    assert set(results) == {"config", "corpus", "runs", "environment"}
    assert results["config"]["recipes"] == ["bf16", "naive"] and results["config"]["steps"] == 5
    assert results["config"]["params"] > 0
    assert {"torch", "device_name", "date"} <= set(results["environment"])
    assert results["environment"]["torch"] == torch.__version__
    assert list(results["runs"]) == ["bf16", "naive"]
    for name, run in results["runs"].items():
        assert {"train_loss", "final_train_loss", "val_loss", "val_curve", "gap_to_bf16_pct", "tokens_per_s",
                "first_step_s", "init_sha256", "diverged"} <= set(run)  # fmt: skip
        assert len(run["train_loss"]) == 5 and not run["diverged"]
        assert run["final_train_loss"] == pytest.approx(sum(run["train_loss"]) / 5)  # fewer than 10 steps: all
        assert run["val_curve"] == [[5, run["val_loss"]]]  # --eval-every 0: once, after the last step
        assert run["tokens_per_s"] > 0
    assert results["runs"]["bf16"]["gap_to_bf16_pct"] == 0.0
    bf16, naive = results["runs"]["bf16"]["val_loss"], results["runs"]["naive"]["val_loss"]
    assert results["runs"]["naive"]["gap_to_bf16_pct"] == pytest.approx(100 * (naive - bf16) / bf16)


def test_train_writes_a_png_plot(two_recipes):
    out_dir, _, _ = two_recipes
    png = (out_dir / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_plot_results_redraws_the_plot_from_results_json(two_recipes, tmp_path):
    out_dir, _, _ = two_recipes
    png = plot_results(str(out_dir / "results.json"), str(tmp_path / "again.png"))
    assert png == str(tmp_path / "again.png")
    data = (tmp_path / "again.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    height = int.from_bytes(data[20:24], "big")  # IHDR: with bf16 among the runs, a second (gap) panel
    assert height == int.from_bytes((out_dir / "loss.png").read_bytes()[20:24], "big") == int(7.5 * 110)


def test_train_prints_a_table_row_per_recipe(two_recipes):
    _, printed, results = two_recipes
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("recipe"))
    assert "val loss" in lines[header] and "vs bf16" in lines[header] and "tokens/s" in lines[header]
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 4]}
    assert set(rows) == {"bf16", "naive"}
    assert float(rows["naive"][2]) == pytest.approx(results["runs"]["naive"]["val_loss"], abs=1e-4)
    assert "results.json" in printed and "loss.png" in printed


def test_recipes_start_from_the_same_weights_and_data(two_recipes):
    _, _, results = two_recipes
    bf16, naive = results["runs"]["bf16"], results["runs"]["naive"]
    assert bf16["init_sha256"] == naive["init_sha256"]
    # Same weights and first batch: the first losses differ only by the quantization of the forward.
    assert naive["train_loss"][0] == pytest.approx(bf16["train_loss"][0], rel=0.01)
    assert bf16["train_loss"] != naive["train_loss"]  # but the recipes do differ


def test_the_same_seed_gives_the_same_bf16_loss_curve(two_recipes, tmp_path):
    _, _, first = two_recipes
    _, again = _train(tmp_path, "--recipes", "bf16")
    assert again["runs"]["bf16"]["train_loss"] == first["runs"]["bf16"]["train_loss"]
    assert again["runs"]["bf16"]["val_loss"] == first["runs"]["bf16"]["val_loss"]
    assert again["runs"]["bf16"]["gap_to_bf16_pct"] == 0.0


def test_corpus_split_is_deterministic_and_disjoint():
    a, b = load_corpus(300_000), load_corpus(300_000)
    assert a.train_files == b.train_files and a.val_files == b.val_files
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert not set(a.train_files) & set(a.val_files)
    assert a.val_files and all(f.endswith(".py") and "site-packages" not in f for f in a.train_files + a.val_files)
    assert 250_000 < len(a.train) + len(a.val) < 3_000_000
    assert len(a.val) < len(a.train)
    x, y = train_batch(a.train, 3, 4, 16, seed=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes
    assert torch.equal(x, train_batch(a.train, 3, 4, 16, seed=0)[0])
    assert not torch.equal(x, train_batch(a.train, 4, 4, 16, seed=0)[0])
    val = val_batches(a.val, 2, 4, 16)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(val, val_batches(a.val, 2, 4, 16)))


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--recipes", "bf16,bogus"], "unknown recipe 'bogus'; valid recipes: " + ", ".join(Recipe.names())),
        (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["--steps", "-3"], "argument --steps: must be a positive integer, got -3"),
        (["--d-model", "40"], "--d-model must be a multiple of 16"),
        (["--d-model", "48", "--heads", "5"], "--d-model (48) must be a multiple of --heads (5)"),
        (["--mode", "reduce-overhead", "--inner", "aot_eager"], "--mode reduce-overhead needs --inner inductor"),
        (["--monitor", "0"], "argument --monitor: must be a positive integer, got 0"),
    ],
)
def test_train_bad_flags_give_a_one_line_error(capsys, flags, message):
    line = _one_line_error(capsys, ["train", *flags])
    assert line.startswith("fp4compile train: error:") and message in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_train_on_cuda_without_a_gpu_is_an_error(capsys):
    assert "--device cuda needs a CUDA GPU" in _one_line_error(capsys, ["train", "--device", "cuda"])


def test_train_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--recipes", "--steps", "--device", "--out", "--seed", "--batch", "--seq", "--d-model", "--layers",
                 "--heads", "--lr", "--warmup", "--eval-every", "--val-batches", "--inner", "--mode", "--corpus-mb",
                 "--threads", "--no-progress", "--osci-reset", "--osci-start", "--osci-period", "--osci-window",
                 "--osci-threshold", "--osci-memory-efficient", "--monitor"):  # fmt: skip
        assert flag in text
    assert "aot_eager" in text and "standard library" in text
    # Measured times live in the README only: the help points there and states none of its own.
    assert "Results of the demo" in " ".join(text.split())
    assert not re.search(r"\d\s*(s|sec|min|minutes?|ms)\b", text), re.findall(r".{20}\d\s*(?:s|min)\b.{5}", text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_without_a_gpu_exits_nonzero_with_one_line(capsys):
    assert main(["bench"]) != 0
    captured = capsys.readouterr()
    assert "needs a CUDA GPU" in captured.err and captured.err.count("\n") == 1 and captured.out == ""


def test_explain_prints_the_demo_models_table(capsys):
    assert main(["explain", "--recipe", "quartet_ii"]) == 0
    out = capsys.readouterr().out
    assert "rewritten" in out and "quartet_ii" in out
    assert "8 of 9 matmuls rewritten to NVFP4" in out  # 2 blocks x (qkv, proj, fc, proj); lm_head stays
    assert "skipped: skip pattern 'lm_head'" in out
    assert main(["explain", "--skip", "*.mlp.*"]) == 0
    assert "4 of 9 matmuls rewritten" in capsys.readouterr().out


def test_explain_unknown_recipe_is_a_one_line_error(capsys):
    assert "unknown recipe 'fp3'; valid recipes: nvidia" in _one_line_error(capsys, ["explain", "--recipe", "fp3"])


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]


def test_osci_reset_defaults_scale_with_the_steps(tmp_path):
    _, results = _train(tmp_path, "--steps", "8", "--recipes", "naive", "--osci-reset")
    config = results["config"]
    assert (config["osci_start"], config["osci_period"], config["osci_window"]) == (4, 2, 1)  # 8 // 2, 8 // 5, 1
    assert [r["step"] for r in results["runs"]["naive"]["osci_reset"]] == [6]  # snapshot 4, track 5, reset after 6


def test_osci_reset_runs_on_the_quantized_recipes_only(tmp_path):
    # 10 steps; snapshot after step 2, track step 3, reset after step 4; the next snapshot would be step 10.
    flags = ["--steps", "10", "--recipes", "bf16,naive"]
    osci = ["--osci-reset", "--osci-start", "2", "--osci-period", "8", "--osci-window", "1"]
    printed, with_hook = _train(tmp_path / "osci", *flags, *osci)
    _, without = _train(tmp_path / "plain", *flags)
    assert with_hook["config"]["osci_reset"] and not without["config"]["osci_reset"]
    assert with_hook["runs"]["bf16"]["osci_reset"] is None and without["runs"]["naive"]["osci_reset"] is None
    history = with_hook["runs"]["naive"]["osci_reset"]
    assert [r["step"] for r in history] == [4]
    tracked = 96 * 32 + 32 * 32 + 128 * 32 + 32 * 128  # d_model 32, 1 block: qkv, attn proj, fc, mlp proj
    assert history[0]["tracked"] == tracked and sum(v["tracked"] for v in history[0]["layers"].values()) == tracked
    assert history[0]["reset"] == sum(v["reset"] for v in history[0]["layers"].values()) > 0
    plain, hooked = without["runs"]["naive"]["train_loss"], with_hook["runs"]["naive"]["train_loss"]
    assert hooked[:5] == plain[:5]  # nothing touches the weights before the reset after step 4
    assert hooked[5:] != plain[5:]  # the reset moved weights, and the run went on from there
    assert with_hook["runs"]["bf16"]["train_loss"] == without["runs"]["bf16"]["train_loss"]
    header = next(line for line in printed.splitlines() if line.startswith("recipe"))
    assert "OsciReset resets" in header
    assert "naive +osci" in printed and f"{history[0]['reset']:,} in 1 resets of {tracked:,}" in printed


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--osci-period", "5"], "--osci-period needs --osci-reset"),
        (["--recipes", "bf16", "--osci-reset"], "--osci-reset needs a quantized recipe; --recipes is bf16"),
        (["--osci-reset", "--osci-period", "4", "--osci-window", "4"], "--osci-window (4) must be smaller than"),
        (["--steps", "10", "--osci-reset", "--osci-start", "8"], "must come by the last step (9)"),
    ],
)
def test_osci_reset_bad_flags_give_a_one_line_error(capsys, flags, message):
    line = _one_line_error(capsys, ["train", *flags])
    assert line.startswith("fp4compile train: error:") and message in line


def test_results_record_the_outlier_channels_each_layer_ended_with(tmp_path):
    # 10 steps: OutControl scaled to record at step 2 and select at step 3. d_model 32: only mlp.proj (128 inputs)
    # has a 1x128 block to give (k rounds up to a multiple of 128); the Hot-Channel Patch keeps min(64, inputs),
    # and chon keeps the attention output projection (attn.proj) in bf16.
    printed, results = _train(tmp_path, "--steps", "10", "--recipes", "bf16,tetrajet_v2_full,chon")
    runs = results["runs"]
    assert runs["bf16"]["outlier_channels"] is None
    assert runs["tetrajet_v2_full"]["outlier_channels"] == {
        "blocks.0.attn.qkv": 0, "blocks.0.attn.proj": 0, "blocks.0.mlp.fc": 0, "blocks.0.mlp.proj": 128
    }  # fmt: skip
    assert runs["chon"]["outlier_channels"] == {"blocks.0.attn.qkv": 32, "blocks.0.mlp.fc": 32, "blocks.0.mlp.proj": 64}
    assert "tetrajet_v2_full: outlier channels in 1 of 4 layers (128 each)" in printed
    assert "chon: outlier channels in 3 of 3 layers (32, 64 each)" in printed


def test_train_config_checks_what_it_feeds_in_the_flags_words():
    # The CLI prints these as they are (test_train_bad_flags_give_a_one_line_error and the osci test above).
    with pytest.raises(ValueError, match=r"^--d-model must be a multiple of 16 \(the NVFP4 block size\), got 40$"):
        train.TrainConfig(d_model=40).resolved()  # GPTConfig's rule
    with pytest.raises(ValueError, match=r"^--d-model \(48\) must be a multiple of --heads \(5\)$"):
        train.TrainConfig(d_model=48, heads=5).resolved()
    with pytest.raises(ValueError, match="^--mode max-autotune needs --inner inductor"):  # the backend's rule
        train.TrainConfig(mode="max-autotune", inner="aot_eager").resolved()
    with pytest.raises(ValueError, match="^--osci-window, --osci-memory-efficient needs --osci-reset$"):
        train.TrainConfig(osci_window=3, osci_memory_efficient=True)  # on construction
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        train.TrainConfig(device="tpu").resolved()


def test_train_config_resolved_fills_osci_reset_only_when_it_runs():
    plain = train.TrainConfig(steps=20).resolved()
    assert (plain.osci_start, plain.osci_period, plain.osci_window) == (None, None, None)
    assert plain.resolved() == plain  # resolving again changes nothing
    osci = train.TrainConfig(steps=20, osci_reset=True).resolved()
    assert (osci.osci_start, osci.osci_period, osci.osci_window) == (10, 4, 1)
    assert osci.resolved() == osci


def test_outcontrol_schedule_is_scaled_to_a_run_too_short_for_it():
    """A 500-step demo would end before the preset's selection (step 550): its OutControl records from step 100
    for 10 steps, under a name that says so; long runs and other recipes train the preset as it is."""
    short = train.TrainConfig(steps=500, recipes=("tetrajet_v2_full",)).resolved()
    run = short.run_recipe("tetrajet_v2_full")
    assert run.name == "tetrajet_v2_full_start100_window10"
    assert (run.outliers.start, run.outliers.window, run.outliers.ratio) == (100, 10, 0.1)
    assert dataclasses.replace(run, name="tetrajet_v2_full", outliers=Recipe.named("tetrajet_v2_full")
                               .outliers) == Recipe.named("tetrajet_v2_full")  # fmt: skip
    assert short.compile_options("tetrajet_v2_full")["recipe"] == run
    long = train.TrainConfig(steps=600, recipes=("tetrajet_v2_full",)).resolved()
    assert long.run_recipe("tetrajet_v2_full") is Recipe.named("tetrajet_v2_full")
    assert long.compile_options("tetrajet_v2_full")["recipe"] == "tetrajet_v2_full"
    assert short.run_recipe("chon") is Recipe.named("chon")


def test_results_table_layout():
    runs = {
        "bf16": train.RecipeRun("bf16", [3.0, 2.0], [(2, 2.5)], 1234.5, 0.1, 0.2, "0"),
        "naive": train.RecipeRun("naive", [3.0, 2.2], [(2, 2.6)], 100.0, 12.34, 0.2, "0",
                                 osci_reset=[{"step": 1, "tracked": 40960, "reset": 12}]),
    }  # fmt: skip
    assert train.results_table(runs).splitlines() == [
        "recipe       train loss (last 10)  val loss  vs bf16 (val)  tokens/s  1st step s          OsciReset resets",
        "-----------  --------------------  --------  -------------  --------  ----------  ------------------------",
        "bf16                       2.5000    2.5000              -     1,234         0.1                         -",
        "naive +osci                2.6000    2.6000        +4.00 %       100        12.3  12 in 1 resets of 40,960",
    ]


def test_a_recipe_trained_in_a_fresh_process_matches_in_process():
    # GPU runs train each recipe in a spawned process (train._train_in_fresh_process); same losses as in-process.
    from fp4compile.demo import train

    config = train.TrainConfig(recipes=("naive",), steps=3, d_model=32, layers=1, heads=2, batch=2, seq=32,
                               eval_every=0, val_batches=1, corpus_bytes=300_000).resolved()  # fmt: skip
    corpus = load_corpus(config.corpus_bytes)
    spawned = train._train_in_fresh_process("naive", config, corpus, progress=False)
    here = train.train_recipe("naive", config, corpus, progress=False)
    assert spawned.train_loss == here.train_loss and spawned.val_curve == here.val_curve
    assert spawned.init_sha256 == here.init_sha256


def _never_called(*args, **kwargs):
    raise AssertionError("training started, but it should not have")


def _unwritable_out_dirs(tmp_path) -> list[str]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    paths = [str(a_file / "out"), str(a_file)]  # under a regular file; a regular file itself
    if os.path.isdir("/proc/self"):
        paths.append("/proc/fp4compile-out")  # procfs: no mkdir, even as root
    return paths


def test_train_out_that_cannot_be_created_exits_2_with_one_line_before_training(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(train, "run_training", _never_called)
    monkeypatch.setattr(train, "train_recipe", _never_called)
    monkeypatch.setattr(train, "GPT", _never_called)
    for out in _unwritable_out_dirs(tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *TINY, "--out", out])
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1, captured.err  # one line: no usage, no traceback
        assert captured.err.startswith(f"fp4compile train: error: --out {out}: "), captured.err
    assert (tmp_path / "a-file").read_text() == "not a directory"
    assert sorted(os.listdir(tmp_path)) == ["a-file"]  # nothing written


def test_train_out_errors_name_the_reason(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(train, "run_training", _never_called)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for out, reason in [(a_file, "exists and is not a directory"), (a_file / "sub", "cannot create the directory")]:
        with pytest.raises(SystemExit):
            main(["train", *TINY, "--out", str(out)])
        assert reason in capsys.readouterr().err


def test_train_creates_the_out_directory_and_its_parents_before_training(monkeypatch, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    seen = []

    def fake_run_training(config, out_dir, progress=True):
        seen.append((os.path.isdir(out_dir), sorted(os.listdir(out_dir))))  # created, and the probe is gone
        return {}

    monkeypatch.setattr(train, "run_training", fake_run_training)
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert seen == [(True, [])]


def test_bad_flags_are_reported_before_the_out_directory_is_created(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--d-model", "40", "--out", str(tmp_path / "out")])
    assert "--d-model must be a multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_training_checks_out_dir_before_building_a_model(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(train, "GPT", _never_called)
    monkeypatch.setattr(train, "load_corpus", _never_called)
    with pytest.raises(NotADirectoryError, match="cannot create the directory"):
        train.run_training(train.TrainConfig(), str(tmp_path / "a-file" / "out"), progress=False)


def test_a_corpus_too_small_for_the_sequences_is_a_one_line_error_before_training(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(train, "train_recipe", _never_called)
    monkeypatch.setattr(train, "GPT", _never_called)
    for flags, message in [
        (["--corpus-mb", "0.3", "--seq", "200000"], "is too short for sequences of 200000 bytes"),
        (["--corpus-mb", "0.001"], "selects too few files to split"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *TINY, *flags, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fp4compile train: error: ") and message in err, err
    assert os.listdir(tmp_path) == []


def test_a_failing_plot_keeps_results_json_and_is_a_one_line_error(capsys, monkeypatch, tmp_path):
    def no_space(results_json, path):
        assert os.path.isfile(results_json)  # the results are written before the plot is drawn
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(plot, "plot_results", no_space)
    assert main(["train", *TINY, "--recipes", "bf16", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    results = str(tmp_path / "results.json")
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("fp4compile train: error: the plot failed (")
    assert "No space left on device" in captured.err and f"results.json was written at {results}" in captured.err
    assert "recipe" in captured.out and "bf16" in captured.out  # the table is printed before the plot
    with open(results) as f:
        written = json.load(f)
    assert list(written["runs"]) == ["bf16"] and len(written["runs"]["bf16"]["train_loss"]) == 5
    assert all(math.isfinite(v) for v in written["runs"]["bf16"]["train_loss"])
    assert not (tmp_path / "loss.png").exists()


def _fake_train_recipe(recipe, config, corpus, progress=True, log=print):
    losses = [3.0 - 0.1 * i for i in range(config.steps)]
    return train.RecipeRun(recipe, losses, [(config.steps, 2.5)], 100.0, 0.1, 0.2, "0" * 64)


def test_a_bug_in_the_plot_is_not_swallowed(monkeypatch, tmp_path):
    def buggy(results_json, path):
        raise KeyError("a bug")

    monkeypatch.setattr(train, "train_recipe", _fake_train_recipe)
    monkeypatch.setattr(plot, "plot_results", buggy)
    with pytest.raises(KeyError, match="a bug"):
        main(["train", *TINY, "--recipes", "bf16,naive", "--out", str(tmp_path)])
    with open(tmp_path / "results.json") as f:
        assert list(json.load(f)["runs"]) == ["bf16", "naive"]


def test_results_json_that_cannot_be_written_is_a_one_line_error(capsys, monkeypatch, tmp_path):
    def full_disk(path, *args, **kwargs):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(train, "train_recipe", _fake_train_recipe)
    monkeypatch.setattr(train, "write_results", full_disk)
    monkeypatch.setattr(plot, "plot_results", _never_called)
    assert main(["train", *TINY, "--recipes", "bf16", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fp4compile train: error: ") and "No space left" in err, err


def test_train_nproc_runs_each_recipe_on_data_parallel_ranks(tmp_path):
    printed, results = _train(tmp_path, "--recipes", "bf16,naive", "--nproc", "2")
    assert results["config"]["nproc"] == 2
    assert "x 2 processes (DDP)" in printed and printed.count("vs bf16 (val)") == 1  # rank 0 alone reports
    for run in results["runs"].values():
        assert len(run["train_loss"]) == 5 and all(math.isfinite(v) for v in run["train_loss"])
    # Step 0 is the mean of the two ranks' micro-batches (indices 0 and 1) on the initial weights.
    config = train.TrainConfig(**{k: v for k, v in results["config"].items() if k not in ("params", "wall_s")})
    corpus = load_corpus(config.corpus_bytes)
    torch.manual_seed(config.seed)
    model = train.GPT(config.model_config())
    with torch.no_grad():
        losses = [model(*train_batch(corpus.train, i, config.batch, config.seq, config.seed)) for i in (0, 1)]
    assert results["runs"]["bf16"]["train_loss"][0] == pytest.approx(((losses[0] + losses[1]) / 2).item(), rel=1e-6)


# ----------------------------------------------------------------------------- --data
def _text_tree(root, files=12, words=400):
    """``files`` text files, a third of them in a subdirectory, plus a hidden file that must be skipped."""
    (root / "sub").mkdir(parents=True)
    vocabulary = "the quick brown fox jumps over a lazy dog while nvfp4 training runs".split()
    for i in range(files):
        text = " ".join(vocabulary[(i * 7 + j * 3) % len(vocabulary)] for j in range(words))
        (root / ("sub" if i % 3 == 0 else ".") / f"doc{i:02d}.txt").write_text(text)
    (root / ".hidden.txt").write_text("never read")
    return sorted(str(p) for p in root.rglob("doc*.txt"))


def test_data_trains_on_the_users_text_split_by_file(tmp_path):
    files = _text_tree(tmp_path / "text")
    printed, results = _train(tmp_path / "out", "--recipes", "bf16", "--data", str(tmp_path / "text"))
    corpus = results["corpus"]
    walked = [str(tmp_path / "text" / f"doc{i:02d}.txt") for i in range(12) if i % 3] + [
        str(tmp_path / "text" / "sub" / f"doc{i:02d}.txt") for i in range(0, 12, 3)
    ]  # the walk's order: a directory's files (sorted), then its subdirectories
    assert sorted(walked) == files
    assert corpus["val_files"] == [walked[9]]  # every 10th file of the walk is validation
    assert corpus["train_files"] == walked[:9] + walked[10:]
    assert "--data files" in printed and ".hidden" not in json.dumps(corpus)
    assert math.isfinite(results["runs"]["bf16"]["val_loss"])
    again = load_corpus(300_000, data=[str(tmp_path / "text")])
    assert list(again.train_files) == corpus["train_files"]  # deterministic


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "b.bin").write_bytes(b"ab\0cd"), "looks binary (it holds NUL bytes); pass text files"),
        (lambda d: (d / "e.txt").write_text(""), "no text to train on"),
        (lambda d: (d / "one.txt").write_text("x" * 4000), "give at least two files"),
        (lambda d: None, "no such file or directory"),
    ],
    ids=["binary", "empty", "one-file", "missing"],
)
def test_bad_data_is_a_one_line_error(capsys, tmp_path, make, message):
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    path = next(iter(data.iterdir()), tmp_path / "missing")
    line = _one_line_error(capsys, ["train", *TINY, "--out", str(tmp_path / "out"), "--data", str(path)])
    assert line.startswith("fp4compile train: error: corpus: --data") and message in line


# ----------------------------------------------------------------------------- --seeds and resuming
def test_seeds_train_every_recipe_per_seed_and_summarize_mean_and_spread(tmp_path):
    printed, results = _train(tmp_path, "--recipes", "bf16,naive", "--seeds", "2", "--seed", "3")
    runs = results["runs"]
    assert list(runs) == ["bf16@3", "naive@3", "bf16@4", "naive@4"]
    assert [(r["recipe"], r["seed"]) for r in runs.values()] == [("bf16", 3), ("naive", 3), ("bf16", 4), ("naive", 4)]
    assert runs["bf16@3"]["init_sha256"] != runs["bf16@4"]["init_sha256"]  # another seed, another model
    assert runs["bf16@3"]["init_sha256"] == runs["naive@3"]["init_sha256"]  # one seed, the same start for all
    gaps = [runs[f"naive@{s}"]["gap_to_bf16_pct"] for s in (3, 4)]
    header, rule, bf16_row, naive_row = printed.splitlines()[-6:-2]
    assert "vs bf16 (val), mean" in header and "min .. max" in header
    assert f"{sum(gaps) / 2:+.2f} %" in naive_row and f"{min(gaps):+.2f} .. {max(gaps):+.2f} %" in naive_row
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_an_interrupted_run_resumes_and_another_configuration_starts_over(tmp_path, monkeypatch):
    calls = []
    real = train.train_recipe

    def interrupted(recipe, *args, **kwargs):
        calls.append(recipe)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(recipe, *args, **kwargs)

    monkeypatch.setattr(train, "train_recipe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "--recipes", "bf16,naive")
    with open(tmp_path / "results.json") as f:
        assert list(json.load(f)["runs"]) == ["bf16"]  # written after the first run
    calls.clear()
    monkeypatch.setattr(train, "train_recipe", lambda recipe, *a, **k: calls.append(recipe) or real(recipe, *a, **k))
    printed, resumed = _train(tmp_path, "--recipes", "bf16,naive")
    assert calls == ["naive"] and "resuming: 1 run(s)" in printed
    _, fresh = _train(tmp_path / "fresh", "--recipes", "bf16,naive")
    deterministic = ("train_loss", "val_curve", "init_sha256", "gap_to_bf16_pct", "recipe", "seed")
    for key, run in fresh["runs"].items():  # the resumed run kept bf16's first run and trained naive as before
        assert {f: resumed["runs"][key][f] for f in deterministic} == {f: run[f] for f in deterministic}
    printed, _ = _train(tmp_path, "--recipes", "bf16", "--steps", "6")
    assert "another configuration's runs: moved to" in printed and (tmp_path / "results.previous.json").exists()


# ----------------------------------------------------------------------------- --hf-config
def _hf_config(directory, model_type="llama", **overrides):
    import transformers

    shapes = {
        "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64),
        "gpt2": dict(n_embd=32, n_layer=1, n_head=2, n_positions=64),
        "t5": dict(d_model=32, num_layers=1, num_heads=2, d_ff=64, d_kv=16),
    }  # fmt: skip
    config = transformers.AutoConfig.for_model(model_type, **{**shapes[model_type], **overrides})
    config.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_hf_config_trains_that_architecture_from_the_same_weights_per_recipe(tmp_path, model_type):
    config = _hf_config(tmp_path / "config", model_type)
    printed, results = _train(tmp_path / "out", "--recipes", "bf16,naive", "--hf-config", config)
    runs = results["runs"]
    assert runs["bf16"]["init_sha256"] == runs["naive"]["init_sha256"]
    assert all(math.isfinite(run["val_loss"]) for run in runs.values())
    assert f"byte-level {model_type} (" in printed and results["config"]["hf_config"] == config


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: str(d / "nowhere"), "no such file"),
        (lambda d: (d / "c.json").write_text("{not json") and str(d / "c.json"), "cannot read it as JSON"),
        (lambda d: (d / "c.json").write_text("{}") and str(d / "c.json"), 'no "model_type"'),
        (lambda d: _hf_config(d, "t5"), "'t5' is not a causal language model"),
        (lambda d: _hf_config(d, "llama", max_position_embeddings=16), "16 positions, fewer than --seq 32"),
    ],
    ids=["missing", "not-json", "no-model-type", "not-causal", "short-positions"],
)
def test_bad_hf_config_is_a_one_line_error(capsys, tmp_path, make, message):
    path = make(tmp_path)
    line = _one_line_error(capsys, ["train", *TINY, "--out", str(tmp_path / "out"), "--hf-config", path])
    assert "--hf-config" in line and message in line


def _tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(["def f(x):\n    return x + 1\n" * 50, "import os\nclass A: pass\n" * 50], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.save_pretrained(directory)
    return str(directory), fast


def test_tokenizer_trains_on_token_ids_with_its_vocabulary(tmp_path):
    config = _hf_config(tmp_path / "config")
    directory, tokenizer = _tokenizer(tmp_path / "tokenizer")
    printed, results = _train(tmp_path / "out", "--recipes", "bf16", "--hf-config", config, "--tokenizer", directory)
    corpus = load_corpus(300_000)
    text = bytes(corpus.train.tolist()).decode("utf-8", "replace")
    want = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert results["corpus"]["unit"] == "token" and results["corpus"]["train_bytes"] == want
    assert "M tokens" in printed and math.isfinite(results["runs"]["bf16"]["val_loss"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (lambda d: ["--tokenizer", str(d)], "--tokenizer needs --hf-config"),
        (lambda d: ["--hf-config", _hf_config(d / "c"), "--tokenizer", str(d / "none")], "not a directory"),
        (lambda d: ["--hf-config", _hf_config(d / "c"), "--tokenizer", str(d / "c")], "no tokenizer could be loaded"),
    ],
    ids=["without-hf-config", "missing", "not-a-tokenizer"],
)
def test_bad_tokenizer_is_a_one_line_error(capsys, tmp_path, flags, message):
    line = _one_line_error(capsys, ["train", *TINY, "--out", str(tmp_path / "out"), *flags(tmp_path)])
    assert message in line


def test_a_directory_walk_skips_binary_files_and_says_how_many(tmp_path):
    files = _text_tree(tmp_path / "text")
    (tmp_path / "text" / "sub" / "__pycache__").mkdir()
    (tmp_path / "text" / "sub" / "__pycache__" / "m.pyc").write_bytes(b"\0\1")
    (tmp_path / "text" / "image.bin").write_bytes(b"PNG\0\0")
    corpus = load_corpus(300_000, data=[str(tmp_path / "text")])
    assert sorted(corpus.train_files + corpus.val_files) == files
    assert "(1 binary files skipped)" in corpus.describe()  # __pycache__ is not walked at all


def test_monitor_writes_numerics_and_heatmaps_and_changes_no_loss(tmp_path, two_recipes):
    printed, watched = _train(tmp_path, "--recipes", "bf16,naive", "--monitor", "2")
    _, _, plain = two_recipes
    assert watched["runs"]["naive"]["train_loss"] == plain["runs"]["naive"]["train_loss"]
    assert watched["config"]["monitor"] == 2
    folder = tmp_path / "numerics" / "naive"
    assert not (tmp_path / "numerics" / "bf16").exists()  # nothing to measure in bf16
    rows = [json.loads(line) for line in (folder / "numerics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [0, 2, 4]
    assert {r["layer"] for r in rows} == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc",
                                          "blocks.0.mlp.proj"}  # fmt: skip
    for stat in ("snr_db", "scale_zero"):
        png = folder / f"numerics_{stat}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in printed
