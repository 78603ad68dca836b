"""FX passes over captured graphs: rewrite matmuls into NVFP4 linears, and report what was done."""

from .matmul import module_fqn, parameter_fqn, rewrite_matmuls
from .report import MatmulRecord, RewriteReport

__all__ = ["MatmulRecord", "RewriteReport", "module_fqn", "parameter_fqn", "rewrite_matmuls"]
