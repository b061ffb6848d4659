"""Old import path of :mod:`smt.core.config` (was ``smt.config``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.config import (
    CRITERIA,
    DEFAULT_DENSITY,
    DELTA_DTYPES,
    FORWARD_MODES,
    PRUNE_CRITERIA,
    REGROWTH_CRITERIA,
    REGROWTH_SCHEDULES,
    PoolConfig,
    RegrowthConfig,
    SMTConfig,
)

__all__ = [
    "CRITERIA",
    "DEFAULT_DENSITY",
    "DELTA_DTYPES",
    "FORWARD_MODES",
    "PRUNE_CRITERIA",
    "PoolConfig",
    "REGROWTH_CRITERIA",
    "REGROWTH_SCHEDULES",
    "RegrowthConfig",
    "SMTConfig",
]
