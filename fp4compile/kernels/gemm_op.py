"""``fp4compile::gemm``: the Triton NVFP4 GEMM as an opaque custom op (on CPU tensors: the reference GEMM).

Eager calls and traces that Inductor does not compile for the ``nvfp4`` backend (``aot_eager``, a user's own
trace) record this op: it autotunes the persistent TMA kernel's tile shape per GEMM and launches it through
Triton's launcher (block-scaled GEMMs on Hopper: the Gluon kernel, ``gemm.gluon_preferred``). In graphs the
backend compiles with Inductor, the GEMM is instead a kernel launch that Inductor's generated code makes
(``gemm_traced.py``), with the tile shape this op's autotuner picked, except where the op runs the Gluon kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..schema import op_name
from .gemm import gemm_triton

__all__ = ["gemm_op"]


@torch.library.custom_op(op_name("gemm"), mutates_args=(), device_types="cuda")
def gemm_op(
    a: Tensor,
    b: Tensor,
    outer_a: Tensor,
    outer_b: Tensor,
    bias: Optional[Tensor],
    out_dtype: torch.dtype,
    uniform_k: int = 0,
) -> Tensor:
    """``(a @ b^T) * outer`` (+ bias) as ``out_dtype`` (see :func:`~fp4compile.kernels.gemm.gemm_triton`)."""
    return gemm_triton(a, b, outer_a, outer_b, bias, out_dtype, uniform_k=uniform_k)


@gemm_op.register_fake
def _gemm_fake(a, b, outer_a, outer_b, bias, out_dtype, uniform_k=0):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


@gemm_op.register_kernel("cpu")
def _gemm_cpu(a, b, outer_a, outer_b, bias, out_dtype, uniform_k=0):
    """The reference GEMM for CPU tensors (the CPU stands in for the GPU in tests and the CPU benchmark of the
    compiled CUDA code path): the same one rounding to ``out_dtype`` after FP32 accumulation and bias; ``uniform_k``
    changes only the GPU kernel's order of rounding."""
    from ..dispatch import _reference_gemm

    return _reference_gemm(a, b, outer_a, outer_b, bias, out_dtype)
