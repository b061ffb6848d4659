"""Old import path of :mod:`smt.lightning.data.datamodule` (was ``smt.data``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.data.datamodule import InstructionDataModule
from smt.lightning.data.records import load_records, split_indices, take_limit
from smt.lightning.data.tokens import (
    IGNORE_INDEX,
    InstructionCollator,
    PromptCollator,
    encode_examples,
    encode_prompts,
    fit_to_length,
    load_tokenizer,
    pack_examples,
    prepare_tokenizer,
)

__all__ = [
    "IGNORE_INDEX",
    "InstructionCollator",
    "InstructionDataModule",
    "PromptCollator",
    "encode_examples",
    "encode_prompts",
    "fit_to_length",
    "load_records",
    "load_tokenizer",
    "pack_examples",
    "prepare_tokenizer",
    "split_indices",
    "take_limit",
]
