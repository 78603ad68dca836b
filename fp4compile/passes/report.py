"""What the matmul pass found: one record per matmul, and a report that prints them as a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch.fx as fx

__all__ = ["ALREADY_NVFP4", "FILTERED", "INELIGIBLE", "MatmulRecord", "NO_WEIGHT", "REWRITTEN", "RewriteReport"]

#: ``MatmulRecord.status``: rewritten to NVFP4.
REWRITTEN = "rewritten"
#: Kept in high precision by a filter the user chose: ``skip``, the recipe's ``keep_high_precision``,
#: the ``bf16`` recipe, or a model converted by ``quantize_``.
FILTERED = "filtered"
#: Has a weight but cannot run in NVFP4 (dims not multiples of 16, dtype, shape, ...): warned about.
INELIGIBLE = "ineligible"
#: Activation x activation (attention scores, ...): not a layer, never a candidate.
NO_WEIGHT = "no weight"
#: An ``fp4compile::linear`` op already (``NVFP4Linear``, ``nvfp4_linear`` by hand).
ALREADY_NVFP4 = "already NVFP4"


class MatmulRecord(NamedTuple):
    """One matmul of a captured graph and what the pass did with it."""

    graph: int
    node: str
    module: str
    weight: str
    op: str
    x_shape: tuple
    w_shape: tuple
    recipe: str
    rewritten: bool
    reason: str  # why not, for a skipped matmul; the outlier-channel path of a rewritten one, or ""
    status: str = REWRITTEN


def _outcome(r: MatmulRecord) -> str:
    if not r.rewritten:
        return f"skipped: {r.reason}"
    return f"rewritten, {r.reason}" if r.reason else "rewritten"


def _shape(shape: tuple) -> str:
    return "x".join(str(d) for d in shape) if shape else "?"


@dataclass
class RewriteReport:
    """Every matmul found in the captured graph(s) of a model, and the rewritten graphs.

    ``str(report)`` is a table (module, weight, op, shapes, recipe, rewritten or the reason it
    was skipped); ``graphs`` holds the rewritten FX ``GraphModule``\\ s (``graph.code`` shows them);
    ``graph_breaks`` counts the breaks Dynamo made (graphs - 1).
    """

    records: list[MatmulRecord] = field(default_factory=list)
    graphs: list[fx.GraphModule] = field(default_factory=list)

    @property
    def rewritten(self) -> list[MatmulRecord]:
        """The matmuls that now run in NVFP4."""
        return [r for r in self.records if r.rewritten]

    @property
    def skipped(self) -> list[MatmulRecord]:
        """The matmuls left in high precision, each with its reason."""
        return [r for r in self.records if not r.rewritten]

    @property
    def ineligible(self) -> list[MatmulRecord]:
        """The matmuls with a weight that stay in high precision for a reason no filter chose."""
        return [r for r in self.records if r.status == INELIGIBLE]

    @property
    def graph_breaks(self) -> int:
        """Number of graph breaks Dynamo made while capturing (captured graphs minus one)."""
        return max(0, len(self.graphs) - 1)

    def __str__(self) -> str:
        header = ("graph", "module", "weight", "op", "x", "weight [out, in]", "recipe", "NVFP4")
        rows = [
            (str(r.graph), r.module or "(root)", r.weight or "-", r.op, _shape(r.x_shape), _shape(r.w_shape),
             r.recipe, _outcome(r))
            for r in self.records
        ]  # fmt: skip
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        summary = f"{len(self.rewritten)} of {len(self.records)} matmuls rewritten to NVFP4"
        summary += f" in {len(self.graphs)} graph(s), {self.graph_breaks} graph break(s)"
        return "\n".join(lines + [summary])
