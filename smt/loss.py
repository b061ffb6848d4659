"""Old import path of :mod:`smt.lightning.loss` (was ``smt.loss``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.loss import IGNORE_INDEX, PLAIN_HEAD_TYPES, labelled_positions_loss

__all__ = [
    "IGNORE_INDEX",
    "PLAIN_HEAD_TYPES",
    "labelled_positions_loss",
]
