"""The Triton MXFP8 kernel against the spec (``fp4compile/mxfp8.py``): the same bytes, exponents, GEMM values and
outer scales, on the GPU or in Triton's interpreter on the CPU."""

import pytest
import torch
from testing import KERNEL_DEVICE, ON_GPU

from fp4compile.kernels.mxfp8 import mxfp8_triton
from fp4compile.mxfp8 import mxfp8_gemm_operand, quantize_mxfp8


def _inputs(rows: int, k: int) -> torch.Tensor:
    """FP32 rows whose 1x32 blocks span magnitudes from 2**-140 to 2**120: blocks whose scaled elements are E4M3
    subnormals or round to zero, blocks four exponents apart from their neighbours and beyond fp16's reach of
    them, all-zero blocks, exact powers of two (amax / 448 on a binade boundary) and E4M3 ties."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g)
    block_scale = torch.exp2(torch.randint(-140, 120, (rows, k // 32), generator=g).float())
    x = x * block_scale.repeat_interleave(32, dim=1)
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] = 448.0 * 2.0**-3  # amax / 448 exactly a power of two
    x[1, 32:64] = torch.tensor([1.0 + 1 / 16, 1.0 + 3 / 16, -(1.0 + 1 / 16), 448.0] * 8)  # E4M3 ties
    x[2, :32] = torch.tensor([2.0**-130, -(2.0**-135), 2.0**-149, 0.0] * 8)  # subnormal amax / 448
    x[3] = torch.randn(k, generator=g) * 2.0 ** torch.arange(k).remainder(40).float()  # spread inside a block
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_equals_the_spec(dtype, transposed):
    rows, k = (1024 + 8, 512) if ON_GPU else (40, 256)
    x = _inputs(rows, k).to(dtype)
    if transposed:  # a transposed view (unit stride along the rows), as OutControl's wgrad reads dY^T
        x = x.T.contiguous().T
    q = quantize_mxfp8(x)
    want_values, want_outer = mxfp8_gemm_operand(q)
    values, outer, elements, exponents = mxfp8_triton(x.to(KERNEL_DEVICE), saved=True)
    assert torch.equal(elements.cpu(), q.elements.view(torch.uint8))
    assert torch.equal(exponents.cpu(), q.exponents)
    assert torch.equal(values.cpu().view(torch.int16), want_values.view(torch.int16))
    assert torch.equal(outer.cpu().view(torch.int32), want_outer.view(torch.int32))


def test_kernel_follows_the_spec_on_non_finite_inputs():
    """A NaN stays NaN in the GEMM values (a bad gradient is not hidden) with the spec's exponent and NaN byte; an
    infinity saturates at 448 with the spec's exponent."""
    x = _inputs(8, 128)
    x[0, 5] = float("nan")
    x[1, 40] = float("inf")
    x[2, 70] = -float("inf")
    x[3, 100] = float("nan")
    x[3, 101] = float("inf")
    q = quantize_mxfp8(x)
    want_values, want_outer = mxfp8_gemm_operand(q)
    values, outer, elements, exponents = (t.cpu() for t in mxfp8_triton(x.to(KERNEL_DEVICE), saved=True))
    assert torch.equal(exponents, q.exponents)
    assert torch.equal(elements, q.elements.view(torch.uint8))
    assert torch.equal(values.isnan(), want_values.isnan()) and values.isnan().sum() == 2
    finite = ~values.isnan()
    assert torch.equal(values[finite].view(torch.int16), want_values[finite].view(torch.int16))
    assert torch.equal(outer.view(torch.int32), want_outer.view(torch.int32))


def test_kernel_without_the_saved_tensors_writes_the_same_operand():
    x = _inputs(24, 128).to(KERNEL_DEVICE)
    values, outer, elements, exponents = mxfp8_triton(x)
    assert elements is None and exponents is None
    want_values, want_outer = mxfp8_triton(x, saved=True)[:2]
    assert torch.equal(values, want_values) and torch.equal(outer, want_outer)


def test_kernel_names_a_k_that_is_not_a_multiple_of_128():
    with pytest.raises(ValueError, match=r"K=96 must be a multiple of 128"):
        mxfp8_triton(torch.zeros(4, 96, device=KERNEL_DEVICE))
