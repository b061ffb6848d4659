"""Old import path of :mod:`smt.lightning.distributed` (was ``smt.distributed``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.distributed import (
    Reduce,
    check_same_selection,
    check_sharded_bank,
    check_strategy,
    shard_network,
    shards_in_configure_model,
    summed_regrowth_state,
    summed_scorer_states,
    zeroed_regrowth_state,
    zeroed_scorer_states,
)

__all__ = [
    "Reduce",
    "check_same_selection",
    "check_sharded_bank",
    "check_strategy",
    "shard_network",
    "shards_in_configure_model",
    "summed_regrowth_state",
    "summed_scorer_states",
    "zeroed_regrowth_state",
    "zeroed_scorer_states",
]
