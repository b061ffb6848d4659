"""Old import path of :mod:`smt.lightning.schedules` (was ``smt.schedules``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.schedules import after_warmup, warmup_cosine

__all__ = [
    "after_warmup",
    "warmup_cosine",
]
