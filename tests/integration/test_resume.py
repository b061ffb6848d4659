"""Resuming with ``ckpt_path`` before and after the selection gives the run that was never interrupted.

One uninterrupted run (8 optimizer steps, warm-up 3) writes step checkpoints every 2 steps (mid-epoch:
the loader has 64 batches, and batches are keyed by the global step, see ``plain_modules.py``). Runs
resumed from step 2 (inside the warm-up) and step 4 (after the selection) must end with the same map and
bit-identical slots.
"""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from plain_modules import QUIET, Probe, Regressor

from smt import SparseMatrixTuning
from smt.core.model import get_bank

pytestmark = pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")

WARMUP, MAX_STEPS = 3, 8


def run(root, ckpt_path=None, checkpoint_every: int | None = None):
    seed_everything(0)
    module = Regressor("trainable")
    smt = SparseMatrixTuning(target_modules=["up", "down"], block_size=4, num_blocks=3, warmup_steps=WARMUP)
    probe = Probe(smt)
    callbacks = [probe, smt]
    if checkpoint_every:
        callbacks.append(
            ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=checkpoint_every, save_top_k=-1)
        )
    settings = QUIET | {"enable_checkpointing": bool(checkpoint_every)}
    trainer = Trainer(max_steps=MAX_STEPS, callbacks=callbacks, default_root_dir=root, **settings)
    trainer.fit(module, ckpt_path=ckpt_path)
    assert trainer.global_step == MAX_STEPS
    return module, smt, probe


def slots(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in get_bank(module).slots]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    module, smt, probe = run(root, checkpoint_every=2)
    assert sorted(p.name for p in root.glob("*.ckpt")) == [f"step={s}.ckpt" for s in (2, 4, 6, 8)]
    return root, module, smt


def test_resume_after_selection_matches_uninterrupted_run(uninterrupted, tmp_path):
    root, reference, _ = uninterrupted
    module, smt, probe = run(tmp_path, ckpt_path=root / "step=4.ckpt")

    assert probe.start_phase == "tuning" and probe.scoring_steps == 0  # no warm-up after resuming
    assert [r["step"] for r in probe.after_step] == list(range(5, MAX_STEPS + 1))
    assert torch.equal(get_bank(module).map, get_bank(reference).map)
    for resumed, expected in zip(slots(module), slots(reference), strict=True):
        assert torch.equal(resumed, expected)


def test_resume_inside_warmup_continues_it(uninterrupted, tmp_path):
    root, reference, reference_smt = uninterrupted
    checkpoint = torch.load(root / "step=2.ckpt", weights_only=False)
    saved = next(state for key, state in checkpoint["callbacks"].items() if "SparseMatrixTuning" in key)
    assert saved["phase"] == "warmup" and saved["steps_scored"] == 2 and saved["scorers"]

    module, smt, probe = run(tmp_path, ckpt_path=root / "step=2.ckpt")

    assert probe.start_phase == "warmup" and probe.start_steps_scored == 2  # continued, not restarted
    assert probe.scoring_steps == 1  # only the warm-up's last step was left
    selected_at = next(r["step"] for r in probe.after_step if r["phase"] == "tuning")
    assert selected_at == WARMUP
    assert smt.selection.warmup_steps == WARMUP
    assert {n: b.tolist() for n, b in smt.selection.blocks.items()} == {
        n: b.tolist() for n, b in reference_smt.selection.blocks.items()
    }
    for name, scores in reference_smt.selection.scores.items():  # partial scores were restored, not recomputed
        assert torch.equal(smt.selection.scores[name], scores)
    assert torch.equal(get_bank(module).map, get_bank(reference).map)
    for resumed, expected in zip(slots(module), slots(reference), strict=True):
        assert torch.equal(resumed, expected)
