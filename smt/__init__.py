"""smt: Sparse Matrix Tuning for large language models.

Core names import without Lightning; ``SparseMatrixTuning`` (a Lightning callback) loads Lightning on
first use, so ``import smt`` stays cheap for library users.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SMTConfig": "smt.config",
    "BlockGrid": "smt.blocks",
    "Selection": "smt.selection",
    "select_top_k": "smt.selection",
    "apply_selection": "smt.model",
    "inject": "smt.model",
    "save_delta": "smt.delta",
    "load_delta": "smt.delta",
    "read_delta": "smt.delta",
    "merge_delta": "smt.model",
    "trainable_summary": "smt.model",
    "SparseMatrixTuning": "smt.callbacks",
    "DeltaSet": "smt.deltaset",
    "export_lora": "smt.lora_export",
    "export_shira": "smt.shira_export",
    "NonFiniteGuard": "smt.guards",
    "AtomicCheckpointIO": "smt.checkpoint_io",
}

__all__ = [
    "AtomicCheckpointIO",
    "BlockGrid",
    "DeltaSet",
    "NonFiniteGuard",
    "SMTConfig",
    "Selection",
    "SparseMatrixTuning",
    "apply_selection",
    "export_lora",
    "export_shira",
    "inject",
    "load_delta",
    "merge_delta",
    "read_delta",
    "save_delta",
    "select_top_k",
    "trainable_summary",
]

if TYPE_CHECKING:  # pragma: no cover
    from smt.blocks import BlockGrid
    from smt.callbacks import SparseMatrixTuning
    from smt.checkpoint_io import AtomicCheckpointIO
    from smt.config import SMTConfig
    from smt.delta import load_delta, read_delta, save_delta
    from smt.deltaset import DeltaSet
    from smt.guards import NonFiniteGuard
    from smt.lora_export import export_lora
    from smt.model import apply_selection, inject, merge_delta, trainable_summary
    from smt.selection import Selection, select_top_k
    from smt.shira_export import export_shira


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'smt' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
