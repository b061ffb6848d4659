"""Old import path of :mod:`smt.core.patterns` (was ``smt.patterns``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.patterns import Pattern, name_matcher, no_match_error

__all__ = [
    "Pattern",
    "name_matcher",
    "no_match_error",
]
