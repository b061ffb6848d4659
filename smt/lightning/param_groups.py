"""Optimizer param groups for a run with smt: the blocks' slots, a full warm-up's dense weights, the rest.

Two settings need a group of their own: ``smt.lr_scale`` (the slots train at the optimizer's LR × ``lr_scale``,
LoRA+-style, while a trained head or norms keep the optimizer's LR) and ``smt.warmup_lr`` (a full warm-up's dense
weights). ``SMTLanguageModel`` builds its optimizer from ``param_groups``; a LightningModule of your own does the
same in its ``configure_optimizers``, and the callback refuses, when training starts, a setting whose group the
optimizer lacks (``check_groups``). Every group's LR is set here, so an LR scheduler scales each from its own start.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from torch import nn

from smt.core.model import get_bank
from smt.lightning.full_warmup import GROUP_FLAG

SLOTS_FLAG = "smt_slots"
"""Key marking the optimizer param group of smt's block slots."""


def param_groups(trainer: Trainer, params: list[nn.Parameter], lr: float) -> list[dict]:
    """``params`` (the trainable ones) as optimizer param groups, each with its LR.

    The slots: ``lr × smt.lr_scale``, marked ``smt_slots: True``; a full warm-up's dense weights: ``smt.warmup_lr``
    (else ``lr``), marked ``smt_full_warmup: True``; the rest (``smt.trainable_modules``): ``lr``. Empty groups are
    left out; without the callback every parameter is in one group.

    Example:
        >>> def configure_optimizers(self):  # doctest: +SKIP
        ...     params = [p for p in self.parameters() if p.requires_grad]
        ...     return torch.optim.AdamW(param_groups(self.trainer, params, lr=3e-4))
    """
    from smt.lightning.callback import find_callback  # the callback imports this module

    smt = find_callback(trainer)
    if smt is None:
        return [{"params": list(params), "lr": lr}]
    slots = {id(slot) for slot in get_bank(smt.target(trainer.lightning_module)).slots}
    dense = {id(p) for p in smt.full_warmup.parameters} if smt.full_warmup is not None else set()
    groups = [
        {"params": [p for p in params if id(p) in slots], "lr": lr * smt.config.lr_scale, SLOTS_FLAG: True},
        {"params": [p for p in params if id(p) in dense], "lr": _warmup_lr(smt, lr), GROUP_FLAG: True},
        {"params": [p for p in params if id(p) not in slots and id(p) not in dense], "lr": lr},
    ]
    return [group for group in groups if group["params"]]


def check_groups(lr_scale: float, optimizers: list[torch.optim.Optimizer]) -> None:
    """Refuse an ``lr_scale`` the optimizer cannot honour (the slots share a group with other parameters).

    Raises:
        ValueError: ``lr_scale`` ≠ 1 and no param group is marked ``smt_slots``.
    """
    marked = any(group.get(SLOTS_FLAG) for opt in optimizers for group in opt.param_groups)
    if lr_scale != 1.0 and not marked:
        raise ValueError(
            f"smt.lr_scale={lr_scale} needs the slots in a param group of their own; build the optimizer from "
            "smt.lightning.param_groups.param_groups(trainer, params, lr), or set smt.lr_scale=1"
        )


def _warmup_lr(smt, lr: float) -> float:
    warmup = smt.full_warmup
    return warmup.warmup_lr if warmup is not None and warmup.warmup_lr is not None else lr
