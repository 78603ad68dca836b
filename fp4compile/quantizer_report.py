"""Error statistics of the named quantizers on synthetic data (``fp4compile quantizers``).

For an input ``x`` [rows, K] and its quantization ``x_hat``:

- relative quadratic error: the mean over rows of ``||x - x_hat||^2 / ||x||^2``;
- error of the mean of B draws: the same statistic for the average of B independent
  quantizations (fresh seed and signs each). An unbiased quantizer's falls as 1/B, so
  ``rel_error / mean_error`` is close to B; a deterministic or biased one's stays near
  its single-draw error (ratio near 1, or well below B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .quantize import quantize
from .spec import QuantSpec

__all__ = ["DISTRIBUTIONS", "QuantizerStats", "make_data", "relative_quadratic_error", "quantizer_stats"]

#: Synthetic inputs: name -> description.
DISTRIBUTIONS = {
    "gaussian": "N(0, 1)",
    "heavy-tailed": "Student-t, 3 degrees of freedom",
}


@dataclass(frozen=True)
class QuantizerStats:
    """One row of the quantizer table."""

    name: str
    distribution: str
    rel_error: float
    mean_error: float
    draws: int
    bytes_per_element: float

    @property
    def error_ratio(self) -> float:
        """``rel_error / mean_error``: about ``draws`` when unbiased, about 1 when deterministic."""
        return self.rel_error / self.mean_error if self.mean_error > 0 else float("inf")


def make_data(distribution: str, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A float32 [rows, cols] CPU sample of ``distribution`` (a key of :data:`DISTRIBUTIONS`)."""
    if distribution == "gaussian":
        return torch.randn(rows, cols, generator=generator)
    if distribution == "heavy-tailed":
        # Student-t(3) = N / sqrt(chi2_3 / 3), with chi2_3 the sum of three squared normals.
        normal = torch.randn(rows, cols, generator=generator)
        chi2 = torch.randn(3, rows, cols, generator=generator).square().sum(0)
        return normal / torch.sqrt(chi2 / 3)
    raise ValueError(f"unknown distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")


def relative_quadratic_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean over rows of ``||x - x_hat||^2 / ||x||^2`` (computed in float64)."""
    x, x_hat = x.double(), x_hat.double()
    return ((x - x_hat).square().sum(-1) / x.square().sum(-1)).mean().item()


def quantizer_stats(
    name: str,
    x: torch.Tensor,
    *,
    distribution: str,
    draws: int,
    generator: Optional[torch.Generator] = None,
) -> QuantizerStats:
    """Error statistics of the named quantizer on ``x`` over ``draws`` independent quantizations."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    spec = QuantSpec.named(name)
    total = torch.zeros_like(x, dtype=torch.float64)
    errors = []
    for _ in range(draws if spec.stochastic or spec.random_signs else 1):
        x_hat = quantize(x, spec, generator=generator).dequantize(torch.float32)
        errors.append(relative_quadratic_error(x, x_hat))
        total += x_hat.double()
    mean = total / len(errors)
    return QuantizerStats(
        name=name,
        distribution=distribution,
        rel_error=sum(errors) / len(errors),
        mean_error=relative_quadratic_error(x, mean),
        draws=draws,
        bytes_per_element=spec.bytes_per_element,
    )
