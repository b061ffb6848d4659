"""``NonFiniteGuard``: a step whose loss or gradients are not finite updates nothing, and a diverged run stops.

Once per optimizer step, the same decision on every rank (reduced with smt's other per-step flags, one all-reduce
and one host read per step: ``smt.lightning.step_flags``): were every loss of the step's micro-batches and every
trainable gradient finite? If not, all gradients are dropped before the optimizer
runs (``None``: no update, no weight decay, no optimizer state), the skip is counted (the running count is
logged every step as ``smt/skipped_steps``), and after ``max_consecutive`` skipped steps in a row the run stops with
``TrainingDivergedError``, leaving every checkpoint written so far as it was (skipped steps change no weight).

How it composes:

- fp16 with a ``GradScaler``: Lightning unscales before this hook and the scaler records its own inf check
  there, so an overflowing *gradient* is the scaler's business (it skips the step and lowers the scale) and
  is not counted; a non-finite *loss* is counted either way.
- ``SparseMatrixTuning`` drops every gradient during the warm-up and discards non-finite warm-up scores
  itself; the guard still counts warm-up steps with a non-finite loss, so a run that diverges while scoring
  stops too.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from smt.lightning.step_flags import step_flags


class TrainingDivergedError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard(Callback):
    """Skip and count optimizer steps with a non-finite loss or gradient; stop after too many in a row.

    Example:
        >>> trainer = Trainer(callbacks=[NonFiniteGuard(max_consecutive=5)])  # on by default in `smt fit`

    Args:
        max_consecutive: stop after this many skipped steps in a row (0 = never stop, only skip and count).
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 0:
            raise ValueError(f"guard.max_consecutive={max_consecutive} must be ≥ 0 (0 = never stop)")
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0
        self._loss_finite: torch.Tensor | None = None
        self._batch_key: tuple[int, int] | None = None
        self._last_decided: tuple[int, int] | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        step_flags(trainer).add(f"guard {id(self)}", lambda: self._bad_step(trainer, pl_module))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._batch_key = (trainer.current_epoch, batch_idx)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self._batch_key == self._last_decided:
            return  # a second optimizer on the same batch: the step is already decided (and dropped if bad)
        self._last_decided = self._batch_key
        if step_flags(trainer).totals(trainer, self._batch_key)[f"guard {id(self)}"] == 0:
            self.consecutive = 0
            return
        drop_gradients(optimizer)
        self.skipped_steps += 1
        self.consecutive += 1
        rank_zero_warn(
            f"smt: step {trainer.global_step}: non-finite loss or gradient, step skipped "
            f"({self.consecutive} in a row, {self.skipped_steps} in all)"
        )
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise TrainingDivergedError(
                f"training diverged: {self.consecutive} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {trainer.global_step}); lower the learning rate or check the data, then resume "
                "from the last checkpoint (it holds no skipped update)"
            )

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._last_decided == self._batch_key:
            self._loss_finite = None  # the step is done; with gradient accumulation losses keep adding up
        pl_module.log("smt/skipped_steps", float(self.skipped_steps))  # every step: a column from the first row

    def _bad_step(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        """1.0 if this rank's losses of the step or (without a loss scaler) its gradients are not all finite."""
        device = pl_module.device
        finite = torch.ones((), dtype=torch.bool, device=device)
        if self._loss_finite is not None:
            finite = finite & self._loss_finite.to(device)
        if not scaler_enabled(trainer):
            params = [p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]]
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                # FSDP2 gradients are DTensors: each rank checks its own shard; the sum over ranks covers them all.
                local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
                # One fused call for all slots: the max-norm is NaN/inf exactly when a gradient holds one (no overflow).
                finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(local, float("inf")))).all().to(device)
        return (~finite).float()

    @override
    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def scaler_enabled(trainer: Trainer) -> bool:
    """Whether an fp16 ``GradScaler`` handles overflowing gradients in this run."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler is not None and scaler.is_enabled()


def loss_scale(trainer: Trainer) -> torch.Tensor | float:
    """The fp16 GradScaler's scale as its device tensor (``get_scale()`` would read it on the host: a sync)."""
    if not scaler_enabled(trainer):
        return 1.0
    scaler = trainer.precision_plugin.scaler
    scale = scaler._get_scale_async()  # set by scaler.scale(loss), which Lightning calls before this hook
    return scaler.get_scale() if scale is None else scale


def drop_gradients(optimizer) -> None:
    """Remove every gradient before the optimizer step: no update, no weight decay, no optimizer state."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
