"""NumericsMonitor: statistics against the reference quantizer, the probe's operands, and that it changes nothing."""

import json
import math
import sys

import pytest
import torch
import torch.nn as nn
from testing import KERNEL_DEVICE, requires_gpu
from torch.utils._python_dispatch import TorchDispatchMode

import fp4compile
from fp4compile import NumericsMonitor, QuantSpec, Recipe
from fp4compile.backend import BackendOptions
from fp4compile.format import E2M1_VALUES, TE_RHT_SIGNS, quantize_reference
from fp4compile.monitor import slot_operands
from fp4compile.nn import NVFP4Linear
from fp4compile.operand_stats import STATS, dequantized, operand_stats, quantize_padded


def _planted(rows=48, k=256):
    """An operand with a hot column, blocks far below the amax (their E4M3 scales flush or go subnormal)."""
    torch.manual_seed(0)
    t = torch.randn(rows, k)
    t[:, 37] *= 60.0  # the hot channel
    t[:4, 64:80] = 1e-9  # scale 2^-30 of the amax: flushes to 0
    t[4:8, 96:112] *= 1e-3  # a subnormal E4M3 scale
    t[8:10, 128:144] = 0.0  # an all-zero block: not counted as flushed
    return t


def _expected(t: torch.Tensor, spec: QuantSpec, top: int) -> dict:
    """The statistics computed independently in float64 from format.quantize_reference."""
    rows, k = t.shape
    signs = torch.tensor(TE_RHT_SIGNS) if spec.rotation == "rht16_te" else None
    q = quantize_reference(t, spec, signs=signs)
    x = t.double()
    deq = q.dequantize(torch.float64)
    scales = q.scales.double()
    blocks = x.abs().view(rows, k // 16, 16).amax(-1)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    codes = torch.stack([q.codes & 0xF, q.codes >> 4], -1).flatten(1).long()
    column = x.square().sum(0)
    order = torch.argsort(column, descending=True)[:top]
    return {
        "amax": x.abs().max().item(),
        "snr_db": 10 * math.log10(x.square().sum().item() / (x - deq).square().sum().item()),
        "scale_zero": ((scales == 0) & (blocks > 0)).sum().item() / (blocks > 0).sum().item(),
        "scale_subnormal": ((scales > 0) & (scales < 2**-6)).double().mean().item(),
        "elem_saturated": (table[codes].abs() == 6).double().mean().item(),
        "scale_saturated": (scales == 448).double().mean().item(),
        "top_share": column[order].sum().item() / column.sum().item(),
        "top_channels": order.tolist(),
    }


@pytest.mark.parametrize("name", ["rtn", "rtn_2d", "double_block_rtn", "rtn_4over6", "rht16_rtn_te"])
def test_statistics_equal_the_reference_quantizers(name):
    t, spec = _planted(), QuantSpec.named(name)
    got = {k: v.tolist() if v.dim() else v.item() for k, v in operand_stats(t, spec, top=4).items()}
    want = _expected(t, spec, 4)
    assert got["top_channels"] == want["top_channels"] and got["top_channels"][0] == 37
    for stat in STATS[:-1]:
        assert got[stat] == pytest.approx(want[stat], rel=1e-5, abs=1e-7), stat
    if name in ("rtn", "rtn_4over6"):  # per-tensor scales: the planted blocks flush, or keep a subnormal scale
        assert got["scale_zero"] == pytest.approx(4 / (48 * 256 // 16 - 2), rel=1e-6) and got["scale_subnormal"] > 0


_KERNEL_CASES = ["planted", "fp32", "transposed_odd_k", "rows_padded_2d", "double_block", "rotated", "with_nan"]


@pytest.mark.parametrize("case", _KERNEL_CASES)
def test_measuring_kernel_equals_the_reference(case):
    """The Triton kernel of the measurement (``kernels/stats.py``; in Triton's interpreter on CPU machines) against
    its torch definition: counts and max equal, sums equal up to their order; the dequantization decoded in the
    kernel (per-tensor and per-1x128-block outer scales) or, for a rotated quantization, given to it."""
    from fp4compile.kernels.stats import operand_sums_triton
    from fp4compile.operand_sums import operand_sums_reference

    names = {"rows_padded_2d": "rtn_2d", "double_block": "double_block_rtn", "rotated": "rht16_rtn_te"}
    spec = QuantSpec.named(names.get(case, "rtn"))
    t = _planted(rows=40, k=320 if case != "double_block" else 384).to(
        torch.float32 if case == "fp32" else torch.bfloat16
    )
    if case == "transposed_odd_k":  # a wgrad operand: a transposed view, K = 199 tokens (odd, not a block multiple)
        base = _planted(rows=199, k=48)
        base[16:32, 3] = 1e-9  # one block of row 3 once transposed: flushes
        t = base.to(torch.bfloat16).T
    if case == "with_nan":
        t[3, 5] = float("nan")
    t = t.to(KERNEL_DEVICE)
    rows, k = t.shape
    q = quantize_padded(t, spec)
    deq = dequantized(q, rows, k)
    if case == "rotated":
        got = operand_sums_triton(t, q.codes, q.scales, deq=deq)
    else:
        got = operand_sums_triton(t, q.codes, q.scales, outer=q.outer)
    want = operand_sums_reference(t, deq, q.codes, q.scales)
    assert got[2].tolist() == want[2].tolist()
    got, want = [g.cpu() for g in got], [w.cpu() for w in want]
    if case == "with_nan":  # a NaN amax (codes and scales of a NaN tensor are unspecified: counted as they are)
        assert got[1][2].isnan() and want[1][2].isnan() and want[2][0] > 0
        return
    assert want[2][0] > want[2][1] and want[2][3] > 0  # nonzero blocks, of them flushed; elements at 6
    assert want[2][1] > 0 or case in ("rows_padded_2d", "double_block", "rotated")  # (other scale granularities)
    assert got[1][2] == want[1][2]  # max |x|
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1][:2], want[1][:2], rtol=1e-6, atol=0)


def test_measuring_kernel_names_bad_arguments():
    from fp4compile.kernels.stats import operand_sums_triton

    t = torch.randn(16, 32, device=KERNEL_DEVICE)
    q = quantize_padded(t, QuantSpec.named("rtn"))
    with pytest.raises(ValueError, match="either deq .* or outer"):
        operand_sums_triton(t, q.codes, q.scales)
    with pytest.raises(ValueError, match="deq must be FP32"):
        operand_sums_triton(t, q.codes, q.scales, deq=t.double())


def test_operands_measured_together_equal_each_measured_alone():
    """``measure`` over many operands (the monitor measures a probe at once: one buffer, one top-k over rows of
    different widths) gives each operand the statistics it has alone; a narrow operand reports only its own
    channels, even when ``top`` exceeds its width."""
    from fp4compile.operand_stats import derive, measure

    operands = [
        (_planted(48, 256).to(KERNEL_DEVICE), QuantSpec.named("rtn")),
        (_planted(40, 200).to(KERNEL_DEVICE).T, QuantSpec.named("rht16_rtn_te")),
        (torch.randn(16, 16, device=KERNEL_DEVICE), QuantSpec.named("rtn_2d")),
    ]
    top = 20
    together = measure(operands, top)
    stats = derive(together.sums, together.counts, together.sizes)
    assert together.top_counts == (20, 20, 16)
    for i, (t, spec) in enumerate(operands):
        alone = operand_stats(t, spec, top)
        channels = together.top_channels[i, : together.top_counts[i]]
        assert channels.tolist() == alone["top_channels"].tolist() and channels.max() < t.shape[1]
        for stat in STATS[:-1]:
            assert stats[stat][i].item() == pytest.approx(alone[stat].item(), rel=1e-6, nan_ok=True), (i, stat)
    assert sorted(together.top_channels[2, :16].tolist()) == list(range(16))  # all of its channels, no padding


def test_padding_is_left_out_and_bad_operands_are_refused():
    t = _planted(rows=40, k=200)  # K and rows padded for double-block and 16x16 scales
    for name in ("double_block_rtn", "rtn_2d"):
        stats = operand_stats(t, QuantSpec.named(name))
        assert 0 < stats["elem_saturated"].item() < 1 and stats["top_channels"].max().item() < 200
    plain = operand_stats(t[:, :192], QuantSpec.named("rtn"))
    assert plain["snr_db"].item() > 10
    odd = t[:, :199] * 40  # an odd K (wgrad operands: K = tokens): the last byte's high nibble is padding
    codes = quantize_padded(odd, QuantSpec.named("rtn")).codes[:40]
    nibbles = torch.stack([codes & 0xF, codes >> 4], -1).flatten(1)[:, :199]
    saturated = ((nibbles & 0x7) == 0x7).double().mean().item()
    assert saturated > 0
    assert operand_stats(odd, QuantSpec.named("rtn"))["elem_saturated"].item() == pytest.approx(saturated, rel=1e-6)
    with pytest.raises(ValueError, match="non-empty 2-D operand"):
        operand_stats(torch.randn(16), QuantSpec.named("rtn"))


def test_slot_operands_follow_the_recipe_sources():
    torch.manual_seed(0)
    x, w, dy = torch.randn(32, 64), torch.randn(48, 64), torch.randn(32, 48)
    plain = slot_operands(Recipe.named("nvidia"), x, w, dy)
    assert list(plain) == ["fwd.x", "fwd.w", "dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x"]
    assert torch.equal(plain["dgrad.w"], w.T) and torch.equal(plain["wgrad.x"], x.T)
    tj = slot_operands(Recipe.named("tetrajet_v2"), x, w, None)  # W^T and X^T re-quantized from the forward's
    spec = QuantSpec.named("double_block_rtn")
    pad = torch.nn.functional.pad
    assert torch.equal(tj["dgrad.w"], quantize_reference(pad(w, (0, 64)), spec).dequantize()[:, :64].T)
    assert torch.equal(tj["wgrad.x"], quantize_reference(pad(x, (0, 64)), spec).dequantize()[:, :64].T)
    assert "dgrad.dy" not in tj
    wang = slot_operands(Recipe.named("fp4_dge_occ"), x, w, dy)  # only the NVFP4 slots
    assert all(isinstance(Recipe.named("fp4_dge_occ").spec(s), QuantSpec) for s in wang)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(64, 128), nn.BatchNorm1d(128), nn.Linear(128, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _train(steps, monitor_every=None, converted=True, recipe="nvidia"):
    torch.manual_seed(0)
    net = _Net()
    if converted:
        net.fc1, net.fc2 = NVFP4Linear.from_linear(net.fc1, recipe), NVFP4Linear.from_linear(net.fc2, recipe)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x = torch.randn(64, 64)
    monitor = None if monitor_every is None else NumericsMonitor(net, every=monitor_every, recipe=recipe)
    model = net if converted else torch.compile(net, backend="nvfp4", options={"recipe": recipe, "inner": "aot_eager"})
    for _ in range(steps):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if monitor is not None:
            monitor.step(lambda m: m(x).square().mean())
    return net, monitor


@pytest.mark.parametrize("converted", [True, False])
def test_training_is_bit_identical_with_the_monitor(converted):
    base, _ = _train(4, converted=converted)
    watched, monitor = _train(4, monitor_every=1, converted=converted)
    for (name, a), b in zip(base.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name  # weights, BatchNorm statistics: the probes left no trace
    assert {r["step"] for r in monitor.rows} == {0, 1, 2, 3}
    layers = {(r["layer"], r["slot"]) for r in monitor.rows}
    assert len(layers) == 12 and {layer for layer, _ in layers} == {"fc1", "fc2"}


def test_probe_measures_the_operands_the_layer_saw():
    net, monitor = _train(0, monitor_every=1)
    x = torch.randn(64, 64)
    rows = monitor.step(lambda m: m(x).square().mean())
    got = {(r["layer"], r["slot"], r["stat"]): r["value"] for r in rows}
    seen = {}

    def hook(module, args, out):
        seen["x"] = args[0].detach()
        out.register_hook(lambda g: seen.__setitem__("dy", g))

    net.fc2.register_forward_hook(hook)
    net(x).square().mean().backward()
    fwd = operand_stats(seen["x"], QuantSpec.named("rtn"))  # nvidia fwd.x: deterministic
    for stat in ("amax", "snr_db", "scale_zero", "elem_saturated", "top_share"):
        assert got[("fc2", "fwd.x", stat)] == pytest.approx(fwd[stat].item(), rel=1e-6), stat
    dy = seen["dy"]
    assert got[("fc2", "dgrad.dy", "amax")] == pytest.approx(dy.abs().max().item(), rel=1e-6)
    assert (
        got[("fc2", "wgrad.dy", "top_channels")] == operand_stats(dy.T, QuantSpec.named("rtn"))["top_channels"].tolist()
    )


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_off_steps_do_nothing_and_compiled_graphs_do_not_change():
    net, monitor = _train(1, monitor_every=3, converted=False)
    calls = []
    with _CountOps() as ops:
        assert monitor.step(lambda m: calls.append(m)) is None  # step 1 of every 3: no probe
        assert monitor.step(lambda m: calls.append(m)) is None
    assert ops.count == 0 and calls == []

    torch._dynamo.reset()
    frames = []

    def counting(gm, inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(net, backend=counting)
    x = torch.randn(64, 64)
    compiled(x).sum().backward()
    before = len(frames)
    for _ in range(3):
        compiled(x).sum().backward()
        monitor.step(lambda m: m(x).sum())
    assert len(frames) == before == 1  # no recompilation, no graph break


def test_a_probe_reads_its_statistics_from_the_device_once(monkeypatch):
    """All statistics of a probe come to the host in one transfer per device (a host synchronization each on a
    GPU), not one per statistic (12 operands x 8 statistics here)."""
    net, monitor = _train(0, monitor_every=1)
    reads = []

    def counted(name, original):
        def read(t, *args):
            caller = sys._getframe(1).f_code.co_filename  # the monitor's reads (the CPU reference has host constants)
            if caller.endswith(("monitor.py", "operand_stats.py")):
                reads.append(name)
            return original(t, *args)

        return read

    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    x = torch.randn(64, 64)
    rows = monitor.step(lambda m: m(x).square().mean())
    monkeypatch.undo()
    assert len(rows) == 12 * 8 and reads == ["tolist", "tolist"]  # the numbers, then the channel indices
    assert all(r["value"] is None or isinstance(r["value"], (float, list)) for r in rows)


def test_backend_option_tells_the_recipe_and_logs_are_written(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    monitor = NumericsMonitor(net, every=2, log=tmp_path / "numerics.jsonl")
    csv_monitor = NumericsMonitor(net, every=2, recipe="quartet_ii", log=tmp_path / "numerics.csv")
    with pytest.raises(ValueError, match="no recipe was given"):
        monitor.layers()
    options = {"recipe": "quartet_ii", "inner": "aot_eager", "monitor": monitor}
    compiled = torch.compile(net, backend="nvfp4", options=options)
    x = torch.randn(32, 64)
    compiled(x).sum().backward()
    assert monitor.recipe.name == "quartet_ii"
    for m in (monitor, csv_monitor):
        m.step(lambda mod: mod(x).sum())
    lines = (tmp_path / "numerics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 6 * len(STATS)
    first = json.loads(lines[0])
    assert first["step"] == 0 and first["layer"] == "fc1" and first["slot"] == "fwd.x" and first["stat"] == "amax"
    csv_lines = (tmp_path / "numerics.csv").read_text().splitlines()
    assert csv_lines[0] == "step,layer,slot,stat,value" and len(csv_lines) == 1 + len(lines)


def test_bad_input_is_named():
    net = _Net()
    with pytest.raises(ValueError, match="every must be a positive integer"):
        NumericsMonitor(net, every=0, recipe="nvidia")
    with pytest.raises(ValueError, match=r"log must end in \.jsonl or \.csv"):
        NumericsMonitor(net, recipe="nvidia", log="numerics.txt")
    with pytest.raises(ValueError, match="unknown recipe"):
        NumericsMonitor(net, recipe="nvfp5")
    with pytest.raises(TypeError, match="expects an nn.Module"):
        NumericsMonitor("net", recipe="nvidia")
    monitor = NumericsMonitor(net, recipe="nvidia")
    with pytest.raises(ValueError, match="loss_fn ran none of the quantized linears"):
        monitor.step(lambda m: torch.zeros((), requires_grad=True))
    with pytest.raises(TypeError, match="'monitor' must be a fp4compile.NumericsMonitor, got str"):
        BackendOptions.parse({"monitor": "yes"})
    assert fp4compile.NumericsMonitor is NumericsMonitor


def test_probe_runs_compiled_modules_eagerly():
    """A loss_fn that calls the compiled model (or a model whose blocks are compiled, as under FSDP2) is probed
    eagerly (``torch.compiler.set_stance("force_eager")``): the same rows as calling the module, no compilation."""
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(16, 64)
    compiled = torch.compile(net, backend="nvfp4", options={"recipe": "nvidia", "inner": "aot_eager"})
    rows, graphs = [], torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for loss_fn in (lambda m: m(x).square().mean(), lambda m: compiled(x).square().mean()):
        torch.manual_seed(1)
        rows.append(NumericsMonitor(net, recipe="nvidia").step(loss_fn))
    assert rows[0] == rows[1] and len(rows[0]) == 2 * 6 * len(STATS)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing was compiled


def test_through_quantize_each_layer_keeps_its_recipe():
    torchao = pytest.importorskip("torchao")
    torch.manual_seed(0)
    net = _Net()
    config = fp4compile.NVFP4Config(recipe="quartet_ii", skip=["fc2"])
    torchao.quantization.quantize_(net, config, filter_fn=config.filter_fn)
    monitor = NumericsMonitor(net, every=1)  # no recipe needed: the converted layers carry theirs
    x = torch.randn(32, 64)
    rows = monitor.step(lambda m: m(x).square().mean())
    assert [(fqn, r.name) for fqn, _, r in monitor.layers()] == [("fc1", "quartet_ii")]
    assert {r["layer"] for r in rows} == {"fc1"} and len({r["slot"] for r in rows}) == 6


@requires_gpu
@pytest.mark.parametrize("name", ["rtn", "rtn_2d", "double_block_rtn", "rtn_4over6", "rht16_rtn_te"])
def test_gpu_statistics_equal_the_cpu_ones(name):
    """The GPU's statistics (Triton quantization and measuring kernel) against the CPU's (the
    reference, eager torch ops)."""
    t, spec = _planted(rows=4096, k=2048), QuantSpec.named(name)
    gpu, cpu = operand_stats(t.cuda(), spec), operand_stats(t, spec)
    for stat in STATS:
        exact = stat not in ("snr_db", "top_share")  # sums in another order on the GPU
        assert gpu[stat].cpu().tolist() == pytest.approx(cpu[stat].tolist(), rel=0 if exact else 1e-5), stat


@requires_gpu
def test_gpu_probe_under_autocast_leaves_training_unchanged():
    def run(every):
        torch.manual_seed(0)
        net = _Net().cuda()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        compiled = torch.compile(net, backend="nvfp4", options={"recipe": "nvidia"})
        monitor = None if every is None else NumericsMonitor(net, every=every, recipe="nvidia")
        x = torch.randn(256, 64, device="cuda")
        for _ in range(4):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if monitor is not None:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    monitor.step(lambda m: m(x).square().mean())
        return net, monitor

    base, _ = run(None)
    watched, monitor = run(2)
    for a, b in zip(base.state_dict().values(), watched.state_dict().values()):
        assert torch.equal(a, b)
    assert {r["step"] for r in monitor.rows} == {0, 2}


def test_tensorboard_logger_or_a_clear_error(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the tensorboard package"):
            NumericsMonitor(_Net(), recipe="nvidia", tensorboard=tmp_path / "tb")
        return
    net = _Net()
    monitor = NumericsMonitor(net, recipe="nvidia", tensorboard=tmp_path / "tb")
    monitor.step(lambda m: m(torch.randn(16, 64)).sum())
    assert any((tmp_path / "tb").iterdir())  # an events file with the scalars


@requires_gpu
@pytest.mark.parametrize("recipe", ["nvidia", "quartet_ii"])
def test_gpu_probe_synchronizes_only_to_read_its_results(recipe):
    """A probe on a GPU waits for the device twice, for its two reads (the numbers, the channel indices): no
    host-to-device copy of a constant and no read inside the measurement (each would stall the host)."""
    import warnings

    torch.manual_seed(0)
    net = _Net().cuda()
    monitor = NumericsMonitor(net, every=1, recipe=recipe)
    x = torch.randn(256, 64, device="cuda")
    monitor.step(lambda m: m(x).square().mean())  # first probe: kernels compiled, nothing else measured
    monitor.steps = 0
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            rows = monitor.step(lambda m: m(x).square().mean())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]  # (not the mode's own notice)
    assert len(rows) == 2 * 6 * len(STATS) and len(syncs) == 2, [str(w.message)[:120] for w in syncs]
