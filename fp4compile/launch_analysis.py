"""One Triton mutation analysis per distinct kernel launch while the backend compiles a graph.

Under ``torch.compile`` every Triton launch that an op's decomposition records through ``wrap_triton`` is
analysed by torch to learn which tensor arguments the kernel writes: torch generates the kernel's Triton IR
and walks it, in AOTAutograd's functionalization (more than once) and again in Inductor's lowering. For our
quantize kernel one analysis costs ~60 ms of Triton front-end time (measured on the CPU), and a Llama-style
graph records hundreds of launches that differ only in their tensors: tens of seconds of the first step.

The analysis is a pure function of the kernel, the values of its scalar and constexpr arguments and the
dtypes of its tensor arguments (torch analyses a 2-element stand-in for every tensor and a fixed value for
every symbolic size). :func:`memoized_launch_analysis` remembers its result under exactly that key for the
duration of one compilation, so that each distinct launch is analysed once. Launches with arguments the key
cannot describe (tensor descriptors, unknown objects) are analysed every time, as before.

This replaces torch's analysis function (a private one, looked up by name at each call) only inside the
``with`` block and restores it on exit; with a torch that lacks it the block changes nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["launch_key", "memoized_launch_analysis"]

#: torch's analysis functions (the name changed between torch versions), all ``(kernel, kwargs, tma_metadata)``.
_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _argument_key(value: Any) -> Optional[tuple]:
    """What torch's analysis sees of one kernel argument, or None when it cannot be told from the value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    if isinstance(value, _SYMBOLIC):
        return ("symbolic",)
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    from torch._inductor.ir import TensorBox

    if isinstance(value, TensorBox):
        return ("tensor", value.get_dtype())
    import sympy

    if isinstance(value, sympy.Expr):
        return ("symbolic",)
    return None


def _kernel_key(kernel: Any) -> Any:
    """The kernel's identity for the analysis: a ``triton.jit`` function itself; for an autotuner (torch may hand
    the analysis a fresh copy per launch) its function and the first config, which is what torch analyses."""
    configs = getattr(kernel, "configs", None)
    if configs is None:
        return kernel
    first = tuple(sorted(configs[0].kwargs.items())) if configs else ()
    return ("autotuned", _kernel_key(kernel.fn), first)


def launch_key(kernel: Any, kwargs: dict, tma_descriptor_metadata: Any) -> Optional[tuple]:
    """The memo key of one launch's analysis, or None when the launch must be analysed afresh."""
    if tma_descriptor_metadata:
        return None
    parts = []
    for name in sorted(kwargs):
        part = _argument_key(kwargs[name])
        if part is None:
            return None
        parts.append((name, *part))
    return (_kernel_key(kernel), tuple(parts))


def _memoized(name: str, analysis: Callable, memo: dict) -> Callable:
    def analyse(kernel, kwargs, tma_descriptor_metadata, *args, **kw):
        key = launch_key(kernel, kwargs, tma_descriptor_metadata)
        if key is None or args or kw:
            return analysis(kernel, kwargs, tma_descriptor_metadata, *args, **kw)
        key = (name, *key)
        if key not in memo:
            memo[key] = analysis(kernel, kwargs, tma_descriptor_metadata)
        return memo[key]

    return analyse


@contextlib.contextmanager
def memoized_launch_analysis() -> Iterator[dict]:
    """Within the block, torch's Triton launch analysis runs once per distinct launch (see the module doc).

    Yields the memo (``{key: result}``), whose length is the number of distinct launches analysed.
    """
    memo: dict = {}
    try:
        from torch._higher_order_ops import triton_kernel_wrap as wrap_module
    except ImportError:
        yield memo
        return
    originals = {name: getattr(wrap_module, name) for name in _ANALYSES if hasattr(wrap_module, name)}
    try:
        for name, analysis in originals.items():
            setattr(wrap_module, name, _memoized(name, analysis, memo))
        yield memo
    finally:
        for name, analysis in originals.items():
            setattr(wrap_module, name, analysis)
