"""Old import path of :mod:`smt.core.layer` (was ``smt.layer``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.layer import SparseBlockLinear

__all__ = [
    "SparseBlockLinear",
]
