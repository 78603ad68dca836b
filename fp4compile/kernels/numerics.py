"""Triton device functions mirroring ``fp4compile/format.py`` operation for operation.

Encoding (E2M1 and E4M3 rounding, E4M3 bytes, code packing), decoding (E2M1 codes
and E4M3 bytes back to FP32), rotation and reduction helpers. Every function here
computes exactly what its ``format.py`` counterpart computes, with one IEEE rounding
per operation. Kernels are compiled with FP fusion on (Inductor compiles the kernels it
launches that way), so every product whose rounding matters before an add goes through
:func:`product` (``mul_rn``, never fused into an FMA); the other products are exact
(powers of two, +-1, E2M1 x E4M3) or feed no add, and fusing them changes no bit.
E4M3 rounding is done arithmetically (no ``.to(tl.float8e4nv)``: the Triton interpreter
rounds that cast wrongly), divisions use ``div_rn`` and reciprocals :func:`reciprocal` (``/`` is
approximate on the GPU).
Decoding is exact: E2M1 and E4M3 values are exact in FP32.

[Note: pieces] Kernels hold a tile of NB 16-element scale blocks as [BM, NB, W]
"pieces": two halves of W=8 (elements 0-7 and 8-15 of each block, loaded
separately), so that one thread owns each block (reductions over a block stay in
its registers, and RHT-16's 8-element butterflies too), or one piece of W=16 (a
contiguous load; a block then lies across two threads; RHT-128 needs it).
Per-block results combine the pieces: max, or the sum of their trees, which
equals the 16-element tree of format.pairwise_sum.

[Note: subnormals] Triton links libdevice with flush-to-zero on by default (its
``enable_reflect_ftz`` compile option; the kernels are also compiled by Inductor, with
its own options), so ``libdevice.mul_rn`` and ``libdevice.rcp_rn`` compile to
``mul.rn.ftz.f32`` and ``rcp.rn.ftz.f32`` and flush subnormal inputs and results,
where torch and ``format.py`` keep them (a GPU test caught the reciprocal). :func:`product` and
:func:`reciprocal` therefore issue the IEEE instructions as inline PTX;
``tl.math.div_rn`` and plain ``+`` and ``*`` compile without flushing.
"""

import triton
import triton.language as tl

__all__ = [
    "e2m1_round",
    "exact_fp32",
    "e4m3_rne",
    "e4m3_sr",
    "e4m3_byte",
    "e2m1_value",
    "e4m3_value",
    "dequantized_at",
    "join_parts",
    "fwht",
    "fwht8",
    "abs_bits",
    "from_bits",
    "max_abs",
    "code_times_scale",
    "pairwise_sum",
    "sign_vector",
    "piece_random_bits",
    "pack_codes",
    "product",
    "reciprocal",
]

_MAGIC_RNE = tl.constexpr(8388608.0)  # 2**23


@triton.jit
def exact_fp32(x):
    """``x`` (bf16, fp16 or fp32) as FP32, exactly; bf16 by its bits (Triton's interpreter converts subnormal bf16
    to FP32 wrongly; compiled for the GPU either way is exact)."""
    if x.dtype.is_bf16():
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def product(a, b, NO_FMA: tl.constexpr):
    """``a * b`` rounded once and never contracted with a following add: PTX ``mul.rn.f32`` on the GPU (``NO_FMA``;
    see the note on subnormals); the interpreter (CPU tensors) evaluates each operation on its own anyway."""
    if NO_FMA:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a * b


@triton.jit
def reciprocal(x, NO_FMA: tl.constexpr):
    """``1 / x`` rounded to nearest even: PTX ``rcp.rn.f32`` when compiled for the GPU (``NO_FMA``; fewer
    instructions and registers than a general division; see the note on subnormals), ``div_rn`` in the interpreter
    (which runs no PTX). The same value."""
    if NO_FMA:
        return tl.inline_asm_elementwise("rcp.rn.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.math.div_rn(1.0, x)


@triton.jit
def _e2m1_binade(a):
    """``2**floor(log2(max(a, 1)))`` for ``0 <= a <= 6`` (1, 2 or 4): E2M1's grid step around ``a`` is half of it."""
    return (tl.maximum(a, 1.0).to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_round(v, bits16, STOCHASTIC: tl.constexpr):
    """E2M1 (code, value) of FP32 ``v``: RNE saturating, or SR with 16-bit random ints ``bits16``.

    Every magnitude on the grid {0, .5, 1, 1.5, 2, 3, 4, 6} times 2**-126 (exact; the smaller ones subnormal)
    has the E2M1 code's exponent and mantissa bits at FP32 bits 22-24, so a shift reads the code off the rounded
    magnitude. For a non-finite ``v`` (which only occurs where the outer scale is NaN) code and value are
    unspecified.
    """
    a = tl.minimum(tl.abs(v), 6.0)
    p = _e2m1_binade(a)
    if STOCHASTIC:
        t = a * (0x7F800000 - p.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)  # a / step, exact
        low = t.to(tl.int32).to(tl.float32)
        up = bits16.to(tl.float32) < (t - low) * 65536.0
        mag = (low + up.to(tl.float32)) * (p * 0.5)
    else:
        # a + p * 2**22 rounds a to a multiple of the step p / 2, ties to even (one rounding: the product is
        # exact), and subtracting p * 2**22 again is exact (Sterbenz).
        magic = p * 4194304.0
        mag = (a + magic) - magic
    v_bits = v.to(tl.int32, bitcast=True)
    code = ((mag * 1.1754943508222875e-38).to(tl.int32, bitcast=True) >> 22) | ((v_bits >> 28) & 8)
    value = (mag.to(tl.int32, bitcast=True) | (v_bits & -2147483648)).to(tl.float32, bitcast=True)
    return code, value


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
def e2m1_value(code):
    """FP32 value of 4-bit E2M1 codes (int32): sign bit 3, exponent bits 2-1, mantissa bit 0."""
    e = (code >> 1) & 3
    m = code & 1
    normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def e4m3_value(byte):
    """FP32 value of float8_e4m3fn bit patterns (int32, non-negative scales)."""
    e = (byte >> 3) & 15
    m = byte & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)


@triton.jit
def dequantized_at(codes_ptr, scales_ptr, outer_ptr, rows, cols, ok, K, OUTER: tl.constexpr, NO_FMA: tl.constexpr):
    """FP32 ``code * scale * outer`` of a stored row-major quantization (packed codes [M, K/2], E4M3 scale bytes
    [M, K/16], outer scales per tensor (``OUTER`` 1) or per 1x128 block [M, K/128] (``OUTER`` 2)) at the positions
    (``rows``, ``cols``), broadcastable integer tensors; 0 where not ``ok``. Code times scale is exact; the outer
    scale's product is rounded once, as ``format.dequantize`` and the decode kernel round it."""
    r64 = rows.to(tl.int64)
    cols = cols.to(tl.int32)
    byte = tl.load(codes_ptr + r64 * (K // 2) + cols // 2, mask=ok, other=0).to(tl.int32)
    code = (byte >> (4 * (cols % 2))) & 15  # element 2j in the low nibble of byte j
    scale = tl.load(scales_ptr + r64 * (K // 16) + cols // 16, mask=ok, other=0).to(tl.int32)
    value = e2m1_value(code) * e4m3_value(scale)
    if OUTER == 1:
        value = product(value, tl.load(outer_ptr), NO_FMA)
    else:
        value = product(value, tl.load(outer_ptr + r64 * (K // 128) + cols // 128, mask=ok, other=0.0), NO_FMA)
    return tl.where(ok, value, 0.0)


@triton.jit
def code_times_scale(byte, scale_byte, ROWS: tl.constexpr, BLOCKS: tl.constexpr):
    """FP32 ``code * scale`` [ROWS, BLOCKS * 16] of a tile's packed codes ``byte`` [ROWS, BLOCKS * 8] (int32;
    element 2j in the low nibble of byte j) and its E4M3 scale bytes ``scale_byte`` [ROWS, BLOCKS] (int32):
    exact, a product of an E2M1 and an E4M3 value."""
    codes = tl.reshape(tl.join(byte & 15, byte >> 4), [ROWS, BLOCKS * 16])
    scale = tl.broadcast_to(e4m3_value(scale_byte)[:, :, None], [ROWS, BLOCKS, 16])
    return e2m1_value(codes) * tl.reshape(scale, [ROWS, BLOCKS * 16])


@triton.jit
def _fwht_stage(x, ROWS: tl.constexpr, N: tl.constexpr, H: tl.constexpr):
    """One butterfly stage with stride H: (a, b) -> (a + b, a - b) for pairs H apart."""
    t = tl.permute(tl.reshape(x, [ROWS, N // (2 * H), 2, H]), (0, 1, 3, 2))
    a, b = tl.split(t)
    t = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(t, [ROWS, N])


@triton.jit
def fwht(x, ROWS: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """Unnormalized Walsh-Hadamard transform of each row of ``x`` [ROWS, N]: strides N/2, ..., 2, 1."""
    for stage in tl.static_range(LOG_N):
        x = _fwht_stage(x, ROWS, N, N >> (stage + 1))
    return x


@triton.jit
def _bfly(a, b):
    return a + b, a - b


@triton.jit
def fwht8(x, R0: tl.constexpr, R1: tl.constexpr):
    """Walsh-Hadamard transform of the last dim of ``x`` [R0, R1, 8], strides 4, 2, 1, in registers."""
    e, o = tl.split(tl.reshape(x, [R0, R1, 4, 2]))  # columns (0, 2, 4, 6) and (1, 3, 5, 7)
    e0, e1 = tl.split(tl.reshape(e, [R0, R1, 2, 2]))  # (0, 4), (2, 6)
    o0, o1 = tl.split(tl.reshape(o, [R0, R1, 2, 2]))  # (1, 5), (3, 7)
    c0, c4 = tl.split(e0)
    c2, c6 = tl.split(e1)
    c1, c5 = tl.split(o0)
    c3, c7 = tl.split(o1)
    c0, c4 = _bfly(c0, c4)
    c1, c5 = _bfly(c1, c5)
    c2, c6 = _bfly(c2, c6)
    c3, c7 = _bfly(c3, c7)
    c0, c2 = _bfly(c0, c2)
    c1, c3 = _bfly(c1, c3)
    c4, c6 = _bfly(c4, c6)
    c5, c7 = _bfly(c5, c7)
    c0, c1 = _bfly(c0, c1)
    c2, c3 = _bfly(c2, c3)
    c4, c5 = _bfly(c4, c5)
    c6, c7 = _bfly(c6, c7)
    e = tl.reshape(tl.join(tl.join(c0, c4), tl.join(c2, c6)), [R0, R1, 4])
    o = tl.reshape(tl.join(tl.join(c1, c5), tl.join(c3, c7)), [R0, R1, 4])
    return tl.reshape(tl.join(e, o), [R0, R1, 8])


@triton.jit
def join_parts(parts, n: tl.constexpr):
    """Join the tensors ``parts`` (a tuple of n >= 2, n a power of two) along new last dims of size 2 (log2(n) of
    them: reshaped, the parts in order)."""
    half: tl.constexpr = n // 2
    # join(a, b) appends a last dim of 2: pairing part i with part i + n/2 at each level leaves them in order
    paired = ()
    for i in tl.static_range(half):
        paired = paired + (tl.join(parts[i], parts[i + half]),)
    if half == 1:
        return paired[0]
    else:
        return join_parts(paired, half)


@triton.jit
def sign_vector(signs_ptr, FIXED_SIGNS, first: tl.constexpr, n: tl.constexpr):
    """Signs ``first .. first+n-1`` as FP32 +-1: bits of the constexpr mask ``FIXED_SIGNS`` (bit i set: sign i
    is -1), or loaded from ``signs_ptr`` when the mask is -1."""
    idx = first + tl.arange(0, n)
    if FIXED_SIGNS >= 0:
        return tl.where(((tl.full([n], FIXED_SIGNS, tl.int32) >> idx) & 1) != 0, -1.0, 1.0)
    else:
        return tl.load(signs_ptr + idx)


@triton.jit
def abs_bits(x):
    """FP32 bits of |x| as int32: ordered like |x|, with every NaN above +inf (a NaN-sticky max key)."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def from_bits(bits):
    """FP32 value of int32 bits."""
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def max_abs(x):
    """max |x| over the last dim of [R0, R1, W] as FP32, NaN if any element is NaN: one NaN-propagating float max
    per element (``max.NaN``; the NaN it returns may have any payload: take :func:`abs_bits` of it as a key)."""
    return tl.reduce(tl.abs(x), 2, _max_nan)


@triton.jit
def pairwise_sum(t, W: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr):
    """Sum over the last dim of ``t`` [R0, R1, W] (W = 8 or 16) as a tree of adjacent pairs."""
    if W == 16:
        a, b = tl.split(tl.reshape(t, [R0, R1, 8, 2]))
        t = a + b
    a, b = tl.split(tl.reshape(t, [R0, R1, 4, 2]))
    a, b = tl.split(tl.reshape(a + b, [R0, R1, 2, 2]))
    a, b = tl.split(a + b)
    return a + b


@triton.jit
def piece_random_bits(seed, rows, col0, K, PIECE: tl.constexpr, W: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr):
    """16-bit random ints [BM, NB, W] for elements PIECE*W .. PIECE*W + W-1 of the blocks at ``col0``.

    Element (i, j) uses half j % 2 of word (j % 8) // 2 of philox(seed, i * K/8 + j // 8) (format.py):
    one Philox call per 8 elements.
    """
    G: tl.constexpr = W // 8
    groups = col0 // 8 + 2 * tl.arange(0, NB)[:, None] + PIECE * G + tl.arange(0, G)[None, :]
    counter = (rows[:, None, None] * (K // 8) + groups[None, :, :]).to(tl.int32)
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BM, NB, G, 4])
    return tl.reshape(tl.join(words & 0xFFFF, words >> 16), [BM, NB, W])


@triton.jit
def pack_codes(code, W: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr):
    """Pack codes [BM, NB, W] into bytes [BM, NB, W/2], element 2i in the low nibble."""
    lo, hi = tl.split(tl.reshape(code, [BM, NB, W // 2, 2]))
    return (lo | (hi << 4)).to(tl.uint8)
