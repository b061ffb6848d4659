"""Old import path of :mod:`smt.lightning.run_logs` (was ``smt.run_logs``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.run_logs import (
    TABLE_COLUMNS,
    SelectionReport,
    default_logger,
    markdown_table,
    selection_metrics,
    selection_table,
    tensorboard_available,
)

__all__ = [
    "SelectionReport",
    "TABLE_COLUMNS",
    "default_logger",
    "markdown_table",
    "selection_metrics",
    "selection_table",
    "tensorboard_available",
]
