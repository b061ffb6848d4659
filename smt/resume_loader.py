"""Old import path of :mod:`smt.lightning.data.resume_loader` (was ``smt.resume_loader``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.data.resume_loader import ResumableLoader

__all__ = [
    "ResumableLoader",
]
