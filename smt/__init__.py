"""smt: Sparse Matrix Tuning for large language models.

Core names import without Lightning; ``SparseMatrixTuning`` (a Lightning callback) loads Lightning on
first use, so ``import smt`` stays cheap for library users.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SMTConfig": "smt.core.config",
    "BlockGrid": "smt.kernels.blocks",
    "Selection": "smt.core.selection",
    "select_top_k": "smt.core.selection",
    "apply_selection": "smt.core.model",
    "inject": "smt.core.model",
    "save_delta": "smt.adapters.delta",
    "load_delta": "smt.adapters.delta",
    "read_delta": "smt.adapters.delta",
    "merge_delta": "smt.core.merge",
    "trainable_summary": "smt.core.summary",
    "SparseMatrixTuning": "smt.lightning.callback",
    "DeltaSet": "smt.adapters.deltaset",
    "export_lora": "smt.adapters.lora",
    "export_shira": "smt.adapters.shira",
    "NonFiniteGuard": "smt.lightning.guards",
    "AtomicCheckpointIO": "smt.lightning.checkpoint_io",
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
    from smt.adapters.delta import load_delta, read_delta, save_delta
    from smt.adapters.deltaset import DeltaSet
    from smt.adapters.lora import export_lora
    from smt.adapters.shira import export_shira
    from smt.core.config import SMTConfig
    from smt.core.merge import merge_delta
    from smt.core.model import apply_selection, inject
    from smt.core.selection import Selection, select_top_k
    from smt.core.summary import trainable_summary
    from smt.kernels.blocks import BlockGrid
    from smt.lightning.callback import SparseMatrixTuning
    from smt.lightning.checkpoint_io import AtomicCheckpointIO
    from smt.lightning.guards import NonFiniteGuard


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'smt' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
