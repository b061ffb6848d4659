"""Old import path of :mod:`smt.core.io` (was ``smt.io``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.io import (
    MAX_DIMENSION,
    WriteFailedError,
    atomic_save_safetensors,
    atomic_write,
    parse_count,
    parse_grids,
    parse_json,
    read_safetensors,
)

__all__ = [
    "MAX_DIMENSION",
    "WriteFailedError",
    "atomic_save_safetensors",
    "atomic_write",
    "parse_count",
    "parse_grids",
    "parse_json",
    "read_safetensors",
]
