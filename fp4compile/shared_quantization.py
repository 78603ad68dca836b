"""Quantize once what several linears share, while ``torch.compile`` traces them.

Linears that read the same activation (q/k/v projections, gate/up) quantize it with the same forward
quantizer, and, under ``nvidia``, X^T with the same wgrad quantizer. While AOTAutograd traces the
``fp4compile::`` ops (``tracing.py``: a torch dispatch mode is active) every such tensor is one traced
object passed to each op, so a deterministic quantization of it (no random seed, no random signs) can be
remembered on that object and reused: the compiled graph then quantizes it once. The result is the same by
construction (a deterministic quantizer gives the same bits for the same input); the tensors an op returns
(the saved quantization) are copies on reuse, since the outputs of different ops must not alias.

The memo lives on the traced tensor (an attribute, keyed by the quantizer and the tensor's version counter, so
an in-place change invalidates it) and dies with the trace. Eager calls never share: outside tracing every
function here is the plain computation.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .format import NVFP4
from .gemm import Operand
from .spec import QuantSpec
from .tracing import tracing

__all__ = ["flattened", "shared_operand", "shared_quantization", "shared_value", "transposed"]

_MEMO = "_fp4compile_shared"


def _traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor of a trace (functional or fake): only those carry a memo, which then dies with the
    trace (a real tensor under some other dispatch mode, a parameter say, would keep it alive)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return tracing() and isinstance(t, (FunctionalTensor, FakeTensor))


def _memo(t: torch.Tensor) -> dict:
    memo = t.__dict__.get(_MEMO)
    if memo is None:
        memo = t.__dict__[_MEMO] = {}
    return memo


def _cached(t: torch.Tensor, key, make: Callable[[], object]):
    if not _traced(t):
        return make()
    memo = _memo(t)
    version, value = memo.get(key, (None, None))
    if version != t._version:
        value = make()
        memo[key] = (t._version, value)
    return value


def shared_value(t: torch.Tensor, key, make: Callable[[], object]):
    """``make()``, computed once per traced ``t`` and ``key`` (``make`` must be deterministic); outside tracing
    every call computes it."""
    return _cached(t, key, make)


def flattened(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, K] (``x`` itself when 2-D); one view per traced tensor, so that the linears reading ``x``
    receive the same object."""
    if x.dim() == 2:
        return x
    return _cached(x, "flattened", lambda: x.reshape(-1, x.shape[-1]))


def transposed(x: torch.Tensor) -> torch.Tensor:
    """``x.T``; one view per traced tensor (the wgrad operand X^T of every linear reading ``x``)."""
    return _cached(x, "transposed", lambda: x.T)


def _shared(x: torch.Tensor, key, spec: QuantSpec, signs: Optional[torch.Tensor], quantize: Callable):
    """``(quantize(), reused)``: computed once per traced ``x`` and ``key`` when deterministic."""
    if not _traced(x) or signs is not None or spec.stochastic:
        return quantize(), False
    memo = _memo(x)
    version, found = memo.get(key, (None, None))
    if version == x._version:
        return found, True
    made = quantize()
    memo[key] = (x._version, made)
    return made, False


def _copies(q: NVFP4) -> NVFP4:
    return dataclasses.replace(q, codes=q.codes.clone(), scales=q.scales.clone(), outer=q.outer.clone())


def shared_operand(
    x: torch.Tensor,
    spec: QuantSpec,
    signs: Optional[torch.Tensor],
    quantize: Callable[[], Operand],
) -> Operand:
    """``quantize()`` (the quantization of ``x`` by ``spec`` with its GEMM values), computed once per traced ``x``
    when deterministic; a reuse returns copies of the packed tensors and the same GEMM values."""
    operand, reused = _shared(x, spec, spec, signs, quantize)
    return Operand(_copies(operand.q), operand.values) if reused else operand


def shared_quantization(
    x: torch.Tensor,
    spec: QuantSpec,
    signs: Optional[torch.Tensor],
    quantize: Callable[[], NVFP4],
) -> NVFP4:
    """``quantize()`` (the quantization of ``x`` by ``spec``, without GEMM values: one that is only saved), computed
    once per traced ``x`` when deterministic; a reuse returns copies of the packed tensors."""
    q, reused = _shared(x, ("saved", spec), spec, signs, quantize)
    return _copies(q) if reused else q
