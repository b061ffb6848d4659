"""Old import path of :mod:`smt.core.bank` (was ``smt.bank``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.bank import FORMAT_VERSION, BlockBank

__all__ = [
    "BlockBank",
    "FORMAT_VERSION",
]
