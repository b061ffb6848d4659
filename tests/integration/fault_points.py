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
            event after it moved the slots; ``sigterm`` — a SIGTERM during the step (the run should save and exit).
    """

    def __init__(self, step: int, point: str = "batch_end") -> None:
        self.step, self.point = step, point

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.point == "checkpoint_write":
            self._arm_checkpoint_write(trainer)
        if self.point == "regrowth":
            self._arm_regrowth(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.point == "sigterm" and trainer.global_step + 1 == self.step:
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
        from smt.regrowth import Regrower

        original, strike = Regrower.event, self.step

        def event_then_die(regrower, *args, **kwargs):
            report = original(regrower, *args, **kwargs)
            if trainer.global_step == strike:
                _kill_now()  # slots moved in memory, nothing of it saved
            return report

        Regrower.event = event_then_die


class NaNLossAt(Callback):
    """Turn the logits (hence the loss) of the given optimizer steps into NaN, through a hook on ``lm_head``."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)
        self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step in self.steps:
            head = pl_module.model.get_output_embeddings()
            self.handle = head.register_forward_hook(lambda module, args, out: out * torch.nan)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
