"""Old import path of :mod:`smt.core.progress` (was ``smt.progress``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.progress import (
    WHAT_TO_CHECK,
    NothingTrainedError,
    ProgressCheck,
    check_gradients_reached,
    local_slots_moved,
    refuse_all_zero_delta,
    slots_learning_rate_positive,
)

__all__ = [
    "NothingTrainedError",
    "ProgressCheck",
    "WHAT_TO_CHECK",
    "check_gradients_reached",
    "local_slots_moved",
    "refuse_all_zero_delta",
    "slots_learning_rate_positive",
]
