"""Outlier input channels of a linear layer: TetraJet-v2's OutControl and CHON's Hot-Channel Patch.

OutControl chooses its channels once and keeps them in MXFP8 (below); the Hot-Channel Patch
(:class:`HotChannelPatch`, :class:`HotState`, :func:`update_hot`) re-scores every ``period`` training
forwards and patches its hot channels with residual columns (``hcp_gemms.py``).

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

from .format import stored_fp32

__all__ = [
    "HotChannelPatch",
    "HotState",
    "OutControl",
    "OutlierState",
    "attach_state",
    "module_state",
    "new_state",
    "observe",
    "outlier_count",
    "outlier_path",
    "selected_channels",
    "state_type",
    "sum_over_ranks",
    "update_hot",
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


@dataclass(frozen=True)
class HotChannelPatch:
    """CHON's Hot-Channel Patch (``Recipe(outliers=HotChannelPatch(...))``, preset ``chon``).

    Every ``period`` training forwards each linear scores its input channels by the mean absolute
    quantization residual of X (over tokens) plus that of W (over output units) and keeps the ``k`` highest;
    the forward GEMM then carries, for those channels, the residual columns of construction A
    (``[X^ | R_X,I | X^_I] x [W^ | W^_I | R_W,I]``), so the error on them is only ``-R_W,I^T R_X,I``.

    Attributes:
        k: hot channels per layer (at most ``in_features``). The paper's value was not recovered; 64 is this
            library's choice (about 3 % of a 2048-wide layer).
        period: training forwards between re-scorings; the paper's value was not recovered, 100 is ours.
        residual: precision of the residual columns, ``"bf16"`` or ``"nvfp4"`` (the recipe's forward quantizer).
    """

    k: int = 64
    period: int = 100
    residual: str = "bf16"

    def __post_init__(self) -> None:
        for name in ("k", "period"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HotChannelPatch.{name} must be a positive integer, got {value!r}")
        if self.residual not in ("bf16", "nvfp4"):
            raise ValueError(f"HotChannelPatch.residual must be 'bf16' or 'nvfp4', got {self.residual!r}")


def outlier_path(control, in_features: int) -> str:
    """The outlier-channel path a layer of ``in_features`` inputs carries, as ``explain`` prints it."""
    if isinstance(control, HotChannelPatch):
        return f"Hot-Channel Patch of {min(control.k, in_features)} channels ({control.residual} residuals)"
    k = outlier_count(in_features, control)
    if k == 0:
        return f"no OutControl channels (in_features {in_features} < 128)"
    return f"OutControl: {k} of {in_features} channels in {control.outlier_format}"


def outlier_count(in_features: int, control: OutControl) -> int:
    """``k``: ``ratio * in_features`` rounded up to a multiple of 128, at most ``in_features`` rounded down to one."""
    return min(in_features // _BLOCK * _BLOCK, math.ceil(control.ratio * in_features / _BLOCK) * _BLOCK)


class OutlierState(NamedTuple):
    """The per-layer state (see the module docstring); tensors on the layer's device."""

    norms: torch.Tensor
    count: torch.Tensor
    order: torch.Tensor
    selected: torch.Tensor


class HotState(NamedTuple):
    """A Hot-Channel Patch layer's state: training forwards seen (``count`` [] int64) and the hot channels
    (``index`` [k] int64; channels ``0 .. k-1`` until the first scoring, which the first forward does)."""

    count: torch.Tensor
    index: torch.Tensor


def state_type(control) -> type:
    """:class:`OutlierState` for OutControl, :class:`HotState` for the Hot-Channel Patch."""
    return HotState if isinstance(control, HotChannelPatch) else OutlierState


def new_state(in_features: int, device=None, control=None):
    """The state of a layer that has seen no forward (for ``control``, default OutControl): zero norms and count,
    identity order, not selected; or zero count and channels ``0 .. k-1``."""
    if isinstance(control, HotChannelPatch):
        k = min(control.k, in_features)
        return HotState(torch.zeros((), dtype=torch.int64, device=device),
                        torch.arange(k, dtype=torch.int64, device=device))  # fmt: skip
    return OutlierState(
        torch.zeros(in_features, dtype=torch.float32, device=device),
        torch.zeros((), dtype=torch.int64, device=device),
        torch.arange(in_features, dtype=torch.int64, device=device),
        torch.zeros((), dtype=torch.bool, device=device),
    )


def module_state(module: torch.nn.Module):
    """The state (:class:`OutlierState` or :class:`HotState`) a linear module holds as buffers ``outlier_<field>``,
    or None."""
    for kind in (OutlierState, HotState):
        if all(hasattr(module, f"outlier_{field}") for field in kind._fields):
            return kind(*(getattr(module, f"outlier_{field}") for field in kind._fields))
    return None


def attach_state(module: torch.nn.Module, control, fresh: bool = False):
    """The state of ``module`` (an ``nn.Linear``), registered as its buffers ``outlier_<field>`` if it has none yet
    (or, with ``fresh``, anew), on its weight's device, so that ``state_dict()`` saves it and ``load_state_dict``
    restores it; ``control`` is remembered as the attribute ``outlier_control`` (for reports)."""
    module.outlier_control = control
    state = None if fresh else module_state(module)
    if state is not None and not isinstance(state, state_type(control)):
        raise ValueError(f"{type(module).__name__} holds the state of another outliers option than {control}")
    if state is None:
        state = new_state(module.weight.shape[1], module.weight.device, control)
        for field, tensor in zip(state._fields, state):
            module.register_buffer(f"outlier_{field}", tensor)
    return state


def selected_channels(state, control) -> torch.Tensor:
    """The outlier channels of a layer (int64; OutControl: descending norm, empty before the selection; the
    Hot-Channel Patch: the current hot channels). Reads state back (a host sync): for reports only."""
    if isinstance(state, HotState):
        return state.index.clone()
    if not bool(state.selected):
        return state.order.new_empty(0)
    return state.order[: outlier_count(state.order.numel(), control)].clone()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks of the default process group (a functional all-reduce, traceable by
    ``torch.compile``), or ``t`` itself outside ``torch.distributed``: every rank then selects the same channels."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(t, "sum", dist.group.WORLD)


def observe(x: torch.Tensor, state: OutlierState, control: OutControl) -> None:
    """Record one training forward's input X [tokens, in] into ``state``, in place, and select when the window
    is complete: ``order`` becomes the channels by descending accumulated norm (ties by channel index). Under
    ``torch.distributed`` the norms are summed over the ranks first, so every rank selects the same channels."""
    count = state.count
    recording = (count >= control.start) & (count < control.start + control.window)
    norms = sum_over_ranks(torch.linalg.vector_norm(stored_fp32(x.detach()), dim=0))
    state.norms.add_(torch.where(recording, norms, torch.zeros_like(norms)))
    completes = (count + 1 == control.start + control.window) & ~state.selected
    ranked = torch.argsort(state.norms, descending=True, stable=True)
    state.order.copy_(torch.where(completes, ranked, state.order))
    state.selected.logical_or_(completes)
    count.add_(1)


def update_hot(score: torch.Tensor, state: HotState, control: HotChannelPatch) -> None:
    """After a training forward: on every ``period``-th forward (the first included) the ``k`` channels of highest
    ``score`` (summed over data-parallel ranks) become the hot channels; in place, no host sync."""
    rescore = state.count % control.period == 0
    top = torch.topk(sum_over_ranks(score), state.index.numel()).indices
    state.index.copy_(torch.where(rescore, top, state.index))
    state.count.add_(1)
