"""FX pass over a Dynamo graph: rewrite activation x weight matmuls into ``nvfp4_linear``.

Dynamo graphs hold torch-level calls (``F.linear``, ``@``, ``matmul``, ``mm``, ``addmm``,
``bmm`` and their ``Tensor`` methods) whose parameters are graph inputs. Every call whose
right operand is a parameter (possibly transposed) becomes one ``nvfp4_linear(x, W, bias,
recipe=...)`` node, so AOTAutograd traces the quantized op's own forward and backward and
the rest of the graph is left unchanged. Calls that are not rewritten are reported with the
reason. Rewriting happens before AOTAutograd, so eager code (``nvfp4_linear`` by hand, the
torchao path) and compiled code run one implementation.

Layers that are NVFP4 already (``NVFP4Linear``, e.g. after torchao's ``quantize_`` with
``NVFP4Config``, or ``nvfp4_linear`` called by hand) reach the graph as the
``fp4compile::linear`` op: the pass leaves them as they are, with their own recipe, and
reports them as ``already NVFP4`` (never quantized twice).
"""

from __future__ import annotations

import builtins
import operator
import re
from typing import Optional, Sequence, Union

import torch
import torch.fx as fx

from ..eligibility import FLOAT_DTYPES, LayerFilter, normalize_fqn, why_not_nvfp4
from ..linear import nvfp4_linear
from ..outlier_channels import attach_state, outlier_path, state_type
from ..recipe import Recipe
from .names import ModuleNames, source_to_fqn
from .report import ALREADY_NVFP4, FILTERED, INELIGIBLE, NO_WEIGHT, REWRITTEN, MatmulRecord

__all__ = ["ALREADY_NVFP4_OP", "STATE_WEIGHTS", "module_fqn", "nvfp4_op_recipes", "parameter_fqn", "rewrite_matmuls"]

# (call target or method name) -> op label; a, b, bias argument positions are decoded per label.
_FUNCTIONS = {
    torch._C._nn.linear: "linear",
    torch.nn.functional.linear: "linear",
    torch.matmul: "matmul",
    operator.matmul: "matmul",
    torch.mm: "mm",
    torch.addmm: "addmm",
    torch.bmm: "bmm",
}
_METHODS = {"matmul": "matmul", "__matmul__": "matmul", "mm": "mm", "addmm": "addmm", "bmm": "bmm"}
# Ops that look through to the tensor they come from: (flips orientation of a 2-D tensor?).
_TRANSPOSE_ATTRS = ("T", "mT")
_CAST_METHODS = ("to", "type", "contiguous", "bfloat16", "half", "float")
_MODULE_PATH_ROOT = re.compile(r"^[LG]\['[^']*'\](?:\[\d+\])*\.?")
#: Label of the already-quantized linear op in records.
ALREADY_NVFP4_OP = "fp4compile.linear"
_LINEAR_OP = re.compile(r"fp4compile::(?:outlier_)?linear(?:_v\d+)?")  # the op's name carries its schema version


# ----------------------------------------------------------------------------- names
def module_fqn(node: fx.Node, names: Optional[ModuleNames] = None) -> tuple[str, Optional[torch.nn.Module]]:
    """(FQN, module) of the innermost ``nn.Module`` whose forward produced ``node`` (``("", None)`` for the root).

    Dynamo keys ``nn_module_stack`` by ``id(module)``: the module is looked up in ``names`` by
    identity; a module ``names`` does not know is named after Dynamo's path (without its root).
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", None
    key, (path, _) = list(stack.items())[-1]
    if names is not None and isinstance(key, str) and key.isdigit():
        found = names.module(int(key))
        if found is not None:
            return found
    return normalize_fqn(_MODULE_PATH_ROOT.sub("", path)), None


def _parameter(node: fx.Node) -> Optional[torch.nn.Parameter]:
    if node.op == "placeholder":
        grapharg = node.meta.get("grapharg")
        example = getattr(grapharg, "example", None) if grapharg is not None else None
        return example if isinstance(example, torch.nn.Parameter) else None
    if node.op == "get_attr":
        owner = node.graph.owning_module
        try:
            value = operator.attrgetter(node.target)(owner)
        except AttributeError:
            return None
        return value if isinstance(value, torch.nn.Parameter) else None
    return None


def parameter_fqn(node: fx.Node, names: Optional[ModuleNames] = None) -> str:
    """FQN of the parameter behind a placeholder or get_attr node: by identity in ``names``, else Dynamo's path."""
    param = _parameter(node)
    if names is not None and param is not None:
        fqn = names.parameter(param)
        if fqn is not None:
            return fqn
    if node.op == "get_attr":
        return str(node.target)
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return source_to_fqn(source.name) if source is not None else node.name


# ----------------------------------------------------------------------------- operands
def _decode(node: fx.Node) -> Optional[tuple[str, fx.Node, fx.Node, Optional[fx.Node], bool]]:
    """(op, a, b, bias, weight_given_as_out_in) for a matmul-like node computing ``a @ b (+ bias)``."""
    if node.op == "call_function" and node.target in _FUNCTIONS:
        op, args, kwargs = _FUNCTIONS[node.target], list(node.args), node.kwargs
    elif node.op == "call_method" and node.target in _METHODS:
        op, args, kwargs = _METHODS[node.target], list(node.args), node.kwargs
    else:
        return None
    if op == "linear":
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return op, args[0], weight, bias, True
    if op == "addmm":
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) != 3:
            return op, args[1], args[2], None, False  # reported as unsupported below
        return op, args[1], args[2], args[0], False
    if len(args) != 2 or kwargs:
        return None
    return op, args[0], args[1], None, False


def _trace_to_parameter(node) -> tuple[Optional[fx.Node], bool]:
    """Follow transposes and casts from ``node`` to a parameter; (parameter node, transposed?)."""
    flipped = False
    while isinstance(node, fx.Node):
        if _parameter(node) is not None:
            return node, flipped
        if _is_transpose(node):
            flipped, node = not flipped, node.args[0]
        elif node.op == "call_method" and node.target in _CAST_METHODS:
            node = node.args[0]
        else:
            return None, False
    return None, False


def _is_transpose(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is builtins.getattr:
        return node.args[1] in _TRANSPOSE_ATTRS
    if node.op == "call_method" and node.target == "t":
        return True
    if node.op == "call_function" and node.target is torch.t:
        return True
    dims = tuple(node.args[1:]) if len(node.args) > 1 else ()
    if (node.op == "call_method" and node.target in ("transpose", "permute")) or (
        node.op == "call_function" and node.target in (torch.transpose, torch.permute)
    ):
        dims = tuple(d for d in (dims[0] if dims and isinstance(dims[0], (tuple, list)) else dims))
        return dims in ((0, 1), (1, 0), (-1, -2), (-2, -1))
    return False


def _val(node) -> Optional[torch.Tensor]:
    if isinstance(node, fx.Node):
        value = node.meta.get("example_value", node.meta.get("val"))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _shape(node) -> tuple:
    value = _val(node)
    return tuple(value.shape) if value is not None else ()


def _nvfp4_op_recipe(node: fx.Node) -> Optional[str]:
    """The recipe name of an ``fp4compile::linear`` op node (a layer already in NVFP4), else None."""
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    else:
        return None
    if not _LINEAR_OP.fullmatch(name):
        return None
    recipe = node.kwargs.get("recipe", node.args[-1] if len(node.args) > 3 else None)  # the last argument
    return str(recipe)


def _already_nvfp4_record(node: fx.Node, recipe: str, graph_index: int, names: Optional[ModuleNames]) -> MatmulRecord:
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    param, _ = _trace_to_parameter(weight)
    return MatmulRecord(
        graph=graph_index,
        node=node.name,
        module=module_fqn(node, names)[0],
        weight=parameter_fqn(param, names) if param is not None else "",
        op=ALREADY_NVFP4_OP,
        x_shape=_shape(node.args[0] if node.args else node.kwargs.get("x")),
        w_shape=_shape(weight),
        recipe=recipe,
        rewritten=False,
        reason=f"already NVFP4 (recipe {recipe!r})",
        status=ALREADY_NVFP4,
    )


def nvfp4_op_recipes(gm: fx.GraphModule) -> set[str]:
    """Recipes of the layers of ``gm`` that are NVFP4 already (``fp4compile::linear`` op nodes)."""
    return {r for r in map(_nvfp4_op_recipe, gm.graph.nodes) if r is not None}


# ----------------------------------------------------------------------------- the pass
def _why_not(op, a, b, bias, param_b, param_a, w_shape) -> Optional[str]:
    """The reason a decoded matmul stays in high precision, or None if it can be rewritten."""
    if param_b is None:
        if param_a is not None:
            return "weight is the left operand (W @ x); write x @ W.T"
        return "activation x activation (no parameter operand)"
    if param_a is not None:
        return "both operands are parameters"
    if op == "bmm" or len(w_shape) != 2:
        return f"weight operand of shape {list(w_shape)} is not a 2-D matrix"
    if op == "addmm" and (bias is None or len(_shape(bias)) != 1):
        return "addmm with alpha/beta or a non-vector input"
    x_val, w_val = _val(a), _val(b)
    if x_val is not None and x_val.dtype not in FLOAT_DTYPES:
        return f"activation dtype {x_val.dtype} is not bfloat16, float16 or float32"
    if x_val is not None and x_val.dim() < 2:
        return "1-D activation"
    # Mixed float dtypes only trace under autocast (eager would have raised); nvfp4_linear casts like autocast.
    return why_not_nvfp4(*w_shape, w_val.dtype if w_val is not None else None)


def _filter_reason(
    layer_filter: LayerFilter, names: Optional[ModuleNames], param, module: tuple[str, Optional[torch.nn.Module]],
    weight_fqn: str,
) -> Optional[str]:  # fmt: skip
    """Why ``layer_filter`` keeps the matmul of weight ``param`` (in ``module``) in high precision, or None."""
    owner_fqn, owner = names.owner(param) if names is not None else ("", None)
    candidates = names.parameter_names(param) if names is not None else ()
    if not candidates:  # a parameter no module on the stack holds: Dynamo's path
        owner_fqn = weight_fqn.rsplit(".", 1)[0] if "." in weight_fqn else ""
        candidates = (owner_fqn, weight_fqn)
    if owner is None:
        owner_fqn, owner = (owner_fqn or module[0]), module[1]
    return layer_filter.match((module[0],) + tuple(candidates), owner_fqn, owner)


def rewrite_matmuls(
    gm: fx.GraphModule,
    recipe: Recipe,
    skip: Union[LayerFilter, Sequence[str]] = (),
    graph_index: int = 0,
    names: Optional[ModuleNames] = None,
    keep_plain: Optional[str] = None,
) -> list[MatmulRecord]:
    """Rewrite every eligible matmul of Dynamo graph ``gm`` in place; return one record per matmul found.

    Args:
        gm: a graph captured by Dynamo (torch-level calls, parameters as placeholders).
        recipe: the recipe of the rewritten matmuls.
        skip: a :class:`~fp4compile.eligibility.LayerFilter` (or FQN patterns) added to the recipe's
            ``keep_high_precision``; it is matched against the module's and the weight's names.
        graph_index: the graph's number in a report.
        names: the model's names by identity (:class:`ModuleNames`); without it, or for a
            parameter it does not know, names are Dynamo's source paths without their root.
        keep_plain: when set, the reason every otherwise eligible matmul stays in high precision
            (the model was converted by ``quantize_`` and the backend was not asked for a recipe).

    ``fp4compile::linear`` op nodes (layers already in NVFP4) are left unchanged and recorded as
    not rewritten, with the reason ``already NVFP4`` and their own recipe.
    """
    layer_filter = LayerFilter(tuple(recipe.keep_high_precision)) + LayerFilter.parse(skip)
    graph = gm.graph
    records: list[MatmulRecord] = []
    for node in list(graph.nodes):
        existing = _nvfp4_op_recipe(node)
        if existing is not None:
            records.append(_already_nvfp4_record(node, existing, graph_index, names))
            continue
        decoded = _decode(node)
        if decoded is None:
            continue
        op, a, b, bias, out_in = decoded
        param_b, flipped = _trace_to_parameter(b)
        param_a, _ = _trace_to_parameter(a)
        # The weight as [out, in]: linear's weight as given; for a @ b, b^T.
        b_shape = _shape(b)
        w_shape = b_shape if out_in else tuple(reversed(b_shape)) if len(b_shape) == 2 else b_shape
        reason = _why_not(op, a, b, bias, param_b, param_a, w_shape)
        status = (NO_WEIGHT if param_a is None and param_b is None else INELIGIBLE) if reason else REWRITTEN
        module = module_fqn(node, names)
        weight_node = param_b if param_b is not None else param_a  # W @ x: name the weight all the same
        weight_fqn = parameter_fqn(weight_node, names) if weight_node is not None else ""
        if weight_node is not None:  # the user's filter also silences a weight matmul that cannot be rewritten
            filtered = _filter_reason(layer_filter, names, _parameter(weight_node), module, weight_fqn)
            if filtered is not None:
                reason, status = filtered, FILTERED
        if reason is None and not recipe.quantized:
            reason, status = "recipe bf16 quantizes nothing", FILTERED
        if reason is None and keep_plain is not None:
            reason, status = keep_plain, FILTERED
        owner = module[1]
        path = ""
        if reason is None and recipe.outliers is not None:
            if owner is None or getattr(owner, "weight", None) is not _parameter(weight_node) or not out_in:
                reason, status = _NO_STATE_OWNER, INELIGIBLE
            else:
                path = outlier_path(recipe.outliers, w_shape[1])
        records.append(
            MatmulRecord(
                graph=graph_index,
                node=node.name,
                module=module[0],
                weight=weight_fqn,
                op=op,
                x_shape=_shape(a),
                w_shape=w_shape,
                recipe=recipe.name,
                rewritten=reason is None,
                reason=reason or path,
                status=status,
            )
        )
        if reason is None:
            state = None
            if recipe.outliers is not None:
                state = _state_nodes(gm, node, attach_state(owner, recipe.outliers), len(records))
                gm.meta.setdefault(STATE_WEIGHTS, []).append((weight_node, owner, module[0] or weight_fqn))
            _replace(graph, node, a, b, bias, out_in, recipe.name, state)
    graph.lint()
    gm.recompile()
    return records


#: ``gm.meta`` key: ``[(weight node, the layer, its name)]`` of the layers whose outlier state the pass baked
#: into ``gm`` (the backend checks at run time that the graph runs with those layers' weights).
STATE_WEIGHTS = "fp4compile_state_weights"

_NO_STATE_OWNER = (
    "the recipe's outliers option keeps each layer's outlier-channel state on its nn.Linear (F.linear of the "
    "module's own weight); this matmul has none"
)


def _state_nodes(gm: fx.GraphModule, node: fx.Node, state, index: int) -> list[fx.Node]:
    """``get_attr`` nodes of the layer's state tensors, registered on ``gm`` as the very tensors the module holds:
    AOTAutograd lifts them to graph inputs, so their updates reach the module and nothing recompiles."""
    from torch._dynamo.source import ConstantSource

    nodes = []
    sources = getattr(gm, "_param_name_to_source", None)  # AOTAutograd reads a source per lifted buffer
    with gm.graph.inserting_before(node):
        for field, tensor in zip(state._fields, state):
            name = f"_fp4compile_outlier_{index}_{field}"
            gm.register_buffer(name, tensor)
            if sources is not None:
                sources[name] = ConstantSource(name)
            nodes.append(gm.graph.get_attr(name))
    return nodes


def _linear_with_state(x, weight, bias, *state, recipe: str):
    """``nvfp4_linear`` with the layer's outlier state (the call the pass inserts for recipes with ``outliers``)."""
    kind = state_type(Recipe.named(recipe).outliers)
    return nvfp4_linear(x, weight, bias, recipe=recipe, outlier_state=kind(*state))


def _replace(graph: fx.Graph, node: fx.Node, a, b, bias, out_in: bool, recipe: str, state=None) -> None:
    with graph.inserting_before(node):
        if out_in:
            weight = b
        elif _is_transpose(b):
            weight = b.args[0]  # (W^T)^T = W: use the parameter side directly
        else:
            weight = graph.call_method("t", (b,))
        if state is None:
            new = graph.call_function(nvfp4_linear, (a, weight, bias), {"recipe": recipe})
        else:
            new = graph.call_function(_linear_with_state, (a, weight, bias, *state), {"recipe": recipe})
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    if not out_in and not b.users and b.op != "placeholder":
        graph.erase_node(b)
