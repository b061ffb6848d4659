"""Old import path of :mod:`smt.core.placement` (was ``smt.placement``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.placement import (
    CONTAINERS,
    config_for_holder,
    holding_attribute,
    holding_attribute_of,
    relative_names,
    relative_selection,
    relocate_root_bank,
)

__all__ = [
    "CONTAINERS",
    "config_for_holder",
    "holding_attribute",
    "holding_attribute_of",
    "relative_names",
    "relative_selection",
    "relocate_root_bank",
]
