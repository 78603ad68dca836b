"""The compiled CUDA decomposition of the quantized linear, run on the CPU, equals the CPU reference bit for bit.

Under ``torch.compile`` on a GPU the ``fp4compile::`` ops decompose (``ops.py``): AOTAutograd traces their
CUDA bodies, with the shared quantization of one activation, the per-tensor amax as a graph reduction and the
kernel launches as graph nodes. This file runs that same trace on the CPU: ``dispatch.on_triton`` says yes for
CPU tensors, each kernel launch recorded while tracing becomes an opaque mutating op that runs the kernel in
Triton's interpreter, and the GEMM op ``fp4compile::gemm`` runs its CPU kernel, the reference GEMM. A whole
Hugging Face model compiled this way (``inner="aot_eager"``: everything but Inductor's code generation) must
give the loss and every gradient of the same model compiled on the CPU reference path, including the stochastic
rounding (same seeds).
"""

import itertools

import pytest
import test_models
import torch
from testing import ON_GPU

from fp4compile import dispatch, tracing

pytestmark = pytest.mark.skipif(ON_GPU, reason="the kernels run in Triton's interpreter (CPU machines only)")

_LAUNCHES: dict = {}
_IDS = itertools.count()


@torch.library.custom_op("fp4compile_test::launch", mutates_args=("tensors",))
def _launch(call_id: int, tensors: list[torch.Tensor]) -> None:
    kernel, grid, args, kwargs = _LAUNCHES[call_id]
    given = iter(tensors)
    fill = lambda a: next(given) if isinstance(a, torch.Tensor) else a  # noqa: E731
    kernel[grid](*[fill(a) for a in args], **{k: fill(v) for k, v in kwargs.items()})


@_launch.register_fake
def _(call_id, tensors):
    return None


class _RecordedLauncher:
    """``launcher(kernel)`` for the CPU: while tracing, a launch is recorded as one ``fp4compile_test::launch``
    op over its tensor arguments (every one counted as written); otherwise the interpreted kernel runs."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not tracing.tracing():
                return self.kernel[grid](*args, **kwargs)
            call_id = next(_IDS)
            _LAUNCHES[call_id] = (self.kernel, grid, args, kwargs)
            _launch(call_id, [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)])

        return launch


def _cuda_path_on_cpu(monkeypatch):
    import fp4compile.kernels.decode as decode
    import fp4compile.kernels.mxfp8 as mxfp8
    import fp4compile.kernels.quantize as quantize
    import fp4compile.kernels.residual as residual

    monkeypatch.setattr(dispatch, "on_triton", lambda t: True)
    for module in (quantize, decode, residual, mxfp8):
        monkeypatch.setattr(module, "launcher", _RecordedLauncher)


def _loss_and_grads(kind: str, recipe: str):
    torch._dynamo.reset()
    model = test_models._model(kind, layers=2, d=64, seq=32)
    ids = test_models._batch(0, 4, 32)
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": recipe, "inner": "aot_eager"})
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as on a GPU: bf16 operands, bias and outputs
        loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, recipe", [("gpt2", "nvidia"), ("llama", "quartet_ii")])
def test_the_compiled_cuda_decomposition_equals_the_reference(monkeypatch, kind, recipe):
    """GPT-2's transposed Conv1D weights with biases, Llama's q/k/v and gate/up sharing their input; ``nvidia``
    (RHT, stochastic rounding) and ``quartet_ii`` (MS-EDEN, random signs)."""
    loss, grads = _loss_and_grads(kind, recipe)
    launches = len(_LAUNCHES)
    _cuda_path_on_cpu(monkeypatch)
    loss_cuda_path, grads_cuda_path = _loss_and_grads(kind, recipe)
    assert len(_LAUNCHES) > launches  # the kernels were traced into the graph, not run by the reference
    assert torch.equal(loss_cuda_path, loss)
    assert grads.keys() == grads_cuda_path.keys()
    for name, grad in grads.items():
        assert torch.equal(grads_cuda_path[name], grad), name


def _mlp_loss_and_grads(recipe):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))
    x = torch.randn(64, 256)
    x[:, 7] *= 30.0  # an outlier channel for OutControl to select
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": recipe, "inner": "aot_eager"})
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(x).float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("path", ["outcontrol", "hot_channel_patch"])
def test_the_compiled_cuda_decomposition_of_the_outlier_paths_equals_the_reference(monkeypatch, path):
    """OutControl selecting in its first forward (the MXFP8 columns joined into the GEMM operands, the outlier
    columns of dW) and the Hot-Channel Patch's residual columns, traced as on a GPU.

    OutControl runs on ``tetrajet_v2`` with round-to-nearest, unrotated backward quantizers: with its stochastic,
    randomly rotated ones the compiled graph draws some of the backward's random bits in the forward (AOTAutograd's
    partitioner moves the re-quantization of the saved X^T, which needs only forward values, into the forward and
    saves its result), so its bits differ from the eager op's, equal in distribution."""
    import dataclasses

    from fp4compile import HotChannelPatch, OutControl, Recipe

    if path == "outcontrol":
        base = Recipe.named("tetrajet_v2_full")
        deterministic = {s: dataclasses.replace(getattr(base, s), rounding="rtn", rotation="none")
                         for s in ("dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x")}  # fmt: skip
        outliers = OutControl(ratio=0.1, start=0, window=1)
        recipe = dataclasses.replace(base, name="outcontrol_now_rtn", outliers=outliers, **deterministic)
    else:
        recipe = dataclasses.replace(Recipe.named("chon"), name="hcp_16", outliers=HotChannelPatch(k=16))
    loss, grads = _mlp_loss_and_grads(recipe)
    launches = len(_LAUNCHES)
    _cuda_path_on_cpu(monkeypatch)
    loss_cuda_path, grads_cuda_path = _mlp_loss_and_grads(recipe)
    assert len(_LAUNCHES) > launches
    assert torch.equal(loss_cuda_path, loss)
    for name, grad in grads.items():
        assert torch.equal(grads_cuda_path[name], grad), name
