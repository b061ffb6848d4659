"""Test-only callbacks that hurt a real ``smt fit`` process at chosen points (added with ``--trainer.callbacks+=``).

``tests/integration`` is on the subprocess's ``PYTHONPATH``, so ``fault_points.KillAt`` resolves there.
"""

from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch import Callback


def _kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(Callback):
    """SIGKILL (or SIGTERM) this process at optimizer step ``step``.

    Args:
        step: the global step (optimizer steps done) at which to strike.
        point: ``batch_end`` — after the step, before any checkpoint of it; ``checkpoint_write`` — halfway through
            writing the step's first checkpoint (inside ``AtomicCheckpointIO``); ``regrowth`` — inside the regrowth
            event after it moved the slots; ``sigterm`` — a SIGTERM during the step (the run should save and exit);
            ``validation`` — a SIGTERM in the first validation batch after the step.
        rank: strike only this rank (default: every rank).
    """

    def __init__(self, step: int, point: str = "batch_end", rank: int | None = None) -> None:
        self.step, self.point, self.rank = step, point, rank

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            self.point = None  # another rank's strike
        if self.point == "checkpoint_write":
            self._arm_checkpoint_write(trainer)
        if self.point == "regrowth":
            self._arm_regrowth(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.point == "sigterm" and trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        at_step = not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == 0
        if self.point == "validation" and at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.point == "batch_end" and trainer.global_step == self.step:
            _kill_now()

    def _arm_checkpoint_write(self, trainer) -> None:
        checkpoint_io = trainer.strategy.checkpoint_io
        original = checkpoint_io.write_payload

        def write_half_then_die(checkpoint, temporary):
            if checkpoint["global_step"] != self.step:
                return original(checkpoint, temporary)
            original(checkpoint, temporary)
            with open(temporary, "r+b") as handle:  # leave a half-written temporary file behind
                handle.truncate(os.path.getsize(temporary) // 2)
            _kill_now()

        checkpoint_io.write_payload = write_half_then_die

    def _arm_regrowth(self, trainer) -> None:
        from smt.core.regrowth import Regrower

        original, strike = Regrower.event, self.step

        def event_then_die(regrower, *args, **kwargs):
            report = original(regrower, *args, **kwargs)
            if trainer.global_step == strike:
                _kill_now()  # slots moved in memory, nothing of it saved
            return report

        Regrower.event = event_then_die


class NaNLossAt(Callback):
    """Turn the logits (hence the loss) of the given optimizer steps into NaN, through a hook on ``lm_head``.

    Args:
        steps: global steps (optimizer steps done before the batch) whose loss becomes NaN.
        rank: only on this rank (default: every rank).
    """

    def __init__(self, steps: list[int], rank: int | None = None) -> None:
        self.steps, self.rank = set(steps), rank
        self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step in self.steps and self.rank in (None, trainer.global_rank):
            head = pl_module.model.get_output_embeddings()
            self.handle = head.register_forward_hook(lambda module, args, out: out * torch.nan)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class RecordRank(Callback):
    """Writes ``<folder>/rank<r>.pt`` when fit ends on every rank: the slots and the skipped-step count.

    Forked DDP ranks cannot hand objects back to the test, so each leaves a file.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        from smt.core.model import get_bank
        from smt.lightning.guards import NonFiniteGuard

        (guard,) = [c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)]
        slots = [slot.detach().clone() for slot in get_bank(pl_module.model).slots]
        record = {"slots": slots, "skipped_steps": guard.skipped_steps, "step": trainer.global_step}
        os.makedirs(self.folder, exist_ok=True)
        torch.save(record, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))
