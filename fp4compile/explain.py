"""``fp4compile.explain``: which matmuls of a model the ``nvfp4`` backend rewrites, without compiling."""

from __future__ import annotations

import torch

from .backend import BackendOptions
from .passes import RewriteReport, rewrite_matmuls

__all__ = ["explain"]


def explain(model, *args, **options) -> RewriteReport:
    """Capture ``model(*args)`` with Dynamo, run the matmul pass, and report what it did.

    Nothing is compiled for training: the rewritten graphs run once, eagerly, under
    ``torch.no_grad()``. ``options`` are those of ``backend="nvfp4"`` (``recipe``, ``skip``, ...).

    Returns:
        A :class:`~fp4compile.passes.RewriteReport`: ``print(report)`` shows a table of every
        matmul found (module, weight, shapes, recipe, rewritten or why not); ``report.graphs``
        are the rewritten FX graphs (``report.graphs[0].code``).
    """
    parsed = BackendOptions.parse(options)
    report = RewriteReport()

    def capture(gm: torch.fx.GraphModule, example_inputs, **kwargs):
        report.records.extend(rewrite_matmuls(gm, parsed.recipe, parsed.skip, graph_index=len(report.graphs)))
        report.graphs.append(gm)
        return gm.forward

    target = getattr(model, "_orig_mod", model)
    with torch.no_grad():
        torch.compile(target, backend=capture)(*args)
    return report
