"""Triton kernel of OsciReset's tracked step: both distance accumulations and the weight copy in one pass.

Per element: ``d_q += |deq - deq_prev|``, ``d_w += |float32(w) - float32(prev)|``, ``prev = w``, the same
FP32 operations (one rounding each, no multiply to fuse) as ``fp4compile.osci_reset``'s plain-torch
update, so the results are bit-identical. One launch per layer instead of seven.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["track_update_triton"]

_BLOCK = 1024


@triton.jit
def _track_update(w_ptr, prev_ptr, deq_ptr, deq_prev_ptr, d_q_ptr, d_w_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask)
    prev = tl.load(prev_ptr + offs, mask=mask)
    deq = tl.load(deq_ptr + offs, mask=mask)
    deq_prev = tl.load(deq_prev_ptr + offs, mask=mask)
    d_q = tl.load(d_q_ptr + offs, mask=mask)
    d_w = tl.load(d_w_ptr + offs, mask=mask)
    tl.store(d_q_ptr + offs, d_q + tl.abs(deq - deq_prev), mask=mask)
    tl.store(d_w_ptr + offs, d_w + tl.abs(w.to(tl.float32) - prev.to(tl.float32)), mask=mask)
    tl.store(prev_ptr + offs, w, mask=mask)


def track_update_triton(
    w: torch.Tensor,
    prev: torch.Tensor,
    deq: torch.Tensor,
    deq_prev: torch.Tensor,
    d_q: torch.Tensor,
    d_w: torch.Tensor,
) -> None:
    """In place: ``d_q += |deq - deq_prev|``, ``d_w += |w - prev|`` (FP32), ``prev.copy_(w)``.

    All six tensors contiguous with the same shape; ``w`` and ``prev`` of one float dtype, the rest FP32.
    """
    tensors = (w, prev, deq, deq_prev, d_q, d_w)
    if any(not t.is_contiguous() or t.shape != w.shape for t in tensors):
        raise ValueError("track_update_triton needs contiguous tensors of one shape")
    if prev.dtype != w.dtype or any(t.dtype != torch.float32 for t in (deq, deq_prev, d_q, d_w)):
        raise ValueError("track_update_triton: w and prev share a dtype; deq, deq_prev, d_q and d_w are FP32")
    n = w.numel()
    _track_update[(triton.cdiv(n, _BLOCK),)](w, prev, deq, deq_prev, d_q, d_w, n, BLOCK=_BLOCK)
