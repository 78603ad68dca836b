"""Philox4x32-10 in plain torch, bit-identical to Triton's ``tl.randint4x``.

Stochastic rounding in fp4compile draws its random bits from a counter-based
generator: a 64-bit ``seed`` (drawn from torch's generator once per
quantization) and a 32-bit counter derived from the element's position. The
Triton kernels call ``tl.randint4x(seed, counter)``; this module computes the
same four 32-bit words on any torch device, so the reference quantizer in
``format.py`` reproduces a kernel's stochastic output bit for bit.

All arithmetic is done on int64 tensors holding unsigned 32-bit values; the
32x32 -> 64-bit products are split into 16-bit halves so nothing overflows.
"""

from __future__ import annotations

import torch

__all__ = ["philox4x32"]

_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_N_ROUNDS = 10


def _mul_hi_lo(c: torch.Tensor, const: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``const * c`` for unsigned 32-bit ``c``."""
    c_hi = c >> 16
    c_lo = c & 0xFFFF
    p = c_hi * const  # < 2**48
    q = c_lo * const  # < 2**48
    hi = (p + (q >> 16)) >> 16
    lo = (q + ((p & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four 32-bit random words per counter value, as ``tl.randint4x(seed, counter)``.

    Args:
        seed: the 64-bit key (a Python int in [0, 2**63)).
        counter: integer tensor of counters in [0, 2**31) (the first Philox
            counter word; the other three are zero, as in Triton).

    Returns:
        Four int64 tensors shaped like ``counter`` holding values in [0, 2**32).
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
    c0 = counter.to(torch.int64) & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3
