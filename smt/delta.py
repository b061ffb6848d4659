"""Old import path of :mod:`smt.adapters.delta` (was ``smt.delta``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.adapters.delta import FORMAT, FORMAT_VERSION, delta_state, load_delta, read_delta, save_delta

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "delta_state",
    "load_delta",
    "read_delta",
    "save_delta",
]
