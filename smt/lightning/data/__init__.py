"""Instruction-tuning data: records from files or the hub (``records``), prompt templates (``prompts``),
tokenisation and batching (``tokens``), the ``InstructionDataModule`` and its resumable training loader.
Only ``datamodule`` imports Lightning; the rest is plain ``datasets``/``transformers`` and is used without it.
"""
