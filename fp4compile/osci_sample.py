"""The memory-efficient OsciReset variant's sample: which weight elements it tracks, and ``Q`` at them.

TetraJet-v2's ``distance_ratio_memeff`` tracks, per weight, the ``sample_fraction`` of its elements closest to
a rounding edge of the forward quantization at the snapshot (:func:`edge_score`, :func:`sample_size`), and reads
``Q(W)`` only at those elements (:func:`dequantize_at`), without decoding the whole weight.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .format import NVFP4, e2m1_decode, unpack_nibbles
from .osci_layers import TrackedLayer
from .osci_shards import full_weight

__all__ = ["BIN_WIDTHS", "dequantize_at", "edge_score", "sample_size"]

#: Width of the rounding bin of each E2M1 magnitude (0, .5, 1, 1.5, 2, 3, 4, 6), as TetraJet-v2's memeff variant.
BIN_WIDTHS = (0.5, 0.5, 0.5, 0.5, 0.75, 1.0, 1.5, 2.0)


def sample_size(numel: int, sample_fraction: float) -> int:
    """Elements sampled from a weight of ``numel`` elements: ``ceil(sample_fraction * numel)``, at least 1."""
    return min(numel, max(1, math.ceil(sample_fraction * numel - 1e-9)))


def edge_score(layer: TrackedLayer, q: NVFP4, autocast_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``|W/s - Q(W)/s| / binwidth(Q(W)/s)`` per element of the layer's whole weight (s = block scale x outer scale).

    ``q`` is ``Q``'s packed quantization of that weight. 0 at a bin centre, highest next to a rounding edge
    (TetraJet-v2's memeff selection).
    """
    rows, k = layer.param.shape
    codes = unpack_nibbles(q.codes)[:, :k]
    values = e2m1_decode(codes).abs()
    widths = torch.tensor(BIN_WIDTHS, dtype=torch.float32, device=codes.device)[(codes & 7).long()]
    scale = q.scales.to(torch.float32).repeat_interleave(16, dim=1)[:, :k]
    if q.outer.dim() == 0:
        scale = scale * q.outer
    else:
        scale = scale * q.outer.repeat_interleave(128, dim=1)[:, :k]
    w = full_weight(layer.param)
    if autocast_dtype is not None:
        w = w.to(autocast_dtype)
    scaled = w.to(torch.float32).abs() / scale
    score = torch.where(scale > 0, (scaled - values).abs() / widths, 0.0)
    return torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0)


def dequantize_at(q: NVFP4, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """FP32 dequantized values of ``q`` at flat ``index`` into the unpadded [out, in_features] tensor.

    Bit-identical to ``q.dequantize(torch.float32)`` at those elements (same products, same order), without
    decoding the whole tensor.
    """
    rows = torch.div(index, in_features, rounding_mode="floor")
    cols = index - rows * in_features
    packed = q.codes[rows, torch.div(cols, 2, rounding_mode="floor")]
    codes = torch.where(cols % 2 == 0, packed & 0xF, packed >> 4)
    values = e2m1_decode(codes) * q.scales[rows, torch.div(cols, 16, rounding_mode="floor")].to(torch.float32)
    if q.outer.dim() == 0:
        return values * q.outer
    return values * q.outer[rows, torch.div(cols, 128, rounding_mode="floor")]
