"""``fp4compile.explain``: which matmuls of a model the ``nvfp4`` backend rewrites, without compiling."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .backend import BackendOptions, check_recipe_mix, converted_recipes, rewrite_graph
from .passes import ModuleNames, RewriteReport

__all__ = ["explain"]


def explain(model, *args, options: Optional[dict[str, Any]] = None, **kwargs) -> RewriteReport:
    """Capture ``model(*args, **kwargs)`` with Dynamo, run the matmul pass, and report what it did.

    Nothing is compiled for training: the rewritten graphs run once, eagerly, under
    ``torch.no_grad()``. With a recipe that has ``outliers``, the rewrite attaches each layer's
    outlier-channel state buffers to its ``nn.Linear`` (as compiling does). ``args`` and ``kwargs``
    are the model's inputs (``input_ids=ids`` for a Hugging Face model); ``options`` are those of
    ``backend="nvfp4"``, as given to
    ``torch.compile(model, backend="nvfp4", options={...})`` (``recipe``, ``skip``, ...).

    Returns:
        A :class:`~fp4compile.passes.RewriteReport`: ``print(report)`` shows a table of every
        matmul found (module, weight, shapes, recipe, rewritten or why not); ``report.graphs``
        are the rewritten FX graphs (``report.graphs[0].code``).
    """
    parsed = BackendOptions.parse(options)
    report = RewriteReport()
    target = getattr(model, "_orig_mod", model)
    if isinstance(target, torch.nn.Module):
        check_recipe_mix(parsed, converted_recipes(target.named_modules()))  # before Dynamo wraps the error

    def capture(gm: torch.fx.GraphModule, example_inputs, **backend_kwargs):
        names = ModuleNames.from_call_stack()
        if isinstance(target, torch.nn.Module):
            names.add_root(target)
        report.records.extend(rewrite_graph(gm, parsed, names, graph_index=len(report.graphs)))
        report.graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(target, backend=capture)(*args, **kwargs)
    return report
