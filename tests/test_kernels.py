"""Triton quantize kernels vs the format.py reference: bit for bit, for every named quantizer.

On a CPU machine the kernels run in the Triton interpreter on small shapes; on a
GPU the same tests run at large shapes. Stochastic quantizers are compared given
the same Philox seed and rotation signs.
"""

import pytest
import torch
import triton
import triton.language as tl
from testing import KERNEL_DEVICE, ON_GPU

from fp4compile import QuantSpec
from fp4compile.format import TE_RHT_SIGNS, quantize_reference
from fp4compile.kernels import abs_max_pair_triton, quantize_triton
from fp4compile.philox import philox4x32
from fp4compile.quantize import draw_seed, draw_signs

# (rows, K): rows not a multiple of any tile size, K a multiple of 128 and, where a spec allows, of 16 only.
if ON_GPU:
    SHAPES = [(8192 + 37, 4096), (1000, 14336), (4096 + 16, 4096 + 48)]
else:
    SHAPES = [(37, 256), (16, 128), (50, 176)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _random_streams(spec, device):
    seed = draw_seed(device) if spec.stochastic else None
    if spec.rotation == "rht16_te":
        signs = torch.tensor(TE_RHT_SIGNS, dtype=torch.float32, device=device)
    elif spec.random_signs:
        signs = draw_signs(spec.rotation_size, device)
    else:
        signs = None
    return seed, signs


def _assert_bit_identical(x, spec):
    seed, signs = _random_streams(spec, x.device)
    got = quantize_triton(x, spec, seed=seed, signs=signs)
    want = quantize_reference(x, spec, seed=None if seed is None else int(seed.item()), signs=signs)
    assert got.codes.dtype == torch.uint8 and got.scales.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(got.codes, want.codes, rtol=0, atol=0)
    torch.testing.assert_close(got.scales.view(torch.uint8), want.scales.view(torch.uint8), rtol=0, atol=0)
    torch.testing.assert_close(got.outer, want.outer, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["rtn", "rtn_2d", "sr_te", "rtn_4over6", "sr", "sr_4over6"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_with_the_callers_amax_matches_reference(name, dtype):
    """The per-tensor amax from an ordinary reduction (dispatch's graph amax) gives the amax pass's bits."""
    spec = QuantSpec.named(name)
    for m, k in _valid_shapes(spec):
        x = (torch.randn(m, k, device=KERNEL_DEVICE) * 5).to(dtype)
        x[0, 1] = 0.0
        seed, _ = _random_streams(spec, x.device)
        got = quantize_triton(x, spec, seed=seed, amax=x.abs().amax().float())
        want = quantize_reference(x, spec, seed=None if seed is None else int(seed.item()))
        torch.testing.assert_close(got.codes, want.codes, rtol=0, atol=0)
        torch.testing.assert_close(got.scales.view(torch.uint8), want.scales.view(torch.uint8), rtol=0, atol=0)
        torch.testing.assert_close(got.outer, want.outer, rtol=0, atol=0)
    x = torch.randn(16, 128, device=KERNEL_DEVICE)
    x[3, 5] = float("nan")
    assert torch.isnan(quantize_triton(x, spec, seed=seed, amax=x.abs().amax()).outer)  # NaN in, NaN scale out
    with pytest.raises(ValueError, match="amax= is for per-tensor specs"):
        quantize_triton(x, QuantSpec.named("double_block_rtn"), amax=x.abs().amax())


@pytest.mark.parametrize("name", ["rht16_rtn_te", "rht16_sr_te", "ms_eden"])
@pytest.mark.parametrize("transposed", [False, True])
def test_one_amax_pass_gives_the_rotated_and_the_plain_amax(name, transposed):
    """``abs_max_pair_triton``: the amax after the rotation is the rotated quantizer's own amax pass's (the
    quantization given it equals the reference bit for bit), and the plain amax is ``max |x|`` (NaN-sticky), read
    through a transposed view as the backward's dY^T is."""
    spec = QuantSpec.named(name)
    m, k = 64, 256
    base = (torch.randn(k, m, device=KERNEL_DEVICE) * 5).to(torch.bfloat16)
    x = base.T if transposed else base.T.contiguous()
    seed, signs = _random_streams(spec, x.device)
    rotated, plain = abs_max_pair_triton(x, spec, signs)
    assert plain.view(torch.int32) == x.float().abs().amax().view(torch.int32)
    got = quantize_triton(x, spec, seed=seed, signs=signs, amax=rotated)
    want = quantize_reference(x.contiguous(), spec, seed=None if seed is None else int(seed.item()), signs=signs)
    torch.testing.assert_close(got.codes, want.codes, rtol=0, atol=0)
    torch.testing.assert_close(got.scales.view(torch.uint8), want.scales.view(torch.uint8), rtol=0, atol=0)
    torch.testing.assert_close(got.outer, want.outer, rtol=0, atol=0)
    x = x.clone()
    x[3, 5] = float("nan")
    assert abs_max_pair_triton(x, spec, signs).isnan().all()
    with pytest.raises(ValueError, match="per-tensor and rotated"):
        abs_max_pair_triton(x, QuantSpec.named("rtn"))


def _valid_shapes(spec):
    rows_ok = lambda m: m % spec.row_multiple == 0  # noqa: E731
    shapes = [(m, k) for m, k in SHAPES if k % spec.k_multiple == 0]
    return [(m if rows_ok(m) else m - m % 16, k) for m, k in shapes]


@pytest.mark.parametrize("name", QuantSpec.names())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference(name, dtype):
    spec = QuantSpec.named(name)
    for m, k in _valid_shapes(spec):
        x = (torch.randn(m, k, device=KERNEL_DEVICE) * 5).to(dtype)
        _assert_bit_identical(x, spec)


def _edge_case_tensor(k, device):
    """Rows that exercise every branch: zeros, tiny (subnormal E4M3 scales), huge, ties, outliers."""
    rows = [
        torch.zeros(k),
        torch.full((k,), 1e-30),  # one tiny row next to O(1) rows: block scales round to 0 / subnormal
        torch.linspace(-6, 6, k),
        torch.randn(k) * 1e-4,
        torch.randn(k) * 3e4,
        torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0] * (k // 8)),  # E2M1 ties at unit scale
        torch.randn(k).where(torch.rand(k) > 0.9, torch.zeros(k)),
        torch.randn(k) * torch.logspace(-6, 6, k),
    ]
    x = torch.stack(rows)
    x[2, 5] = 448.0 * 6  # the tensor maximum
    return x.to(device)


@pytest.mark.parametrize("name", QuantSpec.names())
def test_kernel_edge_cases(name):
    spec = QuantSpec.named(name)
    x = _edge_case_tensor(256, KERNEL_DEVICE)
    if spec.row_multiple == 16:
        x = torch.cat([x, x.flip(0)])
    _assert_bit_identical(x, spec)
    _assert_bit_identical(torch.zeros_like(x), spec)


@pytest.mark.parametrize("name", ["rtn", "double_block_rtn", "ms_eden"])
def test_kernel_nonfinite_input_gives_nan_outer(name):
    spec = QuantSpec.named(name)
    x = torch.randn(32, 256, device=KERNEL_DEVICE)
    x[3, 7] = float("nan")
    x[20, 200] = float("inf")
    seed, signs = _random_streams(spec, x.device)
    q = quantize_triton(x, spec, seed=seed, signs=signs)
    deq = q.dequantize(torch.float32)
    if spec.outer == "tensor":
        assert torch.isnan(q.outer) and torch.isnan(deq).all()
    else:
        assert torch.isnan(deq[3, :128]).all() and torch.isnan(deq[20, 128:]).all()
        assert torch.isfinite(deq[:3]).all()


def test_kernel_strided_rows():
    x = torch.randn(64, 512, device=KERNEL_DEVICE)[:, :256]
    assert x.stride(0) == 512
    spec = QuantSpec.named("sr")
    seed = draw_seed(x.device)
    got = quantize_triton(x, spec, seed=seed)
    want = quantize_reference(x.contiguous(), spec, seed=int(seed.item()))
    torch.testing.assert_close(got.codes, want.codes, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name", ["rtn", "sr", "rht16_sr_te", "rht16_rtn_te", "ms_eden", "double_block_rht16_sr", "rtn_4over6", "rtn_2d"]
)
def test_kernel_reads_transposed_views_in_place(name):
    """The wgrad operands are X^T and dY^T: the kernel reads the transposed view without a copy, by columns (the
    default) or through the view, with the reference's codes, scales and outer scales and the same GEMM values;
    the row count and K are not multiples of the tile (masked loads and stores)."""
    spec = QuantSpec.named(name)
    tokens = (1024 if ON_GPU else 128) + (16 if spec.k_multiple == 16 else 0)
    features = 256 + 16 * spec.row_multiple + (5 if spec.row_multiple == 1 else 0)
    x = (torch.randn(tokens, features, device=KERNEL_DEVICE) * 3).bfloat16()
    xt = x.T
    assert xt.stride() == (1, features)
    seed, signs = _random_streams(spec, x.device)
    want = quantize_reference(xt.contiguous(), spec, seed=None if seed is None else int(seed.item()), signs=signs)
    values = {}
    for by_columns in (None, False):
        if by_columns is None and spec.rotation_size == 128:
            continue  # RHT-128 reads along the columns
        values[by_columns] = torch.empty(xt.shape, dtype=torch.float16, device=KERNEL_DEVICE)
        got = quantize_triton(xt, spec, seed=seed, signs=signs, by_columns=by_columns, values=values[by_columns])
        torch.testing.assert_close(got.codes, want.codes, rtol=0, atol=0)
        torch.testing.assert_close(got.scales.view(torch.uint8), want.scales.view(torch.uint8), rtol=0, atol=0)
        torch.testing.assert_close(got.outer, want.outer, rtol=0, atol=0)
    if len(values) == 2:
        assert torch.equal(values[None].view(torch.int16), values[False].view(torch.int16))


def test_kernel_reading_by_columns_needs_halves():
    x = torch.randn(128, 64, device=KERNEL_DEVICE).T
    with pytest.raises(ValueError, match=r"by_columns=True needs halves=True"):
        quantize_triton(x, QuantSpec.named("rtn"), by_columns=True, halves=False)
    with pytest.raises(ValueError, match=r"by_columns=True needs halves=True"):
        quantize_triton(x, QuantSpec.named("ms_eden"), by_columns=True, signs=torch.ones(128, device=KERNEL_DEVICE))


@pytest.mark.parametrize("name", [n for n in QuantSpec.names() if QuantSpec.named(n).rotation == "rht16_te"])
def test_kernel_compiled_in_te_signs_match_the_reference(name):
    """signs=None for rht16_te uses TE's signs held in the kernel (no device tensor): same bits as passing them."""
    spec = QuantSpec.named(name)
    x = (torch.randn(48, 256, device=KERNEL_DEVICE) * 3).bfloat16()
    seed, signs = _random_streams(spec, x.device)
    got = quantize_triton(x, spec, seed=seed, signs=None)
    want = quantize_reference(x, spec, seed=None if seed is None else int(seed.item()), signs=signs)
    assert got.signs is None
    torch.testing.assert_close(got.codes, want.codes, rtol=0, atol=0)
    torch.testing.assert_close(got.scales.view(torch.uint8), want.scales.view(torch.uint8), rtol=0, atol=0)
    torch.testing.assert_close(got.outer, want.outer, rtol=0, atol=0)


def test_kernel_random_rotation_without_signs_is_an_error():
    x = torch.randn(32, 128, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="needs rotation signs"):
        quantize_triton(x, QuantSpec.named("ms_eden"), seed=draw_seed(x.device))


@triton.jit
def _randint4x_kernel(seed_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    w0, w1, w2, w3 = tl.randint4x(tl.load(seed_ptr), i)
    j = tl.arange(0, 4)
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [N, 4])
    tl.store(out_ptr + i[:, None] * 4 + j[None, :], words.to(tl.int64))


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5, 2**62 - 1])
def test_philox_matches_triton_randint4x(seed):
    seed_t = torch.tensor([seed], dtype=torch.int64, device=KERNEL_DEVICE)
    out = torch.empty(1024, 4, dtype=torch.int64, device=KERNEL_DEVICE)
    _randint4x_kernel[(1,)](seed_t, out, N=1024)
    want = torch.stack(philox4x32(seed, torch.arange(1024, device=KERNEL_DEVICE)), dim=-1)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rtn", "rtn_2d", "sr", "double_block_rht16_sr", "ms_eden"])
@pytest.mark.parametrize("block_rows,tiles,stages", [(16, 1, 1), (32, 2, 1), (64, 4, 1), (16, 4, 2)])
def test_kernel_launch_shapes(name, block_rows, tiles, stages):
    """Any tile rows / tiles per program / pipelined loads give the same bits, including programs whose tiles run
    past K."""
    spec = QuantSpec.named(name)
    m, k = (48, 384) if not ON_GPU else (4096 + 48, 4096 + 384)
    x = torch.randn(m, k, device=KERNEL_DEVICE)
    seed, signs = _random_streams(spec, x.device)
    got = quantize_triton(
        x, spec, seed=seed, signs=signs, block_rows=block_rows, tiles_per_program=tiles, stages=stages
    )
    want = quantize_reference(x, spec, seed=None if seed is None else int(seed.item()), signs=signs)
    torch.testing.assert_close(got.codes, want.codes, rtol=0, atol=0)
    torch.testing.assert_close(got.scales.view(torch.uint8), want.scales.view(torch.uint8), rtol=0, atol=0)
    torch.testing.assert_close(got.outer, want.outer, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rtn", "rtn_2d", "sr", "rtn_4over6", "sr_4over6", "double_block_rtn"])
def test_kernel_block_layouts_give_the_same_bits(name):
    """A block held as two halves in one thread or whole across two threads (the default of unrotated specs): the
    reference's codes, scales and outer scales, and the same fp16 GEMM values."""
    spec = QuantSpec.named(name)
    m, k = (48, 384) if not ON_GPU else (4096 + 48, 4096 + 384)
    x = torch.randn(m, k, device=KERNEL_DEVICE) * 3
    seed, signs = _random_streams(spec, x.device)
    want = quantize_reference(x, spec, seed=None if seed is None else int(seed.item()), signs=signs)
    values = {}
    for halves in (True, False):
        values[halves] = torch.empty(m, k, dtype=torch.float16, device=KERNEL_DEVICE)
        got = quantize_triton(x, spec, seed=seed, signs=signs, halves=halves, values=values[halves])
        torch.testing.assert_close(got.codes, want.codes, rtol=0, atol=0)
        torch.testing.assert_close(got.scales.view(torch.uint8), want.scales.view(torch.uint8), rtol=0, atol=0)
        torch.testing.assert_close(got.outer, want.outer, rtol=0, atol=0)
    assert torch.equal(values[True].view(torch.int16), values[False].view(torch.int16))


def test_kernel_rotations_need_their_block_layout():
    x = torch.randn(16, 128, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=r"needs halves=True"):
        quantize_triton(x, QuantSpec.named("rht16_rtn_te"), halves=False)
