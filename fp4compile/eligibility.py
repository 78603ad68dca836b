"""Which layers run in NVFP4: the eligibility rule, FQN names, the ``skip`` filter and the module walker.

Every entry point (the backend's pass, ``nvfp4_linear``, ``NVFP4Linear``, ``quantize_``, OsciReset)
asks :func:`why_not_nvfp4` whether a weight can be quantized, so they agree and say it the same way.

The backend's ``options={"skip": ...}``, ``NVFP4Config(skip=...)`` and ``OsciReset(skip=...)`` take
the same thing: ``fnmatch`` patterns of module FQNs (``"model.layers.0.*"``), a callable
``(fqn, module) -> bool`` that returns True for the layers to keep in high precision, or a list
mixing both. A name is the model's own FQN (``model.layers.0.self_attn.q_proj``), without the
``_orig_mod`` components that ``torch.compile`` inserts; a layer inside a compiled submodule also
answers to its name relative to that submodule.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = [
    "FLOAT_DTYPES",
    "LayerFilter",
    "linear_layer_names",
    "SkipRule",
    "normalize_fqn",
    "relative_names",
    "swap_linear_layers",
    "warn_unmatched_patterns",
    "why_not_nvfp4",
]

#: Dtypes an NVFP4 operand may have before quantization.
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

#: What ``skip`` accepts: a pattern, a ``(fqn, module) -> bool`` callable, or a sequence of those.
SkipRule = Union[str, Callable[[str, Optional[nn.Module]], bool], Sequence[Union[str, Callable]]]

_COMPILE_WRAPPER = "_orig_mod"


def why_not_nvfp4(out_features, in_features, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why a linear with weight ``[out_features, in_features]`` of ``dtype`` cannot run in NVFP4, or None if it can.

    NVFP4 blocks are 16 wide along every GEMM's reduction dim, and in and out are each the reduction
    dim of one GEMM (forward and dgrad), so both must be positive multiples of 16; the weight must be
    bfloat16, float16 or float32. Symbolic sizes (Dynamo's dynamic shapes) are not decided.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        return f"weight dtype {dtype} is not bfloat16, float16 or float32"
    if not isinstance(in_features, int) or not isinstance(out_features, int):
        return "symbolic weight shape"
    if in_features <= 0 or out_features <= 0 or in_features % 16 or out_features % 16:
        return f"in_features={in_features} or out_features={out_features} is not a multiple of 16"
    return None


def swap_linear_layers(
    module: nn.Module,
    from_linear: Callable[[nn.Module, str], nn.Module],
    filter_fn: Callable[[nn.Module, str], bool],
    fqn: str = "",
) -> nn.Module:
    """Replace, depth first, each submodule ``m`` at ``fqn`` with ``filter_fn(m, fqn)`` by ``from_linear(m, fqn)``.

    A replaced module's children are not visited. Returns ``module`` itself, or its replacement when
    ``module`` itself matches (use the return value). ``fqn`` is ``module``'s own name.
    """
    if filter_fn(module, fqn):
        return from_linear(module, fqn)
    for name, child in list(module.named_children()):
        new = swap_linear_layers(child, from_linear, filter_fn, f"{fqn}.{name}" if fqn else name)
        if new is not child:
            setattr(module, name, new)
    return module


def normalize_fqn(fqn: str) -> str:
    """``fqn`` without the ``_orig_mod`` components that ``torch.compile``'s ``OptimizedModule`` adds."""
    return ".".join(part for part in fqn.split(".") if part and part != _COMPILE_WRAPPER)


def relative_names(fqn: str) -> tuple[str, ...]:
    """``fqn`` normalized, then relative to each compiled submodule on its path (outermost first)."""
    parts = fqn.split(".")
    names = [normalize_fqn(fqn)]
    for i, part in enumerate(parts):
        if part == _COMPILE_WRAPPER:
            names.append(normalize_fqn(".".join(parts[i + 1 :])))
    return tuple(dict.fromkeys(n for n in names if n))


@dataclass(frozen=True)
class LayerFilter:
    """The layers kept in high precision: FQN patterns and callables.

    Attributes:
        patterns: ``fnmatch`` patterns, matched against a layer's module FQN and its weight's FQN.
        callables: ``(fqn, module) -> bool`` functions, called with the module's FQN and the module
            (``None`` where the matmul has no module, e.g. a compiled function); True keeps the layer
            in high precision. Note the argument order: torchao's ``filter_fn`` is ``(module, fqn)``
            and returns True for the layers to *convert*.
    """

    patterns: tuple[str, ...] = ()
    callables: tuple[Callable, ...] = ()

    @classmethod
    def parse(cls, skip: Optional[SkipRule], what: str = "skip") -> "LayerFilter":
        """A filter from a user's ``skip`` value; a wrong type raises ``TypeError`` naming ``what``."""
        if skip is None:
            return cls()
        if isinstance(skip, LayerFilter):
            return skip
        items = (skip,) if isinstance(skip, str) or callable(skip) else skip
        try:
            items = tuple(items)
        except TypeError:
            raise TypeError(
                f"{what} must be FQN patterns (strings), a callable (fqn, module) -> bool, or a list of those; "
                f"got {type(skip).__name__}"
            ) from None
        patterns, callables = [], []
        for item in items:
            if isinstance(item, str):
                patterns.append(item)
            elif callable(item):
                callables.append(item)
            else:
                raise TypeError(
                    f"{what} must be FQN patterns (strings), a callable (fqn, module) -> bool, or a list of those; "
                    f"got an item {item!r} of type {type(item).__name__}"
                )
        return cls(tuple(patterns), tuple(callables))

    def __bool__(self) -> bool:
        return bool(self.patterns or self.callables)

    def __add__(self, other: "LayerFilter") -> "LayerFilter":
        return LayerFilter(self.patterns + other.patterns, self.callables + other.callables)

    def match(self, names: Iterable[str], module_fqn: str = "", module: Optional[nn.Module] = None) -> Optional[str]:
        """Why the layer named ``names`` is kept (``"skip pattern 'x'"`` / ``"skip callable f"``), or None.

        ``names`` are every name the layer answers to (module FQN, weight FQN, names relative to
        compiled submodules); callables get ``module_fqn`` and ``module``.
        """
        names = [n for n in names if n]
        for pattern in self.patterns:
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                return f"skip pattern {pattern!r}"
        for fn in self.callables:
            if fn(module_fqn, module):
                return f"skip callable {getattr(fn, '__qualname__', repr(fn))}"
        return None

    def unmatched_patterns(self, names: Iterable[str]) -> list[str]:
        """The patterns that match none of ``names``."""
        names = list(names)
        return [p for p in self.patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def linear_layer_names(named_modules: Iterable[tuple[str, nn.Module]]) -> tuple[list[str], list[str]]:
    """The ``nn.Linear`` layers among ``named_modules`` (the layers a skip pattern is meant for).

    Returns:
        Their FQNs (``_orig_mod`` removed), and every name a pattern can match for them (names relative to
        compiled submodules, with and without ``.weight``).
    """
    fqns, names = [], []
    for raw, module in named_modules:
        if isinstance(module, nn.Linear):
            fqns.append(normalize_fqn(raw))
            names += relative_names(raw) + relative_names(f"{raw}.weight" if raw else "weight")
    return fqns, names


def warn_unmatched_patterns(
    layer_filter: LayerFilter,
    linear_names: Sequence[str],
    where: str,
    candidates: Optional[Sequence[str]] = None,
    stacklevel: int = 2,
) -> None:
    """Warn once per pattern of ``layer_filter`` that matches no linear layer (a typo would keep nothing).

    Args:
        layer_filter: the user's filter; only its patterns are checked.
        linear_names: the linear layers' FQNs; the warning shows two of them, so the fix is plain.
        where: who is speaking (``"nvfp4 backend"``, ``"NVFP4Config"``, ...).
        candidates: every name a pattern may match (default ``linear_names``).
    """
    names = [n for n in dict.fromkeys(linear_names) if n]
    candidates = names if candidates is None else [n for n in candidates if n]
    for pattern in layer_filter.unmatched_patterns(candidates):
        examples = ", ".join(repr(n) for n in names[:2]) or "none: the model has no linear layer"
        warnings.warn(
            f"{where}: skip pattern {pattern!r} matches no linear layer, so it keeps nothing in high precision; "
            f"the model's linear layers are named like {examples}",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
