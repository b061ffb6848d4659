"""Old import path of :mod:`smt.lightning.module` (was ``smt.module``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.adapters.merge import save_merged
from smt.lightning.module import BUILTIN_TOKENIZERS, DTYPES, SMTLanguageModel, load_causal_lm, load_tokenizer_for

__all__ = [
    "BUILTIN_TOKENIZERS",
    "DTYPES",
    "SMTLanguageModel",
    "load_causal_lm",
    "load_tokenizer_for",
    "save_merged",
]
