"""The GEMM in a graph that Inductor compiles: the persistent TMA kernel, launched by Inductor's generated code.

Outside such a graph the GEMM is the opaque op ``fp4compile::gemm`` (``gemm_op.py``): each call goes through the
custom-op dispatch, Triton's autotuner and Python launcher, and builds two host-side TMA descriptors, about as much
host time as a quantized linear's other launches together (an H200 step of a Llama-style model was bound by it:
benchmarks/RESULTS.md, "Ninth session"). Inside the graph the same kernel is recorded with ``wrap_triton`` and
Inductor launches it as it launches its own kernels. Two things differ from the eager launch:

- the kernel builds its TMA descriptors on the device from the operands' pointers (``DEVICE_DESC``): torch's
  analysis of which arguments a recorded kernel writes, and Inductor's launchers, take pointers; and
- the tile shape is fixed when the graph is traced: the eager autotuner's choice for the same GEMM, timed once per
  layout on zero tensors laid out as the operands are, outside the trace. The compiled GEMM is then the eager one
  instruction for instruction, and rounds the same.

Block-scaled GEMMs on a Hopper GPU are the exception: they run on the Gluon kernel (``gemm.gluon_preferred``),
1.25-1.33x faster than this one, which Inductor cannot launch (torch records and launches Triton kernels, not Gluon
ones), so those stay the opaque op in every graph.

Device-side descriptors need a global scratch buffer per launch, which Triton allocates through the allocator that
Inductor's launcher sets; the ``aot_eager`` inner compiler runs recorded kernels through Triton's own launcher,
which has none. So the graph launches this kernel only while :func:`inductor_launches` is active (the backend
compiling with Inductor); elsewhere the trace records the opaque op, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
import triton

from .gemm import _check_uniform, _gemm_tma, _gemm_tma_body, _num_sms, _tma_rows, gemm_triton, gluon_preferred
from .launch import launcher

__all__ = ["gemm_launched", "inductor_launches", "launchable", "tma_operands", "tuned_config"]

_INDUCTOR_LAUNCHES = contextvars.ContextVar("fp4compile_inductor_launches", default=False)
_TUNED: dict = {}


@contextlib.contextmanager
def inductor_launches() -> Iterator[None]:
    """Within the block, traced GEMMs are recorded as kernel launches for Inductor (see the module docstring)."""
    token = _INDUCTOR_LAUNCHES.set(True)
    try:
        yield
    finally:
        _INDUCTOR_LAUNCHES.reset(token)


def _b_kmajor(b: torch.Tensor) -> bool:
    """Whether B is a transposed view of a TMA-ready [K, N] tensor (the dgrad's W^T), read through that tensor."""
    return not _tma_rows(b) and _tma_rows(b.T)


def tma_operands(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernel can read ``a`` and ``b`` through TMA descriptors: fp16 with TMA-ready rows (B's or those
    of the tensor under a transposed B)."""
    return a.dtype == b.dtype == torch.float16 and _tma_rows(a) and (_tma_rows(b) or _b_kmajor(b))


def launchable(a: torch.Tensor, b: torch.Tensor, outer_a: torch.Tensor, uniform_k: int) -> bool:
    """Whether the GEMM of ``a`` and ``b`` is recorded as an Inductor-launched kernel: inside
    :func:`inductor_launches`, CUDA operands the kernel can read (:func:`tma_operands`), unless the eager GEMM runs
    on the Gluon kernel (``gemm.gluon_preferred``: block-scaled, on Hopper)."""
    if not (_INDUCTOR_LAUNCHES.get() and a.is_cuda and tma_operands(a, b)):
        return False
    return not gluon_preferred(a, b, outer_a, uniform_k)


def _layout(t: torch.Tensor) -> tuple:
    """What of a (possibly traced) tensor the tile choice depends on: shape, strides, storage offset, dtype."""
    return tuple(t.shape), t.stride(), t.storage_offset(), t.dtype


def _stand_in(shape: tuple, stride: tuple, offset: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A zero tensor with exactly that layout (the same row pitch and alignment, so the same kernel)."""
    extent = offset + sum((size - 1) * step for size, step in zip(shape, stride)) + 1 if all(shape) else offset
    return torch.zeros(extent, dtype=dtype, device=device).as_strided(shape, stride, offset)


def tuned_config(
    a: torch.Tensor,
    b: torch.Tensor,
    outer_a: torch.Tensor,
    outer_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    uniform_k: int,
) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, stages, warps): the eager TMA autotuner's choice for this GEMM (its key: M, N, K, the scale
    layout, bias, uniform columns, B's layout and the dtypes), timed outside any trace on zero tensors laid out as
    the operands are, once per layout and process."""
    layouts = [None if t is None else _layout(t) for t in (a, b, outer_a, outer_b, bias)]
    key = (tuple(layouts), out_dtype, uniform_k, a.device)
    if key not in _TUNED:
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes(), torch.no_grad():
            stand_ins = [None if t is None else _stand_in(*t, a.device) for t in layouts]
            gemm_triton(*stand_ins, out_dtype, method="tma", uniform_k=uniform_k)
            config = _gemm_tma.best_config
        _TUNED[key] = tuple(config.kwargs[name] for name in ("BM", "BN", "BK")) + (config.num_stages,
                                                                                   config.num_warps)  # fmt: skip
    return _TUNED[key]


def gemm_launched(
    a: torch.Tensor,
    b: torch.Tensor,
    outer_a: torch.Tensor,
    outer_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    uniform_k: int = 0,
    config: Optional[tuple[int, int, int, int, int]] = None,
) -> torch.Tensor:
    """``(a @ b^T) * outer`` (+ bias) as ``out_dtype``, as :func:`~fp4compile.kernels.gemm.gemm_triton` computes it,
    recorded (while tracing) as one launch of the persistent TMA kernel with device-side descriptors.

    ``config``: (BM, BN, BK, stages, warps); default :func:`tuned_config`. Operands as :func:`launchable` says."""
    m, k = a.shape
    n = b.shape[0]
    block_outer = outer_a.dim() == 2
    _check_uniform(uniform_k, block_outer, k)
    bm, bn, bk, stages, warps = config or tuned_config(a, b, outer_a, outer_b, bias, out_dtype, uniform_k)
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    sms = _num_sms(a.device.index or 0)  # CUDA tensors carry their device index
    grid = (min(sms, triton.cdiv(m, bm) * triton.cdiv(n, bn)),)
    kmajor = _b_kmajor(b)
    launcher(_gemm_tma_body)[grid](
        a, b, c, outer_a, outer_b, bias if bias is not None else outer_a, m, n, k, c.stride(0), c.stride(1),
        uniform_k, a.stride(0), b.stride(1) if kmajor else b.stride(0), BLOCK_OUTER=block_outer,
        HAS_BIAS=bias is not None, UNIFORM=uniform_k > 0, NUM_SMS=sms, BM=bm, BN=bn, BK=bk, GROUP_M=8,
        DEVICE_DESC=True, B_KMAJOR=kmajor, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return c
