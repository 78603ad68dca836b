"""Triton kernels, bit-identical to ``fp4compile/format.py`` where rounding is deterministic.

- ``quantize``: NVFP4 quantization for every ``QuantSpec`` (RTN, SR, four-over-six, MS-EDEN, RHT-16/128,
  per-tensor and 1x128 outer scales), optionally writing the exact fp16 GEMM values alongside; the two
  per-tensor amaxes of a tensor quantized rotated and unrotated from one pass;
- ``gemm``: the NVFP4 GEMM on exact fp16 operands, pointer and TMA variants sharing their tile order, K step
  and epilogue helpers, outer scales in the epilogue or per 1x128 K-block;
- ``gemm_gluon``: the per-1x128-block scaled GEMM in Gluon with an asynchronous wgmma, which
  ``gemm_triton(method="auto")`` runs on Hopper (``gemm.gluon_preferred``);
- ``decode``: packed codes and scales back to fp16/fp32 values (optionally transposed, cropped, padded, or with
  the rotation undone);
- ``residual``: the Hot-Channel Patch's residual ``x - dequantize(q)``, decoded as it reads: column sums of its
  magnitude (the channel scores) and its hot columns;
- ``mxfp8``: OutControl's MXFP8 quantization and its GEMM operand (fp16 values, per-1x128 outer scales) in one
  pass;
- ``stats``: the monitor's measurement of one quantized operand;
- ``osci``: OsciReset's fused tracked-step update;
- ``numerics``: the ``@triton.jit`` helpers the kernels share: E2M1/E4M3 rounding and encoding, E2M1 code and
  E4M3 scale decoding, rotation and reduction.

The library reaches them only through ``fp4compile/dispatch.py``, which chooses between these kernels (CUDA
tensors) and the reference (elsewhere); benchmarks and kernel tests call them directly.
"""

from .quantize import abs_max_pair_triton, quantize_triton

__all__ = ["abs_max_pair_triton", "quantize_triton"]
