"""Triton kernels: NVFP4 quantization (every ``QuantSpec``)."""

from .quantize import quantize_triton

__all__ = ["quantize_triton"]
