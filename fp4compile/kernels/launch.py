"""How the kernel wrappers launch their Triton kernels: directly, or through ``torch.library.wrap_triton``.

Inside the ``fp4compile::`` triton ops (``ops.py``) AOTAutograd traces the wrappers with fake or functional
tensors: the kernel calls must then be ``wrap_triton`` calls, which record them as graph nodes that Inductor
compiles and launches itself. Outside tracing a kernel is launched directly, since ``wrap_triton``'s dispatch
costs about a millisecond per call in eager mode.
"""

from __future__ import annotations

from typing import Any

from torch.library import wrap_triton

from ..tracing import tracing

__all__ = ["launcher"]


def launcher(kernel: Any) -> Any:
    """``kernel`` itself, or ``wrap_triton(kernel)`` while :func:`tracing`; index it with the grid as usual."""
    return wrap_triton(kernel) if tracing() else kernel
