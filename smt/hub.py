"""Old import path of :mod:`smt.lightning.hub` (was ``smt.hub``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.hub import (
    HUB_PREFIX,
    HubDataset,
    explain_load_failure,
    from_pretrained,
    is_repo_id,
    load_hub_dataset,
    offline_setting,
    parse_hub_dataset,
)

__all__ = [
    "HUB_PREFIX",
    "HubDataset",
    "explain_load_failure",
    "from_pretrained",
    "is_repo_id",
    "load_hub_dataset",
    "offline_setting",
    "parse_hub_dataset",
]
