"""Test setup: Triton kernels run in the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated,
i.e. before ``fp4compile.kernels`` is imported, hence here.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_DEVICE = "cuda" if ON_GPU else "cpu"

requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (run on the device machine)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
