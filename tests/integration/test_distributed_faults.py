"""Faults under 2-process DDP on CPU (gloo, forked ranks), through ``smt fit`` on ``configs/debug.yaml``.

40 records: 32 train on 2 ranks = 4 batches per rank and epoch, 8 steps = 2 epochs; validation after the 3rd
batch of each epoch (steps 3 and 7); warm-up 3. Three runs:

- reference: a NaN loss on rank 1 only at step 5 → both ranks skip that step (``NonFiniteGuard`` decides on all
  ranks at once) and stay identical;
- struck: a SIGTERM to rank 1 only, during the validation after step 3 (mid-epoch, right after the selection)
  → both ranks save ``last.ckpt`` at step 3 and exit 143;
- resumed from it: each rank's ``ResumableLoader`` skips the 3 batches of its shard trained before, and the
  run ends bit-identical to the reference.

And the no-op guard: Δ that never moves stops both ranks together (one summed flag), no hang.

``ddp_fork`` rather than ``ddp``: plain ``ddp`` re-launches ``sys.argv``, which inside pytest re-runs the session.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DEBUG_CONFIG

from smt.lightning.checkpoint_io import read_checkpoint
from smt.lightning.cli import run_lightning

pytestmark = pytest.mark.filterwarnings("ignore")
DDP = ["--trainer.strategy=ddp_fork", "--trainer.devices=2", "--trainer.val_check_interval=3"]
CHECKPOINTS = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
               "--trainer.callbacks.dirpath=checkpoints", "--trainer.callbacks.save_last=true",
               "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=0"]  # fmt: skip
NAN_ON_RANK_1 = ["--trainer.callbacks+=fault_points.NaNLossAt", "--trainer.callbacks.steps=[5]",
                 "--trainer.callbacks.rank=1"]  # fmt: skip


def ddp_fit(folder: Path, train_file: Path, *extra: str) -> None:
    """One ``smt fit`` with two forked ranks in ``folder``; each rank leaves ``folder/ranks/rank<r>.pt``."""
    record = ["--trainer.callbacks+=fault_points.RecordRank", f"--trainer.callbacks.folder={folder / 'ranks'}"]
    args = ["fit", "--config", str(DEBUG_CONFIG), "--data.train_path", str(train_file), *DDP, *CHECKPOINTS]
    folder.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        run_lightning([*args, *NAN_ON_RANK_1, *record, *extra])


def ranks(folder: Path) -> list[dict]:
    return [torch.load(folder / "ranks" / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_file):
    root = tmp_path_factory.mktemp("ddp_faults")
    ddp_fit(root / "reference", train_file)
    sigterm = ["--trainer.callbacks+=fault_points.KillAt", "--trainer.callbacks.step=3",
               "--trainer.callbacks.point=validation", "--trainer.callbacks.rank=1"]  # fmt: skip
    with pytest.raises(Exception, match="exit code 143") as struck:  # each rank exits as `smt fit` would
        ddp_fit(root / "struck", train_file, *sigterm)
    saved = read_checkpoint(root / "struck" / "checkpoints" / "last.ckpt")
    ddp_fit(root / "struck", train_file, "--ckpt_path=checkpoints/last.ckpt")
    return SimpleNamespace(root=root, struck=struck, saved_step=saved["global_step"])


def test_a_nan_on_one_rank_is_skipped_on_both(runs):
    rank0, rank1 = ranks(runs.root / "reference")
    assert rank0["step"] == rank1["step"] == 8 and rank0["skipped_steps"] == rank1["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(rank0["slots"], rank1["slots"], strict=True))
    assert any(slot.abs().max() > 0 for slot in rank0["slots"])


def test_a_sigterm_to_one_rank_in_validation_saves_for_both_and_resumes_exactly(runs):
    assert runs.saved_step == 3  # right after the selection, mid-epoch (3 of 4 batches per rank trained)
    reference, resumed = (read_checkpoint(runs.root / f / "checkpoints" / "last.ckpt") for f in ("reference", "struck"))
    assert resumed["global_step"] == reference["global_step"] == 8
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for name, value in reference["state_dict"].items():
        got = resumed["state_dict"][name]
        assert torch.equal(got, value) if torch.is_tensor(value) else got == value, name
    for got, want in zip(ranks(runs.root / "struck"), ranks(runs.root / "reference"), strict=True):
        assert got["skipped_steps"] == want["skipped_steps"] == 1
        assert all(torch.equal(a, b) for a, b in zip(got["slots"], want["slots"], strict=True))


def test_slots_that_never_move_stop_both_ranks(tmp_path):
    from distributed_modules import BATCH, WORLD, ShardedRegressor
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DDPStrategy
    from plain_modules import DropSlotGradients

    from smt import SparseMatrixTuning

    smt = SparseMatrixTuning(target_modules=["up", "down"], block_size=4, num_blocks=3, warmup_steps=2,
                             check_progress_after=2)  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", devices=WORLD, strategy=DDPStrategy(start_method="fork"), max_steps=8,
        callbacks=[smt, DropSlotGradients()], default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(Exception, match="Δ is still exactly 0 in every slot after 2 tuning steps"):
        trainer.fit(ShardedRegressor(samples=4 * WORLD * BATCH))
