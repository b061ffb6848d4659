"""The paper's warm-up (``smt.warmup_updates=full``): the network trains densely before the blocks are chosen.

The official SMT code runs ``full_ft_steps`` of ordinary full fine-tuning while it accumulates block scores, then
tunes the selected blocks from the warmed weights. Here, with the lifecycle constraint that the trainable set never
changes after the strategy wraps the model (DDP buckets, optimizer param groups, strict checkpoint loads):

- ``setup`` (before wrapping and ``configure_optimizers``): every parameter of the network that holds the bank
  requires grad, beside the slots. ``smt.lightning.param_groups`` puts them in a group of their own with
  ``smt.warmup_lr`` (``smt_full_warmup: True``; ``SMTLanguageModel`` gives that group a constant LR, the blocks'
  schedule starts after the warm-up as before).
- warm-up steps: only the slots' gradients are dropped (Δ ≡ 0, as in the score-only warm-up); the optimizer updates
  every dense weight while the layers tap block scores from the same backward (``SparseBlockLinear`` forms
  ``dW0 = gᵀx`` only while ``W0`` requires grad).
- after the last warm-up step's optimizer step (``end``): the dense weights stop requiring grad, so backward forms
  no dense weight gradient and keeps no dense activations for them any more; their gradients are set to None (AdamW
  neither moves nor decays a parameter without one) and their optimizer state is popped, freeing full FT's two fp32
  moments. Under DDP a parameter that stops receiving gradients needs ``find_unused_parameters=True``.
- the blocks' Δ is relative to the warmed weights: the trained model is ``W_warm + Δ``. The warmed weights live in
  the model (a full checkpoint holds them; slim checkpoints, which reload the original base, are refused), the
  bank's provenance carries their tag, and a delta file is written with its warmed base beside it
  (``smt.adapters.warm_base``).

Memory: during the warm-up this is full fine-tuning of the network (weights + gradients + AdamW's two fp32 moments:
~16 bytes per fp32 weight, plus the activations dense weight gradients need); from the selection on, SMT's own.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from smt.adapters.warm_base import WARM_TAG, warm_tag
from smt.core.model import get_bank
from smt.core.quant import has_quantized_layers

GROUP_FLAG = "smt_full_warmup"
"""Key marking the optimizer param group of the dense warm-up weights."""


class FullWarmup:
    """The dense weights a full warm-up trains, and their release at selection.

    Example:
        >>> trainer = Trainer(callbacks=[SparseMatrixTuning(warmup_updates="full", warmup_lr=1e-5)])  # doctest: +SKIP
    """

    def __init__(self, warmup_lr: float | None) -> None:
        self.warmup_lr = warmup_lr
        self.parameters: list[nn.Parameter] = []
        self.ended = False

    def train(self, network: nn.Module) -> None:
        """Make every weight of ``network`` but the slots trainable (before the strategy wraps the model)."""
        slots = {id(slot) for slot in get_bank(network).slots}
        self.parameters = [p for p in network.parameters() if id(p) not in slots and p.is_floating_point()]
        for param in self.parameters:
            param.requires_grad_(True)

    def drop_slot_gradients(self, network: nn.Module) -> None:
        """In a warm-up step: Δ stays 0 (and gets no optimizer state); the dense gradients stay for the step."""
        for slot in get_bank(network).slots:
            slot.grad = None

    def end(self, network: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        """After the last warm-up optimizer step (or on resume after it): freeze, free, and tag the warmed weights."""
        if self.ended:
            return
        bank = get_bank(network)
        if WARM_TAG not in bank.provenance:  # a resumed run keeps the tag its checkpoint carries
            bank.provenance = {**bank.provenance, "warmup_updates": "full", WARM_TAG: warm_tag(self.parameters)}
        for param in self.parameters:
            param.requires_grad_(False)
            param.grad = None
            for optimizer in optimizers:
                optimizer.state.pop(param, None)
        self.ended = True

    def check_optimizer(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Refuse a ``warmup_lr`` the optimizer cannot honour (the dense weights share a group with the slots).

        Raises:
            ValueError: ``warmup_lr`` is set but no param group is marked ``smt_full_warmup``.
        """
        marked = any(group.get(GROUP_FLAG) for opt in optimizers for group in opt.param_groups)
        if self.warmup_lr is not None and not marked:
            raise ValueError(
                "smt.warmup_lr needs the dense weights in a param group of their own; build the optimizer from "
                "smt.lightning.param_groups.param_groups(trainer, params, lr), or unset smt.warmup_lr"
            )


def check_full_warmup(trainer: Trainer, pl_module: LightningModule, network: nn.Module) -> None:
    """Refuse, at setup, what a full warm-up cannot run under; one line naming the fix.

    Raises:
        ValueError: a quantized base, slim checkpoints, FSDP/DeepSpeed, or DDP without ``find_unused_parameters``.
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if has_quantized_layers(network):
        raise ValueError(
            "smt.warmup_updates=full trains every weight densely, which a quantized base cannot store; "
            "use model.quantization=none or smt.warmup_updates=none"
        )
    hparams = getattr(pl_module, "hparams", {})
    if hparams.get("slim_checkpoints") and hparams.get("model"):
        raise ValueError(
            "smt.warmup_updates=full changes every base weight, but a slim checkpoint reloads the original base on "
            "resume; set model.slim_checkpoints=false"
        )
    strategy = trainer.strategy
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)):
        raise ValueError(
            f"smt.warmup_updates=full is not supported under {type(strategy).__name__} (it would shard full FT's "
            "state); use DDP (strategy=ddp_find_unused_parameters_true) or smt.warmup_updates=none"
        )
    if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters"):
        raise ValueError(
            "smt.warmup_updates=full stops the dense weights' gradients at selection, which DDP allows only with "
            "find_unused_parameters=True; use strategy=ddp_find_unused_parameters_true"
        )
