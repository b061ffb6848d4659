"""Taking Δ into the weights and SMT out of a model (no Lightning here).

``merged(model)`` writes ``W0 + Δ`` into every wrapped layer for a block of code and puts the original bits back
after (exact: the slots stay the one truth); ``merge_delta`` writes it for good and ``remove_smt`` puts the plain
modules back and drops the bank — the one way out, also for the LoRA export's base copy and the re-quantized export.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from smt.core.layer import SparseBlockLinear
from smt.core.model import BANK_NAME, bank_holder, get_bank, sparse_layers


def remove_smt(model: nn.Module, replace: Callable[[str, SparseBlockLinear], nn.Module] | None = None) -> nn.Module:
    """Take SMT out of ``model``: a plain module goes back in place of every wrapped layer, and the bank goes.

    The one way out, used by ``merge_delta`` (``W0 + Δ`` written first), by the LoRA export's base copy and by the
    re-quantized export (a new quantized layer per tuned one).

    Args:
        model: the network the bank is on, or any module around it.
        replace: ``(name, layer) → module`` to put in place of each wrapped layer; default: its own base module.

    Returns:
        ``model`` itself, without wrapped layers or bank.
    """
    holder = bank_holder(model)
    for name, layer in sparse_layers(holder).items():
        holder.set_submodule(name, layer.base if replace is None else replace(name, layer))
    delattr(holder, BANK_NAME)
    return model


def merge_delta(model: nn.Module) -> nn.Module:
    """Write ``W0 + Δ`` into each target's weight and put the plain modules back; removes the bank.

    ``model`` is the network the bank is on or any module around it (e.g. the LightningModule whose ``self.model``
    the callback tuned).

    Returns:
        ``model`` itself, now a plain model (e.g. ready for transformers' ``save_pretrained``).

    Raises:
        ValueError: a tuned layer is quantized (its storage cannot hold ``W0 + Δ``); nothing is changed then.
    """
    layers = sparse_layers(model)
    quantized = [name for name, layer in layers.items() if layer.quantized and layer.slot_ids()]
    if quantized:
        raise ValueError(
            f"cannot merge into {quantized[0]} ({type(layers[quantized[0]].base).__name__}): quantized storage cannot "
            "hold W0 + Δ; save a dequantized or re-quantized copy instead (smt export --merged [--requantize])"
        )
    for layer in layers.values():
        layer.merge()
    return remove_smt(model)


class merged:
    """Context manager: every wrapped layer holds ``W0 + Δ`` inside, the original bits after.

    Quantized layers stay as they are and add Δ in their forward (see ``SparseBlockLinear.merge``), so the model
    computes ``W0 + Δ`` everywhere inside, without a per-call weight copy where the weight can hold it. A model
    without a bank is left as it is.

    Example:
        >>> with merged(model):  # doctest: +SKIP
        ...     model.save_pretrained(out, state_dict=plain_state_dict(model))
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = list(sparse_layers(model).values()) if get_bank(model) is not None else []

    def __enter__(self) -> list[SparseBlockLinear]:
        for layer in self.layers:
            layer.merge()
        return self.layers

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.unmerge()


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without smt's own entries: the keys of the model before injection."""
    return {k: v for k, v in model.state_dict().items() if BANK_NAME not in k.split(".")}
