"""Test setup: Triton kernels run in the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, i.e. before
``fp4compile.kernels`` is imported, hence here (pytest loads this file first). Helpers shared by
the tests live in ``testing.py``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
