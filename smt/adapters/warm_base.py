"""The warmed base of a full warm-up (``smt.warmup_updates=full``): what a delta file needs beside it.

After a full warm-up the trained model is ``W_warm + Δ``: every weight of the network moved densely before the
selection, and the slots' Δ is relative to the warmed weights. A delta file holds only Δ, so on the original base it
would rebuild ``W0 + Δ``, a model that was never trained. Instead of a dense ``W_warm − W0`` (not exact in floating
point) the warmed weights themselves are saved beside the delta, as a plain model folder ``<delta>.warm_base``
(``save_pretrained`` of ``W_warm``, no Δ): ``smt merge <delta>.warm_base DELTA OUT`` and ``DeltaSet`` on it rebuild
the trained model bit for bit (``round(W_warm + Δ)``, what the trained layers compute).

The bank's provenance carries a tag of the warmed weights (``warm_base``); the delta file's provenance and the warm
base's config (``smt_warm_base``) repeat it. Applying a warm delta to a model without that tag is refused in one line;
exports that have no place for the dense change (PEFT SHiRA, LoRA) refuse too. No Lightning here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

WARM_TAG = "warm_base"
"""Provenance key of the warmed weights' tag (present only after a full warm-up)."""
CONFIG_TAG = "smt_warm_base"
"""Attribute of a warm base's ``config`` (``config.json``) holding the same tag."""


def warm_tag(parameters: list[nn.Parameter]) -> str:
    """A tag of the warmed weights: sha256 of each parameter's fp64 sum and sum of squares (16 hex digits).

    Deterministic and equal on every rank (DDP keeps the weights identical); one cheap pass over the weights.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for param in parameters:
            values = param.detach().double()
            digest.update(torch.stack([values.sum(), values.square().sum()]).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def warm_tag_of(provenance: dict | str | None) -> str | None:
    """The warm tag in a bank's provenance or a delta file's provenance JSON (None: no full warm-up)."""
    if isinstance(provenance, str):
        provenance = json.loads(provenance or "{}")
    return (provenance or {}).get(WARM_TAG)


def model_warm_tag(model: nn.Module) -> str | None:
    """The warm tag of a tuning model's bank (None: no bank, or no full warm-up)."""
    from smt.core.model import get_bank

    bank = get_bank(model)
    return None if bank is None else warm_tag_of(bank.provenance)


def warm_base_folder(delta_path: str | Path) -> Path:
    """Where the warmed base of ``delta_path`` goes: ``run/delta.safetensors`` → ``run/delta.warm_base``."""
    path = Path(delta_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".warm_base")


def save_warm_base(model: nn.Module, delta_path: str | Path, tag: str, tokenizer=None) -> Path:
    """``save_pretrained`` the warmed weights (no Δ) of a transformers ``model`` beside its delta file, tagged.

    Raises:
        ValueError: ``model`` has no ``save_pretrained`` (save its ``state_dict()`` whole instead).
    """
    from smt.core.merge import plain_state_dict

    if not hasattr(model, "save_pretrained"):
        raise ValueError(
            f"smt.warmup_updates=full: {type(model).__name__} has no save_pretrained, so the warmed base cannot be "
            "written beside the delta; save the tuned model's state_dict() whole instead"
        )
    folder = warm_base_folder(delta_path)
    setattr(model.config, CONFIG_TAG, tag)
    try:  # the tag marks this folder only: a merged model saved later must not claim to be a warm base
        model.save_pretrained(folder, state_dict=plain_state_dict(model))
    finally:
        delattr(model.config, CONFIG_TAG)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def is_its_warm_base(model: nn.Module, tag: str | None) -> bool:
    """Whether ``model`` is the warmed base a delta with ``tag`` needs (always, for a delta without a warm-up)."""
    return tag is None or getattr(getattr(model, "config", None), CONFIG_TAG, None) == tag


def check_warm_base(model: nn.Module, tag: str | None, path: str | Path) -> None:
    """Refuse to apply a full warm-up's delta to anything but its warmed base.

    Raises:
        ValueError: the delta was tuned on warmed weights and ``model`` is not them.
    """
    if not is_its_warm_base(model, tag):
        raise ValueError(
            f"delta file {path} was tuned on warmed weights (smt.warmup_updates=full), which the sparse Δ cannot "
            f"carry; apply it to its warmed base {warm_base_folder(path)}, not the original base"
        )


def refuse_warm(tag: str | None, what: str) -> None:
    """Refuse an export that has no place for the warm-up's dense change.

    Raises:
        ValueError: the model or delta comes from a full warm-up.
    """
    if tag is not None:
        raise ValueError(
            f"{what} cannot carry the dense change of a full warm-up (smt.warmup_updates=full); "
            "export the merged model (smt export --merged) or the delta with its warmed base (smt export --delta)"
        )
