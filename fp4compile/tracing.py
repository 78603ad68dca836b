"""Whether the quantized linear's code is being traced (by AOTAutograd, ``make_fx`` or fake tensors).

The triton ops' bodies (``ops.py``) run twice over: eagerly on real tensors, and traced under torch
dispatch modes while ``torch.compile`` builds its graph. Two things depend on which: kernels are launched
through ``wrap_triton`` only while tracing (``kernels/launch.py``), and deterministic quantizations are shared
between linears only while tracing (``shared_quantization.py``).
"""

from __future__ import annotations

import torch

__all__ = ["tracing"]


def tracing() -> bool:
    """Whether a torch dispatch mode is active (AOTAutograd's functionalization, fake tensors, ``make_fx``).

    False while Dynamo traces the calling Python (``nvfp4_linear`` inside a compiled model's forward): Dynamo
    records the tensor ops themselves, and AOTAutograd traces them later."""
    if torch.compiler.is_dynamo_compiling():
        return False
    return torch._C._len_torch_dispatch_stack() > 0
