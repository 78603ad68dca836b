"""Helpers shared by the tests: where kernels run, and the GPU-only marker.

``conftest.py`` sets ``TRITON_INTERPRET`` before anything imports Triton kernels; this module only
describes the machine, so tests import it like any module (``from testing import requires_gpu``).
"""

import pytest
import torch

__all__ = ["KERNEL_DEVICE", "ON_GPU", "requires_gpu"]

#: Whether a CUDA GPU is present (GPU-only tests run; kernels run compiled, not interpreted).
ON_GPU = torch.cuda.is_available()

#: The device kernel tests put their tensors on: CUDA, or the CPU under Triton's interpreter.
KERNEL_DEVICE = "cuda" if ON_GPU else "cpu"

#: Marks a test that needs a CUDA GPU; on the CPU it is skipped with the reason.
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (run on the device machine)")
