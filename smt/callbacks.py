"""Old import path of :mod:`smt.lightning.callback` (was ``smt.callbacks``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.callback import GRADIENT_FREE, SparseMatrixTuning, _relocate_root_bank_hook

__all__ = [
    "GRADIENT_FREE",
    "SparseMatrixTuning",
    "_relocate_root_bank_hook",
]
