"""The residual kernels (``kernels/residual.py``: the Hot-Channel Patch's scores and residual columns) against
``x - format.dequantize(q)``: the residual columns bit for bit, the column sums up to their order."""

import pytest
import torch
from testing import KERNEL_DEVICE

from fp4compile import QuantSpec, dispatch
from fp4compile.kernels.residual import column_abs_residual_triton, residual_columns_triton
from fp4compile.operand_stats import quantize_padded


def _operand(rows: int, k: int, dtype=torch.bfloat16) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(rows, k) * 2
    x[:, 7] *= 40  # a hot channel
    x[3, 32:48] = 1e-8  # a block that flushes
    return x.to(dtype).to(KERNEL_DEVICE)


@pytest.mark.parametrize(("spec", "rows", "k", "dtype"), [
    ("rtn", 80, 200, torch.bfloat16),  # K padded to 208, an odd number of 16-blocks
    ("rtn_2d", 40, 256, torch.bfloat16),  # 16x16 scales, rows padded to 48
    ("rtn", 64, 128, torch.float32),
])  # fmt: skip
def test_residual_kernels_equal_the_dequantization(spec, rows, k, dtype):
    x = _operand(rows, k, dtype)
    q = quantize_padded(x, QuantSpec.named(spec))
    residual = x.float() - q.dequantize(torch.float32)[:rows, :k]
    index = torch.tensor([7, 0, k - 1, 33, 100], device=KERNEL_DEVICE)
    assert torch.equal(residual_columns_triton(x, q, index), residual[:, index])
    torch.testing.assert_close(column_abs_residual_triton(x, q), residual.abs().sum(0), rtol=1e-6, atol=0)
    assert torch.equal(dispatch.residual_columns(x, q, index), residual[:, index])  # the device's path


def test_residual_kernels_refuse_what_they_do_not_decode():
    x = _operand(32, 256)
    with pytest.raises(ValueError, match="per-tensor quantization without rotation"):
        column_abs_residual_triton(x, quantize_padded(x, QuantSpec.named("double_block_rtn")))
    with pytest.raises(ValueError, match="must lie within its quantization"):
        column_abs_residual_triton(_operand(32, 512), quantize_padded(x, QuantSpec.named("rtn")))
