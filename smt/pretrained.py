"""Old import path of :mod:`smt.lightning.pretrained` (was ``smt.pretrained``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.pretrained import (
    DEFAULT_SMOLLM2_DIR,
    SMOLLM2_GGUF,
    SMOLLM2_INSTALL,
    SMOLLM2_PACKAGE,
    convert_gguf,
    find_packaged_gguf,
    is_converted,
    prepare_smollm2,
)

__all__ = [
    "DEFAULT_SMOLLM2_DIR",
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL",
    "SMOLLM2_PACKAGE",
    "convert_gguf",
    "find_packaged_gguf",
    "is_converted",
    "prepare_smollm2",
]
