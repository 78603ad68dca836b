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
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .eligibility import LayerFilter, warn_unmatched_patterns
from .launch_analysis import memoized_launch_analysis
from .nn import NVFP4Linear
from .passes import MatmulRecord, ModuleNames, RewriteReport, nvfp4_op_recipes, rewrite_matmuls
from .passes.matmul import STATE_WEIGHTS
from .passes.report import INELIGIBLE
from .recipe import Recipe

__all__ = [
    "BackendOptions",
    "check_recipe_mix",
    "converted_recipes",
    "inductor_config_patches",
    "nvfp4_backend",
    "rewrite_graph",
    "with_state_owner_check",
]

log = logging.getLogger(__name__)

INNER_COMPILERS = ("inductor", "aot_eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


_OPTION_NAMES = ("recipe", "skip", "inner", "mode", "inductor", "mix_recipes", "monitor")


@dataclass(frozen=True)
class BackendOptions:
    """The options of ``backend="nvfp4"`` (pass them as ``torch.compile(..., options={...})``).

    Attributes:
        recipe: a :class:`Recipe` or preset name (default ``"nvidia"``).
        skip: layers kept in high precision, in addition to the recipe's ``keep_high_precision``:
            ``fnmatch`` patterns of the model's own module FQNs (``"model.layers.0.*"``), a callable
            ``(fqn, module) -> bool`` returning True for the layers to keep, or a list of both.
        inner: ``"inductor"`` (default) compiles the rewritten graph; ``"aot_eager"`` runs it
            through AOTAutograd without Inductor (for debugging).
        mode: an Inductor mode (``"max-autotune"``, ``"reduce-overhead"``, ...). ``torch.compile``
            does not accept ``mode=`` together with ``options=``, so it can be given here.
        inductor: Inductor config patches for this compilation only (``{"cpp_wrapper": True}``): what
            ``torch.compile(options=...)`` would pass to Inductor, which the backend's own options replace. Names
            are ``torch._inductor.config``'s (dotted for nested ones); they apply after the mode's.
        mix_recipes: allow a ``recipe`` that differs from the recipe of layers already converted to
            ``NVFP4Linear`` (by ``quantize_``); without it that is an error.
        recipe_given: whether the user named the recipe (the options held ``"recipe"``).
        monitor: a :class:`~fp4compile.NumericsMonitor` of the model, told the ``recipe`` and ``skip`` of the
            compilation (its probes run outside the compiled graphs; the graphs do not change).
    """

    recipe: Recipe
    skip: LayerFilter = LayerFilter()
    inner: str = "inductor"
    mode: Optional[str] = None
    inductor: tuple = ()
    mix_recipes: bool = False
    recipe_given: bool = False
    monitor: Any = None

    @classmethod
    def parse(cls, options: Optional[dict[str, Any]] = None, mode: Optional[str] = None) -> "BackendOptions":
        """Validate a user's options dict; unknown keys, recipes, compilers or modes raise ``ValueError``."""
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"nvfp4 backend options must be a dict, got {type(options).__name__}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(_OPTION_NAMES))
        if unknown:
            raise ValueError(f"unknown nvfp4 backend option(s) {unknown}; valid options: {', '.join(_OPTION_NAMES)}")
        recipe = Recipe.resolve(options.get("recipe", "nvidia"))
        skip = LayerFilter.parse(options.get("skip"), what="nvfp4 option 'skip'")
        inner = options.get("inner", "inductor")
        if inner not in INNER_COMPILERS:
            raise ValueError(f"unknown nvfp4 option inner={inner!r}; valid: {', '.join(INNER_COMPILERS)}")
        mode = options.get("mode", mode)
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        if mode not in (None, "default") and inner != "inductor":
            raise ValueError(f"mode={mode!r} needs inner='inductor' (got inner={inner!r})")
        inductor = _inductor_patches(options.get("inductor"), inner)
        mix_recipes = options.get("mix_recipes", False)
        if not isinstance(mix_recipes, bool):
            raise TypeError(f"nvfp4 option 'mix_recipes' must be True or False, got {mix_recipes!r}")
        monitor = options.get("monitor")
        if monitor is not None:
            from .monitor import NumericsMonitor

            if not isinstance(monitor, NumericsMonitor):
                raise TypeError(
                    f"nvfp4 option 'monitor' must be a fp4compile.NumericsMonitor, got {type(monitor).__name__}"
                )
        return cls(recipe, skip, inner, mode, inductor, mix_recipes, recipe_given="recipe" in options, monitor=monitor)


def _inductor_patches(patches: Any, inner: str) -> tuple:
    """The ``inductor`` option checked: a dict of known ``torch._inductor.config`` names, as sorted pairs."""
    if patches is None:
        return ()
    if not isinstance(patches, dict):
        kind = type(patches).__name__
        raise TypeError(f"nvfp4 option 'inductor' must be a dict of Inductor config patches, got {kind}")
    if patches and inner != "inductor":
        raise ValueError(f"nvfp4 option 'inductor' needs inner='inductor' (got inner={inner!r})")
    from torch._inductor import config

    known = config.get_config_copy()
    unknown = sorted(name for name in patches if name not in known)
    if unknown:
        raise ValueError(
            f"unknown Inductor config name(s) {unknown} in nvfp4 option 'inductor' "
            f"(names of torch._inductor.config, dotted for nested ones: 'triton.cudagraphs')"
        )
    if "post_grad_custom_post_pass" in patches:
        raise ValueError("nvfp4 option 'inductor' cannot set post_grad_custom_post_pass: the backend uses it")
    return tuple(sorted(patches.items()))


def converted_recipes(named_modules: Iterable[tuple[str, torch.nn.Module]]) -> set[str]:
    """Recipes of the ``NVFP4Linear`` layers among ``named_modules`` (a model converted by ``quantize_``)."""
    return {m.recipe for _, m in named_modules if isinstance(m, NVFP4Linear)}


def check_recipe_mix(options: BackendOptions, converted: Iterable[str]) -> None:
    """Refuse a ``recipe`` option that differs from the recipes of already converted layers, unless ``mix_recipes``."""
    converted = sorted(converted)
    if converted and options.recipe_given and set(converted) != {options.recipe.name} and not options.mix_recipes:
        raise ValueError(
            f"the model holds NVFP4Linear layers of recipe(s) {converted} (from quantize_), but the nvfp4 backend "
            f"was given recipe {options.recipe.name!r}; drop the recipe option to keep the conversion, pass "
            f"the same recipe, or options={{'mix_recipes': True}} to run both"
        )


def rewrite_graph(
    gm: torch.fx.GraphModule, options: BackendOptions, names: ModuleNames, graph_index: int = 0
) -> list[MatmulRecord]:
    """Run the matmul pass on ``gm`` as the backend does, and say what the user must hear.

    A model that holds ``NVFP4Linear`` layers (``quantize_``) keeps its conversion: with no
    ``recipe`` option its other linears stay in high precision (a warning says how to quantize
    them), and a ``recipe`` that differs from the converted layers' raises ``ValueError`` unless
    ``mix_recipes=True``. Skip patterns that match no linear of the model are warned about, and
    weight matmuls that stay in high precision for a reason no filter chose are listed in one
    WARNING log record.
    """
    converted = sorted(nvfp4_op_recipes(gm) | converted_recipes(names.modules()))
    check_recipe_mix(options, converted)
    keep_plain = None
    if converted:
        if not options.recipe_given:
            keep_plain = (
                f"kept: the model was converted by quantize_ (recipe {', '.join(converted)}); "
                f"options={{'recipe': {converted[0]!r}}} quantizes it too"
            )
    records = rewrite_matmuls(gm, options.recipe, options.skip, graph_index, names, keep_plain)
    linear_fqns, linear_names = names.linear_names()
    seen = [n for r in records if r.weight for n in (r.module, r.weight)]
    warn_unmatched_patterns(options.skip, linear_fqns + seen, "nvfp4 backend", candidates=linear_names + seen)
    kept = [r for r in records if keep_plain is not None and r.reason == keep_plain]
    if kept:
        warnings.warn(
            f"nvfp4 backend: the model holds NVFP4Linear layers (recipe {', '.join(converted)}), so its "
            f"{len(kept)} other linear matmul(s) stay in high precision, as quantize_ left them "
            f"({', '.join(r.module or r.weight for r in kept[:3])}{', ...' if len(kept) > 3 else ''}); "
            f"pass options={{'recipe': {converted[0]!r}}} to quantize them too",
            UserWarning,
            stacklevel=2,
        )
    ineligible = [r for r in records if r.status == INELIGIBLE]
    if ineligible:
        listing = "\n".join(f"  {r.module or r.weight or '(root)'}: {r.reason}" for r in ineligible)
        log.warning(
            "nvfp4 backend: %d matmul(s) with a weight stay in high precision (they run unquantized):\n%s\n"
            "To silence this, name them in options={'skip': [...]}; fp4compile.explain(model, ...) shows every matmul.",
            len(ineligible),
            listing,
        )
    return records


def compile_rewritten(gm: torch.fx.GraphModule, example_inputs: list, options: BackendOptions):
    """Compile an already rewritten graph with the inner compiler the options name.

    With Inductor the backward graph is lowered now, with the forward (AOTAutograd's
    ``force_non_lazy_backward_lowering``, patched for this call only), instead of at the first backward: so that
    its lowering, which analyses every Triton launch again, runs inside the launch-analysis memo too."""
    if options.inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        with memoized_launch_analysis():
            return aot_eager(gm, example_inputs)
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    from .kernels.gemm_traced import inductor_launches

    with memoized_launch_analysis(), inductor_launches(), functorch_config.patch(force_non_lazy_backward_lowering=True):
        return compile_fx(gm, example_inputs, config_patches=inductor_config_patches(gm, options))


def inductor_config_patches(gm: torch.fx.GraphModule, options: BackendOptions) -> dict:
    """The Inductor config patches the backend compiles ``gm`` with: the mode's, then the user's ``inductor`` option,
    then the backend's own."""
    from torch._inductor import list_mode_options

    patches = dict(list_mode_options(options.mode)) if options.mode not in (None, "default") else {}
    patches.update(dict(options.inductor))
    patches["post_grad_custom_post_pass"] = _CodeVersionPass()
    return patches


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
    if options.monitor is not None:
        options.monitor.configure(options.recipe, options.skip)
    report = RewriteReport(rewrite_graph(gm, options, ModuleNames.from_call_stack()), [gm])
    log.info("nvfp4 backend (recipe %s):\n%s", options.recipe.name, report)
    return with_state_owner_check(gm, compile_rewritten(gm, example_inputs, options))


def with_state_owner_check(gm: torch.fx.GraphModule, compiled: Callable) -> Callable:
    """``compiled``, refusing to run with other weights than those whose outlier state ``gm`` holds.

    Recipes with ``outliers`` keep each layer's state on its module, and the pass bakes it into the graph. Dynamo
    reuses one compiled graph for identical modules (``block.compile()`` on each repeated block, "regional
    compilation"): those would share the first block's state. Checking that each such layer's weight input is
    that layer's weight (an identity test per layer and call) turns that into an error that says what to do.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    checks = [(placeholders.index(node), layer, name) for node, layer, name in gm.meta.get(STATE_WEIGHTS, [])
              if node.op == "placeholder"]  # fmt: skip
    if not checks:
        return compiled

    def check(args) -> None:
        for index, layer, name in checks:
            if args[index] is not layer.weight:  # the layer's current weight: replacing it (assign=True) is fine
                raise RuntimeError(
                    f"nvfp4 backend: this compiled graph holds the outlier-channel state of layer {name!r} and is "
                    "being run with another module's weights: torch.compile reused it for an identical module "
                    "(compiling each repeated block separately). Recipes with `outliers` keep per-layer state: "
                    "compile the whole model (torch.compile(model, backend='nvfp4', ...)) instead."
                )

    boxed = getattr(compiled, "_boxed_call", False)

    @functools.wraps(compiled)
    def run(*args):
        check(args[0] if boxed and len(args) == 1 and isinstance(args[0], list) else args)  # either convention
        return compiled(*args)

    return run
