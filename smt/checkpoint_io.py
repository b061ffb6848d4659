"""Old import path of :mod:`smt.lightning.checkpoint_io` (was ``smt.checkpoint_io``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.checkpoint_io import (
    CRC_CHUNK,
    AtomicCheckpointIO,
    PreemptedError,
    PreemptionCheckpoint,
    checkpoint_folder,
    read_checkpoint,
    with_atomic_checkpoint_io,
)

__all__ = [
    "AtomicCheckpointIO",
    "CRC_CHUNK",
    "PreemptedError",
    "PreemptionCheckpoint",
    "checkpoint_folder",
    "read_checkpoint",
    "with_atomic_checkpoint_io",
]
