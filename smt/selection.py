"""Old import path of :mod:`smt.core.selection` (was ``smt.selection``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.selection import FORMAT, FORMAT_VERSION, Pool, Selection, assign_pools, budget_blocks, select_top_k

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Pool",
    "Selection",
    "assign_pools",
    "budget_blocks",
    "select_top_k",
]
