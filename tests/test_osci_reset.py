"""OsciReset: detection and reset of oscillating weights, schedule, memory, model kinds, checkpointing, errors.

The synthetic problem: one [16, 128] weight whose every 1x16 block holds a +-6 anchor, so every block
scale is 1 and the FP4 grid is {0, .5, 1, 1.5, 2, 3, 4, 6}. The loss 0.5 * ||Q_ste(W) - T||^2 (the
straight-through gradient of a quantized forward, Q = the recipe's fwd_w) moves W by lr * (Q(W) - T).

- 64 oscillators: T = +-2.51, W starts at +-2.45..2.48, next to the rounding edge 2.5 between 2 and 3.
  Below the edge the step is +0.051, above it -0.049: Q(W) flips between 2 and 3 on every step while W
  moves ~0.05, so D_q / D_w ~ 20 >= 8. After a reset W sits at 2 or 3 and needs ~10 steps to reach the
  edge again, so the steps right after a reset have no flip.
- 64 drifters: T = +-3, W starts at +-1.1: Q climbs 1 -> 1.5 -> 2 -> 3 once and stays (ratio ~1).
- the rest: T on the grid and Q(W) = T from the start (gradient 0, never move).
"""

import copy
import io
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from testing import requires_gpu
from torch.utils._python_dispatch import TorchDispatchMode

import fp4compile
from fp4compile import Recipe
from fp4compile import osci_layers as osci_layers_module
from fp4compile.linear_gemms import linear_forward
from fp4compile.nn import NVFP4Linear
from fp4compile.osci_reset import OsciReset, _dequantize_at

OUT, IN = 16, 128
START, PERIOD, WINDOW = 4, 30, 10
RESET_STEPS = [START + WINDOW + 1, START + PERIOD + WINDOW + 1]  # 15, 45
STEPS = 50
LR = 0.1


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- the synthetic problem
def _problem():
    """Initial weight, target and kind per element (0 still, 1 anchor, 2 oscillator, 3 drifter)."""
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    sign = torch.where(torch.rand(OUT, IN, generator=g) < 0.5, -1.0, 1.0)
    target = grid[torch.randint(0, 6, (OUT, IN), generator=g)] * sign
    weight = target + (torch.rand(OUT, IN, generator=g) - 0.5) * 0.2 * sign
    col = torch.arange(IN).expand(OUT, IN) % 16
    row = torch.arange(OUT)[:, None].expand(OUT, IN)
    anchor, osc, drift = col == 0, (col == 1) & (row < 8), (col == 2) & (row < 8)
    jitter = torch.rand(OUT, IN, generator=g) * 0.03
    target = torch.where(anchor, 6.0 * sign, torch.where(osc, 2.51 * sign, torch.where(drift, 3.0 * sign, target)))
    weight = torch.where(anchor, 6.0 * sign, torch.where(osc, (2.45 + jitter) * sign, weight))
    weight = torch.where(drift, 1.1 * sign, weight)
    kind = anchor.long() + 2 * osc.long() + 3 * drift.long()
    return weight, target, kind


class Toy(nn.Module):
    """``fc`` (tracked) and ``lm_head`` (kept in high precision by every recipe), both on the problem."""

    def __init__(self, weight, dtype=torch.float32):
        super().__init__()
        self.fc = nn.Linear(IN, OUT, bias=False, dtype=dtype)
        self.lm_head = nn.Linear(IN, OUT, bias=False, dtype=dtype)
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.lm_head.weight.copy_(weight)


def _q(w, recipe):
    """The recipe's forward weight quantization, dequantized to FP32."""
    return fp4compile.quantize(w.detach(), Recipe.named(recipe).fwd_w).dequantize(torch.float32)


def _ste_step(model, optimizer, target, recipe):
    loss = 0.0
    for w in (model.fc.weight, model.lm_head.weight):
        q = _q(w, recipe).to(w.dtype)
        loss = loss + 0.5 * ((w + (q - w).detach()).float() - target).square().sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


class _Probe:
    """A step post hook registered before OsciReset's: the weight as the optimizer left it, every step."""

    def __init__(self, optimizer, weight):
        self.weight, self.seen = weight, []
        optimizer.register_step_post_hook(lambda *_: self.seen.append(weight.detach().clone()))


def _run(
    recipe="tetrajet_v2", memory_efficient=False, with_reset=True, dtype=torch.float32, steps=STEPS, device="cpu", **kw
):
    weight, target, kind = _problem()
    model = Toy(weight, dtype).to(device)
    target, kind = target.to(device), kind.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    probe = _Probe(optimizer, model.fc.weight)
    osc = None
    if with_reset:
        osc = OsciReset(
            model, recipe, start=START, period=PERIOD, window=WINDOW, memory_efficient=memory_efficient, **kw
        )
        osc.register(optimizer)
    fc, head = [], []
    for _ in range(steps):
        _ste_step(model, optimizer, target, recipe)
        fc.append(model.fc.weight.detach().clone())
        head.append(model.lm_head.weight.detach().clone())
    return osc, probe, fc, head, kind


# ----------------------------------------------------------------------------- detection and reset
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["full", "memeff"])
@pytest.mark.parametrize("recipe", ["tetrajet_v2", "nvidia"])
def test_oscillating_weights_are_reset_at_the_scheduled_step(recipe, memory_efficient):
    osc, probe, fc, head, kind = _run(recipe, memory_efficient)
    oscillator = kind == 2
    tracked = 205 if memory_efficient else OUT * IN  # ceil(0.1 * 2048)
    history = osc.history
    assert [r["step"] for r in history] == RESET_STEPS
    for report in history:
        assert report["layers"] == {"fc.weight": {"tracked": tracked, "reset": 64}}
        assert (report["tracked"], report["reset"]) == (tracked, 64)
    assert osc.last_report() == history[-1]

    # Exactly the oscillators were reset, each to Q of the weight the optimizer produced at that step.
    for step in range(STEPS):
        changed = fc[step] != probe.seen[step]
        if step in RESET_STEPS:
            assert torch.equal(changed, oscillator)
            assert torch.equal(fc[step][changed], _q(probe.seen[step], recipe)[changed])
        else:
            assert not changed.any(), f"OsciReset changed weights at step {step}"

    # Flips of Q(W) from step s-1 to s, per oscillator: every step in the window, none right after the reset.
    qs = [_q(w, recipe) for w in fc]
    flips = torch.stack([(qs[s] != qs[s - 1]) & oscillator for s in range(1, STEPS)]).sum(dim=(1, 2))
    before = flips[START : RESET_STEPS[0]]  # steps START+1 .. reset step
    after = flips[RESET_STEPS[0] : RESET_STEPS[0] + 8]  # the 8 steps after the reset
    assert before.tolist() == [64] * len(before)
    assert after.sum() == 0
    assert flips[RESET_STEPS[1] : RESET_STEPS[1] + 4].sum() == 0

    # lm_head: never tracked, never touched (bitwise the run without OsciReset).
    assert list(osc.layers) == ["fc.weight"]
    _, _, fc_plain, head_plain, _ = _run(recipe, with_reset=False)
    assert all(torch.equal(a, b) for a, b in zip(head, head_plain))
    assert all(torch.equal(a, b) for a, b in zip(fc[: RESET_STEPS[0]], fc_plain[: RESET_STEPS[0]]))


@requires_gpu
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["full", "memeff"])
@pytest.mark.parametrize("recipe", ["tetrajet_v2", "nvidia"])
def test_gpu_weights_are_reset_to_the_specs_quantization(recipe, memory_efficient):
    # On CUDA, Q runs the Triton quantize kernels; the reset values must be the CPU spec's bits.
    osc, probe, fc, _, kind = _run(recipe, memory_efficient, device="cuda")
    cpu_osc = _run(recipe, memory_efficient)[0]
    assert osc.history == cpu_osc.history and [r["step"] for r in osc.history] == RESET_STEPS
    for step in RESET_STEPS:
        changed = (fc[step] != probe.seen[step]).cpu()
        assert torch.equal(changed, (kind == 2).cpu())
        assert torch.equal(fc[step].cpu()[changed], _q(probe.seen[step].cpu(), recipe)[changed])


def test_bf16_weights_are_reset_in_their_dtype():
    osc, probe, fc, _, kind = _run(dtype=torch.bfloat16, steps=RESET_STEPS[0] + 1)
    step = RESET_STEPS[0]
    changed = fc[step] != probe.seen[step]
    assert fc[step].dtype == torch.bfloat16 and changed.any() and not (changed & (kind != 2)).any()
    assert torch.equal(fc[step][changed], _q(probe.seen[step], "tetrajet_v2").to(torch.bfloat16)[changed])
    assert osc.bytes_per_weight() == 2 + 8 + 0.59375  # bf16 previous weight, 2 FP32 sums, packed Q


def test_one_log_line_per_reset(caplog):
    with caplog.at_level(logging.INFO, logger="fp4compile.osci_reset"):
        _run(steps=STEPS)
    lines = [r.getMessage() for r in caplog.records if r.name == "fp4compile.osci_reset"]
    assert len(lines) == 2
    assert lines[0].startswith("OsciReset step 15: reset 64 of 2048 tracked weights")
    assert lines[1].startswith("OsciReset step 45: ")


# ----------------------------------------------------------------------------- schedule and work
def test_schedule():
    osc = OsciReset(Toy(_problem()[0]), start=START, period=PERIOD, window=WINDOW)
    snapshots, resets = {4, 34, 64}, {15, 45, 75}
    tracks = set(range(5, 15)) | set(range(35, 45)) | set(range(65, 75))
    for step in range(80):
        want = ("snapshot",) if step in snapshots else ("track",) if step in tracks else ()
        assert osc.schedule(step) == (("reset",) if step in resets else want), step
    back_to_back = OsciReset(Toy(_problem()[0]), start=0, period=4, window=3)  # window + 1 == period
    track, both = ("track",), ("reset", "snapshot")
    assert [back_to_back.schedule(s) for s in range(9)] == [("snapshot",), *[track] * 3, both, *[track] * 3, both]


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["full", "memeff"])
def test_steps_outside_the_schedule_do_no_work(monkeypatch, memory_efficient):
    calls = []
    real = osci_layers_module.quantize

    def counting(*args, **kwargs):
        calls.append(len(steps_done))
        return real(*args, **kwargs)

    steps_done = []
    monkeypatch.setattr(osci_layers_module, "quantize", counting)
    weight, target, _ = _problem()
    model = Toy(weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    osc = OsciReset(model, start=START, period=PERIOD, window=WINDOW, memory_efficient=memory_efficient)
    osc.register(optimizer)
    held = []
    for step in range(STEPS):
        _ste_step(model, optimizer, target, "tetrajet_v2")
        steps_done.append(step)
        held.append(osc.bytes_held())
    # One quantization per tracked weight on snapshot, tracked and reset steps; none on the others.
    scheduled = [s for s in range(STEPS) if osc.schedule(s)]
    assert calls == scheduled and len(calls) == 2 * (WINDOW + 2)
    window_steps = {s for s in range(STEPS) if osc.schedule(s) in (("snapshot",), ("track",))}
    assert all((held[s] > 0) == (s in window_steps) for s in range(STEPS))

    # Not a single tensor operation (allocation included) on idle steps: before start and between windows.
    idle = OsciReset(Toy(weight), start=START, period=PERIOD, window=WINDOW, memory_efficient=memory_efficient)
    for step in range(RESET_STEPS[0] + 3):
        if idle.schedule(step):
            idle.on_step()
            continue
        with _CountOps() as counter:
            idle.on_step()
        assert counter.ops == [], f"step {step} ran {counter.ops}"
    assert idle.step == RESET_STEPS[0] + 3


# ----------------------------------------------------------------------------- memory
@pytest.mark.parametrize(
    ("recipe", "memory_efficient", "per_weight"),
    [("tetrajet_v2", False, 12.59375), ("nvidia", False, 12.5625 + 4 / 2048), ("tetrajet_v2", True, 20 * 205 / 2048)],
)
def test_bytes_held_stay_within_the_documented_bound(recipe, memory_efficient, per_weight):
    weight, target, _ = _problem()
    model = Toy(weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    osc = OsciReset(model, recipe, start=START, period=PERIOD, window=WINDOW, memory_efficient=memory_efficient)
    osc.register(optimizer)
    assert osc.bytes_per_weight() == per_weight
    assert osc.bytes_bound() == per_weight * OUT * IN
    peak = 0
    for _ in range(RESET_STEPS[0] + 2):
        _ste_step(model, optimizer, target, recipe)
        held = osc.bytes_held()
        assert held <= osc.bytes_bound()
        peak = max(peak, held)
    assert peak == osc.bytes_bound() and osc.bytes_held() == 0
    if memory_efficient:
        assert osc.bytes_per_weight() <= 0.1 * 20 + 20 / (OUT * IN)  # 2.0 B per weight, rounded up to whole elements


def test_memory_efficient_bound_scales_with_sample_fraction():
    model = Toy(_problem()[0])
    for fraction, sampled in ((1.0, 2048), (0.25, 512), (0.01, 21)):
        osc = OsciReset(model, start=0, memory_efficient=True, sample_fraction=fraction)
        assert osc.bytes_bound() == sampled * 20


def test_dequantize_at_is_bitwise_dequantize():
    for spec in ("double_block_rtn", "rtn", "rtn_2d", "rtn_4over6"):
        w = torch.randn(32, 256) * torch.rand(32, 1) * 3
        q = fp4compile.quantize(w, spec)
        index = torch.randperm(w.numel())[:300].sort().values.to(torch.int32)
        got = _dequantize_at(q, index, 256)
        assert torch.equal(got, q.dequantize(torch.float32).reshape(-1)[index.long()])


@pytest.mark.parametrize("recipe", ["tetrajet_v2", "nvidia", "quartet_ii"])
def test_q_is_the_forward_weight_quantization_padding_included(recipe):
    """in_features=48 is padded to 128 by the forward's double-block quantizer; Q pads alike."""
    model = nn.Sequential(nn.Linear(48, 32, bias=False))
    osc = OsciReset(model, recipe, start=0)
    layer = osc._layers["0.weight"]
    q = osc._quantize(layer)
    x = torch.randn(4, 48)
    saved = linear_forward(x, model[0].weight.detach(), None, Recipe.named(recipe))
    if saved[4].numel():  # recipes that save the forward quantization of W
        assert torch.equal(q.codes, saved[4]) and torch.equal(q.scales.view(torch.uint8), saved[5])
    padded = F.pad(model[0].weight.detach(), (0, layer.k_padded - 48))
    want = fp4compile.quantize(padded, Recipe.named(recipe).fwd_w).dequantize(torch.float32)[:, :48]
    assert torch.equal(osc._dequantized(layer, q), want)


def test_autocast_dtype_quantizes_the_weight_the_forward_sees():
    model = nn.Sequential(nn.Linear(128, 32, bias=False))
    osc = OsciReset(model, start=0, autocast_dtype=torch.bfloat16)
    layer = osc._layers["0.weight"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what nvfp4_linear quantizes under autocast
        seen = fp4compile.linear._autocast_inputs(torch.randn(4, 128), model[0].weight, None)[1]
    want = fp4compile.quantize(seen.detach(), "double_block_rtn").dequantize(torch.float32)
    assert seen.dtype == torch.bfloat16 and torch.equal(osc._dequantized(layer, osc._quantize(layer)), want)


# ----------------------------------------------------------------------------- which weights
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(128, 64)
        self.fc2 = nn.Linear(64, 128)
        self.odd = nn.Linear(128, 24)
        self.lm_head = nn.Linear(128, 32, bias=False)

    def forward(self, x):
        h = x + self.fc2(F.relu(self.fc1(x)))
        return self.lm_head(h), self.odd(h)


def _train_net(model, optimizer, steps, weight, seed=0):
    """Train on random data; ``weight`` after every step (after every post hook)."""
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        x = torch.randn(16, 128, generator=g)
        logits, side = model(x)
        loss = logits.square().mean() + side.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append(weight.detach().clone())
    return seen


def test_plain_model_tracks_eligible_linears_only():
    net = Net()
    assert OsciReset(net, start=0).layers == {"fc1.weight": "tetrajet_v2", "fc2.weight": "tetrajet_v2"}
    assert list(OsciReset(net, start=0, skip=["fc2"]).layers) == ["fc1.weight"]
    nested = nn.ModuleDict({"decoder": Net()})
    assert list(OsciReset(nested, start=0).layers) == ["decoder.fc1.weight", "decoder.fc2.weight"]  # not *.lm_head
    assert list(OsciReset(net, start=0, weights=["lm_head.weight"]).layers) == ["lm_head.weight"]


def test_compiled_model_with_nvfp4_backend():
    torch.manual_seed(0)
    net = Net()
    compiled = torch.compile(net, backend="nvfp4", options={"recipe": "tetrajet_v2", "inner": "aot_eager"})
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.5)
    probe = _Probe(optimizer, net.fc1.weight)
    osc = OsciReset(compiled, "tetrajet_v2", start=1, period=6, window=2, threshold=1.0)
    assert list(osc.layers) == ["fc1.weight", "fc2.weight"]  # no _orig_mod, no lm_head, no odd
    assert osc._layers["fc1.weight"].param is net.fc1.weight
    osc.register(optimizer)
    after = _train_net(compiled, optimizer, 11, net.fc1.weight)
    history = osc.history
    assert [r["step"] for r in history] == [4, 10]
    for report in history:  # what was reset is Q of the weight the optimizer produced
        step, counts = report["step"], report["layers"]["fc1.weight"]
        changed = after[step] != probe.seen[step]
        already_on_grid = _q(probe.seen[step], "tetrajet_v2") == probe.seen[step]  # reset to their own value
        assert counts["tracked"] == 128 * 64 and 0 < changed.sum() <= counts["reset"]
        assert counts["reset"] <= (changed | already_on_grid).sum()
        assert torch.equal(after[step][changed], _q(probe.seen[step], "tetrajet_v2")[changed])
    skipping = torch.compile(Net(), backend="nvfp4", options={"recipe": "nvidia", "skip": ["fc1"]})
    assert list(OsciReset(skipping, "nvidia", start=0, skip=["fc1"]).layers) == ["fc2.weight"]  # explicit, as compiled


def test_converted_model_uses_the_layers_recipe():
    net = Net()
    net.fc1 = NVFP4Linear.from_linear(net.fc1, "nvidia")
    osc = OsciReset(net, "tetrajet_v2", start=0, period=3, window=1)
    # Converted: only the NVFP4Linear is quantized; fc2 stayed an nn.Linear (high precision) on purpose.
    assert osc.layers == {"fc1.weight": "nvidia"}
    assert osc._layers["fc1.weight"].spec == Recipe.named("nvidia").fwd_w
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    osc.register(optimizer)
    _train_net(net, optimizer, 3, net.fc1.weight)
    assert [r["step"] for r in osc.history] == [2]
    compiled = torch.compile(net, backend="nvfp4", options={"recipe": "quartet_ii", "inner": "aot_eager"})
    assert OsciReset(compiled, "tetrajet_v2", start=0).layers == {"fc1.weight": "nvidia"}  # its own recipe still


def test_torchao_quantize_converted_model():
    pytest.importorskip("torchao.quantization")
    from torchao.quantization import quantize_

    from fp4compile.torchao_integration import NVFP4Config

    net = Net()
    config = NVFP4Config(recipe="quartet_ii")
    quantize_(net, config, filter_fn=config.filter_fn)
    assert OsciReset(net, start=0).layers == {"fc1.weight": "quartet_ii", "fc2.weight": "quartet_ii"}


# ----------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["full", "memeff"])
@pytest.mark.parametrize("split", [9, 20])  # inside the first window, between windows
def test_resumed_run_is_bitwise_the_uninterrupted_run(memory_efficient, split):
    weight, target, _ = _problem()

    def fresh():
        model = Toy(weight)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
        osc = OsciReset(model, start=START, period=PERIOD, window=WINDOW, memory_efficient=memory_efficient)
        osc.register(optimizer)
        return model, optimizer, osc

    model, optimizer, straight_osc = fresh()
    straight, straight_states = [], []
    for _ in range(STEPS):
        _ste_step(model, optimizer, target, "tetrajet_v2")
        straight.append(model.fc.weight.detach().clone())
        straight_states.append(copy.deepcopy(straight_osc.state_dict()))

    model, optimizer, osc = fresh()
    for _ in range(split):
        _ste_step(model, optimizer, target, "tetrajet_v2")
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "osc": osc.state_dict()}, buffer)
    del model, optimizer, osc
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, optimizer, resumed = fresh()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optim"])
    resumed.load_state_dict(checkpoint["osc"])
    assert resumed.step == split
    for step in range(split, STEPS):
        _ste_step(model, optimizer, target, "tetrajet_v2")
        assert torch.equal(model.fc.weight, straight[step]), f"diverged at step {step}"
        _assert_states_equal(resumed.state_dict(), straight_states[step])
    assert resumed.history == straight_osc.history and len(resumed.history) == 2


def _assert_states_equal(got, want):
    assert (got["step"], got["config"], got["history"]) == (want["step"], want["config"], want["history"])
    assert got["layers"].keys() == want["layers"].keys()
    for fqn, state in want["layers"].items():
        assert got["layers"][fqn].keys() == state.keys()
        for name, tensor in state.items():
            assert got["layers"][fqn][name].dtype == tensor.dtype
            assert torch.equal(got["layers"][fqn][name], tensor), (fqn, name)


def test_load_state_dict_rejects_another_schedule():
    model = Toy(_problem()[0])
    state = OsciReset(model, start=START, period=PERIOD, window=WINDOW).state_dict()
    with pytest.raises(ValueError, match="period=30 but this OsciReset has 40"):
        OsciReset(model, start=START, period=40, window=WINDOW).load_state_dict(state)
    with pytest.raises(ValueError, match="memory_efficient"):
        OsciReset(model, start=START, period=PERIOD, window=WINDOW, memory_efficient=True).load_state_dict(state)
    with pytest.raises(ValueError, match="not an OsciReset state_dict"):
        OsciReset(model, start=START).load_state_dict({"step": 3})


# ----------------------------------------------------------------------------- errors and hooks
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, "threshold must be a positive number"),
        ({"threshold": -8}, "threshold must be a positive number"),
        ({"window": 201}, r"window \(201\) must be smaller than period \(200\)"),
        ({"window": 200}, r"window \(200\) must be smaller than period \(200\)"),
        ({"sample_fraction": 0.0}, r"sample_fraction must lie in \(0, 1\]"),
        ({"sample_fraction": 1.5}, r"sample_fraction must lie in \(0, 1\]"),
        ({"start": -1}, "start must be a non-negative integer"),
        ({"period": 0}, "period must be a positive integer"),
        ({"recipe": "tetrajet"}, "unknown recipe 'tetrajet'; valid recipes: nvidia, tetrajet_v2"),
        ({"recipe": "bf16"}, "recipe 'bf16' quantizes nothing"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    kwargs = {"start": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        OsciReset(Toy(_problem()[0]), **kwargs)


def test_model_without_eligible_weights_raises():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = nn.Linear(128, 24)
            self.lm_head = nn.Linear(128, 32)

    with pytest.raises(ValueError, match="found no eligible weight in Head"):
        OsciReset(Head(), start=0)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        OsciReset(lambda x: x, start=0)
    with pytest.raises(ValueError, match="no parameter 'nope.weight'"):
        OsciReset(Toy(_problem()[0]), start=0, weights=["nope.weight"])


def test_register_remove_and_register_again():
    weight, target, _ = _problem()
    model = Toy(weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    osc = OsciReset(model, start=START)
    handle = osc.register(optimizer)
    with pytest.raises(RuntimeError, match="already registered"):
        osc.register(optimizer)
    _ste_step(model, optimizer, target, "tetrajet_v2")
    handle.remove()
    _ste_step(model, optimizer, target, "tetrajet_v2")
    assert osc.step == 1
    with osc.register(optimizer):
        _ste_step(model, optimizer, target, "tetrajet_v2")
    _ste_step(model, optimizer, target, "tetrajet_v2")
    assert osc.step == 2
    frozen = torch.optim.SGD([model.lm_head.weight], lr=LR)
    with pytest.raises(ValueError, match="updates none of the tracked weights"):
        OsciReset(model, start=0).register(frozen)
