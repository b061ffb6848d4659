"""Instruction-tuning data without Lightning: records from files or the hub (``records``), prompt templates
(``prompts``), tokenisation, loss masks and batching (``tokens``), the next-token loss over labelled positions only
(``loss``), the resumable training loader (``resume_loader``), and loading by hub id or folder (``hub``).
``smt.lightning.datamodule`` wraps them in a LightningDataModule.
"""
