"""Triton decode of stored NVFP4 tensors equals format.py's gemm_operand / dequantize bit for bit."""

import pytest
import torch
from testing import KERNEL_DEVICE, ON_GPU

from fp4compile import quantize
from fp4compile.format import gemm_operand
from fp4compile.kernels.decode import decode_triton

ROWS, K = (1000, 4096) if ON_GPU else (48, 256)


def _input():
    x = torch.randn(ROWS, K) * 3
    x[3, :16] = 0  # zero block (scale 0)
    x[5, 16:32] *= 1e-6  # subnormal E4M3 scale
    x[7, 32:48] = -x[7, 32:48].abs()  # negative codes
    return x.to(KERNEL_DEVICE)


@pytest.mark.parametrize("name", ["rtn", "rtn_2d", "double_block_rtn", "rtn_4over6"])
def test_decode_operand_equals_gemm_operand(name):
    q = quantize(_input()[: ROWS - ROWS % 16], name, validate=False)
    got = decode_triton(q, with_outer=False, dtype=torch.float16)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), gemm_operand(q), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rtn", "double_block_rtn"])
def test_decode_transposed_dequantization_crops_and_pads(name):
    q = quantize(_input(), name)
    rows, cols, padded = ROWS - 8, K - 48, ROWS + 120
    got = decode_triton(q, with_outer=True, dtype=torch.float32, transpose=True, rows=rows, cols=cols,
                        padded_rows=padded)  # fmt: skip
    assert got.shape == (cols, padded)
    torch.testing.assert_close(got[:, :rows], q.dequantize(torch.float32)[:rows, :cols].T, rtol=0, atol=0)
    assert torch.count_nonzero(got[:, rows:]) == 0


@pytest.mark.parametrize("name", ["rtn", "rtn_2d", "double_block_rtn", "rtn_4over6"])
def test_decode_dequantization_with_outer_scales_crops(name):
    """The FP32 dequantization (``dispatch.dequantize``: HCP's residual, OutControl's dgrad weight, the monitor's
    SNR) equals the spec's, cropped to ``cols`` columns."""
    q = quantize(_input()[: ROWS - ROWS % 16], name, validate=False)
    cols = K - 48
    got = decode_triton(q, with_outer=True, dtype=torch.float32, cols=cols)
    assert got.shape == (q.shape[0], cols)
    torch.testing.assert_close(got, q.dequantize(torch.float32)[:, :cols], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rht16_rtn_te", "rht16_sr_te", "double_block_rht16_sr", "ms_eden"])
def test_decode_undoes_the_rotation_as_the_spec_does(name):
    """With ``unrotate`` (``dispatch.dequantize`` of a rotated quantization: the monitor's wgrad operands) the
    decoded values are the spec's dequantization, rotation undone, bit for bit, cropped to ``cols``."""
    q = quantize(_input()[: ROWS - ROWS % 16], name, validate=False)
    cols = K - 48
    got = decode_triton(q, with_outer=True, dtype=torch.float32, cols=cols, unrotate=True)
    want = q.dequantize(torch.float32)[:, :cols]
    rotated = decode_triton(q, with_outer=True, dtype=torch.float32, cols=cols)
    assert q.signs is not None and not torch.equal(got, rotated)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_te_rotation_without_a_sign_tensor_is_undone_with_te_signs():
    """A quantization with TE's fixed RHT-16 signs held by the kernel (``q.signs`` None: the training path's and
    the monitor's) dequantizes as one that carries them, in the spec and in the decode kernel."""
    import dataclasses

    q = quantize(_input()[: ROWS - ROWS % 16], "rht16_rtn_te", validate=False)
    bare = dataclasses.replace(q, signs=None)
    want = q.dequantize(torch.float32)
    assert torch.equal(bare.dequantize(torch.float32), want)
    assert torch.equal(decode_triton(bare, with_outer=True, dtype=torch.float32, unrotate=True), want)
    with pytest.raises(ValueError, match="without its rotation signs"):
        dataclasses.replace(quantize(_input()[:32], "double_block_rht16_sr", validate=False), signs=None).dequantize()


@pytest.mark.parametrize(
    "source, target",
    [("double_block_rtn", "double_block_rht16_sr"), ("rtn_4over6", "ms_eden"), ("rtn", "rtn"),
     ("double_block_rtn", "double_block_rtn"), ("rtn", "rht16_sr_te")],
)  # fmt: skip
def test_requantizing_a_transposed_quantization_decodes_it_as_it_reads_it(source, target):
    """The re-quantization of a saved quantization along its other dim (a backward's W^T or X^T), with the quantize
    kernel decoding the codes as it reads them (no FP32 transpose written), equals decoding the transpose into
    memory and quantizing that, bit for bit: codes, scales, outer scales and GEMM values. Per-tensor and per-block
    sources; targets with the kernel's amax pass (per tensor), RHT-16, RHT-128 with MS-EDEN, stochastic rounding."""
    from fp4compile.kernels.quantize import quantize_triton, requantize_transposed_triton
    from fp4compile.spec import QuantSpec

    q = quantize(_input(), source)
    spec = QuantSpec.named(target)
    rows, cols = ROWS - 8, K - 128
    padded = -(-ROWS // 128) * 128  # a multiple of 128 (the per-block outer scales' length along K)
    seed = torch.tensor([2026], device=KERNEL_DEVICE) if spec.stochastic else None
    signs = None
    if spec.random_signs:
        signs = (torch.randint(0, 2, (spec.rotation_size,)) * 2 - 1).float().to(KERNEL_DEVICE)
    t = decode_triton(q, with_outer=True, dtype=torch.float32, transpose=True, rows=rows, cols=cols, padded_rows=padded)
    want_values, got_values = (torch.empty(cols, padded, dtype=torch.float16, device=KERNEL_DEVICE) for _ in "ab")
    want = quantize_triton(t, spec, seed=seed, signs=signs, values=want_values)
    got = requantize_transposed_triton(q, rows, cols, padded, spec, seed=seed, signs=signs, values=got_values)
    assert got.shape == (cols, padded) and got.dtype == want.dtype == torch.float32
    assert torch.equal(got.codes, want.codes)
    assert torch.equal(got.scales.view(torch.uint8), want.scales.view(torch.uint8))
    assert torch.equal(got.outer, want.outer)
    assert torch.equal(got_values, want_values)


def test_requantizing_names_a_source_it_cannot_read():
    from fp4compile.kernels.quantize import requantize_transposed_triton
    from fp4compile.spec import QuantSpec

    rotated = quantize(_input()[:32, :128], "rht16_rtn_te")
    with pytest.raises(ValueError, match=r"the source must be unrotated"):
        requantize_transposed_triton(rotated, 32, 128, 32, QuantSpec.named("rtn"))
    q = quantize(_input()[:32, :128], "rtn")
    with pytest.raises(ValueError, match=r"must lie within the source's \(32, 128\)"):
        requantize_transposed_triton(q, 33, 128, 48, QuantSpec.named("rtn"))
