"""Old import path of :mod:`smt.adapters.lora` (was ``smt.lora_export``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.adapters.lora import (
    REPORT_NAME,
    LoraReport,
    added,
    base_copy,
    dense_deltas,
    dense_deltas_from_file,
    export_lora,
    export_lora_from_file,
    low_rank,
    output_error,
    save_lora_adapter,
    write_lora,
)

__all__ = [
    "LoraReport",
    "REPORT_NAME",
    "added",
    "base_copy",
    "dense_deltas",
    "dense_deltas_from_file",
    "export_lora",
    "export_lora_from_file",
    "low_rank",
    "output_error",
    "save_lora_adapter",
    "write_lora",
]
