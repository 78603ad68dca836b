"""Helpers shared by the tests: where kernels run, and the GPU-only marker.

``conftest.py`` sets ``TRITON_INTERPRET`` before anything imports Triton kernels; this module only
describes the machine, so tests import it like any module (``from testing import requires_gpu``).
"""

import pytest
import torch

__all__ = ["KERNEL_DEVICE", "ON_GPU", "assert_backend_matches_eager", "linear_step", "requires_gpu"]

#: Whether a CUDA GPU is present (GPU-only tests run; kernels run compiled, not interpreted).
ON_GPU = torch.cuda.is_available()

#: The device kernel tests put their tensors on: CUDA, or the CPU under Triton's interpreter.
KERNEL_DEVICE = "cuda" if ON_GPU else "cpu"

#: Marks a test that needs a CUDA GPU; on the CPU it is skipped with the reason.
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (run on the device machine)")


def assert_backend_matches_eager(recipe, x: torch.Tensor) -> None:
    """A two-layer MLP under ``backend="nvfp4"`` (aot_eager) gives the gradients of ``nvfp4_linear`` by hand."""
    from fp4compile.linear import nvfp4_linear

    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="nvfp4", options={"recipe": recipe, "inner": "aot_eager"})
        compiled(x).square().sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        h = torch.relu(nvfp4_linear(x, model[0].weight, model[0].bias, recipe))
        nvfp4_linear(h, model[2].weight, model[2].bias, recipe).square().sum().backward()
        for g, want in zip(got, [p.grad for p in model.parameters()]):
            assert torch.equal(g, want)
    finally:
        torch._dynamo.reset()


def linear_step(x: torch.Tensor, w: torch.Tensor, recipe, state=None, seed: int = 1):
    """``(y, dx, dw)`` of one ``nvfp4_linear`` forward and backward (with the layer's outlier ``state`` if given),
    torch seeded with ``seed`` first and a fixed random ``dY``."""
    from fp4compile.linear import nvfp4_linear

    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.manual_seed(seed)
    y = nvfp4_linear(x, w, None, recipe, outlier_state=state)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.device)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, dy
