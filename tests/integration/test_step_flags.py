"""One reduced flag vector per optimizer step (``smt.lightning.step_flags``): the guard, the SMT callback (warm-up
taps, regrowth windows, the progress check) and the pre-emption callback share one all-reduce and one host read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from plain_modules import QUIET, Regressor

import smt
from smt import SparseMatrixTuning
from smt.core.config import RegrowthConfig
from smt.lightning.checkpoint_io import PreemptionCheckpoint
from smt.lightning.guards import NonFiniteGuard
from smt.lightning.step_flags import StepFlags, step_flags

pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)")
SMT_PACKAGE = str(Path(smt.__file__).parent)


class FakeTrainer:
    """What ``StepFlags`` asks of a trainer: the world size and a strategy that sums (here: doubles, as two ranks)."""

    def __init__(self, world_size: int) -> None:
        self.world_size, self.reduced = world_size, []
        self.strategy = self

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        self.reduced.append(tensor.clone())
        return tensor * self.world_size


def test_every_source_is_reduced_once_per_step_in_one_vector():
    trainer, flags, asked = FakeTrainer(world_size=2), StepFlags(), []
    flags.add("guard", lambda: asked.append("guard") or torch.tensor(1.0))
    flags.add("preemption", lambda: asked.append("preemption") or 0.0)
    assert flags.totals(trainer, (0, 0)) == {"guard": 2.0, "preemption": 0.0}
    assert flags.totals(trainer, (0, 0))["preemption"] == 0.0  # the same step: the result is read, nothing asked
    assert asked == ["guard", "preemption"] and len(trainer.reduced) == 1 and trainer.reduced[0].shape == (2,)
    flags.totals(trainer, (0, 1))
    assert len(trainer.reduced) == flags.reductions == 2


def test_host_flags_on_one_device_touch_no_tensor():
    trainer, flags = FakeTrainer(world_size=1), StepFlags()
    flags.add("preemption", lambda: 1.0)
    assert flags.totals(trainer, (0, 0)) == {"preemption": 1.0} and not trainer.reduced and flags.reductions == 0


class CountReductions(Callback):
    """Counts, per optimizer step, the reductions smt's code makes (their shared vector and any other; Lightning's own
    are not counted)."""

    def __init__(self) -> None:
        self.per_step: list[int] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        original = trainer.strategy.reduce

        def counting(*args, **kwargs):
            if SMT_PACKAGE in sys._getframe(1).f_code.co_filename:
                self.per_step[-1] += 1
            return original(*args, **kwargs)

        trainer.strategy.reduce = counting  # the single-device strategy reduces nothing, but smt still calls it

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.per_step.append(0)


def test_a_fit_with_every_flag_reduces_once_per_step_outside_selection_and_regrowth_events():
    """Warm-up 3 steps, then tuning with regrowth windows and the progress check due at tuning step 3: every step
    makes exactly one reduction, except the selection (scores) and the regrowth events (window scores)."""
    tuning = SparseMatrixTuning(
        target_modules=["up", "down"], block_size=4, num_blocks=3, warmup_steps=3, check_progress_after=3,
        regrowth=RegrowthConfig(every=4, accumulate=2, rate=0.5),
    )  # fmt: skip
    counter = CountReductions()
    trainer = Trainer(max_steps=12, callbacks=[tuning, NonFiniteGuard(), PreemptionCheckpoint(), counter], **QUIET)
    trainer.fit(Regressor())
    selection, events = 3, {3 + 4, 3 + 8}  # 1-based steps: the last warm-up step; tuning steps 4 and 8
    for step, count in enumerate(counter.per_step, start=1):
        if step == selection or step in events:
            assert count > 1, step  # the scores themselves are summed over ranks there
        else:
            assert count == 1, (step, counter.per_step)
    assert step_flags(trainer).reductions == 12 and tuning.progress.checked
