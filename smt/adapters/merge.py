"""Tuned models as plain ones: ``W0 + Δ`` saved with ``save_pretrained``, and deltas fused into a plain base.

- ``save_merged``: a float base holds ``W0 + Δ`` in place (``smt.core.merge.merged``) and is saved with its own
  keys; a quantized base (``smt.core.quant.is_quantized``, the one test) cannot, so it is dequantized one weight at a
  time, Δ added, and saved in bf16 with plain Linear layers (``save_dequantized``), or re-quantized in its own
  format, ``Q' = quant(deq(Q) + Δ)``, with the error of every layer reported (``save_requantized``).
- ``fuse_deltas_`` (``smt merge``): ``W = W0 + Σ_d w_d · Δ_d`` on a plain model, every file validated before any
  weight is written.

No Lightning here; transformers is imported only to rebuild a plain model from a quantized one's config.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from smt.adapters.deltaset import flat_storage, module_deltas, read_delta_for, weighted_sum
from smt.core.merge import merged, plain_state_dict, remove_smt
from smt.core.model import BANK_NAME, DTYPES, sparse_layers
from smt.core.quant import (
    bnb_config,
    dequantized_weight,
    has_quantized_layers,
    is_quantized,
    quant_state_keys,
    quantization_of,
    requantize,
)


def save_merged(model: nn.Module, tokenizer, folder: str | Path, dtype: str = "bfloat16") -> Path:
    """``save_pretrained`` of ``W0 + Δ`` (plain transformers keys) and the tokenizer; the model is unchanged after.

    A quantized base cannot hold ``W0 + Δ`` in place: its weights are dequantized, Δ added, and the model saved in
    ``dtype`` (bf16 by default; ignored for a float base, which keeps its dtype) with plain Linear layers.
    """
    folder = Path(folder)
    if has_quantized_layers(model):
        save_dequantized(model, folder, DTYPES[dtype])
    else:
        with merged(model):
            model.save_pretrained(folder, state_dict=plain_state_dict(model))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def dequantized_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's plain state dict in ``dtype``: each quantized weight as ``deq(Q)``, plus Δ where SMT tunes it.

    One weight is dequantized at a time; smt's own entries (the bank) are left out.
    """
    skipped = quant_state_keys(model)
    state = {k: v for k, v in model.state_dict().items() if k not in skipped and not k.startswith(BANK_NAME + ".")}
    for name, module in model.named_modules():
        base = getattr(module, "base", module)
        if not is_quantized(base):
            continue
        weight = dequantized_weight(base)
        if base is not module:  # a SparseBlockLinear: its tuned blocks' Δ, applied on the dequantized weight
            weight += module.delta_weight().to(weight.device)
        state[f"{name}.weight"] = weight
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def save_dequantized(model: nn.Module, folder, dtype: torch.dtype = torch.bfloat16) -> None:
    """``save_pretrained`` a plain (unquantized) copy of a transformers model holding ``deq(Q) + Δ`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):  # no second random initialisation: every tensor comes from the state dict
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(dequantized_state_dict(model, dtype), strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(folder)


@torch.no_grad()
def save_requantized(model: nn.Module, folder) -> list[tuple[str, float, float, float]]:
    """Save ``quant(deq(Q) + Δ)`` in the base's own format; consumes ``model`` (its bank is taken out).

    Returns:
        ``(module, max |deq(Q') − (deq(Q) + Δ)|, that ÷ max |deq(Q) + Δ|, max |Δ|)`` for each re-quantized layer:
        an error near ``max |Δ|`` means the quantization grid cannot hold the tuned change.

    Raises:
        ValueError: the base is not quantized (save a plain merged model instead).
    """
    layers = sparse_layers(model)
    quantized = [layer.base for layer in layers.values() if layer.quantized]
    if not quantized:
        raise ValueError("--requantize needs a quantized base (model.quantization nf4/fp4/int8); this one is not")
    report = []

    def requantized(name: str, layer) -> nn.Module:
        if not (layer.quantized and layer.slot_ids()):
            return layer.base
        delta = layer.delta_weight()
        fresh, error, relative = requantize(layer.base, dequantized_weight(layer.base) + delta.to(layer.weight.device))
        report.append((name, error, relative, float(delta.abs().max())))
        return fresh

    remove_smt(model, requantized)
    model.config.quantization_config = bnb_config(*quantization_of(quantized[0])).to_dict()  # from_pretrained rebuilds
    model.save_pretrained(folder)
    return report


@torch.no_grad()
def fuse_deltas_(
    model: torch.nn.Module, paths: list[str | Path], weights: list[float] | None = None, base_model_id=None
) -> torch.nn.Module:
    """``W = W0 + Σ_d w_d · Δ_d`` (sum in fp32, one rounding) on a plain model; every file is validated first.

    Args:
        model: a plain model (weights are changed in place).
        paths: delta files; blocks that overlap add up with their weights.
        weights: one per file (default 1 each).
        base_model_id: the base's id for the check; default ``model.config._name_or_path``, ``""`` skips it.

    Raises:
        ValueError: a bad file, another base, or a non-finite weight; the model is unchanged then.

    Held meanwhile: the positions (8 bytes) and fp32 Δ (4 bytes) of every file's entries; ``W0`` is read and
    ``round(W0 + Σ)`` written one module at a time (a ``DeltaSet`` would also keep ``W0`` for switching back).
    """
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"smt merge --weights {weights} must be finite numbers")
    flats = [module_deltas(model, *read_delta_for(model, path, base_model_id)) for path in paths]  # all validated
    for module in sorted({name for flat in flats for name in flat}):
        parts = [(flat[module], weight) for flat, weight in zip(flats, weights) if module in flat]
        positions, total, _ = weighted_sum(parts)
        storage = flat_storage(model, module)
        storage.index_copy_(0, positions, (storage[positions].float() + total).to(storage.dtype))
    return model


def add_delta_(model: torch.nn.Module, path: str | Path, weight: float = 1.0) -> None:
    """``W += weight · Δ`` for every block of a delta file, on a plain model (validated before any write)."""
    fuse_deltas_(model, [path], [weight], "")


__all__ = [
    "add_delta_",
    "dequantized_state_dict",
    "fuse_deltas_",
    "save_dequantized",
    "save_merged",
    "save_requantized",
]
