"""TetraJet-v2's OutControl: the outlier input channels of a linear layer, chosen once, kept in MXFP8.

``OutControl(ratio, start, window, outlier_format)`` is a :class:`~fp4compile.Recipe`'s ``outliers``
option. Each quantized linear keeps a small state (:class:`OutlierState`, module buffers):

- ``norms`` [in] FP32: the sum over training forwards ``start .. start + window - 1`` of the L2 norm
  of every input channel of X over the forward's tokens (TetraJet-v2's ``X_chan_record``);
- ``count`` [] int64: training forwards seen (one per optimizer step without gradient accumulation);
- ``order`` [in] int64: the channels in descending-norm order once selected (identity before);
- ``selected`` [] bool: set by the forward that completes the window, which already uses the selection.

The ``k`` outlier channels are ``order[:k]``, ``k`` the ratio of ``in_features`` rounded up to a
multiple of 128 (at most the largest multiple of 128 in ``in_features``), as TetraJet-v2's kernels
round it (its paper simulated ``round(ratio * in)``); the rest keep their descending-norm order,
which decides which values share an NVFP4 block. :func:`observe` updates the state from one forward's
X with tensor ops only (no host sync; the selection is an ``argsort`` applied through ``torch.where``),
so the state can live in compiled graphs as inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "OutControl",
    "OutlierState",
    "attach_state",
    "module_state",
    "new_state",
    "observe",
    "outlier_count",
    "selected_channels",
]

_FORMATS = ("mxfp8", "bf16")
_BLOCK = 128


@dataclass(frozen=True)
class OutControl:
    """TetraJet-v2's outlier-channel control (``Recipe(outliers=OutControl(...))``).

    Attributes:
        ratio: the share of input channels kept out of FP4, in (0, 1) (TetraJet-v2: 0.1).
        start: the training forward at which norm recording starts (TetraJet-v2: iteration 500).
        window: how many training forwards are recorded before the one-time selection (TetraJet-v2: 50).
        outlier_format: ``"mxfp8"`` (E4M3, 1x32 blocks, E8M0 scales rounded up, as TetraJet-v2's
            kernels) or ``"bf16"`` for the outlier channels in the forward and wgrad GEMMs; dgrad
            stays fully FP4.
    """

    ratio: float = 0.1
    start: int = 500
    window: int = 50
    outlier_format: str = "mxfp8"

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise ValueError(f"OutControl.ratio must lie in (0, 1), got {self.ratio!r}")
        for name, minimum in (("start", 0), ("window", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"OutControl.{name} must be an integer >= {minimum}, got {value!r}")
        if self.outlier_format not in _FORMATS:
            raise ValueError(f"OutControl.outlier_format must be one of {_FORMATS}, got {self.outlier_format!r}")


def outlier_count(in_features: int, control: OutControl) -> int:
    """``k``: ``ratio * in_features`` rounded up to a multiple of 128, at most ``in_features`` rounded down to one."""
    return min(in_features // _BLOCK * _BLOCK, math.ceil(control.ratio * in_features / _BLOCK) * _BLOCK)


class OutlierState(NamedTuple):
    """The per-layer state (see the module docstring); tensors on the layer's device."""

    norms: torch.Tensor
    count: torch.Tensor
    order: torch.Tensor
    selected: torch.Tensor


def new_state(in_features: int, device=None) -> OutlierState:
    """The state of a layer that has seen no forward: zero norms and count, identity order, not selected."""
    return OutlierState(
        torch.zeros(in_features, dtype=torch.float32, device=device),
        torch.zeros((), dtype=torch.int64, device=device),
        torch.arange(in_features, dtype=torch.int64, device=device),
        torch.zeros((), dtype=torch.bool, device=device),
    )


def module_state(module: torch.nn.Module) -> "OutlierState | None":
    """The state a linear module holds as buffers ``outlier_<field>``, or None."""
    if not hasattr(module, "outlier_order"):
        return None
    return OutlierState(*(getattr(module, f"outlier_{field}") for field in OutlierState._fields))


def attach_state(module: torch.nn.Module, control: OutControl) -> OutlierState:
    """The state of ``module`` (an ``nn.Linear``), registered as its buffers ``outlier_<field>`` if it has none yet
    (on its weight's device), so that ``state_dict()`` saves it and ``load_state_dict`` restores it; ``control``
    is remembered as the attribute ``outlier_control`` (for reports)."""
    module.outlier_control = control
    state = module_state(module)
    if state is None:
        state = new_state(module.weight.shape[1], module.weight.device)
        for field, tensor in zip(OutlierState._fields, state):
            module.register_buffer(f"outlier_{field}", tensor)
    return state


def selected_channels(state: OutlierState, control: OutControl) -> torch.Tensor:
    """The outlier channels of a layer (int64, descending norm; empty before the selection). Reads the flag
    back (a host sync): for reports, not for the training loop."""
    if not bool(state.selected):
        return state.order.new_empty(0)
    return state.order[: outlier_count(state.order.numel(), control)].clone()


def observe(x: torch.Tensor, state: OutlierState, control: OutControl) -> None:
    """Record one training forward's input X [tokens, in] into ``state``, in place, and select when the window
    is complete: ``order`` becomes the channels by descending accumulated norm (ties by channel index)."""
    count = state.count
    recording = (count >= control.start) & (count < control.start + control.window)
    norms = torch.linalg.vector_norm(x.detach().to(torch.float32), dim=0)
    state.norms.add_(torch.where(recording, norms, torch.zeros_like(norms)))
    completes = (count + 1 == control.start + control.window) & ~state.selected
    ranked = torch.argsort(state.norms, descending=True, stable=True)
    state.order.copy_(torch.where(completes, ranked, state.order))
    state.selected.logical_or_(completes)
    count.add_(1)
