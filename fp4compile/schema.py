"""The schema version in the names of the ``fp4compile::`` ops (``fp4compile::linear_v4``, ...).

Inductor's and AOTAutograd's on-disk caches key a graph on the names of the ops it calls, not on their
schemas, so a graph compiled against an older schema would call a changed op with its old arguments:
:data:`SCHEMA_VERSION` is bumped whenever an op's schema or its decomposition changes.
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION", "op_name"]

SCHEMA_VERSION = 4


def op_name(name: str) -> str:
    """``fp4compile::<name>_v<SCHEMA_VERSION>``."""
    return f"fp4compile::{name}_v{SCHEMA_VERSION}"
