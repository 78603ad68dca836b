"""Outlier clamping and compensation (OCC) of activations, from Wang et al. (arXiv 2501.17116, section 3.2).

Before the forward quantizer, each row (token) of the activation X is clamped to its own quantiles:
``X_c = clamp(X, min=quantile(X, 1 - alpha), max=quantile(X, alpha))``, both tails of the signed
values, each at its own quantile (Eq. 9). ``X_c`` goes through the recipe's NVFP4 quantizer; the
sparse residual ``R = X - X_c`` (about ``2 (1 - alpha)`` of the elements) is multiplied in high
precision and added to the output, and the weight gradient gets the matching ``dY^T R`` term. The
gradient through the clamp is the straight-through estimator, as in the paper.

Quantile positions follow Wang et al.'s code on a row of ``n`` values sorted ascending: the lower
bound is the element at index ``floor((1 - alpha) n)``, the upper bound the one at ``floor(alpha n)``
(``alpha`` as the exact fraction ``Fraction(alpha).limit_denominator(10**6)``, so the counts are
integers even for symbolic sizes). They are found by selection (``torch.topk`` of the few
elements beyond each bound), not by a full sort, and the same selection gives the residual's
positions, so the residual is kept as ``(index, value)`` pairs of a fixed count per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from .format import bf16_rne, stored_fp32

__all__ = [
    "OutlierClamping",
    "clamp_outliers",
    "clamp_for_forward",
    "compensation",
    "dense_residual",
    "residual_count",
    "residual_shapes",
    "residual_weight_grad",
]

_GRANULARITIES = ("token", "tensor")
_RESIDUALS = ("bf16", "fp8", "off")
_E4M3_MAX = 448.0


@dataclass(frozen=True)
class OutlierClamping:
    """OCC settings of a recipe (``Recipe(occ=OutlierClamping(...))``).

    Attributes:
        alpha: quantile of the clamp, in (0.5, 1); the paper's default 0.99 clamps ~1 % per tail.
        granularity: ``"token"`` (each row of X its own quantiles, as the released code) or
            ``"tensor"`` (one pair of quantiles for the whole tensor).
        residual: precision of the compensation product ``R W^T`` (and of ``dY^T R``): ``"bf16"``
            (R and W rounded to bf16, FP32 products and sums), ``"fp8"`` (R and W each rounded to
            E4M3 with a per-tensor scale, the paper's cost model), or ``"off"`` (clamp only, as
            the released Megatron integration runs).
    """

    alpha: float = 0.99
    granularity: str = "token"
    residual: str = "bf16"

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.5 < self.alpha < 1:
            raise ValueError(f"OutlierClamping.alpha must lie in (0.5, 1), got {self.alpha!r}")
        if self.granularity not in _GRANULARITIES:
            raise ValueError(f"OutlierClamping.granularity must be one of {_GRANULARITIES}, got {self.granularity!r}")
        if self.residual not in _RESIDUALS:
            raise ValueError(f"OutlierClamping.residual must be one of {_RESIDUALS}, got {self.residual!r}")

    @property
    def compensates(self) -> bool:
        """Whether the residual is multiplied and added (``residual != "off"``)."""
        return self.residual != "off"


def residual_count(n, alpha: float) -> tuple:
    """``(below, above)``: how many of ``n`` sorted values lie before the lower and after the upper bound's index."""
    a = Fraction(alpha).limit_denominator(10**6)
    below = (n * (a.denominator - a.numerator)) // a.denominator
    above = n - 1 - (n * a.numerator) // a.denominator
    return below, above


def residual_shapes(occ, tokens, in_features: int) -> tuple[tuple, tuple]:
    """Shapes of the saved residual's ``(index, value)`` for X [tokens, in_features] (empty without compensation)."""
    if occ is None or not occ.compensates:
        return (0,), (0,)
    rows, n = (tokens, in_features) if occ.granularity == "token" else (1, tokens * in_features)
    below, above = residual_count(n, occ.alpha)
    return (rows, below + above), (rows, below + above)


def _rows(x: torch.Tensor, occ: OutlierClamping) -> torch.Tensor:
    return x if occ.granularity == "token" else x.reshape(1, -1)


def clamp_outliers(x: torch.Tensor, occ: OutlierClamping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_c, index, value)``: X [tokens, K] clamped to its quantiles, and the residual ``X - X_c`` as pairs.

    ``index`` [rows, below + above] (int64) holds positions within each row (rows: the tokens, or one
    row of the flattened tensor for ``granularity="tensor"``) and ``value`` the FP32 residual there
    (0 where an element equals its bound). ``X_c`` has ``x``'s dtype: its values are elements of ``x``.
    """
    rows = _rows(x, occ)
    below, above = residual_count(rows.shape[1], occ.alpha)
    top = torch.topk(rows, above + 1, dim=1, largest=True, sorted=True)
    bottom = torch.topk(rows, below + 1, dim=1, largest=False, sorted=True)
    upper, lower = top.values[:, -1:], bottom.values[:, -1:]
    clamped = torch.minimum(torch.maximum(rows, lower), upper).view_as(x)
    index = torch.cat([top.indices[:, :-1], bottom.indices[:, :-1]], dim=1)
    value = torch.cat(
        [top.values[:, :-1].float() - upper.float(), bottom.values[:, :-1].float() - lower.float()], dim=1
    )
    return clamped, index, value


def clamp_for_forward(x: torch.Tensor, occ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """What a quantized linear's forward quantizes and saves: ``(X_c, (index, value))``, X itself without OCC, and
    fresh empty pairs (int64, FP32) when nothing is compensated (op outputs must not alias)."""
    residual = (x.new_empty(0, dtype=torch.int64), x.new_empty(0, dtype=torch.float32))
    if occ is None:
        return x, residual
    clamped, index, value = clamp_outliers(x, occ)
    return clamped, ((index, value) if occ.compensates else residual)


def dense_residual(shape: torch.Size, index: torch.Tensor, value: torch.Tensor, occ: OutlierClamping) -> torch.Tensor:
    """The FP32 residual ``X - X_c`` of ``shape`` from its ``(index, value)`` pairs."""
    rows = (shape[0], shape[1]) if occ.granularity == "token" else (1, shape[0] * shape[1])
    dense = torch.zeros(rows, dtype=torch.float32, device=value.device)
    return dense.scatter_add_(1, index, value).view(shape)


def _rounded(t: torch.Tensor, residual: str) -> torch.Tensor:
    """``t`` rounded to the residual precision, as FP32 values."""
    t = stored_fp32(t)
    if residual == "bf16":
        return bf16_rne(t)
    amax = t.abs().amax()
    scale = torch.where(amax > 0, amax / _E4M3_MAX, 1.0)
    return (t / scale).to(torch.float8_e4m3fn).float() * scale


def compensation(r: torch.Tensor, weight: torch.Tensor, residual: str) -> torch.Tensor:
    """The forward's compensation ``R @ W^T`` in FP32, R and W rounded to ``residual`` precision."""
    return _rounded(r, residual) @ _rounded(weight, residual).T


def residual_weight_grad(dy: torch.Tensor, r: torch.Tensor, residual: str) -> torch.Tensor:
    """The weight gradient of the compensation, ``dY^T @ R`` in FP32 (R rounded as in the forward)."""
    return stored_fp32(dy).T @ _rounded(r, residual)
