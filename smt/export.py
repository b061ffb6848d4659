"""Old import path of :mod:`smt.lightning.export` (was ``smt.export``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.adapters.merge import add_delta_, fuse_deltas_
from smt.core.model import merge_delta
from smt.lightning.export import (
    DTYPE_ALIASES,
    load_checkpoint,
    model_from_checkpoint,
    run_export,
    run_merge,
    split_merge_targets,
)

__all__ = [
    "DTYPE_ALIASES",
    "add_delta_",
    "fuse_deltas_",
    "load_checkpoint",
    "merge_delta",
    "model_from_checkpoint",
    "run_export",
    "run_merge",
    "split_merge_targets",
]
