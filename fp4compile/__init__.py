"""fp4compile: NVFP4 training numerics and kernels for torch.compile.

Public API:

- :class:`QuantSpec`: how one GEMM operand is quantized (``QuantSpec.named("ms_eden")``).
- :func:`quantize`: quantize a 2-D tensor along its last dim, returning :class:`NVFP4`.
- :class:`NVFP4`: packed E2M1 codes, E4M3 block scales, FP32 outer scales, ``dequantize()``.
- :class:`Recipe`: the six operand quantizations of a linear layer (``Recipe.named("nvidia")``).
- :func:`nvfp4_linear`: ``F.linear`` with NVFP4 forward and backward GEMMs.
- :func:`explain`: which matmuls of a model ``backend="nvfp4"`` rewrites, and the rewritten graphs.

``torch.compile(model, backend="nvfp4")`` finds the backend through the
``torch_dynamo_backends`` entry point (``fp4compile.backend:nvfp4_backend``).

Importing this package registers nothing and changes no global state.
"""

from .explain import explain
from .format import NVFP4
from .linear import nvfp4_linear
from .quantize import quantize
from .recipe import Recipe
from .spec import QuantSpec

__all__ = ["NVFP4", "QuantSpec", "Recipe", "explain", "nvfp4_linear", "quantize"]
__version__ = "0.1.0"
