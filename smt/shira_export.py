"""Old import path of :mod:`smt.adapters.shira` (was ``smt.shira_export``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.adapters.shira import ShiraReport, export_shira, export_shira_from_file, shira_rank, write_shira

__all__ = [
    "ShiraReport",
    "export_shira",
    "export_shira_from_file",
    "shira_rank",
    "write_shira",
]
