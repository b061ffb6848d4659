"""Old import path of :mod:`smt.core.model` (was ``smt.model``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.model import (
    BANK_NAME,
    DTYPES,
    apply_selection,
    bank_holder,
    check_selection_fits,
    current_selection,
    exact_pattern,
    find_targets,
    get_bank,
    inject,
    inject_from_state,
    linear_geometry,
    logical_weight,
    merge_delta,
    merged,
    module_grids,
    plain_state_dict,
    plan_pools,
    select_blocks,
    sparse_layers,
    start_scoring,
    stop_scoring,
)
from smt.core.summary import TrainableSummary, trainable_summary

__all__ = [
    "BANK_NAME",
    "DTYPES",
    "TrainableSummary",
    "apply_selection",
    "bank_holder",
    "check_selection_fits",
    "current_selection",
    "exact_pattern",
    "find_targets",
    "get_bank",
    "inject",
    "inject_from_state",
    "linear_geometry",
    "logical_weight",
    "merge_delta",
    "merged",
    "module_grids",
    "plain_state_dict",
    "plan_pools",
    "select_blocks",
    "sparse_layers",
    "start_scoring",
    "stop_scoring",
    "trainable_summary",
]
