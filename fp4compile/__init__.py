"""fp4compile: NVFP4 training numerics and kernels for torch.compile.

Public API:

- :class:`QuantSpec`: how one GEMM operand is quantized (``QuantSpec.named("ms_eden")``).
- :func:`quantize`: quantize a 2-D tensor along its last dim, returning :class:`NVFP4`.
- :class:`NVFP4`: packed E2M1 codes, E4M3 block scales, FP32 outer scales, ``dequantize()``.

Importing this package registers nothing and changes no global state.
"""

from .format import NVFP4
from .quantize import quantize
from .spec import QuantSpec

__all__ = ["NVFP4", "QuantSpec", "quantize"]
__version__ = "0.1.0"
