"""The compiled CUDA decomposition of the quantized linear, run on the CPU, equals the CPU reference bit for bit.

Under ``torch.compile`` on a GPU the ``fp4compile::`` ops decompose (``ops.py``): AOTAutograd traces their
CUDA bodies, with the shared quantization of one activation, the per-tensor amax as a graph reduction and the
kernel launches as graph nodes. This file runs that same trace on the CPU: ``dispatch.on_triton`` says yes for
CPU tensors, each kernel launch recorded while tracing becomes an opaque mutating op that runs the kernel in
Triton's interpreter, and the GEMM, recorded as a launch of the TMA kernel as under Inductor
(``kernels/gemm_traced.py``), runs the reference GEMM. A whole
Hugging Face model compiled this way (``inner="aot_eager"``: everything but Inductor's code generation) must
give the loss and every gradient of the same model compiled on the CPU reference path, including the stochastic
rounding (same seeds).
"""

import itertools

import pytest
import test_models
import torch
import triton
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


class _ReferenceGemm:
    """Stands in for the TMA GEMM kernel when a recorded launch of it runs: the reference GEMM into C. (Triton's
    interpreter rounds FP32 to bf16 toward zero; the kernel itself is compared with its eager launch bit for bit in
    ``test_gemm_traced.py``, and with the float64 emulation on a GPU.)"""

    runs = 0

    def __getitem__(self, grid):
        def run(a, b, c, outer_a, outer_b, bias, *scalars, HAS_BIAS, **constants):
            _ReferenceGemm.runs += 1
            c.copy_(dispatch._reference_gemm(a, b, outer_a, outer_b, bias if HAS_BIAS else None, c.dtype))

        return run


class _RecordedGemmLauncher(_RecordedLauncher):
    def __init__(self, kernel):
        super().__init__(_ReferenceGemm())


class _TmaAutotuner:
    """Stands in for the TMA GEMM's autotuner in the tile choice made while tracing (no GPU to time configs on):
    the stand-in operands it is given must be real tensors of the traced operands' shapes and layouts."""

    best_config = triton.Config({"BM": 64, "BN": 64, "BK": 64, "GROUP_M": 8}, num_stages=2, num_warps=4)
    seen: list = []

    @classmethod
    def tune(cls, a, b, outer_a, outer_b, bias, out_dtype, method, uniform_k):
        assert all(type(t) is torch.Tensor for t in (a, b, outer_a, outer_b)) and method == "tma"
        cls.seen.append((tuple(a.shape), tuple(b.shape), b.stride()))


def _cuda_path_on_cpu(monkeypatch):
    """On the CPU, trace as on a GPU with Inductor: kernels recorded as launches, the GEMM too (its tile config
    chosen as on a GPU, through a stand-in autotuner)."""
    import fp4compile.kernels.decode as decode
    import fp4compile.kernels.mxfp8 as mxfp8
    import fp4compile.kernels.quantize as quantize
    import fp4compile.kernels.residual as residual
    from fp4compile.kernels import gemm_op, gemm_traced

    monkeypatch.setattr(dispatch, "on_triton", lambda t: True)
    for module in (quantize, decode, residual, mxfp8):
        monkeypatch.setattr(module, "launcher", _RecordedLauncher)
    # not asking for CUDA and Inductor
    monkeypatch.setattr(gemm_traced, "launchable", lambda a, b, outer_a, uniform_k: gemm_traced.tma_operands(a, b))
    monkeypatch.setattr(gemm_traced, "launcher", _RecordedGemmLauncher)
    monkeypatch.setattr(gemm_traced, "gemm_triton", _TmaAutotuner.tune)
    monkeypatch.setattr(gemm_traced, "_gemm_tma", _TmaAutotuner)
    monkeypatch.setattr(gemm_traced, "_num_sms", lambda index: 4)
    monkeypatch.setattr(gemm_traced, "_TUNED", {})
    monkeypatch.setattr(_TmaAutotuner, "seen", [])
    monkeypatch.setattr(_ReferenceGemm, "runs", 0)
    monkeypatch.setattr(gemm_op, "gemm_op", _no_opaque_gemm)


def _no_opaque_gemm(*args):
    raise AssertionError("a GEMM was traced as the opaque op fp4compile::gemm, not as a kernel launch")


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
    # every GEMM (forward, dgrad, wgrad of each linear) ran as a recorded kernel launch, its tile config chosen as on
    # a GPU; nvidia's dgrad reads W^T, the forward's 16x16-quantized W transposed, through the tensor underneath
    assert _ReferenceGemm.runs == 3 * 2 * (4 if kind == "gpt2" else 7)  # two blocks of 4 or 7 linears
    if recipe == "nvidia":
        assert any(stride[0] == 1 for *_, stride in _TmaAutotuner.seen)
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
    assert len(_LAUNCHES) > launches and _ReferenceGemm.runs
    assert torch.equal(loss_cuda_path, loss)
    for name, grad in grads.items():
        assert torch.equal(grads_cuda_path[name], grad), name
