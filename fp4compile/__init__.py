"""fp4compile: NVFP4 training numerics and kernels for torch.compile.

Public API:

- :class:`QuantSpec`: how one GEMM operand is quantized (``QuantSpec.named("ms_eden")``).
- :func:`quantize`: quantize a 2-D tensor along its last dim, returning :class:`NVFP4`.
- :class:`NVFP4`: packed E2M1 codes, E4M3 block scales, FP32 outer scales, ``dequantize()``.
- :class:`Recipe`: the six operand quantizations of a linear layer (``Recipe.named("nvidia")``), with
  Wang et al.'s options ``dge=True`` and ``occ=OutlierClamping(...)``.
- :class:`RowE2M1`, :class:`FP8Tensor`: the slot specs of Wang et al.'s own layout (row-scaled E2M1 forward,
  FP8 backward; the ``fp4_dge_occ`` preset).
- :func:`nvfp4_linear`: ``F.linear`` with NVFP4 forward and backward GEMMs.
- :func:`explain`: which matmuls of a model ``backend="nvfp4"`` rewrites, and the rewritten graphs.
- :class:`OutControl`: TetraJet-v2's outlier input channels in MXFP8 (``Recipe(outliers=...)``,
  preset ``tetrajet_v2_full``); :func:`outlier_channels` reports each layer's selection and
  :func:`attach_outlier_state` registers the state before a checkpoint is loaded.
- :class:`HotChannelPatch`: CHON's residual columns for the hot input channels (preset ``chon``).
- :class:`OsciReset`: TetraJet-v2's reset of oscillating weights, a post-step hook on the optimizer
  (:class:`OsciResetCallback` drives it from a Hugging Face ``Trainer``; needs ``transformers``).
- :class:`NumericsMonitor`: per layer and GEMM operand slot, what quantization does (SNR, flush-to-zero and
  saturation rates, hot channels) every ``every`` steps; ``python -m fp4compile.plot`` draws heatmaps.
- :class:`NVFP4Linear`: ``nn.Linear`` running :func:`nvfp4_linear` (``fp4compile.nn``).
- :class:`NVFP4Config`: torchao config, ``torchao.quantization.quantize_(model, config,
  filter_fn=config.filter_fn)`` with ``config = NVFP4Config(recipe=...)`` swaps eligible linears for
  :class:`NVFP4Linear` (needs ``torchao>=0.18``).
- :func:`export_torchao_nvfp4`: ``NVFP4Linear`` -> ``nn.Linear`` with a torchao ``NVFP4Tensor`` weight,
  bit-identical to ``quantize(weight, "rtn")``, for inference (needs ``torchao>=0.18``);
  :func:`load_torchao_nvfp4` loads a checkpoint of such a model back.

``torch.compile(model, backend="nvfp4")`` finds the backend through the
``torch_dynamo_backends`` entry point (``fp4compile.backend:nvfp4_backend``).

Importing this package registers nothing and changes no global state, and does not import
torchao: ``NVFP4Linear``, ``NVFP4Config`` and ``export_torchao_nvfp4`` load their modules on first
access (the torchao handler of ``NVFP4Config`` is registered then).
"""

import importlib

from .explain import explain
from .format import NVFP4
from .linear import nvfp4_linear
from .monitor import NumericsMonitor
from .osci_reset import OsciReset
from .outlier_channels import HotChannelPatch, OutControl
from .outlier_layers import attach_outlier_state, outlier_channels
from .outliers import OutlierClamping
from .quantize import quantize
from .recipe import Recipe
from .spec import QuantSpec
from .wang_format import FP8Tensor, RowE2M1

# NVFP4Config, export_torchao_nvfp4, load_torchao_nvfp4 (torchao) and OsciResetCallback (transformers) are public
# too but left out of __all__: ``from fp4compile import *`` must work without those packages.
__all__ = [
    "FP8Tensor",
    "HotChannelPatch",
    "NVFP4",
    "NVFP4Linear",
    "NumericsMonitor",
    "OsciReset",
    "OutControl",
    "OutlierClamping",
    "QuantSpec",
    "Recipe",
    "RowE2M1",
    "attach_outlier_state",
    "explain",
    "nvfp4_linear",
    "outlier_channels",
    "quantize",
]
__version__ = "0.1.0"

# Lazily loaded names -> their module (torchao is imported only when its names are first used).
_LAZY = {
    "NVFP4Linear": ".nn",
    "NVFP4Config": ".torchao_integration",
    "export_torchao_nvfp4": ".torchao_integration",
    "load_torchao_nvfp4": ".torchao_integration",
    "OsciResetCallback": ".hf_trainer",
}


def __getattr__(name: str):
    """Load ``NVFP4Linear``, ``NVFP4Config``, ``export_torchao_nvfp4``, ``load_torchao_nvfp4`` and
    ``OsciResetCallback`` on first access.

    The torchao ones raise ``ImportError`` (``pip install "torchao>=0.18"``) when torchao is missing,
    ``OsciResetCallback`` when transformers is.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily loaded ones included."""
    return sorted(set(globals()) | set(_LAZY))
