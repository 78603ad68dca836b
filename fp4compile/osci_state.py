"""OsciReset's bookkeeping around the window arithmetic: its settings, its hook handle and its checkpoint.

- :func:`check_settings`: the checks on ``OsciReset``'s hyperparameters;
- :class:`HookHandle`: what ``OsciReset.register`` returns;
- :func:`build_state_dict` and :func:`restore_state`: the ``state_dict`` format (version :data:`STATE_VERSION`)
  that ``OsciReset.state_dict`` writes and ``OsciReset.load_state_dict`` checks and reads back.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Optional

import torch

from .eligibility import FLOAT_DTYPES
from .osci_layers import TrackedLayer
from .osci_sample import sample_size
from .osci_shards import is_sharded, local_weight

__all__ = [
    "CONFIG_KEYS",
    "SCHEDULE_KEYS",
    "STATE_VERSION",
    "HookHandle",
    "build_state_dict",
    "check_int",
    "check_settings",
    "restore_state",
]

STATE_VERSION = 1
#: The settings a ``state_dict`` records under ``config`` besides the recipe's name, in this order.
CONFIG_KEYS = ("start", "period", "window", "threshold", "memory_efficient", "sample_fraction")
#: The settings ``load_state_dict`` requires to match (``threshold`` may differ; the new one applies).
SCHEDULE_KEYS = ("start", "period", "window", "memory_efficient", "sample_fraction")


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) of at least ``minimum`` (0 or 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a non-negative" if minimum == 0 else "a positive"
        raise ValueError(f"{name} must be {what} integer, got {value!r}")


def check_settings(
    start: object,
    period: object,
    window: object,
    threshold: object,
    memory_efficient: object,
    sample_fraction: object,
    autocast_dtype: Optional[torch.dtype],
) -> None:
    """Check ``OsciReset``'s hyperparameters (its constructor's arguments of the same names), in this order.

    Raises:
        ValueError: a bad value, or ``window`` not smaller than ``period``.
        TypeError: ``memory_efficient`` is not a bool.
    """
    check_int("start", start, minimum=0)
    check_int("period", period, minimum=1)
    check_int("window", window, minimum=1)
    if window >= period:
        raise ValueError(
            f"window ({window}) must be smaller than period ({period}): the reset comes after step "
            f"snapshot + window + 1, at the latest together with the next period's snapshot"
        )
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    if isinstance(sample_fraction, bool) or not isinstance(sample_fraction, (int, float)):
        raise ValueError(f"sample_fraction must be a number in (0, 1], got {sample_fraction!r}")
    if not 0.0 < sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must lie in (0, 1], got {sample_fraction!r}")
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"memory_efficient must be a bool, got {type(memory_efficient).__name__}")
    if autocast_dtype is not None and autocast_dtype not in FLOAT_DTYPES:
        raise ValueError(f"autocast_dtype must be None or one of {FLOAT_DTYPES}, got {autocast_dtype!r}")


class HookHandle:
    """What :meth:`OsciReset.register` returns: ``remove()`` unregisters the hook (also as a context manager).

    ``owner`` is the registering ``OsciReset``; its ``_handle`` is cleared on ``remove()`` while it is this one.
    """

    def __init__(self, owner: Any, torch_handle) -> None:
        self._owner = owner
        self._torch_handle = torch_handle

    def remove(self) -> None:
        """Unregister the hook from the optimizer; the OsciReset can then be registered again."""
        self._torch_handle.remove()
        if self._owner._handle is self:
            self._owner._handle = None

    def __enter__(self) -> "HookHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def build_state_dict(
    step: int, config: dict[str, Any], layers: Mapping[str, TrackedLayer], history: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``state_dict`` of an OsciReset at ``step`` with settings ``config`` (the recipe's name and
    :data:`CONFIG_KEYS`), tracked ``layers`` (their live window state, not copied) and reset ``history`` (copied)."""
    return {
        "version": STATE_VERSION,
        "step": step,
        "config": config,
        "layers": {fqn: dict(layer.state) for fqn, layer in layers.items() if layer.state},
        "history": copy.deepcopy(history),
    }


def restore_state(
    state_dict: Any, config: Mapping[str, Any], layers: Mapping[str, TrackedLayer]
) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
    """Check a :func:`build_state_dict` result against an OsciReset's ``config`` and tracked ``layers``.

    Returns:
        the step counter and, per FQN of a layer with a live window, its state: copies on the weight's device,
        in the dtypes the window state has (``prev`` the weight's, indices int32 or int64, the rest FP32).

    Raises:
        ValueError: another version or schedule, an unknown layer, or entries of the wrong names or shapes.
    """
    if not isinstance(state_dict, dict) or state_dict.get("version") != STATE_VERSION:
        got = state_dict.get("version") if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"not an OsciReset state_dict of version {STATE_VERSION} (got {got!r})")
    saved_config = state_dict["config"]
    for key in SCHEDULE_KEYS:
        if saved_config[key] != config[key]:
            raise ValueError(f"state_dict has {key}={saved_config[key]!r} but this OsciReset has {config[key]!r}")
    step = state_dict["step"]
    check_int("state_dict['step']", step, minimum=0)
    saved_layers = state_dict["layers"]
    unknown = sorted(set(saved_layers) - set(layers))
    if unknown:
        raise ValueError(f"state_dict holds window state of weights this OsciReset does not track: {unknown}")
    memory_efficient = config["memory_efficient"]
    expected = ("index", "prev", "prev_q", "d_q", "d_w") if memory_efficient else ("prev", "d_q", "d_w")
    restored: dict[str, dict[str, torch.Tensor]] = {}
    for fqn, saved in saved_layers.items():
        layer = layers[fqn]
        if sorted(saved) != sorted(expected):
            raise ValueError(f"state of {fqn!r} has entries {sorted(saved)}, expected {sorted(expected)}")
        device, dtype = layer.param.device, layer.param.dtype
        local = local_weight(layer.param)
        if memory_efficient:
            k = saved["index"].numel()
            shapes = {name: (k,) for name in expected}
            whole = not is_sharded(layer.param)  # a shard holds its rows' share of the sample
            size = sample_size(layer.numel, config["sample_fraction"])
            if (whole and k != size) or (k and int(saved["index"].max()) >= local.numel()):
                raise ValueError(f"state of {fqn!r} samples {k} elements, not {size}")
        else:
            shapes = {name: tuple(local.shape) for name in expected}
        state = {}
        for name in expected:
            tensor = saved[name]
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"state {fqn!r}[{name!r}] has shape {tuple(tensor.shape)}, expected {shapes[name]}")
            if name == "index":
                target_dtype = torch.int32 if layer.numel < 2**31 else torch.int64
            else:
                target_dtype = dtype if name == "prev" else torch.float32
            state[name] = tensor.detach().to(device=device, dtype=target_dtype, copy=True)
        restored[fqn] = state
    return step, restored
