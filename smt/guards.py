"""Old import path of :mod:`smt.lightning.guards` (was ``smt.guards``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.guards import NonFiniteGuard, TrainingDivergedError, drop_gradients, scaler_enabled

__all__ = [
    "NonFiniteGuard",
    "TrainingDivergedError",
    "drop_gradients",
    "scaler_enabled",
]
