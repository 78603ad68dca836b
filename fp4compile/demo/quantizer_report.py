"""Error statistics of the named quantizers on synthetic data (``fp4compile quantizers``).

For an input ``x`` [rows, K] and its quantization ``x_hat``:

- relative quadratic error: the mean over rows of ``||x - x_hat||^2 / ||x||^2``;
- error of the mean of B draws: the same statistic for the average of B independent
  quantizations (fresh seed and signs each). An unbiased quantizer's falls as 1/B, so
  ``rel_error / mean_error`` is close to B; a deterministic or biased one's stays near
  its single-draw error (ratio near 1, or well below B).

:func:`markdown_table` is README's table of the named quantizers: one row per
``QuantSpec.names()``, with the one-line description from :data:`DESCRIPTIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..quantize import quantize
from ..spec import QuantSpec
from .report import markdown_table as _markdown_table

__all__ = [
    "DESCRIPTIONS",
    "DISTRIBUTIONS",
    "QuantizerStats",
    "make_data",
    "markdown_table",
    "relative_quadratic_error",
    "quantizer_stats",
]

#: One line per named quantizer (``QuantSpec.names()``): what it is and where it comes from.
DESCRIPTIONS = {
    "rtn": "NVIDIA / TransformerEngine: per-tensor scale amax/(6*448), E4M3 RNE block scales, E2M1 RNE saturating",
    "rtn_4over6": "Four Over Six: per block, scale the max to 6 or to 4, whichever has the lower squared error; "
    "cap 256",
    "rtn_2d": "NVIDIA's 16x16 weight blocks (the same scales serve W and W^T)",
    "sr": "unbiased stochastic rounding: block max maps to 6*16/17 so no element is clipped",
    "sr_te": "TransformerEngine's stochastic rounding (max maps to 6, clamp at 6: slightly biased)",
    "rht16_sr_te": "TransformerEngine's fixed-sign 16-point random Hadamard transform, then `sr_te` "
    "(nvidia's wgrad.dy)",
    "ms_eden": "Quartet II: random-sign RHT-128, clip 6*16/17/0.93, cap 256, per-16 EDEN correction rounded "
    "stochastically into the E4M3 scale",
    "double_block_rtn": "TetraJet-v2: an unrounded FP32 scale per 1x128 block, no per-tensor scale",
    "double_block_rht16_sr": "TetraJet-v2 backward: double block, random-sign RHT-16, unbiased SR",
    "sr_4over6": "SR combined with the 4/6 rule: biased (kept to show it)",
    "rht16_rtn_te": "TransformerEngine's fixed-sign RHT-16, then `rtn` (nvidia's wgrad.x: the forward input's "
    "columnwise copy)",
}

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


def markdown_table(names: Optional[tuple[str, ...]] = None) -> str:
    """The quantizer table (name, ``QuantSpec.short_str()``, description) as GitHub markdown.

    One row per name of ``names`` (default: every ``QuantSpec.names()``, in that order); a name
    without an entry in :data:`DESCRIPTIONS` is a ``KeyError`` that says so.
    """
    rows = []
    for name in QuantSpec.names() if names is None else names:
        spec = QuantSpec.named(name)
        if name not in DESCRIPTIONS:
            raise KeyError(f"quantizer {name!r} has no description in fp4compile.demo.quantizer_report.DESCRIPTIONS")
        rows.append((f"`{name}`", f"`{spec.short_str()}`", DESCRIPTIONS[name]))
    return _markdown_table(("name", "spec", "what it is"), rows)
