"""Old import path of :mod:`smt.core.regrowth` (was ``smt.regrowth``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.regrowth import Regrower, plan_swaps, regrowth_rate, swap_counts

__all__ = [
    "Regrower",
    "plan_swaps",
    "regrowth_rate",
    "swap_counts",
]
