"""FX passes over captured graphs: rewrite matmuls into NVFP4 linears, and report what was done."""

from .matmul import module_fqn, nvfp4_op_recipes, parameter_fqn, rewrite_matmuls
from .names import ModuleNames
from .report import MatmulRecord, RewriteReport

__all__ = [
    "MatmulRecord",
    "ModuleNames",
    "RewriteReport",
    "module_fqn",
    "nvfp4_op_recipes",
    "parameter_fqn",
    "rewrite_matmuls",
]
