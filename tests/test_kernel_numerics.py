"""The kernels' element-wise rounding helpers against ``format.py``, over dense sweeps of FP32 inputs.

``test_kernels.py`` checks whole quantizations on random and edge-case tensors; here every FP32 value in
wide ranges (and every E2M1 tie with its neighbours) goes through ``numerics.e2m1_round`` on its own, so a
rounding shortcut that is wrong for a few inputs cannot hide behind the block scales. On a GPU this also
checks what the interpreter cannot: that the compiled code keeps subnormal products (no flush to zero).
"""

import pytest
import torch
import triton
import triton.language as tl
from testing import KERNEL_DEVICE, ON_GPU, requires_gpu

from fp4compile.format import e2m1_decode, e2m1_rne, e2m1_sr
from fp4compile.kernels.numerics import e2m1_round, max_abs, product, reciprocal


@triton.jit
def _round_kernel(v_ptr, bits_ptr, code_ptr, value_ptr, n, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    bits = tl.load(bits_ptr + offs, mask=ok, other=0)
    code, value = e2m1_round(v, bits, STOCHASTIC)
    tl.store(code_ptr + offs, code.to(tl.uint8), mask=ok)
    tl.store(value_ptr + offs, value, mask=ok)


def _round(v: torch.Tensor, bits: torch.Tensor, stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    code = torch.empty(v.shape, dtype=torch.uint8, device=v.device)
    value = torch.empty_like(v)
    _round_kernel[(triton.cdiv(v.numel(), 1024),)](v, bits, code, value, v.numel(), STOCHASTIC=stochastic, BLOCK=1024)
    return code, value


def _sweep() -> torch.Tensor:
    """Signed FP32 values: every 64th bit pattern in [0, 8] (every 4096th in the interpreter), every E2M1 tie
    and rounding boundary with its two neighbours, subnormals, zeros and values far above the saturation point."""
    dense = torch.arange(0, 0x41000000, 64 if ON_GPU else 4096, dtype=torch.int32).view(torch.float32)
    ties = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    around = torch.cat([ties.nextafter(torch.tensor(0.0)), ties, ties.nextafter(torch.tensor(10.0))])
    special = torch.tensor([0.0, 1e-45, 1e-40, 1.1754943508222875e-38, 6.5, 7.0, 1e4, 3.4e38])
    v = torch.cat([dense, around, special])
    return torch.cat([v, -v])


@pytest.mark.parametrize("stochastic", [False, True], ids=["rne", "sr"])
def test_e2m1_round_matches_format_on_a_dense_sweep(stochastic):
    v = _sweep()
    bits = torch.randint(0, 1 << 16, v.shape, dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    if stochastic:  # also the extreme draws, which decide the ties of SR at exact grid points
        bits[: v.numel() // 3] = 0
        bits[v.numel() // 3 : 2 * v.numel() // 3] = 0xFFFF
    want = e2m1_sr(v, bits) if stochastic else e2m1_rne(v)
    code, value = _round(v.to(KERNEL_DEVICE), bits.to(KERNEL_DEVICE), stochastic)
    assert torch.equal(code.cpu(), want)
    assert torch.equal(value.cpu().view(torch.int32), e2m1_decode(want).view(torch.int32))  # -0.0 kept


@triton.jit
def _max_abs_kernel(x_ptr, out_ptr, W: tl.constexpr):
    rows = tl.arange(0, 4)
    x = tl.load(x_ptr + rows[:, None, None] * W + tl.arange(0, W)[None, None, :])
    tl.store(out_ptr + rows[:, None], max_abs(x))


def test_max_abs_propagates_nan_and_takes_magnitudes():
    x = torch.tensor(
        [
            [1.0, -3.0, 2.0, 0.5, -0.0, 0.0, 1.0, 2.9],
            [1.0, float("nan"), -7.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -float("inf")],
            [-0.0] * 8,
        ]
    ).to(KERNEL_DEVICE)
    out = torch.empty(4, 1, device=KERNEL_DEVICE)
    _max_abs_kernel[(1,)](x, out, W=8)
    out = out.cpu().flatten()
    assert out[0] == 3.0 and out[1].isnan() and out[2] == float("inf")
    assert out[3].view(torch.int32) & 0x7FFFFFFF == 0


@triton.jit
def _reciprocal_kernel(x_ptr, out_ptr, n, NO_FMA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, reciprocal(tl.load(x_ptr + offs, mask=ok, other=1.0), NO_FMA), mask=ok)


@requires_gpu
def test_gpu_reciprocal_is_the_correctly_rounded_division():
    """``rcp.rn.f32`` (what the compiled kernels use) equals IEEE ``1 / x`` on every 64th positive FP32 pattern, the
    subnormals, the subnormal results and the results that overflow included (libdevice's ``rcp_rn`` flushed the
    subnormal results to zero: numerics' note on subnormals)."""
    x = torch.arange(1, 0x7F800000, 64, dtype=torch.int32, device="cuda").view(torch.float32)
    got = torch.empty_like(x)
    _reciprocal_kernel[(triton.cdiv(x.numel(), 1024),)](x, got, x.numel(), NO_FMA=True, BLOCK=1024)
    assert torch.equal(got.view(torch.int32), torch.div(1.0, x).view(torch.int32))


@triton.jit
def _product_kernel(a_ptr, b_ptr, out_ptr, n, NO_FMA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    a = tl.load(a_ptr + offs, mask=ok, other=1.0)
    b = tl.load(b_ptr + offs, mask=ok, other=1.0)
    tl.store(out_ptr + offs, product(a, b, NO_FMA), mask=ok)


@requires_gpu
def test_gpu_product_keeps_subnormals():
    """``mul.rn.f32`` (what the compiled kernels use) equals IEEE ``a * b`` where the inputs or the product are
    subnormal: every 64th subnormal pattern times factors from 2**-24 to 2**24, and every 64th pattern of the
    smallest normal binades times factors that push the product below 2**-126."""
    subnormal = torch.arange(1, 0x00800000, 64, dtype=torch.int32, device="cuda").view(torch.float32)
    small = torch.arange(0x00800000, 0x02000000, 64, dtype=torch.int32, device="cuda").view(torch.float32)
    factors = torch.tensor([2.0**-24, 0.3, 0.5, 0.75, 1.0, 1.5, 3.0, 2.0**24], device="cuda")
    a = torch.cat([subnormal, small]).repeat_interleave(len(factors))
    b = factors.repeat(len(subnormal) + len(small))
    a = torch.cat([a, -a])
    b = torch.cat([b, b])
    got = torch.empty_like(a)
    _product_kernel[(triton.cdiv(a.numel(), 1024),)](a, b, got, a.numel(), NO_FMA=True, BLOCK=1024)
    want = a * b
    assert (want != 0).logical_and(want.abs() < 2.0**-126).any()  # the sweep does produce subnormal products
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
