"""A run that trains nothing never ends green: each guard of ``smt.core.progress``, forced.

- no gradient reaches the targets in the warm-up → stop at selection;
- Δ still 0 in every slot after ``check_progress_after`` tuning steps with lr > 0 → stop before that step's
  checkpoint (the count survives resume; a shorter run is checked at its end; lr 0 steps are not counted);
- an all-zero Δ is never written: ``smt fit`` at lr 0 and ``smt export`` of an untrained checkpoint exit 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEBUG_CONFIG
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from plain_modules import QUIET, DropSlotGradients, Regressor

from smt import SparseMatrixTuning
from smt.core.model import get_bank
from smt.core.progress import NothingTrainedError
from smt.lightning.cli import main

WARMUP = 3
pytestmark = pytest.mark.filterwarnings(
    "ignore:You're resuming from a checkpoint that ended before the epoch ended",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
    "ignore:Be aware that when using `ckpt_path`",
)


class DetachedRegressor(Regressor):
    """``Regressor`` whose loss never reaches ``up``: its output is detached (a cut backward)."""

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = self.batch_at(self.global_step)
        return F.mse_loss(self.net.down(torch.tanh(self.net.up(x)).detach()), y)


def fit(module, max_steps: int, *callbacks, ckpt_path=None, folder=None, **smt_args) -> SparseMatrixTuning:
    smt = SparseMatrixTuning(
        **({"target_modules": ["up", "down"], "block_size": 4, "num_blocks": 3, "warmup_steps": WARMUP} | smt_args)
    )
    checkpoints = [ModelCheckpoint(folder, "{step}", every_n_train_steps=1, save_top_k=-1)] if folder else []
    quiet = QUIET | {"enable_checkpointing": bool(folder)}
    Trainer(max_steps=max_steps, callbacks=[smt, *callbacks, *checkpoints], **quiet).fit(module, ckpt_path=ckpt_path)
    return smt


def one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_warmup_that_reaches_no_target_stops_at_selection():
    with pytest.raises(NothingTrainedError) as error:
        fit(DetachedRegressor(), 8, target_modules=["up"], trainable_modules=["down"])  # down keeps the loss alive
    assert one_line(error).startswith("every block score of the 3-step warm-up is exactly 0: no gradient reached")
    assert "(up)" in str(error.value) and "detached" in str(error.value)


def test_a_warmup_that_reaches_some_targets_warns_and_selects():
    with pytest.warns(UserWarning, match=r"no gradient reached 1 targeted module\(s\) in the warm-up: \['up'\]"):
        smt = fit(DetachedRegressor(), 5)
    assert smt.selection is not None


def test_slots_that_never_move_stop_the_run_before_that_steps_checkpoint(tmp_path):
    with pytest.raises(NothingTrainedError) as error:
        fit(Regressor(), 12, DropSlotGradients(), folder=tmp_path, check_progress_after=3)
    assert one_line(error).startswith("Δ is still exactly 0 in every slot after 3 tuning steps with lr > 0")
    assert "smt.check_progress_after=0" in str(error.value)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [f"step={s}.ckpt" for s in range(1, 6)]  # not 6


def test_the_step_count_survives_resume(tmp_path):
    with pytest.raises(NothingTrainedError):
        fit(Regressor(), 12, DropSlotGradients(), folder=tmp_path / "first", check_progress_after=3)
    resumed = tmp_path / "first" / "step=5.ckpt"  # 2 tuning steps counted: the check is due after 1 more
    with pytest.raises(NothingTrainedError, match="after 3 tuning steps"):
        fit(
            Regressor(), 12, DropSlotGradients(), ckpt_path=resumed, folder=tmp_path / "resumed", check_progress_after=3
        )
    assert not list((tmp_path / "resumed").glob("*.ckpt"))  # stopped at step 6 again, before its checkpoint


def test_a_run_shorter_than_the_check_is_checked_at_its_end():
    with pytest.raises(NothingTrainedError, match="after 2 tuning steps with lr > 0"):
        fit(Regressor(), WARMUP + 2, DropSlotGradients(), check_progress_after=10)


@pytest.mark.parametrize("setting", ["lr 0", "check off"])
def test_no_stop_at_lr_0_or_with_the_check_off(setting):
    module = Regressor(lr=0.0) if setting == "lr 0" else Regressor()
    callbacks = [] if setting == "lr 0" else [DropSlotGradients()]
    smt = fit(module, WARMUP + 4, *callbacks, check_progress_after=0 if setting == "check off" else 2)
    assert not any(slot.any() for slot in get_bank(module).slots) and not smt.progress.checked


def test_smt_fit_at_lr_0_refuses_its_delta_and_export_refuses_the_checkpoint(train_file, capsys, tmp_path):
    step_checkpoint = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                       "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1",
                       "--trainer.callbacks.dirpath=steps", "--trainer.callbacks.filename={step}"]  # fmt: skip
    args = ["fit", "--config", str(DEBUG_CONFIG), "--data.train_path", str(train_file), "--model.lr=0"]
    assert main([*args, *step_checkpoint, "--trainer.limit_val_batches=0"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("smt: error: Δ is exactly 0 in every slot (lr 0, or no gradient reached the blocks)")
    assert "refusing to write runs/debug/delta.safetensors" in errors[-1]
    assert not (tmp_path / "runs" / "debug" / "delta.safetensors").exists()

    assert main(["export", "steps/step=4.ckpt", "--delta", "out.safetensors"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "smt: error: Δ is exactly 0 in every slot (lr 0, or no gradient reached the blocks): refusing to export "
        "steps/step=4.ckpt; check model.lr and frozen or detached paths (no_grad, .detach()), a quantized "
        "base's backward, labels all masked"
    )
    assert not (tmp_path / "out.safetensors").exists()


def test_a_repacked_4bit_base_that_cuts_gradients_exits_1(train_file, pretrained_folder, capsys, monkeypatch):
    """Without ``keep_trainable``, bitsandbytes' CPU repacking of an nf4 folder base (AVX512-BF16, with validation)
    cuts every gradient through the base: the warm-up scores are all 0 and the run must stop."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn.modules import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    import smt.core.model

    monkeypatch.setattr(smt.core.model, "keep_trainable", lambda model: 0)  # the bug back
    config = str(DEBUG_CONFIG.with_name("debug-nf4.yaml"))
    base = [f"--model.model={pretrained_folder}", "--model.model_config=null"]
    assert main(["fit", "--config", config, "--data.train_path", str(train_file), *base]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("smt: error: every block score of the 3-step warm-up is exactly 0")
