"""``fp4compile.quantize``: checks the input, draws the random streams, dispatches.

CUDA tensors go to the Triton kernels, CPU tensors to the reference in
``format.py``; both produce bit-identical :class:`~fp4compile.format.NVFP4`
results for the same seed and signs.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import dispatch
from .eligibility import FLOAT_DTYPES
from .format import NVFP4, te_rht_signs
from .spec import QuantSpec

__all__ = ["quantize", "draw_seed", "draw_signs"]


def draw_seed(device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A Philox seed as an int64 [1] tensor on ``device``, drawn from ``generator``.

    With a CUDA generator the draw happens on the GPU (no host sync, safe inside CUDA graphs).
    """
    gen_device = generator.device if generator is not None else torch.device(device)
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def draw_signs(n: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` random +-1 rotation signs (float32) on ``device``, drawn from ``generator``."""
    gen_device = generator.device if generator is not None else torch.device(device)
    bits = torch.randint(0, 2, (n,), generator=generator, device=gen_device, dtype=torch.int64)
    return (bits * 2 - 1).to(device=device, dtype=torch.float32, non_blocking=True)


def _check_input(x: torch.Tensor, spec: QuantSpec) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(
            f"quantize expects a 2-D tensor [rows, K] quantized along its last dim; got shape {tuple(x.shape)}. "
            "Flatten leading dims first: x.reshape(-1, x.shape[-1])."
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"quantize expects a bfloat16, float16 or float32 tensor; got {x.dtype}. Convert it with x.float()."
        )
    m, k = x.shape
    if k == 0 or k % spec.k_multiple:
        why = "NVFP4 blocks are 1x16" if spec.k_multiple == 16 else "this spec's 128-element blocks or rotation"
        raise ValueError(f"last dim K={k} must be a positive multiple of {spec.k_multiple} ({why}); pad K with zeros.")
    if m % spec.row_multiple:
        raise ValueError(
            f"rows={m} must be a multiple of {spec.row_multiple} for 16x16 blocks; pad the rows with zeros."
        )


def _check_randomness(spec: QuantSpec, seed: object, signs: object, read_values: bool) -> None:
    if seed is not None and not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1):
        got = f"{seed.dtype} {tuple(seed.shape)}" if isinstance(seed, torch.Tensor) else type(seed).__name__
        raise ValueError(f"seed must be an int64 tensor with one element, got {got} (pass q.seed or draw_seed())")
    if signs is None:
        return
    if spec.rotation == "none":
        raise ValueError(f"signs were given but spec {spec.short_str()} has no rotation")
    if not isinstance(signs, torch.Tensor) or signs.dim() != 1 or signs.numel() != spec.rotation_size:
        got = tuple(signs.shape) if isinstance(signs, torch.Tensor) else type(signs).__name__
        raise ValueError(
            f"signs must be a 1-D tensor of {spec.rotation_size} entries (+1 or -1) for {spec.rotation}, got {got}"
        )
    if read_values and not bool((signs.abs() == 1).all()):
        raise ValueError("signs must hold only +1 and -1 (other values would scale x, not rotate it)")


def quantize(
    x: torch.Tensor,
    spec: Union[QuantSpec, str],
    *,
    generator: Optional[torch.Generator] = None,
    seed: Optional[torch.Tensor] = None,
    signs: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> NVFP4:
    """Quantize a 2-D float tensor to NVFP4 along its last dim (the GEMM reduction dim).

    Args:
        x: [rows, K] bfloat16, float16 or float32 tensor; K a multiple of 16 (128 for
            double-block and RHT-128 specs), rows a multiple of 16 for 16x16 blocks.
        spec: a :class:`QuantSpec` or the name of one (see ``QuantSpec.names()``).
        generator: torch generator for the SR seed and random rotation signs
            (default: torch's default generator of ``x``'s device).
        seed: reuse this int64 [1] Philox seed instead of drawing one (reproduces an
            earlier stochastic quantization: pass ``q.seed``).
        signs: reuse these +-1 rotation signs instead of drawing them (both operands of
            a GEMM must share them so the rotation cancels).
        validate: raise ``ValueError`` if ``x`` holds NaN or inf. The check reads back the
            outer scales (one device sync on CUDA); with ``validate=False`` non-finite
            input instead yields NaN outer scales, so its dequantized values are NaN.

    Returns:
        An :class:`NVFP4` with codes, block scales, outer scales and the random streams used.
    """
    if isinstance(spec, str):
        spec = QuantSpec.named(spec)
    elif not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec or a quantizer name, got {type(spec).__name__}")
    _check_input(x, spec)
    _check_randomness(spec, seed, signs, read_values=validate)
    if not spec.stochastic:
        seed = None  # deterministic specs draw no random bits; q.seed stays None
    device = x.device
    if spec.stochastic and seed is None:
        seed = draw_seed(device, generator)
    if spec.rotation == "rht16_te" and signs is None:
        signs = te_rht_signs(device)
    elif spec.random_signs and signs is None:
        signs = draw_signs(spec.rotation_size, device, generator)
    if signs is not None:
        signs = signs.to(device=device, dtype=torch.float32)
    if seed is not None:
        seed = seed.to(device)

    q = dispatch.quantize(x, spec, seed, signs)
    if validate and not bool(torch.isfinite(q.outer).all()):
        raise ValueError("x contains NaN or inf; NVFP4 cannot represent them (pass validate=False to get NaN scales).")
    return q
