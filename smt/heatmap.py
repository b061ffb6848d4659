"""Old import path of :mod:`smt.core.heatmap` (was ``smt.heatmap``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.core.heatmap import draw_selection, module_kind, selection_figure, selection_images

__all__ = [
    "draw_selection",
    "module_kind",
    "selection_figure",
    "selection_images",
]
