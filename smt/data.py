"""Old import path of :mod:`smt.lightning.data.datamodule` (was ``smt.data``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.data.datamodule import (
    InstructionCollator,
    InstructionDataModule,
    PromptCollator,
    encode_examples,
    encode_prompts,
    fit_to_length,
    load_records,
    load_tokenizer,
    pack_examples,
    prepare_tokenizer,
    split_indices,
    take_limit,
)

__all__ = [
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
