"""Which layers are kept in high precision: FQN names and the ``skip`` filter shared by every entry point.

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
    "SkipRule",
    "normalize_fqn",
    "relative_names",
    "warn_unmatched_patterns",
]

#: Dtypes an NVFP4 operand may have before quantization.
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

#: What ``skip`` accepts: a pattern, a ``(fqn, module) -> bool`` callable, or a sequence of those.
SkipRule = Union[str, Callable[[str, Optional[nn.Module]], bool], Sequence[Union[str, Callable]]]

_COMPILE_WRAPPER = "_orig_mod"


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
