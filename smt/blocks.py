"""Old import path of :mod:`smt.kernels.blocks` (was ``smt.blocks``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.kernels.blocks import FULL, BlockGrid, BlockPlan, resolve_block_size

__all__ = [
    "BlockGrid",
    "BlockPlan",
    "FULL",
    "resolve_block_size",
]
