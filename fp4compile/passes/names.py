"""The model's own names for the parameters and modules of a captured graph, resolved by identity.

Dynamo names graph inputs after the path it took to reach them (``L['self']._modules['layers']...``),
and that path starts wherever the compiled frame starts: ``L['args'][0]`` when a decorator wraps
``forward`` (transformers 5), the block itself for a compiled submodule. Parsing it gives names
such as ``0.model.layers.0.self_attn.q_proj`` that no skip pattern written against
``model.named_modules()`` matches. Instead, the pass looks the parameter objects (Dynamo keeps them
as the placeholders' example values) and the modules (``nn_module_stack`` is keyed by ``id``) up in
the ``named_parameters()`` / ``named_modules()`` of the modules being called: every module whose
``__call__`` is on the Python stack when the backend runs (the compiled model, and its parents when
only a submodule is compiled), and the modules among the compiled frame's arguments. A parameter
takes its name from the outermost of them that holds it, with ``torch.compile``'s ``_orig_mod``
components removed; it also answers to its name relative to each compiled submodule.
"""

from __future__ import annotations

import re
import sys
from typing import Iterable, Iterator, Optional

import torch.nn as nn

from ..eligibility import linear_layer_names, normalize_fqn, relative_names

__all__ = ["ModuleNames", "source_to_fqn"]

_MODULE_CALL_FRAMES = ("_call_impl", "_wrapped_call_impl")
_FIRST_ATTRIBUTE = re.compile(r"\._(?:modules|parameters|buffers)\[")
_LOCAL_OR_GLOBAL = re.compile(r"^[LG]\['([^']*)'\]\.?")


def source_to_fqn(source: str) -> str:
    """A Dynamo source path as an FQN relative to the module it starts from (the fallback when identity fails).

    ``L['args'][0]._modules['layers']._modules['0']._parameters['weight']`` -> ``layers.0.weight``.
    """
    first = _FIRST_ATTRIBUTE.search(source)
    if first:
        path = source[first.start() + 1 :]
    else:  # no module attribute: the local's own name (``L['w']`` -> ``w``), or what follows it
        local = _LOCAL_OR_GLOBAL.match(source)
        path = (source[local.end() :] or local.group(1)) if local else source
    path = re.sub(r"_(?:modules|parameters|buffers)\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return normalize_fqn(path.strip(".").replace("..", "."))


def _unwrap(module: nn.Module) -> nn.Module:
    """The model under DDP / DataParallel (their ``module.`` prefix is not part of the model's names)."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


def _modules_in(value, depth: int = 2) -> Iterator[nn.Module]:
    if isinstance(value, nn.Module):
        yield value
    elif depth and isinstance(value, (tuple, list)):
        for item in value:
            yield from _modules_in(item, depth - 1)
    elif depth and isinstance(value, dict):
        for item in value.values():
            yield from _modules_in(item, depth - 1)
    elif hasattr(value, "__self__") and isinstance(value.__self__, nn.Module):  # a bound method
        yield value.__self__


def _called_modules() -> list[nn.Module]:
    """Modules whose ``__call__`` is on the Python stack, outermost first."""
    modules: list[nn.Module] = []
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in _MODULE_CALL_FRAMES and frame.f_code.co_filename.endswith("module.py"):
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module):
                modules.append(owner)
        frame = frame.f_back
    return modules[::-1]


def _frame_argument_modules() -> list[nn.Module]:
    """Modules among the locals of the frame Dynamo is compiling (``torch.compile(fn)(model, x)``)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # not inside a Dynamo compile (e.g. a graph built by hand)
        return []
    f_locals = getattr(tx, "f_locals", None) or {}
    return [m for value in f_locals.values() for m in _modules_in(value)]


class ModuleNames:
    """Names of parameters and modules by identity, within a set of root modules (outermost first).

    Args:
        roots: the modules to look in; a parameter or module is named after the first root that holds it.
    """

    def __init__(self, roots: Iterable[nn.Module] = ()) -> None:
        self.roots: list[nn.Module] = []
        self._params: dict[int, tuple[str, nn.Module]] = {}  # id(param) -> (raw FQN, owning module)
        self._modules: dict[int, tuple[str, nn.Module]] = {}  # id(module) -> (raw FQN, module)
        for root in roots:
            self.add_root(root)

    @classmethod
    def from_call_stack(cls) -> "ModuleNames":
        """The names seen from inside a backend call: modules being called, then the compiled frame's arguments."""
        roots = [_unwrap(m) for m in _called_modules() + _frame_argument_modules()]
        return cls(dict.fromkeys(roots))  # ordered, deduplicated by identity (modules hash by id)

    def add_root(self, root: nn.Module) -> None:
        """Index ``root``'s modules and parameters (names already known from an earlier root are kept)."""
        if any(r is root for r in self.roots):
            return
        self.roots.append(root)
        for fqn, module in root.named_modules(remove_duplicate=False):
            self._modules.setdefault(id(module), (fqn, module))
            for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
                self._params.setdefault(id(param), (f"{fqn}.{name}" if fqn else name, module))

    # ------------------------------------------------------------------ lookups
    def parameter(self, param) -> Optional[str]:
        """The FQN of ``param`` (``model.layers.0.mlp.up_proj.weight``), or None if no root holds it."""
        entry = self._params.get(id(param))
        return normalize_fqn(entry[0]) if entry is not None else None

    def parameter_names(self, param) -> tuple[str, ...]:
        """Every name ``param``'s owning module answers to, and the same with the parameter's own name."""
        entry = self._params.get(id(param))
        if entry is None:
            return ()
        owner = entry[0].rsplit(".", 1)[0] if "." in entry[0] else ""
        names = relative_names(owner) if owner else ()
        return names + relative_names(entry[0])

    def owner(self, param) -> tuple[str, Optional[nn.Module]]:
        """(FQN, module) of the module holding ``param`` directly; ``("", None)`` if unknown."""
        entry = self._params.get(id(param))
        if entry is None:
            return "", None
        owner = entry[0].rsplit(".", 1)[0] if "." in entry[0] else ""
        return normalize_fqn(owner), entry[1]

    def module(self, module_id: int) -> Optional[tuple[str, nn.Module]]:
        """(FQN, module) of the module with ``id(module) == module_id``, or None."""
        entry = self._modules.get(module_id)
        return (normalize_fqn(entry[0]), entry[1]) if entry is not None else None

    def modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Every indexed module with its FQN (each once)."""
        for fqn, module in self._modules.values():
            yield normalize_fqn(fqn), module

    def linear_names(self) -> tuple[list[str], list[str]]:
        """The ``nn.Linear`` layers of the roots: their FQNs, and every name a skip pattern can match for them."""
        return linear_layer_names((raw, module) for raw, module in self._modules.values())
