"""Old import path of :mod:`smt.core.scoring` (was ``smt.scoring``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.scoring import (
    CRITERIA,
    MEMORY_HEADROOM,
    BlockScorer,
    Criterion,
    available_memory,
    check_accumulator_memory,
    register_criterion,
)

__all__ = [
    "BlockScorer",
    "CRITERIA",
    "Criterion",
    "MEMORY_HEADROOM",
    "available_memory",
    "check_accumulator_memory",
    "register_criterion",
]
