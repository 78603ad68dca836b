"""Triton device functions mirroring ``fp4compile/format.py`` operation for operation.

Every function here computes exactly what its ``format.py`` counterpart computes,
with one IEEE rounding per operation, so kernels launched with
``enable_fp_fusion=False`` match the spec bit for bit. E4M3 rounding is done
arithmetically (no ``.to(tl.float8e4nv)``: the Triton interpreter rounds that
cast wrongly), divisions use ``div_rn`` (``/`` is approximate on the GPU).
"""

import triton
import triton.language as tl

__all__ = [
    "e2m1_round",
    "e4m3_rne",
    "e4m3_sr",
    "e4m3_byte",
    "fwht",
    "pairwise_sum16",
    "element_random_bits",
]

_MAGIC_RNE = tl.constexpr(8388608.0)  # 2**23


@triton.jit
def _e2m1_step_inv(a):
    """(step, 1/step) of the E2M1 grid around magnitude ``a``."""
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    inv = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))
    return step, inv


@triton.jit
def e2m1_round(v, bits16, STOCHASTIC: tl.constexpr):
    """E2M1 (code, value) of FP32 ``v``: RNE saturating, or SR with 16-bit random ints ``bits16``."""
    a = tl.minimum(tl.abs(v), 6.0)
    if STOCHASTIC:
        step, inv = _e2m1_step_inv(a)
        t = a * inv
        low = t.to(tl.int32).to(tl.float32)
        up = bits16.to(tl.float32) < (t - low) * 65536.0
        mag = (low + up.to(tl.float32)) * step
    else:
        # Adding 2**22, 2**23 or 2**24 rounds to a multiple of 0.5, 1 or 2 (ties to even) in one step.
        magic = tl.where(a < 2.0, 4194304.0, tl.where(a < 4.0, 8388608.0, 16777216.0))
        mag = (a + magic) - magic
    # magnitude index from the FP32 bits of the grid value: exponent and top mantissa bit, 0.5 -> 1
    idx = tl.maximum((mag.to(tl.int32, bitcast=True) >> 22) - 252, 0) + (mag == 0.5).to(tl.int32)
    sign = (v.to(tl.int32, bitcast=True) >> 28) & 8
    value = tl.where(sign != 0, -mag, mag)
    return idx | sign, value


@triton.jit
def _e4m3_quantum(r):
    """(quantum, 1/quantum): E4M3 spacing just below non-negative ``r`` (2**-9 when subnormal)."""
    exponent = ((r.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
    qe = tl.maximum(exponent - 3, -9)
    q = ((qe + 127) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
    inv = ((127 - qe) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
    return q, inv


@triton.jit
def e4m3_rne(r):
    """Nearest E4M3 value of non-negative FP32 ``r``, saturating at 448 (as FP32)."""
    r = tl.minimum(r, 448.0)
    q, inv = _e4m3_quantum(r)
    t = r * inv
    return ((t + _MAGIC_RNE) - _MAGIC_RNE) * q


@triton.jit
def e4m3_sr(r, bits20):
    """E4M3 value of non-negative FP32 ``r`` by stochastic rounding with 20-bit random ints."""
    r = tl.minimum(r, 448.0)
    q, inv = _e4m3_quantum(r)
    t = r * inv
    low = t.to(tl.int32).to(tl.float32)
    up = bits20.to(tl.float32) < (t - low) * 1048576.0
    return (low + up.to(tl.float32)) * q


@triton.jit
def e4m3_byte(b):
    """float8_e4m3fn bit pattern (uint8) of an exactly representable non-negative FP32 value."""
    bits = b.to(tl.uint32, bitcast=True)
    normal = ((bits >> 20) - 960).to(tl.int32)
    subnormal = (b * 512.0).to(tl.int32)
    return tl.where(b >= 0.015625, normal, subnormal).to(tl.uint8)


@triton.jit
def _fwht_stage(x, ROWS: tl.constexpr, N: tl.constexpr, H: tl.constexpr):
    """One butterfly stage with stride H: (a, b) -> (a + b, a - b) for pairs H apart."""
    t = tl.permute(tl.reshape(x, [ROWS, N // (2 * H), 2, H]), (0, 1, 3, 2))
    a, b = tl.split(t)
    t = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(t, [ROWS, N])


@triton.jit
def fwht(x, ROWS: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """Unnormalized Walsh-Hadamard transform of each row of ``x`` [ROWS, N]: strides 1, 2, ..., N/2."""
    for stage in tl.static_range(LOG_N):
        x = _fwht_stage(x, ROWS, N, 1 << stage)
    return x


@triton.jit
def pairwise_sum16(t, R: tl.constexpr, NB: tl.constexpr):
    """Sum over the last dim of ``t`` [R, NB, 16] as a tree of adjacent pairs."""
    a, b = tl.split(tl.reshape(t, [R, NB, 8, 2]))
    a, b = tl.split(tl.reshape(a + b, [R, NB, 4, 2]))
    a, b = tl.split(tl.reshape(a + b, [R, NB, 2, 2]))
    a, b = tl.split(a + b)
    return a + b


@triton.jit
def element_random_bits(seed, rows, col0, K, BM: tl.constexpr, BK: tl.constexpr):
    """16-bit random ints [BM, BK] for the elements at ``rows`` x [col0, col0 + BK) (see format.py)."""
    groups = col0 // 8 + tl.arange(0, BK // 8)
    counter = (rows[:, None] * (K // 8) + groups[None, :]).to(tl.int32)
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BM, BK // 8, 4])
    halves = tl.join(words & 0xFFFF, words >> 16)
    return tl.reshape(halves, [BM, BK])
