"""SMT on PyTorch Lightning: the ``SparseMatrixTuning`` callback and the per-step decisions it shares with the
guards, ``SMTLanguageModel`` and its ``InstructionDataModule``, checkpoints and pre-emption, distributed
strategies, and the ``smt`` command (``smt.lightning.cli``). The only layer that imports Lightning.
"""
