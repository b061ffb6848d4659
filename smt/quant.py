"""Old import path of :mod:`smt.core.quant` (was ``smt.quant``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.adapters.merge import dequantized_state_dict, save_dequantized, save_requantized
from smt.core.quant import (
    INT8_THRESHOLD,
    OPTIMIZERS,
    QUANTIZATIONS,
    SKIPPED_MODULES,
    bnb_config,
    build_optimizer,
    dequantized_weight,
    is_quantized,
    keep_trainable,
    make_loadable,
    optimizer_state_bytes,
    quant_state_keys,
    quantization_of,
    quantize_linear,
    quantize_linear_layers,
    requantize,
    require_bitsandbytes,
    tensor_bytes,
)

__all__ = [
    "INT8_THRESHOLD",
    "OPTIMIZERS",
    "QUANTIZATIONS",
    "SKIPPED_MODULES",
    "bnb_config",
    "build_optimizer",
    "dequantized_state_dict",
    "dequantized_weight",
    "is_quantized",
    "keep_trainable",
    "make_loadable",
    "optimizer_state_bytes",
    "quant_state_keys",
    "quantization_of",
    "quantize_linear",
    "quantize_linear_layers",
    "requantize",
    "require_bitsandbytes",
    "save_dequantized",
    "save_requantized",
    "tensor_bytes",
]
