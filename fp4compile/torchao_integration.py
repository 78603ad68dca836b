"""torchao integration: ``quantize_`` with ``NVFP4Config`` for training, ``export_torchao_nvfp4`` for inference.

Training::

    from torchao.quantization import quantize_
    from fp4compile import NVFP4Config

    config = NVFP4Config(recipe="quartet_ii")
    quantize_(model, config, filter_fn=config.filter_fn)  # eligible nn.Linear -> NVFP4Linear
    model = torch.compile(model)                          # any backend; "nvfp4" leaves them as they are

A linear is swapped when it is a plain ``nn.Linear`` (its own forward, not the
``NonDynamicallyQuantizableLinear`` of ``nn.MultiheadAttention``), in and out features are
multiples of 16, its weight is a plain bfloat16/float16/float32 tensor, and its FQN matches
neither the recipe's ``keep_high_precision`` patterns (``lm_head``) nor ``skip``. Others stay
``nn.Linear``.

torchao passes its handlers only ``(module, config)``; a module's FQN reaches only ``quantize_``'s
``filter_fn``. So the FQN rules travel through ``filter_fn=config.filter_fn``: it is the eligibility
test, it remembers the FQN of each module it accepts for the handler, and on the root it warns about
``skip`` patterns that match no linear. Compose it with your own filter as
``filter_fn=lambda m, fqn: mine(m, fqn) and config.filter_fn(m, fqn)``. A config with FQN rules (every
preset keeps ``lm_head``) refuses a module its ``filter_fn`` did not accept, with this fix in the
message: quantizing without the rules would be a silent change of what stays high precision.

Inference: :func:`export_torchao_nvfp4` turns every ``NVFP4Linear`` into an ``nn.Linear`` whose
weight is a torchao ``NVFP4Tensor`` laid out as torchao's own NVFP4 inference configs lay it out
(swizzled E4M3 scales, FP32 per-tensor scale), with codes and scales bit-identical to
``fp4compile.quantize(weight, "rtn")``.

This module imports torchao; ``import fp4compile`` does not import this module (``fp4compile.NVFP4Config``
and ``fp4compile.export_torchao_nvfp4`` load it on first access). Importing it registers the
``NVFP4Config`` handler with torchao, nothing else.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .eligibility import (
    LayerFilter,
    linear_layer_names,
    relative_names,
    swap_linear_layers,
    warn_unmatched_patterns,
    why_not_nvfp4,
)
from .nn import NVFP4Linear
from .quantize import quantize
from .recipe import Recipe
from .spec import QuantSpec

_INSTALL_HINT = 'fp4compile\'s torchao integration needs torchao 0.18 or newer: pip install "torchao>=0.18"'
_MIN_TORCHAO = (0, 18)


def _torchao_version(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


try:
    import torchao
    from torchao.core.config import AOBaseConfig
    from torchao.quantization.transform_module import register_quantize_module_handler
except ImportError as error:  # torchao missing (or broken): say how to get it
    raise ImportError(f"{_INSTALL_HINT} ({error})") from error
if _torchao_version(getattr(torchao, "__version__", "0.0")) < _MIN_TORCHAO:
    raise ImportError(f"{_INSTALL_HINT}; found torchao {torchao.__version__}")

__all__ = ["NVFP4Config", "export_torchao_nvfp4", "load_torchao_nvfp4", "nvfp4_tensor_from_weight"]


@dataclass
class NVFP4Config(AOBaseConfig):
    """torchao config: ``quantize_(model, config, filter_fn=config.filter_fn)`` swaps eligible linears for
    ``NVFP4Linear``.

    Attributes:
        recipe: a preset name (``fp4compile.Recipe.names()``) or a :class:`~fp4compile.Recipe`
            (registered under its name). Unknown names raise ``ValueError`` listing the valid ones.
        skip: layers kept as ``nn.Linear``, in addition to the recipe's ``keep_high_precision``:
            ``fnmatch`` patterns of module FQNs (e.g. ``("*.mlp.*",)``), callables
            ``(fqn, module) -> bool`` returning True for the layers to keep, or both (as the
            backend's ``skip`` option).
    """

    recipe: Union[str, Recipe] = "nvidia"
    skip: tuple = ()
    # module -> the FQN filter_fn accepted it under (read by the handler; never compared or printed)
    _accepted: weakref.WeakKeyDictionary = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        resolved = Recipe.resolve(self.recipe)  # ValueError listing valid names, TypeError for other types
        self.recipe = resolved.name if isinstance(self.recipe, str) else resolved
        parsed = LayerFilter.parse(self.skip, what="NVFP4Config.skip")  # TypeError for anything else
        self.skip = parsed.patterns + parsed.callables

    @property
    def recipe_name(self) -> str:
        """The name of the recipe (what ``NVFP4Linear.recipe`` holds)."""
        return self.recipe if isinstance(self.recipe, str) else self.recipe.name

    @property
    def layer_filter(self) -> LayerFilter:
        """Everything kept in high precision: the recipe's ``keep_high_precision``, then ``skip``."""
        return LayerFilter(tuple(Recipe.named(self.recipe_name).keep_high_precision)) + LayerFilter.parse(self.skip)

    @property
    def patterns(self) -> tuple[str, ...]:
        """All FQN patterns kept in high precision: the recipe's ``keep_high_precision``, then ``skip``'s."""
        return self.layer_filter.patterns

    def why_not(self, module: nn.Module, fqn: Optional[str]) -> Optional[str]:
        """Why ``module`` (at ``fqn``; None if unknown) stays as it is, or None if it becomes an ``NVFP4Linear``."""
        if isinstance(module, NVFP4Linear):
            return "already an NVFP4Linear"
        if not isinstance(module, nn.Linear):
            return f"{type(module).__name__} is not an nn.Linear"
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            return "NonDynamicallyQuantizableLinear (its owner reads the weight directly)"
        if type(module).forward is not nn.Linear.forward:
            return f"{type(module).__name__} overrides nn.Linear.forward"
        weight = module.weight
        if type(weight) not in (torch.Tensor, nn.Parameter):
            return f"weight is a {type(weight).__name__}, not a plain tensor"
        reason = why_not_nvfp4(module.out_features, module.in_features, weight.dtype)
        if reason is not None:
            return reason
        if fqn is not None:
            matched = self.layer_filter.match(relative_names(fqn) + relative_names(f"{fqn}.weight"), fqn, module)
            if matched is not None:
                return f"FQN {fqn!r}: {matched}"
        return None

    def filter_fn(self, module: nn.Module, fqn: str) -> bool:
        """Whether ``module`` at ``fqn`` is swapped (``quantize_(model, config, filter_fn=config.filter_fn)``).

        It remembers the FQN of each module it accepts (the handler applies the FQN rules with it), and on
        the root (``fqn == ""``, torchao's first call) warns about ``skip`` patterns that match no linear.
        """
        if fqn == "" and self.skip:
            linears, names = linear_layer_names(module.named_modules())
            skip = LayerFilter.parse(self.skip)
            warn_unmatched_patterns(skip, linears, "NVFP4Config", candidates=names, stacklevel=3)
        if self.why_not(module, fqn) is not None:
            return False
        self._accepted[module] = fqn
        return True


# ----------------------------------------------------------------------------- the quantize_ handler
def _swap(module: nn.Module, config: NVFP4Config, fqn: Optional[str]) -> nn.Module:
    """``module`` as an ``NVFP4Linear`` if eligible; a container gets its eligible descendant linears swapped.

    ``fqn`` None (unknown) applies no FQN rule below ``module`` either.
    """
    known = fqn is not None

    def eligible(m: nn.Module, name: str) -> bool:
        return isinstance(m, nn.Linear) and config.why_not(m, name if known else None) is None

    def convert(m: nn.Module, name: str) -> nn.Module:
        return NVFP4Linear.from_linear(m, config.recipe_name)

    return swap_linear_layers(module, convert, eligible, fqn or "")


@register_quantize_module_handler(NVFP4Config)
def _nvfp4_config_transform(module: nn.Module, config: NVFP4Config) -> nn.Module:
    """torchao handler: swap ``module`` (an ``nn.Linear`` that ``quantize_``'s filter accepted) for an ``NVFP4Linear``.

    ``config.filter_fn`` accepted the module and remembered its FQN; a config without FQN rules also
    takes modules other filters accepted. A non-linear module gets its eligible descendant linears
    swapped, with their FQNs below the container's.
    """
    fqn = config._accepted.pop(module, None)
    if fqn is None and config.layer_filter:
        rules = list(config.patterns + config.layer_filter.callables)
        raise ValueError(
            f"NVFP4Config keeps layers in high precision by name ({rules}), and torchao gives a module's name only "
            "to quantize_'s filter_fn: call quantize_(model, config, filter_fn=config.filter_fn) (with your own "
            "filter: filter_fn=lambda m, fqn: mine(m, fqn) and config.filter_fn(m, fqn))"
        )
    return _swap(module, config, fqn)


# ----------------------------------------------------------------------------- inference export
def _torchao_nvfp4():
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, QuantizeTensorToNVFP4Kwargs
    from torchao.prototype.mx_formats.utils import hp_data_dims_to_swizzled_scale_dims_nvfp4, to_blocked

    return NVFP4Tensor, QuantizeTensorToNVFP4Kwargs, to_blocked, hp_data_dims_to_swizzled_scale_dims_nvfp4


def _check_export_spec(spec: Union[str, QuantSpec]) -> QuantSpec:
    spec = QuantSpec.named(spec) if isinstance(spec, str) else spec
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec or a quantizer name, got {type(spec).__name__}")
    if spec.outer != "tensor" or spec.rotation != "none" or spec.stochastic:
        raise ValueError(
            "export_torchao_nvfp4 needs a deterministic, unrotated spec with a per-tensor outer scale "
            f"(NVFP4Tensor's layout), e.g. 'rtn', 'rtn_4over6' or 'rtn_2d'; got {spec.short_str()}"
        )
    return spec


def nvfp4_tensor_from_weight(
    weight: torch.Tensor,
    spec: Union[str, QuantSpec] = "rtn",
    *,
    dynamic_activation: bool = False,
    swizzle: bool = True,
):
    """A torchao ``NVFP4Tensor`` holding ``fp4compile.quantize(weight, spec)`` bit for bit.

    ``qdata`` are our packed codes, ``scale`` our E4M3 block scales (in cuBLAS's swizzled layout
    when ``swizzle``), ``per_tensor_scale`` our FP32 outer scale; ``orig_dtype`` is the weight's dtype.
    With ``dynamic_activation`` the tensor carries torchao's activation settings (NVFP4 activations
    with a dynamic per-tensor scale, as ``NVFP4DynamicActivationNVFP4WeightConfig``); otherwise it
    is weight-only (``F.linear`` dequantizes it, as ``NVFP4WeightOnlyConfig``).
    """
    nvfp4_tensor, act_kwargs_cls, to_blocked, swizzled_dims = _torchao_nvfp4()
    spec = _check_export_spec(spec)
    with torch.no_grad():
        q = quantize(weight.detach(), spec)
    rows, k = q.shape
    scale = q.scales
    if swizzle:  # cuBLAS's blocked layout, zero-padded to 128 x 4 scale tiles, as NVFP4Tensor.to_nvfp4 stores it
        scale = to_blocked(scale).view(*swizzled_dims(rows, k))
    act_kwargs = None
    if dynamic_activation:
        act_kwargs = act_kwargs_cls(use_dynamic_per_tensor_scale=True, use_triton_kernel=False, is_swizzled_scales=True)
    return nvfp4_tensor(
        q.codes,
        scale,
        16,
        weight.dtype,
        q.outer.reshape(()),
        None,
        swizzle,
        False,
        act_kwargs,
    )


def export_torchao_nvfp4(
    model: nn.Module,
    *,
    spec: Union[str, QuantSpec] = "rtn",
    dynamic_activation: bool = False,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> nn.Module:
    """Convert every ``NVFP4Linear`` of ``model`` (in place) to an ``nn.Linear`` with a torchao ``NVFP4Tensor`` weight.

    The weight is ``fp4compile.quantize(weight, spec)`` bit for bit (default ``"rtn"``, the
    NVIDIA/TransformerEngine 1x16 quantizer): codes, E4M3 block scales and the FP32 per-tensor
    scale are ours, not re-derived by torchao's ``to_nvfp4`` (whose rounding differs in the cases
    listed in ``tests/test_torchao_agreement.py``). The layout follows torchao's inference configs:
    ``nn.Linear`` with ``weight = nn.Parameter(NVFP4Tensor, requires_grad=False)``, swizzled scales,
    the bias unchanged.

    Saving and loading: save ``model.state_dict()`` with ``torch.save``. To load it, build the model
    as it was saved -- the same dtype, ``quantize_`` with ``NVFP4Config`` swapping the same
    layers, then ``export_torchao_nvfp4`` with the same ``dynamic_activation`` (``spec`` does not
    matter: the checkpoint's codes and scales replace the weights) -- and call
    :func:`load_torchao_nvfp4` ``(model, path)``. Plain ``model.load_state_dict(torch.load(path))``
    works too once torchao's ``torchao.prototype.mx_formats`` is imported (as this function does):
    torchao allow-lists ``NVFP4Tensor`` for ``torch.load``'s ``weights_only=True`` on that import,
    and ``torch.load`` before it fails with "Unsupported global ... NVFP4Tensor";
    ``load_torchao_nvfp4`` allow-lists it for its own load. An exported layer's ``load_state_dict``
    says what to do when a checkpoint does not fit it (a weight saved before export, another dtype
    or ``dynamic_activation``) instead of failing in torchao's ``NVFP4Tensor.copy_``.

    Args:
        model: a model (or a single ``NVFP4Linear``) after ``quantize_`` with ``NVFP4Config``.
        spec: a deterministic per-tensor quantizer without rotation: ``"rtn"``, ``"rtn_4over6"``
            or ``"rtn_2d"`` (its 16x16 scales are stored per 1x16 block).
        dynamic_activation: False (default): weight-only, runs anywhere (CPU included) by
            dequantizing the weight in ``F.linear``. True: activations are quantized to NVFP4 at
            run time by torchao (``NVFP4DynamicActivationNVFP4WeightConfig``'s layout); its
            ``torch._scaled_mm`` FP4 GEMM needs a Blackwell (sm100+) GPU.
        filter_fn: optional ``(module, fqn) -> bool``; only ``NVFP4Linear``\\ s it accepts are converted.

    Returns:
        ``model`` (the root itself is replaced when it is an ``NVFP4Linear``: use the return value).
    """
    spec = _check_export_spec(spec)

    def convert(layer: NVFP4Linear) -> nn.Linear:
        weight = nvfp4_tensor_from_weight(layer.weight, spec, dynamic_activation=dynamic_activation)
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=layer.weight.dtype
        )
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.bias = layer.bias
        linear.train(layer.training)
        linear.register_load_state_dict_pre_hook(_check_exported_weight_on_load)
        return linear

    def selected(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, NVFP4Linear) and (filter_fn is None or filter_fn(module, fqn))

    return swap_linear_layers(model, lambda layer, fqn: convert(layer), selected)


# ----------------------------------------------------------------------------- loading an exported checkpoint
_HOW_TO_BUILD = (
    "build the model as the saved one was built (same dtype, quantize_ with NVFP4Config(...) and its filter_fn, "
    "export_torchao_nvfp4(model, dynamic_activation=<as when saved>)) and load into it"
)


def _what(value) -> str:
    return f"a plain {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _nvfp4_layout_differences(mine, theirs) -> list[str]:
    """The fields torchao's ``NVFP4Tensor.copy_`` needs equal where the model's tensor and the checkpoint's differ."""

    def shape(t):
        return None if t is None else tuple(t.shape)

    fields = {
        "shape": (tuple(mine.shape), tuple(theirs.shape)),
        "dtype": (mine.orig_dtype, theirs.orig_dtype),
        "block_size": (mine.block_size, theirs.block_size),
        "is_swizzled_scales": (mine.is_swizzled_scales, theirs.is_swizzled_scales),
        "use_triton_kernel": (mine.use_triton_kernel, theirs.use_triton_kernel),
        "qdata shape": (shape(mine.qdata), shape(theirs.qdata)),
        "scale shape": (shape(mine.scale), shape(theirs.scale)),
        "per_tensor_scale shape": (shape(mine.per_tensor_scale), shape(theirs.per_tensor_scale)),
        "act_per_tensor_scale shape": (shape(mine.act_per_tensor_scale), shape(theirs.act_per_tensor_scale)),
    }
    act = (mine.act_quant_kwargs, theirs.act_quant_kwargs)
    if (act[0] is None) != (act[1] is None):  # export_torchao_nvfp4's dynamic_activation
        fields["dynamic_activation"] = (act[0] is not None, act[1] is not None)
    else:
        fields["act_quant_kwargs"] = act
    return [f"{name}: model {a}, checkpoint {b}" for name, (a, b) in fields.items() if a != b]


def _load_problem(key: str, param, value) -> Optional[str]:
    """Why ``value`` (a checkpoint's ``key``) cannot be copied into ``param`` (the model's), or None."""
    nvfp4_tensor = _torchao_nvfp4()[0]
    saved, exported = isinstance(value, nvfp4_tensor), isinstance(param, nvfp4_tensor)
    if saved and not exported:
        return (
            f"'{key}' of the checkpoint is an NVFP4Tensor (saved from a model exported by export_torchao_nvfp4) but "
            f"the model's '{key}' is {_what(param)}, not exported: {_HOW_TO_BUILD}"
        )
    if exported and not saved:
        return (
            f"'{key}' of the checkpoint is {_what(value)} but the model's '{key}' is an exported NVFP4Tensor: "
            "load a checkpoint saved before export into the model before export_torchao_nvfp4 (after quantize_), "
            "then export; an exported model loads checkpoints of exported models"
        )
    if saved and exported:
        differences = _nvfp4_layout_differences(param, value)
        if differences:
            return (
                f"'{key}': the checkpoint's NVFP4Tensor does not fit the model's ({'; '.join(differences)}): "
                f"{_HOW_TO_BUILD}"
            )
    return None


def _check_exported_weight_on_load(
    module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """``load_state_dict`` pre-hook of an exported ``nn.Linear``: a clear error where torchao's ``copy_`` is obscure.

    Skipped under ``load_state_dict(..., assign=True)``, which replaces the weight by the checkpoint's tensor as it is.
    """
    if local_metadata.get("assign_to_params_buffers", False):
        return
    key = prefix + "weight"
    if key in state_dict:
        problem = _load_problem(key, module.weight, state_dict[key])
        if problem is not None:
            raise RuntimeError(f"cannot load the state dict into the exported model: {problem}")


def load_torchao_nvfp4(
    model: nn.Module,
    checkpoint,
    *,
    strict: bool = True,
    map_location=None,
):
    """Load a checkpoint of a model exported by :func:`export_torchao_nvfp4` into an exported ``model``.

    ``model`` is built as the saved one was: the same dtype, ``quantize_`` with ``NVFP4Config``
    swapping the same layers, then ``export_torchao_nvfp4(model, dynamic_activation=...)`` with the
    saved model's ``dynamic_activation`` (its ``spec`` does not matter). The checkpoint's ``qdata``,
    ``scale`` and ``per_tensor_scale`` are copied into the model's ``NVFP4Tensor`` weights bit for
    bit (torchao's ``NVFP4Tensor.copy_``), the other entries as ``model.load_state_dict`` copies them.

    Every entry is checked before anything is copied: a checkpoint that does not fit (an
    ``NVFP4Tensor`` for a layer that was not exported, a weight saved before export, another dtype
    or ``dynamic_activation``) raises ``RuntimeError`` saying what to do and leaves ``model`` as it was.

    Args:
        model: the exported model to load into.
        checkpoint: a state dict (``model.state_dict()`` of an exported model), or a path or file
            object ``torch.save`` wrote one to. A file is read with ``torch.load(..., weights_only=True)``,
            allow-listing ``NVFP4Tensor`` and its activation settings for this call only.
        strict: as ``nn.Module.load_state_dict``: missing or unexpected keys are an error.
        map_location: as ``torch.load``, for a file.

    Returns:
        ``model.load_state_dict``'s ``(missing_keys, unexpected_keys)``.
    """
    from collections.abc import Mapping

    if isinstance(checkpoint, Mapping):
        state_dict = checkpoint
    else:
        nvfp4_tensor, act_kwargs_cls, _, _ = _torchao_nvfp4()
        # safe_globals removes its globals on exit: pass only those torchao has not registered for good
        registered = torch.serialization.get_safe_globals()
        missing = [cls for cls in (nvfp4_tensor, act_kwargs_cls) if cls not in registered]
        with torch.serialization.safe_globals(missing):
            state_dict = torch.load(checkpoint, map_location=map_location, weights_only=True)
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"the checkpoint holds a {type(state_dict).__name__}, not a state dict: save model.state_dict()"
            )
    params = model.state_dict(keep_vars=True)
    problems = [_load_problem(key, params[key], value) for key, value in state_dict.items() if key in params]
    problems = [problem for problem in problems if problem is not None]
    if problems:
        raise RuntimeError(
            f"cannot load the checkpoint into this {type(model).__name__} (nothing was loaded):\n\t"
            + "\n\t".join(problems)
        )
    return model.load_state_dict(state_dict, strict=strict)
