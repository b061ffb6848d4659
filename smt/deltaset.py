"""Old import path of :mod:`smt.adapters.deltaset` (was ``smt.deltaset``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.adapters.deltaset import DeltaSet, ModuleDelta, module_deltas, read_delta_for, same_base

__all__ = [
    "DeltaSet",
    "ModuleDelta",
    "module_deltas",
    "read_delta_for",
    "same_base",
]
