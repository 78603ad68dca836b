"""The ``nvfp4`` torch.compile backend: rewrite the captured graph's matmuls, then hand it to Inductor.

``torch.compile(model, backend="nvfp4", options={"recipe": "quartet_ii"})`` finds
:func:`nvfp4_backend` through the ``torch_dynamo_backends`` entry point, so no import of
fp4compile is needed. This module must not register the backend itself (torch registers the
entry point on first use, and a second registration of the name fails).
"""

from __future__ import annotations

import functools
import logging
import pathlib
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .passes import RewriteReport, rewrite_matmuls
from .recipe import Recipe

__all__ = ["BackendOptions", "nvfp4_backend"]

log = logging.getLogger(__name__)

INNER_COMPILERS = ("inductor", "aot_eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class BackendOptions:
    """The options of ``backend="nvfp4"`` (pass them as ``torch.compile(..., options={...})``).

    Attributes:
        recipe: a :class:`Recipe` or preset name (default ``"nvidia"``).
        skip: FQN patterns (``fnmatch``) of layers kept in high precision, in addition to the
            recipe's ``keep_high_precision``.
        inner: ``"inductor"`` (default) compiles the rewritten graph; ``"aot_eager"`` runs it
            through AOTAutograd without Inductor (for debugging).
        mode: an Inductor mode (``"max-autotune"``, ``"reduce-overhead"``, ...). ``torch.compile``
            does not accept ``mode=`` together with ``options=``, so it can be given here.
    """

    recipe: Recipe
    skip: tuple[str, ...] = ()
    inner: str = "inductor"
    mode: Optional[str] = None

    @classmethod
    def parse(cls, options: Optional[dict[str, Any]] = None, mode: Optional[str] = None) -> "BackendOptions":
        """Validate a user's options dict; unknown keys, recipes, compilers or modes raise ``ValueError``."""
        options = dict(options or {})
        valid = [f for f in cls.__dataclass_fields__]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown nvfp4 backend option(s) {unknown}; valid options: {', '.join(valid)}")
        recipe = Recipe.resolve(options.get("recipe", "nvidia"))
        skip = options.get("skip", ())
        if isinstance(skip, str):
            skip = (skip,)
        if not all(isinstance(p, str) for p in skip):
            raise TypeError(f"nvfp4 option 'skip' must be FQN patterns (strings), got {skip!r}")
        inner = options.get("inner", "inductor")
        if inner not in INNER_COMPILERS:
            raise ValueError(f"unknown nvfp4 option inner={inner!r}; valid: {', '.join(INNER_COMPILERS)}")
        mode = options.get("mode", mode)
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        if mode not in (None, "default") and inner != "inductor":
            raise ValueError(f"mode={mode!r} needs inner='inductor' (got inner={inner!r})")
        return cls(recipe=recipe, skip=tuple(skip), inner=inner, mode=mode)


def compile_rewritten(gm: torch.fx.GraphModule, example_inputs: list, options: BackendOptions):
    """Compile an already rewritten graph with the inner compiler the options name."""
    if options.inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(options.mode)) if options.mode not in (None, "default") else {}
    patches["post_grad_custom_post_pass"] = _CodeVersionPass()
    return compile_fx(gm, example_inputs, config_patches=patches)


class _CodeVersionPass(CustomGraphPass):
    """A no-op post-grad pass whose uuid hashes fp4compile's sources.

    Inductor's FX graph cache cannot see inside the ``fp4compile::`` ops; keying the cache on
    our sources means a changed op implementation (or fake kernel) never reuses a stale entry,
    while unchanged code keeps hitting the cache (a pass without a uuid would disable it).
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        return _source_hash()


@functools.lru_cache(maxsize=1)
def _source_hash() -> bytes:
    from torch._inductor.custom_graph_pass import get_hash_for_files

    package = pathlib.Path(__file__).parent
    return get_hash_for_files(tuple(str(p) for p in sorted(package.rglob("*.py"))))


def nvfp4_backend(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Union[dict, str, None]):
    """torch.compile backend: rewrite eligible matmuls into NVFP4 linears, then compile with ``inner``."""
    options = BackendOptions.parse(kwargs.get("options"), kwargs.get("mode"))
    report = RewriteReport(rewrite_matmuls(gm, options.recipe, options.skip), [gm])
    log.info("nvfp4 backend (recipe %s):\n%s", options.recipe.name, report)
    return compile_rewritten(gm, example_inputs, options)
