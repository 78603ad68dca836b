"""Edge cases of the NVFP4 numerics spec in ``fp4compile/format.py``.

Every expected value here comes from an independent construction written in this
file: the E2M1 and E4M3 grids are enumerated from their bit layouts in float64 and
values are rounded by brute-force nearest-grid-point search (ties to the even code,
i.e. mantissa bit 0); the scale formulas of the module docstring's Note are
re-evaluated step by step in numpy float32 (one IEEE rounding per operation);
Hadamard matrices are built by Sylvester's recursion in float64; Philox words are
taken from ``fp4compile.philox.philox4x32`` directly.
"""

import math

import numpy as np
import pytest
import torch

from fp4compile import QuantSpec
from fp4compile.format import (
    E2M1_VALUES,
    NVFP4,
    TE_RHT_SIGNS,
    bf16_rne,
    block_random_bits,
    cast_exactly,
    dequantize,
    e2m1_decode,
    e2m1_rne,
    e2m1_sr,
    e4m3_rne,
    e4m3_sr,
    element_random_bits,
    fp32_from_bits,
    fwht,
    pack_nibbles,
    pairwise_sum,
    quantize_reference,
    rotate,
    stored_fp32,
    stored_sum,
    unpack_nibbles,
    unrotate,
)
from fp4compile.philox import philox4x32

F32 = np.float32
U32 = 2.0**-24  # unit roundoff of FP32

# ----------------------------------------------------------------------------- independent grids and rounding
#: E2M1 magnitudes indexed by the 3 low code bits: exponent bits e, mantissa bit m.
E2M1_GRID = np.array([(m / 2 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)) for e in range(4) for m in range(2)])


def _e4m3_grid() -> np.ndarray:
    """The 127 non-negative finite E4M3 (e4m3fn) values, indexed by code 0x00..0x7E, in float64."""
    codes = np.arange(127)
    e, m = codes >> 3, codes & 7
    return np.where(e == 0, m * 2.0**-9, (1 + m / 8) * 2.0 ** (e - 7))


E4M3_GRID = _e4m3_grid()


def _nearest_code(a: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Index of the grid point nearest to each ``a`` (float64, within the grid's range); ties to the even index."""
    d = np.abs(a[:, None] - grid[None, :])
    near = d == d.min(axis=1, keepdims=True)
    idx = np.arange(grid.size)
    even_tie = np.where(near & (idx % 2 == 0), idx, grid.size).min(axis=1)
    return np.where(near.sum(axis=1) > 1, even_tie, d.argmin(axis=1))


def brute_e2m1_rne(v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of FP32 ``v`` by nearest-grid search in float64, ties to even, saturating, sign bit kept."""
    v64 = v.double().numpy().ravel()
    a = np.abs(v64)
    code = np.where(a > 6, 7, _nearest_code(np.minimum(a, 6.0), E2M1_GRID))
    return torch.from_numpy((code | (np.signbit(v64).astype(np.int64) << 3)).astype(np.uint8)).view(v.shape)


def brute_e4m3_rne(r: np.ndarray) -> np.ndarray:
    """Nearest E4M3 value (float64) of non-negative ``r``, ties to even code, saturating at 448."""
    r = np.asarray(r, dtype=np.float64)
    out = E4M3_GRID[_nearest_code(np.minimum(r, 448.0), E4M3_GRID)]
    return np.where(r > 448, 448.0, out)


def _f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _ulp_neighbours(points: torch.Tensor, steps: int) -> torch.Tensor:
    """``points`` and their ``steps`` nearest FP32 neighbours on either side (torch.nextafter)."""
    out = [points]
    up, down = points.clone(), points.clone()
    for _ in range(steps):
        up = torch.nextafter(up, _f32(math.inf))
        down = torch.nextafter(down, _f32(-math.inf))
        out += [up, down]
    return torch.cat(out)


def test_independent_grids_match_the_formats():
    assert tuple(E2M1_GRID) == E2M1_VALUES[:8]
    assert [-g for g in E2M1_GRID] == list(E2M1_VALUES[8:])
    assert all(np.signbit(E2M1_VALUES[8:]))
    torch_e4m3 = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64).numpy()
    np.testing.assert_array_equal(E4M3_GRID, torch_e4m3)
    assert E4M3_GRID[1] == 2.0**-9 and E4M3_GRID[-1] == 448.0 and np.all(np.diff(E4M3_GRID) > 0)


# ----------------------------------------------------------------------------- E2M1 round to nearest even
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _e2m1_dense_values() -> torch.Tensor:
    special = _f32(list(E2M1_GRID) + list(E2M1_MIDPOINTS) + [6.5, 7.0, 1e30, 2.0**-149, 1e-30])
    near = _ulp_neighbours(special, steps=3)
    sweep = torch.linspace(-7.0, 7.0, 140_001, dtype=torch.float32)
    rand = torch.randn(20_000) * 3
    vals = torch.cat([near, -near, sweep, rand, _f32([math.inf, -math.inf, 0.0, -0.0])])
    return vals


def test_e2m1_rne_matches_brute_force_on_dense_values():
    v = _e2m1_dense_values()
    got = e2m1_rne(v)
    want = brute_e2m1_rne(v)
    assert got.dtype == torch.uint8
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, f"mismatches at {v[bad[:10]].tolist()}: got {got[bad[:10]].tolist()}"


@pytest.mark.parametrize(
    "mid, code",
    [(0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6)],
)
def test_e2m1_rne_midpoints_tie_to_even_code(mid, code):
    below = torch.nextafter(_f32(mid), _f32(0.0))
    above = torch.nextafter(_f32(mid), _f32(10.0))
    lo = int(np.searchsorted(E2M1_GRID, mid)) - 1  # code of the grid point below the midpoint
    assert E2M1_GRID[lo] < mid < E2M1_GRID[lo + 1] and mid == (E2M1_GRID[lo] + E2M1_GRID[lo + 1]) / 2
    assert code % 2 == 0 and code in (lo, lo + 1)
    assert e2m1_rne(_f32([mid, -mid])).tolist() == [code, code | 8]
    assert e2m1_rne(below).item() == lo
    assert e2m1_rne(above).item() == lo + 1


def test_e2m1_rne_saturates():
    v = _f32([6.0, 6.5, 7.0, 100.0, 1e30, math.inf, -6.5, -1e30, -math.inf, torch.finfo(torch.float32).max])
    assert e2m1_rne(v).tolist() == [7, 7, 7, 7, 7, 7, 15, 15, 15, 7]


def test_e2m1_rne_keeps_sign_bit_of_zero_and_tiny_negatives():
    v = _f32([-0.0, -2.0**-149, -1e-30, -0.1, -0.25, 0.0, 2.0**-149, 0.25])
    assert e2m1_rne(v).tolist() == [8, 8, 8, 8, 8, 0, 0, 0]


def test_e2m1_rne_negative_values_mirror_positive_ones():
    v = torch.rand(10_000) * 8
    assert torch.equal(e2m1_rne(-v), e2m1_rne(v) | 8)


def test_te_rht_signs_are_made_on_the_device_from_the_mask():
    from fp4compile.format import TE_RHT_SIGNS, te_rht_signs

    signs = te_rht_signs(torch.device("cpu"))
    assert signs.dtype == torch.float32 and signs.tolist() == list(TE_RHT_SIGNS)


def test_e2m1_decode_inverts_rne_on_the_grid():
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_decode(codes)
    assert values.tolist() == list(E2M1_VALUES)
    assert torch.equal(torch.signbit(values), codes >= 8)
    assert torch.equal(e2m1_rne(values), codes)


# ----------------------------------------------------------------------------- E2M1 stochastic rounding
def _interval_points(lo: float, hi: float) -> list:
    """FP32 points strictly inside (lo, hi) at awkward and simple fractions."""
    width = hi - lo
    fracs = [2.0**-17, 3 * 2.0**-17, 1 / 3, 0.5, 1 - 2.0**-16]
    pts = [float(F32(lo + f * width)) for f in fracs]
    pts += [float(torch.nextafter(_f32(lo), _f32(hi))), float(torch.nextafter(_f32(hi), _f32(lo)))]
    return [p for p in pts if lo < p < hi]


def test_e2m1_sr_up_probability_is_ceil_of_fraction_exhaustively():
    bits = torch.arange(2**16, dtype=torch.int64)
    values, lo_codes, expected_ups = [], [], []
    for lo_code in range(7):
        lo, hi = E2M1_GRID[lo_code], E2M1_GRID[lo_code + 1]
        for p in _interval_points(lo, hi):
            frac = (p - lo) / (hi - lo)  # exact in float64: p is an FP32 number near lo and hi
            for sign in (1.0, -1.0):
                values.append(sign * p)
                lo_codes.append(lo_code | (8 if sign < 0 else 0))
                expected_ups.append(math.ceil(frac * 2**16))
    v = _f32(values)[:, None].expand(-1, bits.numel())
    codes = e2m1_sr(v, bits[None, :].expand_as(v))
    lo_codes = torch.tensor(lo_codes, dtype=torch.uint8)[:, None]
    assert torch.all((codes == lo_codes) | (codes == lo_codes + 1)), "SR left the bracketing grid points"
    ups = (codes == lo_codes + 1).sum(dim=1)
    assert ups.tolist() == expected_ups


def test_e2m1_sr_rounds_up_exactly_for_bits_below_the_threshold():
    # fp32(1.3) = 1.29999995 lies at frac 0.59999990 between 1 and 1.5, so frac * 2**16 = 39321.59375:
    # bits 0..39321 round up (to 1.5, code 3), bits 39322..65535 round down (to 1.0, code 2).
    frac = (float(F32(1.3)) - 1.0) / 0.5
    assert frac * 2**16 == 39321.59375
    bits = torch.tensor([0, 39321, 39322, 65535])
    assert e2m1_sr(_f32([1.3] * 4), bits).tolist() == [3, 3, 2, 2]
    assert e2m1_sr(_f32([-1.3] * 4), bits).tolist() == [11, 11, 10, 10]


def test_e2m1_sr_never_moves_grid_values():
    bits = torch.arange(2**16, dtype=torch.int64)
    grid = _f32(E2M1_VALUES)[:, None].expand(-1, bits.numel())
    codes = e2m1_sr(grid, bits[None, :].expand_as(grid))
    assert torch.equal(codes, torch.arange(16, dtype=torch.uint8)[:, None].expand_as(codes))


def test_e2m1_sr_clamps_at_six():
    bits = torch.arange(0, 2**16, 7, dtype=torch.int64)
    v = _f32([6.0, 6.0001, 6.9, 7.0, 1e30, math.inf, -6.5, -math.inf])[:, None].expand(-1, bits.numel())
    codes = e2m1_sr(v, bits[None, :].expand_as(v))
    assert codes[:6].eq(7).all() and codes[6:].eq(15).all()


def test_e2m1_sr_keeps_sign_of_values_rounded_to_zero():
    v = _f32([-0.0, -0.1, -1e-30])
    assert e2m1_sr(v, torch.tensor([65535, 65535, 65535])).tolist() == [8, 8, 8]
    assert e2m1_sr(_f32([-0.1]), torch.tensor([0])).tolist() == [9]


# ----------------------------------------------------------------------------- E4M3 round to nearest even
def _e4m3_midpoints() -> np.ndarray:
    return (E4M3_GRID[:-1] + E4M3_GRID[1:]) / 2


def test_e4m3_rne_matches_brute_force_on_dense_values():
    pts = _f32(np.concatenate([E4M3_GRID, _e4m3_midpoints(), [464.0, 480.0, 500.0, 1e9, 2.0**-11, 2.0**-149]]))
    near = _ulp_neighbours(pts, steps=2)
    rand = torch.exp2(torch.rand(50_000) * 21.0 - 12.0)  # log-uniform over [2**-12, 2**9]
    r = torch.cat([near, rand, _f32([math.inf, torch.finfo(torch.float32).max])]).clamp(min=0.0)
    got = e4m3_rne(r)
    want = torch.from_numpy(brute_e4m3_rne(r.double().numpy())).float()
    assert got.dtype == torch.float32
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, f"mismatches at {r[bad[:10]].tolist()}: got {got[bad[:10]].tolist()}"


def test_e4m3_rne_every_midpoint_ties_to_even_code():
    mids = _e4m3_midpoints()
    assert np.all(F32(mids) == mids)  # every midpoint is an FP32 number
    even = np.where(np.arange(126) % 2 == 0, E4M3_GRID[:-1], E4M3_GRID[1:])
    got = e4m3_rne(_f32(mids)).double().numpy()
    np.testing.assert_array_equal(got, even)


def test_e4m3_rne_carries_into_the_next_binade():
    # Midpoints whose upper neighbour is a power of two >= 2**-6: the top of each binade has an odd
    # mantissa (111), so the tie carries into the next binade.
    mids = _e4m3_midpoints()
    hi = E4M3_GRID[1:]
    carries = (np.log2(hi) % 1 == 0) & (hi >= 2.0**-6)
    assert carries.sum() == 15  # into 2**-6 .. 2**8 (256's binade ends at 448, not a power of two)
    got = e4m3_rne(_f32(mids[carries])).double().numpy()
    np.testing.assert_array_equal(got, hi[carries])


@pytest.mark.parametrize(
    "r, want, is_midpoint",
    [
        (15.5, 16.0, True),  # 15 = 1.111b*2**3 (odd) | 16 (even): carry
        (31.75, 32.0, False),  # binade [16, 32) has step 2: 30 | 32, 31.75 is past the midpoint 31
        (31.0, 32.0, True),  # 30 = 1.111b*2**4 (odd): tie goes up to 32
        (29.0, 28.0, True),  # 28 = 1.110b*2**4 (even)
        (13.5, 14.0, True),
        (12.5, 12.0, True),
        (248.0, 256.0, True),  # 240 = 1.111b*2**7 (odd) | 256: carry
        (432.0, 448.0, True),  # 416 = 1.101b*2**8 (odd) | 448 = 1.110b*2**8 (even)
        (15.0 * 2.0**-10, 2.0**-6, True),  # largest subnormal 7*2**-9 (odd) | smallest normal 2**-6
    ],
)
def test_e4m3_rne_named_values(r, want, is_midpoint):
    below = E4M3_GRID[E4M3_GRID <= r].max()
    above = E4M3_GRID[E4M3_GRID > r].min()
    assert bool(r == (below + above) / 2) is is_midpoint
    assert brute_e4m3_rne(np.array([r]))[0] == want
    assert e4m3_rne(_f32([r])).item() == want


@pytest.mark.parametrize("r", [448.0, 448.00003, 463.9, 464.0, 479.0, 480.0, 500.0, 1e9, 3e38, math.inf])
def test_e4m3_rne_saturates_at_448(r):
    assert e4m3_rne(_f32([r])).item() == 448.0


@pytest.mark.parametrize(
    "r, want",
    [
        (2.0**-9, 2.0**-9),  # smallest subnormal
        (3 * 2.0**-9, 3 * 2.0**-9),
        (7 * 2.0**-9, 7 * 2.0**-9),  # largest subnormal
        (2.0**-10, 0.0),  # tie between 0 and 2**-9: to 0 (even)
        (3 * 2.0**-10, 2.0**-8),  # tie between 1 and 2 quanta: to 2 (even)
        (5 * 2.0**-10, 2.0**-8),  # tie between 2 and 3 quanta: to 2
        (7 * 2.0**-10, 4 * 2.0**-9),  # tie between 3 and 4 quanta: to 4
        (2.0**-11, 0.0),
        (2.0**-149, 0.0),
        (0.0, 0.0),
    ],
)
def test_e4m3_rne_subnormal_values(r, want):
    assert e4m3_rne(_f32([r])).item() == want
    if r == 2.0**-10:
        assert e4m3_rne(torch.nextafter(_f32([r]), _f32([1.0]))).item() == 2.0**-9
        assert e4m3_rne(torch.nextafter(_f32([r]), _f32([0.0]))).item() == 0.0


# ----------------------------------------------------------------------------- E4M3 stochastic rounding
@pytest.mark.parametrize(
    "r",
    [
        15.3,  # normal, binade [8, 16), step 1
        100.7,  # [64, 128), step 8
        300.3,  # [256, 448], step 32
        1.0 + 2.0**-20,  # tiny fraction 2**-17: exactly 8 of 2**20
        16.0 - 2.0**-20,  # rounds up (carry into the next binade) for all but one of 2**20
        0.02,  # smallest normal binade [2**-6, 2**-5), step 2**-9
        0.0123,  # subnormal
        0.001,  # subnormal, below 2**-9
        3e-5,  # subnormal, tiny fraction of 2**-9
    ],
)
def test_e4m3_sr_up_probability_is_fractional_position_exhaustively(r):
    r32 = float(F32(r))
    lo = E4M3_GRID[E4M3_GRID <= r32].max()
    hi = E4M3_GRID[E4M3_GRID > r32].min()
    frac = (r32 - lo) / (hi - lo)  # exact in float64
    bits = torch.arange(2**20, dtype=torch.int64)
    got = e4m3_sr(_f32([r32]).expand(bits.numel()), bits)
    assert torch.all((got == lo) | (got == hi))
    ups = int((got == hi).sum())
    assert ups == math.ceil(frac * 2**20)
    if r32 >= 2.0**-6:  # normal range: FP32 has 20 bits below E4M3's mantissa, so the probability is exact
        assert frac * 2**20 == ups


def test_e4m3_sr_never_moves_grid_values():
    bits = torch.cat([torch.tensor([0, 1, 2**20 - 1]), torch.randint(0, 2**20, (61,))])
    grid = _f32(E4M3_GRID)[:, None].expand(-1, bits.numel())
    got = e4m3_sr(grid, bits[None, :].expand_as(grid))
    assert torch.equal(got, grid)


def test_e4m3_sr_clamps_at_448():
    bits = torch.tensor([0, 1, 2**19, 2**20 - 1])
    r = _f32([448.0, 448.5, 479.0, 1000.0, 1e30, math.inf])[:, None].expand(-1, 4)
    assert e4m3_sr(r, bits[None, :].expand_as(r)).eq(448.0).all()
    # just below 448 the two neighbours are 416 and 448
    got = e4m3_sr(_f32([447.0]).expand(4), bits)
    assert got.tolist() == [448.0, 448.0, 448.0, 416.0]


# ----------------------------------------------------------------------------- reference quantizer: independent model
def _numpy_reference(x: np.ndarray, spec: QuantSpec):
    """The module docstring's Note, step by step in numpy float32; E4M3/E2M1 rounding by brute force."""
    assert spec.rounding == "rtn" and spec.scale_rule == "max6" and spec.rotation == "none" and spec.block == "1x16"
    m, k = x.shape
    vmax_cap, inv_vmax = F32(spec.vmax * spec.cap), F32(1.0 / spec.vmax)
    xb = x.astype(F32).reshape(m, k // 16, 16)
    blockmax = np.abs(xb).max(axis=-1)
    if spec.outer == "tensor":
        amax = blockmax.max()
        amax_blocks = np.full_like(blockmax, amax)
    else:
        amax = blockmax.reshape(m, k // 128, 8).max(axis=-1)
        amax_blocks = np.repeat(amax, 8, axis=1)
    with np.errstate(divide="ignore", over="ignore"):
        s_enc = np.where(amax_blocks == 0, F32(1), np.minimum(vmax_cap / amax_blocks, F32(np.finfo(F32).max)))
        outer_blocks = (F32(1) / s_enc).astype(F32)
        f = (s_enc * inv_vmax).astype(F32)
        raw = np.minimum((blockmax * f).astype(F32), F32(448))
        b = brute_e4m3_rne(raw.astype(np.float64).ravel()).reshape(raw.shape).astype(F32)
        e = np.where(b == 0, F32(0), np.minimum(F32(1) / (b * outer_blocks), F32(np.finfo(F32).max))).astype(F32)
    v = (xb * e[..., None]).astype(F32)
    codes = brute_e2m1_rne(torch.from_numpy(v.reshape(m, k)))
    outer = outer_blocks[0, 0] if spec.outer == "tensor" else outer_blocks[:, ::8]
    return codes, b, raw, outer


def _check_against_numpy(x: torch.Tensor, spec: QuantSpec) -> NVFP4:
    q = quantize_reference(x, spec)
    codes, b, _, outer = _numpy_reference(x.float().numpy(), spec)
    assert torch.equal(unpack_nibbles(q.codes), codes)
    np.testing.assert_array_equal(q.scales.float().numpy(), b)
    np.testing.assert_array_equal(q.outer.numpy(), outer)
    return q


def test_quantize_rtn_hand_computed_example():
    # Block 0 holds the tensor amax 2688 = 6*448, so s_enc = 2688/2688 = 1 and outer = 1.
    # Its scale: 2688 * fp32(1/6) = 448.0000134 -> FP32 448 -> E4M3 448; e = fp32(1/448) = 1/448*(1+4.3e-8).
    block0 = [2688, -1344, 672, 224, 0, 1000, -1500, 100, -100, 1800, 2400, 448, -448, 896, -2688, 50]
    codes0 = [7, 13, 3, 1, 0, 4, 13, 0, 8, 6, 7, 2, 10, 4, 15, 0]
    # Block 1: max 96 -> 96 * fp32(1/6) = 16.0000005 -> FP32 16 -> E4M3 16; e = 1/16 exactly, so ties are exact:
    # 40/16 = 2.5 -> 2, 4/16 = .25 -> 0, 12/16 = .75 -> 1, 20/16 = 1.25 -> 1, 28/16 = 1.75 -> 2, 3.5 -> 4, 5 -> 4.
    block1 = [96, -48, 40, 8, 4, -4, 12, 20, 28, 56, 80, -88, 0.001, 64, 24, -16]
    codes1 = [7, 13, 4, 1, 0, 8, 2, 2, 4, 6, 6, 15, 0, 6, 3, 10]
    x = _f32([block0 + block1])
    q = quantize_reference(x, QuantSpec.named("rtn"))
    assert q.outer.dtype == torch.float32 and q.outer.shape == () and q.outer.item() == 1.0
    assert q.outer.item() == F32(1) / (F32(6 * 448) / F32(2688))
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.float().tolist() == [[448.0, 16.0]]
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (1, 16)
    assert unpack_nibbles(q.codes).tolist() == [codes0 + codes1]
    assert q.shape == (1, 32)
    deq = q.dequantize()
    want = [E2M1_VALUES[c] * 448 for c in codes0] + [E2M1_VALUES[c] * 16 for c in codes1]
    assert deq.tolist() == [want]
    _check_against_numpy(x, QuantSpec.named("rtn"))


def test_quantize_rtn_hand_example_with_nontrivial_outer_scale():
    # amax 10: s_enc = fp32(2688 / 10) = 268.8 (rounded), outer = 1/s_enc, all in FP32.
    x = _f32([[10.0, -3.3, 0.7, 0.01] * 4 + [0.3, -0.05, 0.2, 0.15] * 4])
    q = quantize_reference(x, QuantSpec.named("rtn"))
    s_enc = F32(2688) / F32(10)
    assert q.outer.item() == F32(1) / s_enc
    raw = [F32(10) * (s_enc * F32(1 / 6)), F32(0.3) * (s_enc * F32(1 / 6))]
    assert q.scales.float().tolist() == [list(brute_e4m3_rne(np.array(raw, dtype=np.float64)))]
    assert q.scales.float().tolist() == [[448.0, 13.0]]  # raw[1] = 13.44 -> 13
    _check_against_numpy(x, QuantSpec.named("rtn"))


def test_quantize_follows_documented_operation_order():
    # Inputs found by search where the FP32 rounding order of the Note's formulas is observable.
    # (a) f = s_enc * fp32(1/6) first, then blockmax * f: raw lands exactly on the E4M3 tie 13.5 -> 14;
    #     (blockmax * s_enc) * fp32(1/6) would give 13.499999 -> 13.
    amax, bmax = F32(52.048675537109375), F32(1.5684309005737305)
    s_enc = F32(2688) / amax
    assert bmax * (s_enc * F32(1 / 6)) == F32(13.5)
    assert (bmax * s_enc) * F32(1 / 6) < F32(13.5)
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 16] = float(amax), float(bmax)
    q = quantize_reference(x, QuantSpec.named("rtn"))
    assert q.scales.float()[0].tolist() == [448.0, 14.0]
    # (b) e = 1 / (b * outer): v = 0.74999994 -> 0.5 (code 1); 1/b/outer or s_enc/b would give exactly
    #     0.75 -> 1.0 (code 2, the even neighbour).
    amax, bmax, elem = F32(75.59107971191406), F32(71.89611053466797), F32(8.773964881896973)
    outer = F32(1) / (F32(2688) / amax)
    b = F32(416)
    assert elem * (F32(1) / (b * outer)) < F32(0.75)
    assert elem * ((F32(1) / b) / outer) == F32(0.75) and elem * ((F32(2688) / amax) / b) == F32(0.75)
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 16], x[0, 17] = float(amax), float(bmax), float(elem)
    q = quantize_reference(x, QuantSpec.named("rtn"))
    assert q.outer.item() == outer
    assert q.scales.float()[0, 1].item() == b
    assert unpack_nibbles(q.codes)[0, 16:18].tolist() == [7, 1]


@pytest.mark.parametrize("name, shape", [("rtn", (6, 64)), ("double_block_rtn", (5, 256))])
def test_quantize_matches_independent_numpy_model(name, shape):
    m, k = shape
    # per-block magnitudes over 7 decades, so some block scales are subnormal or round to 0
    mags = torch.exp2(torch.rand(m, k // 16, 1) * 24 - 20)
    x = (torch.randn(m, k // 16, 16) * mags).reshape(m, k)
    x[0, :16] = 0.0
    _check_against_numpy(x, QuantSpec.named(name))


def test_zero_block_inside_nonzero_tensor():
    x = torch.randn(2, 48) * 3
    x[1, 16:32] = 0.0
    q = quantize_reference(x, QuantSpec.named("rtn"))
    assert q.scales[1, 1].float().item() == 0.0
    assert unpack_nibbles(q.codes)[1, 16:32].eq(0).all()
    deq = q.dequantize()
    assert deq[1, 16:32].eq(0).all() and not torch.signbit(deq[1, 16:32]).any()
    assert q.scales.float().gt(0).sum() == 5


def test_all_zero_tensor():
    x = torch.zeros(3, 32)
    q = quantize_reference(x, QuantSpec.named("rtn"))
    assert q.outer.item() == 1.0
    assert q.scales.float().eq(0).all()
    assert q.codes.eq(0).all()
    assert torch.equal(q.dequantize(), x)


def test_subnormal_block_scale():
    # Block 0 carries the amax 2688 (outer = 1); the others are tiny, so their scales are subnormal E4M3.
    tiny_maxima = [0.01, 0.02, 0.05, 0.08]  # raw = max/6: 0.85, 1.7, 4.3, 6.8 quanta of 2**-9
    x = torch.zeros(1, 16 * (1 + len(tiny_maxima)))
    x[0, :16] = torch.linspace(-2688, 2688, 16)
    for i, bmax in enumerate(tiny_maxima, start=1):
        block = torch.rand(16) * 2 - 1
        block = block / block.abs().max() * bmax
        x[0, 16 * i : 16 * (i + 1)] = block
    q = quantize_reference(x, QuantSpec.named("rtn"))
    outer = q.outer.item()
    assert outer == 1.0
    blockmax = x.view(-1, 16).abs().amax(dim=1).numpy()
    raw = (blockmax * (F32(F32(2688) / F32(2688)) * F32(1 / 6))).astype(F32)
    scales = q.scales.float()[0].numpy()
    np.testing.assert_array_equal(scales, brute_e4m3_rne(raw.astype(np.float64)))
    np.testing.assert_array_equal(scales, e4m3_rne(torch.from_numpy(raw)).numpy())
    assert np.all((scales[1:] > 0) & (scales[1:] < 2.0**-6))  # subnormal E4M3
    assert scales[1] == 2.0**-9  # 0.01/6 = 0.853 quanta -> 1 quantum
    # Error per element: at most half an E2M1 step (<= 1) times the scale where |v| <= 6; where the scale
    # rounded down the clipped excess is at most 6 * (raw - b) <= 6 * 2**-10 (half a subnormal quantum).
    err = (q.dequantize() - x).abs().view(-1, 16)[1:]
    bound = np.maximum(scales[1:], 6 * 2.0**-10) * outer * (1 + 1e-6)
    assert torch.all(err <= torch.from_numpy(bound)[:, None].float())


def test_block_scale_rounding_to_zero_gives_signed_zero_values():
    x = torch.zeros(1, 32)
    x[0, 0] = 2688.0
    x[0, 16:] = torch.linspace(-0.004, 0.004, 16)  # raw = 0.004/6 = 0.34 quanta of 2**-9 -> 0
    q = quantize_reference(x, QuantSpec.named("rtn"))
    assert q.scales.float()[0].tolist() == [448.0, 0.0]
    assert torch.all(unpack_nibbles(q.codes)[0, 16:] & 7 == 0)  # +-0 codes
    assert q.dequantize()[0, 16:].eq(0).all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_element_at_block_max_saturates_when_scale_rounds_down(sign):
    x = torch.zeros(1, 32)
    x[0, 0] = 2688.0  # outer = 1
    x[0, 16] = sign * 92.4  # raw = 92.4/6 = 15.4 -> E4M3 15; v = 92.4/15 = 6.16 -> clamps to 6
    x[0, 17] = sign * 45.0  # 45/15 = 3
    q = quantize_reference(x, QuantSpec.named("rtn"))
    raw = F32(92.4) * (F32(1) * F32(1 / 6))
    b = q.scales.float()[0, 1].item()
    assert b == 15.0 and b < raw
    assert F32(92.4) * (F32(1) / F32(15)) > 6
    codes = unpack_nibbles(q.codes)[0, 16:18].tolist()
    assert codes == ([7, 5] if sign > 0 else [15, 13])
    assert q.dequantize()[0, 16].item() == sign * 90.0


# ----------------------------------------------------------------------------- nibble packing
def test_pack_nibbles_low_nibble_first_literal():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0, 0, 9]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x21, 0x43, 0x0F, 0x90]]
    assert unpack_nibbles(torch.tensor([0xAB, 0x07], dtype=torch.uint8)).tolist() == [0xB, 0xA, 0x7, 0x0]


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(unpack_nibbles(packed), codes)
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_nibbles(unpack_nibbles(every_byte)), every_byte)


# ----------------------------------------------------------------------------- Hadamard transforms
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def _chunked_matmul(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    n = h.shape[0]
    return (x.double().reshape(*x.shape[:-1], -1, n) @ h).reshape(x.shape)


@pytest.mark.parametrize("n", [16, 128])
def test_fwht_equals_sylvester_hadamard_matmul(n):
    h = _sylvester(n)
    assert torch.equal(h @ h, n * torch.eye(n, dtype=torch.float64))
    # small integers: every partial sum is exact in FP32, so the comparison is exact
    xi = torch.randint(-8, 9, (2, 3, 3 * n)).float()
    assert torch.equal(fwht(xi, n).double(), _chunked_matmul(xi, h))
    xd = torch.randn(4, 2 * n, dtype=torch.float64)
    assert (fwht(xd, n) - _chunked_matmul(xd, h)).abs().max() < 1e-12  # |entries| ~ sqrt(n), fp64 eps 2.2e-16


def _butterfly_strides_largest_first(x: np.ndarray, n: int) -> np.ndarray:
    """The documented FP32 butterfly: strides n/2, ..., 2, 1; each pair (a, b) becomes (a + b, a - b)."""
    x = x.astype(F32).copy()
    h = n // 2
    while h >= 1:
        for start in range(0, x.shape[-1], 2 * h):
            a, b = x[..., start : start + h].copy(), x[..., start + h : start + 2 * h].copy()
            x[..., start : start + h], x[..., start + h : start + 2 * h] = a + b, a - b
        h //= 2
    return x


@pytest.mark.parametrize("n", [16, 128])
def test_fwht_butterfly_order_is_bit_exact(n):
    # The stage order does not change the exact result but does change FP32 rounding; kernels rely on it.
    x = torch.randn(6, 2 * n) * torch.exp2(torch.randint(-12, 12, (6, 2 * n)).float())
    want = _butterfly_strides_largest_first(x.numpy(), n)
    assert torch.equal(fwht(x, n), torch.from_numpy(want))
    reversed_order = x.numpy()
    for h in [1 << s for s in range(int(math.log2(n)))]:
        t = reversed_order.reshape(6, -1, 2, h)
        reversed_order = np.stack((t[:, :, 0] + t[:, :, 1], t[:, :, 0] - t[:, :, 1]), axis=2).reshape(6, 2 * n)
    assert not np.array_equal(reversed_order, want)  # the test can tell the orders apart


@pytest.mark.parametrize("n", [16, 128])
def test_rotate_unrotate_round_trip_and_norms(n):
    # FP32 error analysis (u = 2**-24, L = log2 n butterfly stages, each a scaled orthogonal map with
    # one rounding per output): ||fl(H x) - H x|| <= L u ||H x|| to first order, the rounded 1/sqrt(n)
    # and its product add 2u, so ||rotate(x) - Q x|| <= (L + 2) u ||x|| with Q = H diag(s) / sqrt(n)
    # orthogonal; unrotate adds the same again. One extra u of slack covers second-order terms.
    levels = int(math.log2(n))
    signs = (torch.randint(0, 2, (n,)) * 2 - 1).float()
    x = torch.randn(8, 2 * n) * torch.exp2(torch.randint(-10, 10, (8, 1)).float())
    y = rotate(x, signs)
    assert y.dtype == torch.float32
    xn = x.double().norm(dim=1)
    exact = _chunked_matmul(x * signs.repeat(2), _sylvester(n)) / math.sqrt(n)
    assert torch.all((y.double() - exact).norm(dim=1) <= (levels + 3) * U32 * xn)
    back = unrotate(y, signs)
    assert torch.all((back.double() - x.double()).norm(dim=1) <= (2 * levels + 5) * U32 * xn)
    assert torch.all((y.double().norm(dim=1) - xn).abs() <= (levels + 3) * U32 * xn)
    assert not torch.allclose(y, x)


def test_te_rht_signs_are_plus_minus_one():
    assert len(TE_RHT_SIGNS) == 16 and set(TE_RHT_SIGNS) == {1, -1}


# ----------------------------------------------------------------------------- pairwise sums
def test_pairwise_sum_matches_explicit_tree():
    t = (torch.randn(64, 8) * torch.exp2(torch.randint(-20, 20, (64, 8)).float())).numpy()
    want = ((t[:, 0] + t[:, 1]) + (t[:, 2] + t[:, 3])) + ((t[:, 4] + t[:, 5]) + (t[:, 6] + t[:, 7]))
    assert want.dtype == np.float32
    np.testing.assert_array_equal(pairwise_sum(torch.from_numpy(t)).numpy(), want)
    t16 = torch.randn(3, 2, 16) * 1e4
    a = [t16[..., i] for i in range(16)]
    pairs = [a[i] + a[i + 1] for i in range(0, 16, 2)]
    quads = [pairs[i] + pairs[i + 1] for i in range(0, 8, 2)]
    want16 = (quads[0] + quads[1]) + (quads[2] + quads[3])
    assert torch.equal(pairwise_sum(t16), want16)


def test_pairwise_sum_order_is_observable():
    big = 2.0**24  # FP32 spacing is 2 here, so big + 1 rounds (tie) back to big
    t = _f32([[big, 1, 1, 1], [big, 1, -big, 1]])
    got = pairwise_sum(t).tolist()
    assert got == [big + 2, 1.0]
    tn = t.numpy()
    naive = ((tn[:, 0] + tn[:, 1]) + tn[:, 2]) + tn[:, 3]  # left to right
    halves = (tn[:, 0] + tn[:, 2]) + (tn[:, 1] + tn[:, 3])  # stride-n/2 pairing
    assert naive.tolist()[0] != got[0]
    assert halves.tolist()[1] != got[1]


# ----------------------------------------------------------------------------- random bits
SEED = 2**62 + 987654321  # uses both 32-bit key words


def test_element_random_bits_shape_range_determinism():
    bits = element_random_bits(SEED, 5, 64, torch.device("cpu"))
    assert bits.shape == (5, 64) and not bits.dtype.is_floating_point
    assert bits.min() >= 0 and bits.max() < 2**16 and bits.max() >= 2**15
    assert torch.equal(bits, element_random_bits(SEED, 5, 64, torch.device("cpu")))
    assert (bits != element_random_bits(SEED + 1, 5, 64, torch.device("cpu"))).float().mean() > 0.9
    assert bits.unique().numel() > 300


def test_block_random_bits_shape_range_determinism():
    bits = block_random_bits(SEED, 7, 32, torch.device("cpu"))
    assert bits.shape == (7, 32) and not bits.dtype.is_floating_point
    assert bits.min() >= 0 and bits.max() < 2**20 and bits.max() >= 2**19
    assert torch.equal(bits, block_random_bits(SEED, 7, 32, torch.device("cpu")))
    assert (bits != block_random_bits(SEED + 1, 7, 32, torch.device("cpu"))).float().mean() > 0.9


@pytest.mark.parametrize("i, j", [(0, 0), (0, 1), (0, 2), (0, 7), (0, 8), (1, 0), (2, 13), (3, 46), (4, 63)])
def test_element_random_bits_counter_layout(i, j):
    rows, k = 5, 64
    bits = element_random_bits(SEED, rows, k, torch.device("cpu"))
    words = philox4x32(SEED, torch.tensor([i * (k // 8) + j // 8]))
    word = int(words[(j % 8) // 2].item())
    half = (word >> 16) if j % 2 else (word & 0xFFFF)
    assert bits[i, j].item() == half


@pytest.mark.parametrize("i, b", [(0, 0), (0, 1), (2, 5), (6, 31)])
def test_block_random_bits_counter_layout(i, b):
    rows, nblocks = 7, 32
    bits = block_random_bits(SEED, rows, nblocks, torch.device("cpu"))
    word = int(philox4x32(SEED, torch.tensor([i * nblocks + b]))[0].item())
    assert bits[i, b].item() == word & 0xFFFFF


# ----------------------------------------------------------------------------- NVFP4 container
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantize_returns_input_dtype_by_default(dtype):
    x = (torch.randn(4, 64) * 3).to(dtype)
    q = quantize_reference(x, QuantSpec.named("rtn"))
    assert q.dtype == dtype
    assert q.dequantize().dtype == dtype and dequantize(q).dtype == dtype
    full = q.dequantize(torch.float32)
    assert full.dtype == torch.float32
    manual = e2m1_decode(unpack_nibbles(q.codes)).view(4, 4, 16) * q.scales.float()[..., None] * q.outer
    assert torch.equal(full, manual.view(4, 64))
    assert torch.equal(q.dequantize(), full.to(dtype))


@pytest.mark.parametrize(
    "spec, seed",
    [
        (QuantSpec(rotation="rht16"), None),
        (QuantSpec(rotation="rht16_te"), None),
        (QuantSpec(rotation="rht128"), None),
        (QuantSpec.named("ms_eden"), 12345),
    ],
    ids=["rht16", "rht16_te", "rht128", "ms_eden"],
)
def test_dequantize_undoes_rotation(spec, seed):
    x = torch.randn(32, 256)
    n = spec.rotation_size
    if spec.rotation == "rht16_te":
        signs = _f32(TE_RHT_SIGNS)
    else:
        signs = (torch.randint(0, 2, (n,)) * 2 - 1).float()
    q = quantize_reference(x, spec, seed=seed, signs=signs)
    plain = quantize_reference(x, QuantSpec.named("rtn")).dequantize()
    rel_plain = ((plain - x).norm() / x.norm()).item()
    rel = ((q.dequantize() - x).norm() / x.norm()).item()
    rel_rotated_domain = ((q.dequantize_rotated() - x).norm() / x.norm()).item()
    assert 0.02 < rel_plain < 0.2
    assert rel < 1.25 * rel_plain
    assert rel_rotated_domain > 1.0  # without unrotation the values are unrelated to x
    assert torch.equal(q.signs, signs)
    assert torch.equal(q.dequantize(), unrotate(q.dequantize_rotated(), signs))


def test_e2m1_round_is_the_decoded_rne_code_sign_of_zero_included():
    from fp4compile.format import e2m1_decode, e2m1_rne, e2m1_round

    v = torch.cat([torch.randn(4096) * 4, torch.tensor([0.25, -0.25, 0.75, -0.75, 2.5, -2.5, 5.0, -5.0, 7.0, -7.0])])
    v = torch.cat([v, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    got, want = e2m1_round(v), e2m1_decode(e2m1_rne(v))
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


def test_bf16_rne_equals_the_cast_on_every_kind_of_float32_and_survives_inductor():
    """Integer RNE to bf16 gives the cast's bits (normals, subnormals, ties, overflow to inf, signed zeros) and
    Inductor, which drops a fused ``.to(bfloat16).float()`` pair, keeps it."""
    torch.manual_seed(0)
    patterns = torch.randint(-(2**31), 2**31, (300_000,), dtype=torch.int64).to(torch.int32).view(torch.float32)
    ties = (torch.arange(-2000, 2000, dtype=torch.int32) * 0x10000 + 0x8000).view(torch.float32)  # halfway cases
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38, float("inf"), -float("inf")])
    x = torch.cat([patterns, ties, special])
    want, got = x.to(torch.bfloat16).float(), bf16_rne(x)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))
    y = torch.randn(4096) * 1e-3
    assert not torch.equal(torch.compile(lambda t: t.to(torch.bfloat16).float() * 3)(y), y.bfloat16().float() * 3)
    assert torch.equal(torch.compile(lambda t: bf16_rne(t) * 3)(y), bf16_rne(y) * 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stored_fp32_reads_every_bit_pattern_and_the_rounding_survives_a_fused_cast(dtype):
    """The FP32 value of every bf16 / fp16 bit pattern (signed zeros, subnormals, Inf, NaN) read from its bits, as
    ``.float()`` gives it, for transposed views too; and a torch op that Inductor fuses with the downcast producing
    the tensor (the graph amax of a quantized linear's autocast input) reads the rounded values through
    ``stored_fp32``, which ``.float()`` does not ensure."""
    t = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    got, want = fp32_from_bits(t), t.float()
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))
    square = t.view(256, 256).t()
    assert torch.equal(fp32_from_bits(square).nan_to_num(), square.float().nan_to_num())
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        fp32_from_bits(torch.ones(2))

    torch.manual_seed(0)
    x = torch.randn(4096, 64) * 3
    amax = lambda x: stored_fp32(x.to(dtype)).abs().amax()  # noqa: E731
    assert torch.equal(torch.compile(amax, fullgraph=True)(x), amax(x))
    elided = lambda x: x.to(dtype).float().abs().amax()  # noqa: E731
    assert not torch.equal(torch.compile(elided, fullgraph=True)(x), elided(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_exactly_keeps_its_rounding_under_a_fused_upcast(dtype):
    """A quantized linear's torch-op output cast to the autocast dtype, then upcast to an FP32 parameter's gradient
    by autocast's backward: Inductor drops the fused pair for ``.to``, not for :func:`cast_exactly`."""
    torch.manual_seed(0)
    x = torch.randn(4096) * 3
    exact = lambda x: cast_exactly(x * 1.5, dtype).float() + 1  # noqa: E731
    assert torch.equal(torch.compile(exact, fullgraph=True)(x), exact(x))
    assert torch.equal(cast_exactly(x, dtype), x.to(dtype)) and cast_exactly(x, torch.float32) is x
    plain = lambda x: (x * 1.5).to(dtype).float() + 1  # noqa: E731
    assert not torch.equal(torch.compile(plain, fullgraph=True)(x), plain(x))


def test_stored_sum_reads_bits_only_while_traced():
    """Eagerly the bias gradient is one reduction with FP32 accumulation (no FP32 copy of dY); traced, it sums the
    values read from dY's bits, which a fused producer cannot replace by its unrounded values."""
    from torch.fx.experimental.proxy_tensor import make_fx

    t = (torch.randn(512, 96) * 3).bfloat16()
    assert torch.equal(stored_sum(t, 0), t.sum(0, dtype=torch.float32))
    graph = make_fx(lambda t: stored_sum(t, 0))(t)
    assert any(n.target is torch.ops.aten.view.dtype for n in graph.graph.nodes)
    assert torch.equal(graph(t), fp32_from_bits(t).sum(0))
