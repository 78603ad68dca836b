"""``NVFP4Linear``: an ``nn.Linear`` whose forward and backward GEMMs run in NVFP4.

The module holds the same parameters as ``nn.Linear`` (``weight`` [out, in], optional ``bias``
[out], same state_dict keys), so checkpoints move freely between the two; a recipe with ``outliers``
(OutControl, the Hot-Channel Patch) adds the layer's outlier-channel state as buffers ``outlier_<field>``,
saved and restored with the model. Its forward is
:func:`fp4compile.nvfp4_linear` with the module's recipe; in eager mode and under
``torch.compile`` (any backend) it runs the same ``fp4compile::linear`` op.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn

from .eligibility import why_not_nvfp4
from .linear import nvfp4_linear
from .outlier_channels import attach_state, module_state
from .recipe import Recipe

__all__ = ["NVFP4Linear"]


class NVFP4Linear(nn.Linear):
    """``nn.Linear`` computed with :func:`fp4compile.nvfp4_linear` under a :class:`~fp4compile.Recipe`.

    Args:
        in_features, out_features: positive multiples of 16 (NVFP4 blocks are 16 wide along
            every GEMM's reduction dim).
        bias, device, dtype: as for ``nn.Linear``.
        recipe: a preset name (``Recipe.names()``) or a :class:`Recipe` (registered under its name).

    Attributes:
        recipe: the recipe's name (a string, so compiled graphs and pickles refer to it by name;
            ``Recipe.named(layer.recipe)`` gives the :class:`Recipe`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        recipe: Union[str, Recipe] = "nvidia",
    ) -> None:
        name = Recipe.resolve(recipe).name
        _check_features(in_features, out_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = name
        control = Recipe.named(name).outliers
        if control is not None:
            attach_state(self, control)

    @property
    def outlier_state(self):
        """The outlier-channel state (the buffers), or None when the recipe has no ``outliers``."""
        return module_state(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight^T + bias`` with NVFP4 forward and backward GEMMs (see :func:`nvfp4_linear`)."""
        return nvfp4_linear(x, self.weight, self.bias, recipe=self.recipe, outlier_state=self.outlier_state)

    def extra_repr(self) -> str:
        """``nn.Linear``'s description plus the recipe."""
        return f"{super().extra_repr()}, recipe={self.recipe!r}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Union[str, Recipe] = "nvidia") -> "NVFP4Linear":
        """An ``NVFP4Linear`` sharing ``linear``'s parameters (the same ``Parameter`` objects, no copy).

        Device, dtype, ``requires_grad`` and the training flag carry over unchanged; ``linear``
        itself is not modified. Raises ``ValueError`` when in or out features are not multiples of 16.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NVFP4Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        name = Recipe.resolve(recipe).name
        _check_features(linear.in_features, linear.out_features)
        # Build on the meta device (no allocation, no init), then adopt linear's parameters.
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            recipe=name,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        control = Recipe.named(name).outliers
        if control is not None:  # built on meta: the state goes where the weight is
            attach_state(new, control, fresh=True)
        new.train(linear.training)
        return new


def _check_features(in_features: int, out_features: int) -> None:
    reason = why_not_nvfp4(out_features, in_features)
    if reason is not None:
        raise ValueError(
            f"NVFP4Linear: {reason} (NVFP4 blocks are 16 wide along every GEMM's K, so in and out features must be "
            "positive multiples of 16); keep this layer an nn.Linear"
        )
