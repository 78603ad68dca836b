"""NVFP4 numerics in plain torch: the executable spec every kernel is tested against.

NVFP4 stores a tensor quantized along its last dim K as

- ``codes``: E2M1 elements (sign, 2 exponent bits, 1 mantissa bit: +-{0, .5, 1, 1.5, 2, 3, 4, 6}),
  two per byte, element ``2i`` in the low nibble (torchao's and ``tl.dot_scaled``'s order);
- ``scales``: one E4M3 block scale per 16 elements;
- ``outer``: FP32 scales, one per tensor or one per 1x128 block (TetraJet-v2),

and the dequantized value is ``code * scale * outer``.

[Note: the quantization formulas] For a region (the tensor, or a 1x128 block) with
``amax = max|x|`` and a spec with ``vmax`` (6, 6*16/17 or 6*16/17/0.93) and ``cap``
(448 or 256), all in FP32 with one IEEE rounding per operation, in this order::

    s_enc = 1                          if amax == 0
            min((vmax*cap) / amax, FLT_MAX) otherwise         # encode scale
    outer = 1 / s_enc                  (NaN if amax is not finite)
    f     = s_enc * fp32(1/vmax)
    b     = E4M3_RNE(min(blockmax * f, 448))                   # the stored block scale
    e     = 0 if b == 0 else min(1 / (b * outer), FLT_MAX)      # element encode factor
    v     = x * e                                               # then E2M1 RNE (saturating at 6) or SR

For ``vmax=6, cap=448`` this is TransformerEngine's NVFP4 reference (``s_enc * (1/6)``
folded, encode factor from the *rounded* scale). A block whose scale rounds to 0
stores codes of +-0 (sign bits kept; TE stores saturated codes with a zero scale: same dequantized
value). Rotations apply a random Hadamard transform ``y = H(x * signs) / sqrt(n)``
per n-element chunk of K *before* all of the above, with the fast Walsh-Hadamard
butterfly in a fixed order (strides n/2, ..., 2, 1), so kernels can match it exactly.
Sums over a block (four-over-six errors, MS-EDEN's correction) are pairwise trees
over adjacent elements. Stochastic rounding draws from Philox (``philox.py``)
keyed by a seed, with counters fixed by the element's position (see
``element_random_bits`` and ``block_random_bits``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .philox import philox4x32
from .spec import QuantSpec
from .tracing import tracing

__all__ = [
    "E2M1_VALUES",
    "TE_RHT_SIGNS",
    "TE_RHT_SIGN_MASK",
    "te_rht_signs",
    "NVFP4",
    "e2m1_rne",
    "e2m1_round",
    "e2m1_sr",
    "e2m1_decode",
    "e4m3_rne",
    "e4m3_sr",
    "bf16_rne",
    "stored_abs_max",
    "stored_fp32",
    "fp32_from_bits",
    "cast_exactly",
    "stored_sum",
    "pack_nibbles",
    "unpack_nibbles",
    "fwht",
    "rotate",
    "unrotate",
    "pairwise_sum",
    "element_random_bits",
    "block_random_bits",
    "quantize_reference",
    "dequantize",
    "gemm_operand",
    "gemm_reference",
    "scaled_values",
    "dge_derivative",
]

#: The 16 E2M1 values indexed by their 4-bit code (bit 3 is the sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

#: TransformerEngine's fixed sign vector for its 16-point RHT (applied before H: diag(signs) @ H).
TE_RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
#: :data:`TE_RHT_SIGNS` as a bit mask: bit i set where sign i is -1.
TE_RHT_SIGN_MASK = sum(1 << i for i, s in enumerate(TE_RHT_SIGNS) if s < 0)


def te_rht_signs(device: torch.device) -> torch.Tensor:
    """:data:`TE_RHT_SIGNS` as an FP32 tensor on ``device``, made by device ops (a host-to-device copy would
    synchronize with a GPU)."""
    bits = (TE_RHT_SIGN_MASK >> torch.arange(len(TE_RHT_SIGNS), device=device)) & 1
    return (1 - 2 * bits).to(torch.float32)


E4M3_MAX = 448.0
E2M1_MAX = 6.0
FLT_MAX = torch.finfo(torch.float32).max
_MAGIC_RNE = 8388608.0  # 2**23: (t + 2**23) - 2**23 rounds 0 <= t < 2**22 to an integer, ties to even


@functools.lru_cache(maxsize=256)
def _f32(value: float) -> float:
    """``value`` rounded to the nearest FP32 number (as a Python float)."""
    return torch.tensor(value, dtype=torch.float32).item()


def fp32_constants(spec: QuantSpec) -> tuple[float, float]:
    """The FP32 constants ``(vmax * cap, 1 / vmax)`` of ``spec``'s scale formulas."""
    return _f32(spec.vmax * spec.cap), _f32(1.0 / spec.vmax)


def rotation_scale(n: int) -> float:
    """The FP32 normalization ``1/sqrt(n)`` of an n-point Hadamard transform."""
    return _f32(1.0 / math.sqrt(n))


# ----------------------------------------------------------------------------- E2M1
def _e2m1_step(a: torch.Tensor) -> torch.Tensor:
    """Grid spacing of E2M1 around magnitude ``a`` (0.5 below 2, 1 below 4, else 2)."""
    return torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).to(torch.float32)


def _e2m1_code(mag: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Code of an exactly representable magnitude ``mag`` with sign bit ``negative``."""
    idx = torch.where(mag < 2, mag * 2, torch.where(mag < 4, mag + 2, mag * 0.5 + 4))
    return idx.to(torch.uint8) | (negative.to(torch.uint8) << 3)


def _e2m1_rne_magnitude(v: torch.Tensor) -> torch.Tensor:
    """|v| rounded to the E2M1 grid: nearest, ties to even, saturating at 6."""
    a = v.abs().clamp(max=E2M1_MAX)
    step = _e2m1_step(a)
    t = a * (1.0 / step)
    return ((t + _MAGIC_RNE) - _MAGIC_RNE) * step


def e2m1_rne(v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of FP32 ``v``: round to nearest, ties to even, saturating at +-6.

    The sign bit is kept for values that round to zero (as hardware and torchao do).
    """
    return _e2m1_code(_e2m1_rne_magnitude(v), torch.signbit(v))


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """The FP32 values of :func:`e2m1_rne` (``e2m1_decode(e2m1_rne(v))``), computed without a lookup table (no
    host-to-device copy, so it can run inside CUDA-graph capture)."""
    return torch.copysign(_e2m1_rne_magnitude(v), v)


def e2m1_sr(v: torch.Tensor, bits16: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of FP32 ``v`` by stochastic rounding with 16-bit random integers ``bits16``.

    ``|v|`` is clamped to 6 and rounded up to the next grid point with probability
    ``ceil(frac * 2**16) / 2**16`` where ``frac`` is its position between the two
    neighbours: unbiased up to 2**-16 of a grid step.
    """
    a = v.abs().clamp(max=E2M1_MAX)
    step = _e2m1_step(a)
    t = a * (1.0 / step)
    low = t.floor()
    up = bits16.to(torch.float32) < (t - low) * 65536.0
    return _e2m1_code((low + up.to(torch.float32)) * step, torch.signbit(v))


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """FP32 values of unpacked E2M1 codes (uint8 in [0, 16)): :data:`E2M1_VALUES`, computed from the bits (no
    lookup table, hence no host-to-device copy, which would synchronize with a GPU)."""
    c = codes.to(torch.int32)
    exponent, half = (c >> 1) & 3, (c & 1).to(torch.float32) * 0.5
    power = (1 << (exponent - 1).clamp(min=0)).to(torch.float32)  # 2^(exponent - 1), exact
    magnitude = torch.where(exponent == 0, half, power * (1 + half))
    return torch.where((c & 8) != 0, -magnitude, magnitude)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes [..., 2n] into bytes [..., n], element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: bytes [..., n] to codes [..., 2n]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# ----------------------------------------------------------------------------- E4M3
def e4m3_rne(r: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 (float8_e4m3fn) value of non-negative FP32 ``r``, saturating at 448."""
    return r.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def _e4m3_quantum(r: torch.Tensor) -> torch.Tensor:
    """Spacing of E4M3 values just below non-negative ``r`` (2**-9 in the subnormal range)."""
    exponent = torch.frexp(r).exponent - 1  # r = m * 2**exponent with m in [1, 2)
    return torch.exp2((exponent - 3).clamp(min=-9).to(torch.float32))


def e4m3_sr(r: torch.Tensor, bits20: torch.Tensor) -> torch.Tensor:
    """E4M3 value of non-negative FP32 ``r`` by stochastic rounding with 20-bit random integers.

    ``r`` is clamped to 448 and rounded up with probability ``ceil(frac * 2**20) / 2**20``
    (exactly ``frac`` in the normal range, where FP32 has 20 bits below E4M3's mantissa).
    """
    r = r.clamp(max=E4M3_MAX)
    q = _e4m3_quantum(r)
    t = r / q
    low = t.floor()
    up = bits20.to(torch.float32) < (t - low) * 1048576.0
    return (low + up.to(torch.float32)) * q


# ----------------------------------------------------------------------------- BF16
def bf16_rne(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to nearest-even bf16, as FP32 values: the cast ``x.to(bfloat16).float()`` computed with
    integer operations on the FP32 bits, so that no compiler can drop the rounding (Inductor elides a
    downcast-upcast pair it fuses) or move it. Overflow rounds to infinity and NaN stays NaN, as in the cast."""
    bits = x.to(torch.float32).view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    rounded = (magnitude + (0x7FFF + ((magnitude >> 16) & 1))) & 0x7FFF0000
    rounded = torch.where(magnitude > 0x7F800000, magnitude, rounded)  # NaN: unchanged
    return torch.where(bits < 0, rounded | -0x80000000, rounded).view(torch.float32)


def _traced() -> bool:
    """Whether torch ops are being recorded for a compiler (Dynamo tracing Python, or a dispatch-mode trace)."""
    return torch.compiler.is_compiling() or tracing()


def stored_fp32(t: torch.Tensor) -> torch.Tensor:
    """The FP32 values of ``t``'s elements exactly as stored in its dtype.

    Eagerly this is ``t.to(float32)``. While traced (``torch.compile``), bf16 and fp16 are read from their bits
    (:func:`fp32_from_bits`): a compiler that fuses ``t``'s producer with the reader may otherwise feed the reader
    the value before its rounding to ``t``'s dtype (Inductor elides a fused downcast-upcast pair), and a bitcast
    cannot be elided. Every torch op of the quantized linear that reads a low-precision operand reads it through
    this (the kernels read it from memory)."""
    if t.dtype in (torch.bfloat16, torch.float16) and _traced():
        return fp32_from_bits(t)
    return t.to(torch.float32)


def stored_abs_max(t: torch.Tensor) -> torch.Tensor:
    """FP32 ``max |t|`` of ``t``'s stored values (NaN if any is NaN): eagerly taken in ``t``'s own dtype, which is
    exact and copies nothing to FP32; while traced through :func:`stored_fp32`, for the reason given there."""
    if _traced():
        return stored_fp32(t).abs().amax()
    return t.abs().amax().to(torch.float32)


def fp32_from_bits(t: torch.Tensor) -> torch.Tensor:
    """The FP32 values of a bf16 or fp16 tensor computed from its bits with integer ops and bitcasts (exact for
    every bit pattern: signed zeros, subnormals, Inf, NaN)."""
    if t.dtype == torch.bfloat16:
        return ((t.view(torch.int16).to(torch.int32) & 0xFFFF) << 16).view(torch.float32)
    if t.dtype != torch.float16:
        raise ValueError(f"fp32_from_bits: expected a bfloat16 or float16 tensor, got {t.dtype}")
    bits = t.view(torch.int16).to(torch.int32) & 0xFFFF
    negative = bits >= 0x8000
    exponent, mantissa = (bits >> 10) & 0x1F, bits & 0x3FF
    biased = torch.where(exponent == 0x1F, 0xFF, exponent + 112)  # Inf and NaN keep an all-ones exponent
    magnitude = ((biased << 23) | (mantissa << 13)).view(torch.float32)
    magnitude = torch.where(exponent == 0, mantissa.to(torch.float32) * 2.0**-24, magnitude)  # subnormals, zero
    return torch.where(negative, -magnitude, magnitude)


def stored_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The FP32 sum over ``dim`` of ``t``'s stored values (a bias gradient): eagerly ``t.sum(dim, dtype=float32)``,
    which makes no FP32 copy of ``t``; while traced, the sum of :func:`stored_fp32`."""
    if _traced():
        return stored_fp32(t).sum(dim)
    return t.sum(dim, dtype=torch.float32)


def cast_exactly(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` whose rounding no compiler can drop: while traced, the bf16 or fp16 result is read back
    through :func:`fp32_from_bits` and cast again (exactly), so that an upcast Inductor fuses after the cast
    (autocast's backward casting a gradient to its FP32 parameter) sees the rounded values, as in eager mode."""
    if dtype not in (torch.bfloat16, torch.float16) or t.dtype == dtype or not _traced():
        return t.to(dtype)
    return fp32_from_bits(t.to(dtype)).to(dtype)


# ----------------------------------------------------------------------------- sums and rotations
def pairwise_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (a power of two) as a tree of adjacent pairs: ((t0+t1)+(t2+t3))+..."""
    while t.shape[-1] > 1:
        t = t[..., 0::2] + t[..., 1::2]
    return t[..., 0]


def fwht(x: torch.Tensor, n: int) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform (Sylvester order) of each n-chunk of the last dim.

    Butterfly stages with strides n/2, n/4, ..., 1 (largest first); each writes ``a + b`` and ``a - b``.
    """
    shape = x.shape
    for stage in range(int(math.log2(n))):
        h = n >> (stage + 1)
        t = x.reshape(*shape[:-1], -1, 2, h)
        a, b = t[..., 0, :], t[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(shape)
    return x


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Random Hadamard transform of each chunk of ``len(signs)`` along the last dim: H (x * signs) / sqrt(n)."""
    n = signs.numel()
    return fwht(x * _tile(signs, x.shape[-1]), n) * rotation_scale(n)


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate` (H is symmetric and H H = n I)."""
    n = signs.numel()
    return fwht(y, n) * rotation_scale(n) * _tile(signs, y.shape[-1])


def _tile(signs: torch.Tensor, k: int) -> torch.Tensor:
    return signs.to(torch.float32).repeat(k // signs.numel())


# ----------------------------------------------------------------------------- random bits
def element_random_bits(seed: int, rows: int, k: int, device: torch.device) -> torch.Tensor:
    """16-bit random integers [rows, k] for element SR.

    Element (i, j) takes half ``j % 2`` (low half first) of word ``(j % 8) // 2`` of
    ``philox4x32(seed, i * (k // 8) + j // 8)``.
    """
    counter = torch.arange(rows * (k // 8), device=device, dtype=torch.int64)
    words = torch.stack(philox4x32(seed, counter), dim=-1)  # [rows*k/8, 4]
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1)  # [rows*k/8, 4, 2]
    return halves.reshape(rows, k)


def block_random_bits(seed: int, rows: int, nblocks: int, device: torch.device) -> torch.Tensor:
    """20-bit random integers [rows, nblocks] for SR of block scales: the low 20 bits of word 0
    of ``philox4x32(seed, i * nblocks + b)``."""
    counter = torch.arange(rows * nblocks, device=device, dtype=torch.int64)
    return (philox4x32(seed, counter)[0] & 0xFFFFF).reshape(rows, nblocks)


# ----------------------------------------------------------------------------- container
@dataclass(frozen=True)
class NVFP4:
    """A tensor quantized to NVFP4 along its last dim.

    Attributes:
        codes: uint8 [m, k/2], two E2M1 codes per byte, element 2i in the low nibble.
        scales: float8_e4m3fn [m, k/16] block scales (16x16 blocks repeat their scale in 16 rows).
        outer: float32 outer scales: shape [] (per tensor) or [m, k/128] (per 1x128 block).
        spec: the :class:`QuantSpec` that produced it.
        signs: float32 [16] or [128] rotation signs, or None without rotation.
        seed: int64 [1] Philox seed of stochastic rounding, or None for deterministic specs.
        dtype: the dtype of the quantized input (the default of :meth:`dequantize`).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    outer: torch.Tensor
    spec: QuantSpec
    signs: Optional[torch.Tensor] = None
    seed: Optional[torch.Tensor] = None
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        """Logical shape [m, k] of the quantized tensor."""
        return torch.Size((self.codes.shape[0], self.codes.shape[1] * 2))

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Values ``code * scale * outer`` in the input's domain (rotation undone), as ``dtype``."""
        return dequantize(self, dtype)

    def dequantize_rotated(self) -> torch.Tensor:
        """FP32 values ``code * scale * outer`` in the rotated domain (what a GEMM consumes)."""
        m, k = self.shape
        return gemm_operand(self) * _expand_outer(self.outer, m, k)


def gemm_operand(q: NVFP4) -> torch.Tensor:
    """FP32 ``code * scale`` [m, k] in the rotated domain, without the outer scales.

    Every value is a product of an E2M1 and an E4M3 number: at most 6 significant bits
    between 2**-10 and 2688, so it is exact in fp16 and bf16 (the tensor-core operand).
    """
    m, k = q.shape
    values = e2m1_decode(unpack_nibbles(q.codes)).view(m, k // 16, 16)
    return (values * q.scales.to(torch.float32).unsqueeze(-1)).view(m, k)


def gemm_reference(a: NVFP4, b: NVFP4) -> torch.Tensor:
    """``a @ b^T`` of two quantizations along the same K, in float64 (the emulated NVFP4 GEMM).

    Both must be in the same rotated domain (shared signs), as the GEMM consumes them.
    """
    return a.dequantize_rotated().double() @ b.dequantize_rotated().double().T


def _expand_outer(outer: torch.Tensor, m: int, k: int) -> torch.Tensor:
    if outer.dim() == 0:
        return outer
    return outer.repeat_interleave(128, dim=1)


def dequantize(q: NVFP4, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dequantize ``q`` to ``dtype`` (default: the input's dtype), undoing any rotation."""
    values = q.dequantize_rotated()
    signs = q.signs
    if signs is None and q.spec.rotation == "rht16_te":  # the kernels' fixed TE signs (held as a constant)
        signs = te_rht_signs(values.device)
    if signs is None and q.spec.rotation != "none":
        raise ValueError(f"dequantize: {q.spec.short_str()} was quantized without its rotation signs")
    if signs is not None:
        values = unrotate(values, signs)
    return values.to(dtype or q.dtype)


# ----------------------------------------------------------------------------- reference quantizer
def _nan_sticky_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN replaced by +inf, so a max over it is non-finite iff the input was."""
    return torch.where(torch.isnan(x), torch.inf, x.abs())


def _encode_scale(amax: torch.Tensor, vmax_cap: float) -> torch.Tensor:
    s_enc = (torch.tensor(vmax_cap, dtype=torch.float32, device=amax.device) / amax).clamp(max=FLT_MAX)
    return torch.where(amax == 0, 1.0, s_enc)


def _block_max(xb: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Max |x| per scale block, [m, k/16] (16x16 tiles broadcast to their 16 rows)."""
    vmax = _nan_sticky_abs(xb).amax(dim=-1)
    if spec.block == "16x16":
        m, nb = vmax.shape
        vmax = vmax.view(m // 16, 16, nb).amax(dim=1, keepdim=True).expand(m // 16, 16, nb).reshape(m, nb)
    return vmax


def _outer_scales(vmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode scales broadcast to the blocks, outer scales at their storage shape, and outer
    scales broadcast to the blocks (scalars stay scalars; 1x128 values repeat over their 8 blocks)."""
    vmax_cap, _ = fp32_constants(spec)
    m, nb = vmax.shape
    if spec.outer == "tensor":
        amax = vmax.amax() if vmax.numel() else torch.zeros((), device=vmax.device)
    else:
        amax = vmax.view(m, nb // 8, 8).amax(dim=-1)
    s_enc = _encode_scale(amax, vmax_cap)
    outer = torch.where(torch.isfinite(amax), 1.0 / s_enc, torch.nan)
    s_enc_blocks = s_enc if spec.outer == "tensor" else s_enc.repeat_interleave(8, dim=1)
    return s_enc_blocks, outer, outer if spec.outer == "tensor" else outer.repeat_interleave(8, dim=1)


def _encode_factor(b: torch.Tensor, outer_blocks: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, (1.0 / (b * outer_blocks)).clamp(max=FLT_MAX), 0.0)


def _round_elements(v: torch.Tensor, spec: QuantSpec, bits16: Optional[torch.Tensor]) -> torch.Tensor:
    return e2m1_sr(v, bits16) if spec.rounding == "sr" else e2m1_rne(v)


def quantize_reference(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    seed: Optional[int] = None,
    signs: Optional[torch.Tensor] = None,
) -> NVFP4:
    """Quantize a 2-D float tensor along its last dim, in plain torch (the spec).

    Args:
        x: [m, k] float tensor; shapes must satisfy ``spec.k_multiple`` / ``spec.row_multiple``.
        spec: the quantizer.
        seed: Philox seed (int in [0, 2**63)), required when ``spec.stochastic``.
        signs: +-1 rotation signs of length ``spec.rotation_size``, required with a rotation.

    Returns:
        The :class:`NVFP4` quantization. Input checks live in :func:`fp4compile.quantize`.
    """
    m, k = x.shape
    xf = x.to(torch.float32)
    if spec.rotation != "none":
        xf = rotate(xf, signs)
    xb = xf.view(m, k // 16, 16)
    vmax = _block_max(xb, spec)
    s_enc, outer, outer_blocks = _outer_scales(vmax, spec)
    _, inv_vmax = fp32_constants(spec)
    raw = (vmax * (s_enc * inv_vmax)).clamp(max=E4M3_MAX)
    bits16 = element_random_bits(seed, m, k, x.device).view(m, k // 16, 16) if spec.rounding == "sr" else None

    b = e4m3_rne(raw)
    codes = _round_elements(xb * _encode_factor(b, outer_blocks).unsqueeze(-1), spec, bits16)
    if spec.scale_rule == "4over6":
        b4 = e4m3_rne(raw * 1.5)
        codes4 = _round_elements(xb * _encode_factor(b4, outer_blocks).unsqueeze(-1), spec, bits16)
        err6 = _block_sq_error(codes, b, outer_blocks, xb)
        err4 = _block_sq_error(codes4, b4, outer_blocks, xb)
        pick4 = err4 < err6
        codes = torch.where(pick4.unsqueeze(-1), codes4, codes)
        b = torch.where(pick4, b4, b)
    if spec.rounding == "eden":
        b = _eden_scales(xb, b, outer_blocks, codes, seed)

    return NVFP4(
        codes=pack_nibbles(codes.view(m, k)),
        scales=b.to(torch.float8_e4m3fn),
        outer=outer,
        spec=spec,
        signs=None if signs is None else signs.to(torch.float32),
        seed=None if seed is None else torch.tensor([seed], dtype=torch.int64),
        dtype=x.dtype,
    )


def _block_sq_error(codes: torch.Tensor, b: torch.Tensor, outer_blocks: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """Per-block sum of squared dequantization error in the (rotated) input domain."""
    deq = (e2m1_decode(codes) * b.unsqueeze(-1)) * _unsqueeze(outer_blocks)
    diff = deq - xb
    return pairwise_sum(diff * diff)


def _unsqueeze(outer_blocks: torch.Tensor) -> torch.Tensor:
    return outer_blocks if outer_blocks.dim() == 0 else outer_blocks.unsqueeze(-1)


def _eden_scales(
    xb: torch.Tensor, b: torch.Tensor, outer_blocks: torch.Tensor, codes: torch.Tensor, seed: int
) -> torch.Tensor:
    """MS-EDEN: fold S = sum(u^2) / sum(u q) per block into the scale by stochastic E4M3 rounding.

    ``u`` are the unclipped scaled values ``x * e`` and ``q`` their (clipped) E2M1 values.
    """
    u = xb * _encode_factor(b, outer_blocks).unsqueeze(-1)
    q = e2m1_decode(codes)
    num = pairwise_sum(u * u)
    den = pairwise_sum(u * q)
    correction = torch.where(den > 0, num / den, 1.0)
    m, nb = b.shape
    return e4m3_sr(correction * b, block_random_bits(seed, m, nb, xb.device))


# ----------------------------------------------------------------------------- DGE (Wang et al.)
def scaled_values(x: torch.Tensor, q: NVFP4) -> torch.Tensor:
    """``x`` [m, k] in E2M1 units of its quantization ``q``: the FP32 ``v = x * e`` that ``q``'s rounding saw.

    ``e`` is the element encode factor of ``q``'s stored block scale and outer scale (the Note at
    the top of this module), so for a deterministic, unrotated spec this is bit for bit the ``v`` the
    quantizer rounded (for four-over-six, with the scale it picked). ``q`` must quantize ``x`` itself.
    """
    if q.signs is not None:
        raise ValueError("scaled_values needs an unrotated quantization (forward weight specs never rotate)")
    m, k = x.shape
    if q.scales.shape != (m, k // 16):
        raise ValueError(f"q quantizes a [{q.scales.shape[0]}, {16 * q.scales.shape[1]}] tensor, x is [{m}, {k}]")
    b = q.scales.to(torch.float32)
    outer_blocks = q.outer if q.outer.dim() == 0 else q.outer.repeat_interleave(8, dim=1)
    xb = x.to(torch.float32).view(m, k // 16, 16)
    return (xb * _encode_factor(b, outer_blocks).unsqueeze(-1)).view(m, k)


def dge_derivative(v: torch.Tensor, k: float = 5.0, cap: float = 3.0) -> torch.Tensor:
    """Wang et al.'s Differentiable Gradient Estimator: the derivative of the smooth E2M1 surrogate at ``v``.

    ``v`` is in E2M1 units (after the quantizer's scaling, :func:`scaled_values`). On each E2M1
    interval ``[lo, lo + delta)`` of ``|v|`` (delta 0.5 below 2, 1 below 4, 2 up to 6) the surrogate
    ``f(x) = (delta/2) * (1 + sign(2x/delta - 1) * |2x/delta - 1|**(1/k))`` of Eq. 7 has the derivative
    (Eq. 8, with ``x = |v| - lo``)::

        f'(v) = (1/k) * |2 * (|v| - lo) / delta - 1| ** (1/k - 1),   capped at ``cap``

    in FP32: ``1/k`` on the grid points, ``cap`` at the rounding thresholds (interval midpoints),
    symmetric in the sign of ``v``. Defaults are the paper's (k = 5, cap 3.0). NVFP4's E4M3 block
    scale can push ``|v|`` slightly past 6 (to about 6.4, where RTN saturates): such values are
    evaluated at 6, i.e. ``1/k``, as the saturated element's gradient (Wang et al.'s code returns 0
    there, which its power-of-two scales never reach). NaN stays NaN.

    Under SGD the mean multiplier over uniform in-bin positions (~0.59 at k = 5, cap 3) also lowers
    the effective learning rate by about 40 %; Adam normalises most of that away.
    """
    if not isinstance(k, (int, float)) or isinstance(k, bool) or not k > 0 or not math.isfinite(k):
        raise ValueError(f"dge_derivative: k must be a positive finite number, got {k!r}")
    if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0:
        raise ValueError(f"dge_derivative: cap must be a positive number, got {cap!r}")
    a = v.to(torch.float32).abs().clamp(max=E2M1_MAX)
    delta = _e2m1_step(a)
    lo = torch.where(a < 4, torch.floor(a / delta) * delta, 4.0)
    u = (2.0 * (a - lo) / delta - 1.0).abs()
    return ((1.0 / k) * u.pow(1.0 / k - 1.0)).clamp(max=cap)
