"""Data-parallel training with ``backend="nvfp4"`` on 2 processes: DDP and FSDP2, per-rank random streams.

Two settings: 2 CPU processes (gloo, ``inner="aot_eager"``), always; and 2 GPUs (NCCL, Inductor), where the
machine has them. Each setting spawns its 2 ranks once and the tests check several things from their
results, to keep the suite short: a deterministic recipe under DDP (compiled after wrapping) and FSDP2
(``fully_shard`` per block, each block compiled after sharding) equals one process that runs the same
micro-batches and averages their gradients; stochastic recipes train with finite losses; OsciReset keeps
DDP replicas identical; and the stochastic rounding and random signs of the quantized linear differ
between ranks, yet repeat when a rank is re-seeded.
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import fp4compile
from fp4compile.linear import nvfp4_linear
from fp4compile.operand_stats import STATS
from fp4compile.streams import stream_seed

WORLD = 2
STEPS = 3
D = 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


_TEACHER = torch.randn(D, D, generator=torch.Generator().manual_seed(99)) / D**0.5


def _batch(step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank's micro-batch of a learnable task: a fixed random linear map."""
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(1000 * step + rank))
    return x.to(device), (x @ _TEACHER).to(device)


@dataclass(frozen=True)
class Setting:
    """Where the ranks run: the device type, the process-group backend and the backend's inner compiler."""

    device: str
    backend: str
    inner: str

    def rank_device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank) if self.device == "cuda" else torch.device("cpu")

    def options(self, recipe: str) -> dict:
        return {"recipe": recipe, "inner": self.inner}


CPU = Setting("cpu", "gloo", "aot_eager")
CUDA = Setting("cuda", "nccl", "inductor")
STOCHASTIC = ("nvidia", "quartet_ii", "tetrajet_v2")  # trained under DDP next to bf16
OSCI = dict(start=0, period=3, window=1, threshold=0.5, sample_fraction=0.5)  # resets within 6 steps
OSCI_STEPS = 6
# Outlier-channel recipes on naive quantizers (double-block forward for OutControl), registered at import so that
# the spawned ranks know them too.
OUTCONTROL = dataclasses.replace(
    fp4compile.Recipe.named("tetrajet_v2_full"), name="tetrajet_v2_oc_dist_test",
    outliers=fp4compile.OutControl(ratio=0.25, start=0, window=2),
).register()  # fmt: skip
HOT = dataclasses.replace(
    fp4compile.Recipe.named("chon"), name="chon_dist_test", outliers=fp4compile.HotChannelPatch(k=4, period=2)
).register()


def _train(model: nn.Module, forward, rank: int, device, steps: int = STEPS, adam: bool = False) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=0.01) if adam else torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        x, y = _batch(step, rank, device)
        loss = F.mse_loss(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _full_params(model: nn.Module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for p in model.parameters()]


def _rank_streams(device: torch.device) -> dict:
    """What this rank draws for the quantized linear after ``torch.manual_seed(7)``, twice."""
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        seed = stream_seed(device).cpu()
        x = torch.randn(64, 64, device=device, requires_grad=True)
        w = torch.randn(64, 64, device=device, requires_grad=True)
        torch.manual_seed(7)
        nvfp4_linear(x, w, None, "quartet_ii").square().sum().backward()  # MS-EDEN: SR and random RHT signs
        draws.append((seed, w.grad.cpu()))
    return {"seed": draws[0][0], "seed_again": draws[1][0], "dw": draws[0][1], "dw_again": draws[1][1]}


def _weight_rows(rows: list[dict]) -> dict:
    """The monitor's statistics of the weight slots, by (layer without compile wrappers, slot, statistic)."""
    return {
        (row["layer"].replace("._orig_mod", ""), row["slot"], row["stat"]): row["value"]
        for row in rows
        if row["slot"] in ("fwd.w", "dgrad.w")
    }


def _ddp(model: nn.Module, setting: Setting, device: torch.device) -> nn.Module:
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model.to(device), device_ids=ids)


def _fsdp_net(setting: Setting, device: torch.device) -> nn.Module:
    """``_net`` under FSDP2: ``fully_shard`` per block and the root, each block compiled after sharding."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    model = _net().to(device)
    mesh = init_device_mesh(device.type, (WORLD,))  # FSDP2 would pick CUDA wherever a GPU is present
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, backend="nvfp4", options=setting.options("naive"))
    return model


def _worker(rank: int, setting: Setting, init_file: str, out_dir: str) -> None:
    device = setting.rank_device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(setting.backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {"streams": _rank_streams(device)}
    # DDP, compiled after wrapping, deterministic recipe.
    model = _net().to(device)
    compiled = torch.compile(_ddp(model, setting, device), backend="nvfp4", options=setting.options("naive"))
    results["ddp_losses"] = _train(model, compiled, rank, device)
    results["ddp_params"] = _full_params(model)
    # DDP with OsciReset: the replicas' weights stay identical through resets.
    torch._dynamo.reset()
    model = _net().to(device)
    compiled = torch.compile(_ddp(model, setting, device), backend="nvfp4", options=setting.options("nvidia"))
    osc = fp4compile.OsciReset(model, "nvidia", start=0, period=3, window=1, threshold=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    osc.register(opt)
    for step in range(6):
        x, y = _batch(step, rank, device)
        F.mse_loss(compiled(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    results["osci_params"] = _full_params(model)
    results["osci_resets"] = sum(report["reset"] for report in osc.history)
    # DDP with stochastic recipes (and bf16 to compare): finite and training.
    for recipe in ("bf16", *STOCHASTIC):
        torch._dynamo.reset()
        model = _net().to(device)
        compiled = torch.compile(_ddp(model, setting, device), backend="nvfp4", options=setting.options(recipe))
        results[f"{recipe}_losses"] = _train(model, compiled, rank, device, steps=8, adam=True)
    # FSDP2: fully_shard per block and the root, each block compiled after sharding.
    model = _fsdp_net(setting, device)
    results["fsdp_losses"] = _train(model, model, rank, device)
    # The monitor's probe on the sharded model (every rank probes): its weight statistics are the whole weights',
    # and it leaves the parameters as they were (fsdp_params is read after it).
    x, y = _batch(STEPS, rank, device)
    monitor = fp4compile.NumericsMonitor(model, every=1, recipe="naive")
    results["fsdp_monitor"] = _weight_rows(monitor.step(lambda m: F.mse_loss(m(x), y)))
    results["fsdp_params"] = _full_params(model)
    # FSDP2 with OsciReset on the sharded weights (both variants).
    for memory_efficient in (False, True):
        model = _fsdp_net(setting, device)
        osc = fp4compile.OsciReset(model, "naive", memory_efficient=memory_efficient, **OSCI)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        osc.register(opt)
        for step in range(OSCI_STEPS):
            x, y = _batch(step, rank, device)
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[f"fsdp_osci_params_{memory_efficient}"] = _full_params(model)
        results[f"fsdp_osci_resets_{memory_efficient}"] = [(r["step"], r["reset"], r["tracked"]) for r in osc.history]
    # Outlier-channel statistics: summed over the ranks before any selection. No DDP here (it would broadcast
    # rank 0's buffers): each rank trains its own copy on its own batches, and only the sum makes them agree.
    for recipe, field in ((OUTCONTROL, "order"), (HOT, "index")):
        torch._dynamo.reset()
        model = _net().to(device)
        for block in model.blocks:
            block.up = fp4compile.NVFP4Linear.from_linear(block.up, recipe)
        compiled = torch.compile(model, backend="nvfp4", options={"inner": setting.inner})
        _train(model, compiled, rank, device, steps=3)
        layer = model.blocks[0].up
        results[f"{recipe.name}_{field}"] = getattr(layer, f"outlier_{field}").cpu()
        if recipe is OUTCONTROL:
            results["outcontrol_norms"] = layer.outlier_norms.cpu()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.fixture(
    scope="module",
    params=[
        CPU,
        pytest.param(CUDA, marks=pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs (NCCL)")),
    ],
    ids=["cpu-gloo", "cuda-nccl"],
)
def setting(request) -> Setting:
    return request.param


@pytest.fixture(scope="module")
def ranks(setting, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"distributed-{setting.device}")
    args = (setting, str(out / "init"), str(out))
    mp.start_processes(_worker, args=args, nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _one_process(setting: Setting, steps: int, osci: Optional[dict] = None):
    """One process (on the first GPU in the CUDA setting) running both ranks' micro-batches per step and
    averaging their gradients, with OsciReset (``osci``: its keyword arguments) or without: the losses per
    rank, the parameters and OsciReset's history."""
    torch._dynamo.reset()
    device = setting.rank_device(0)
    model = _net().to(device)
    compiled = torch.compile(model, backend="nvfp4", options=setting.options("naive"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    osc = fp4compile.OsciReset(model, "naive", **osci) if osci is not None else None
    if osc is not None:
        osc.register(opt)
    losses = [[] for _ in range(WORLD)]
    for step in range(steps):
        grads = []
        for rank in range(WORLD):
            x, y = _batch(step, rank, device)
            loss = F.mse_loss(compiled(x), y)
            loss.backward()
            grads.append([p.grad / WORLD for p in model.parameters()])
            model.zero_grad(set_to_none=True)
            losses[rank].append(loss.item())
        for p, *per_rank in zip(model.parameters(), *grads):
            p.grad = per_rank[0] + per_rank[1]
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    history = [(r["step"], r["reset"], r["tracked"]) for r in osc.history] if osc is not None else []
    return losses, _full_params(model), history


@pytest.fixture(scope="module")
def single_process(setting):
    return _one_process(setting, STEPS)[:2]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_deterministic_recipe_equals_one_process_with_the_same_micro_batches(ranks, single_process, engine):
    losses, params = single_process
    for rank, result in enumerate(ranks):
        assert result[f"{engine}_losses"] == losses[rank]
        for got, want in zip(result[f"{engine}_params"], params):
            assert torch.equal(got, want)


@pytest.mark.parametrize("recipe", STOCHASTIC)
def test_stochastic_recipes_train_under_ddp(ranks, recipe):
    for result in ranks:
        losses, bf16 = torch.tensor(result[f"{recipe}_losses"]), torch.tensor(result["bf16_losses"])
        assert torch.isfinite(losses).all()
        assert losses[-3:].mean() < 0.85 * losses[:3].mean(), losses  # it learns
        assert abs(losses[-3:].mean() / bf16[-3:].mean() - 1) < 0.1, (losses, bf16)  # about as well as bf16


def test_each_rank_draws_its_own_bits_and_a_rerun_draws_them_again(ranks):
    first, second = (r["streams"] for r in ranks)
    assert not torch.equal(first["seed"], second["seed"])
    assert not torch.equal(first["dw"], second["dw"])  # same data, same user seed: different rounding
    for streams in (first, second):
        assert torch.equal(streams["seed"], streams["seed_again"])
        assert torch.equal(streams["dw"], streams["dw_again"])


def test_osci_reset_keeps_ddp_replicas_identical(ranks):
    first, second = ranks
    assert first["osci_resets"] == second["osci_resets"] > 0
    for a, b in zip(first["osci_params"], second["osci_params"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["full", "memory_efficient"])
def test_osci_reset_on_fsdp2_shards_equals_one_process_on_the_whole_weights(setting, ranks, memory_efficient):
    """Q takes its per-tensor scale from the whole (all-gathered) weight, each rank resets its own rows, and the
    reported counts are the sums over the ranks: the run equals one process with the same micro-batches."""
    _, params, history = _one_process(setting, OSCI_STEPS, dict(memory_efficient=memory_efficient, **OSCI))
    assert sum(reset for _, reset, _ in history) > 0
    for result in ranks:
        assert result[f"fsdp_osci_resets_{memory_efficient}"] == history
        for got, want in zip(result[f"fsdp_osci_params_{memory_efficient}"], params):
            assert torch.equal(got, want)


def test_monitor_probe_on_fsdp2_shards_measures_the_whole_weights(setting, ranks, single_process):
    """Every rank's probe of the FSDP2 model measures the whole (all-gathered) weights: its weight statistics equal
    those of one process holding the same parameters; and the probe left them as they were (the FSDP test above
    reads them after it)."""
    device = setting.rank_device(0)
    model = _net().to(device)
    with torch.no_grad():
        for p, full in zip(model.parameters(), ranks[0]["fsdp_params"]):
            p.copy_(full)
    x, y = _batch(STEPS, 0, device)
    monitor = fp4compile.NumericsMonitor(model, every=1, recipe="naive")
    want = _weight_rows(monitor.step(lambda m: F.mse_loss(m(x), y)))
    assert len(want) == 4 * 2 * len(STATS)  # 4 linears, 2 weight slots
    for r in range(WORLD):
        assert ranks[r]["fsdp_monitor"].keys() == want.keys()
        for key, value in want.items():
            assert ranks[r]["fsdp_monitor"][key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float)
                                                     else value), (r, key)  # fmt: skip


def test_rank_zero_draws_what_a_single_process_draws(setting, ranks):
    torch.manual_seed(7)
    assert torch.equal(stream_seed(setting.rank_device(0)).cpu(), ranks[0]["streams"]["seed"])
    assert fp4compile.streams.rank_and_world() == (0, 1)


def test_no_quantized_weight_is_cached_by_storage():
    """FSDP2 reuses a parameter's storage for new values: the next forward must quantize the new values."""
    torch._dynamo.reset()
    model = nn.Linear(D, D)
    compiled = torch.compile(model, backend="nvfp4", options=CPU.options("nvidia"))
    x = torch.randn(16, D)
    before = compiled(x)
    new = torch.randn(D, D)
    storage = model.weight.data_ptr()
    with torch.no_grad():
        model.weight.copy_(new)  # same storage, new values
    assert model.weight.data_ptr() == storage
    after = compiled(x)
    want = nvfp4_linear(x, new, model.bias, "nvidia")
    assert torch.equal(after, want) and not torch.equal(after, before)
    torch._dynamo.reset()


def test_outlier_channel_statistics_are_summed_over_ranks_so_every_rank_selects_the_same(ranks):
    first, second = ranks
    for key in (f"{OUTCONTROL.name}_order", f"{HOT.name}_index", "outcontrol_norms"):
        assert torch.equal(first[key], second[key]), key
    # OutControl's norms: each input channel's L2 norm over the window's two forwards (the first block's up
    # projection reads the batch itself), summed over both ranks' batches.
    cpu, want = torch.device("cpu"), torch.zeros(D)
    for step in range(2):
        want += sum(torch.linalg.vector_norm(_batch(step, rank, cpu)[0], dim=0) for rank in range(WORLD))
    torch.testing.assert_close(first["outcontrol_norms"], want, rtol=1e-6, atol=0)
