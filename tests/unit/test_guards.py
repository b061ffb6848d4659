"""Numerical and resource guards: NaN steps skipped and counted, divergence stops, fp16 overflow left to the
scaler, oversized warm-up accumulators refused, full disks, and the resumable training loader."""

from __future__ import annotations

import errno
import math
import os

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from smt import SparseMatrixTuning
from smt.core.io import WriteFailedError, atomic_save_safetensors
from smt.core.scoring import BlockScorer, check_accumulator_memory
from smt.data.resume_loader import ResumableLoader
from smt.kernels.blocks import BlockGrid
from smt.lightning.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from smt.lightning.guards import NonFiniteGuard, TrainingDivergedError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Regressor(LightningModule):
    """A 16 → 16 → 12 → 1 MLP whose loss is NaN at the global steps in ``nan_steps``."""

    def __init__(self, nan_steps=()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 1))
        self.nan_steps = set(nan_steps)
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}

    def smt_target(self) -> nn.Module:
        return self.net

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.net(x).squeeze(-1) - y).square().mean()
        return loss * math.nan if self.global_step in self.nan_steps else loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.after_step[self.global_step] = {
            k: v.detach().clone() for k, v in self.state_dict().items() if torch.is_tensor(v)
        }

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def fit(module, guard, steps=12, plugins=(), callbacks=(), root=None):
    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(64, 16), torch.randn(64)), batch_size=4)
    smt = SparseMatrixTuning(target_modules=["0", "2"], block_size=4, num_blocks=3, warmup_steps=3)
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=bool(callbacks),
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[smt, guard, *callbacks],
                      plugins=list(plugins), default_root_dir=root)  # fmt: skip
    trainer.fit(module, data)
    return smt


def test_a_nan_loss_step_is_skipped_counted_and_training_goes_on():
    module, guard = Regressor(nan_steps={5}), NonFiniteGuard(max_consecutive=3)
    smt = fit(module, guard)
    assert guard.skipped_steps == 1 and guard.consecutive == 0
    assert smt.phase == "tuning"
    step5, step6 = module.after_step[5], module.after_step[6]  # the NaN batch is the 6th: step 5 → 6
    assert all(torch.equal(step5[k], step6[k]) for k in step5)  # nothing moved on the skipped step
    assert not all(torch.equal(module.after_step[7][k], step6[k]) for k in step6)  # the next step trained
    assert all(torch.isfinite(v).all() for v in module.after_step[11].values() if v.is_floating_point())


def test_a_nan_inside_the_warmup_is_skipped_and_the_warmup_still_scores_its_steps():
    module, guard = Regressor(nan_steps={1}), NonFiniteGuard()
    smt = fit(module, guard)
    assert guard.skipped_steps == 1 and smt.steps_scored == 3  # the NaN step was not scored
    assert all(torch.isfinite(s).all() for s in smt.selection.scores.values())


def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    module, guard = Regressor(nan_steps=set(range(6, 100))), NonFiniteGuard(max_consecutive=3)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=-1)
    with pytest.raises(TrainingDivergedError, match="3 optimizer steps in a row") as caught:
        fit(module, guard, callbacks=[saver], root=tmp_path)
    assert "\n" not in str(caught.value)
    last = read_checkpoint(tmp_path / "last.ckpt")
    assert last["global_step"] == 8  # the third bad step raised before its checkpoint
    weights = {k.removeprefix("net."): v for k, v in last["state_dict"].items()}
    good = module.after_step[6]  # the last step that trained
    assert all(torch.equal(weights[k], good[k]) for k in good if k in weights)


def test_fp16_overflow_is_the_scalers_business_and_a_nan_loss_is_counted():
    guard = NonFiniteGuard(max_consecutive=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # every early fp16 step overflows in backward
    smt = fit(Regressor(), guard, steps=30, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert scaler.get_scale() < 2.0**40 and smt.phase == "tuning"
    assert guard.skipped_steps == 0  # overflowing gradients were skipped by the scaler, not counted as faults

    guard = NonFiniteGuard(max_consecutive=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    fit(Regressor(nan_steps={10}), guard, steps=14, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert guard.skipped_steps == 1


def test_guard_state_survives_a_checkpoint():
    guard = NonFiniteGuard()
    guard.skipped_steps, guard.consecutive = 4, 2
    restored = NonFiniteGuard()
    restored.load_state_dict(guard.state_dict())
    assert (restored.skipped_steps, restored.consecutive) == (4, 2)
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=-1)


def test_an_exact_grad_abs_mean_warmup_that_does_not_fit_is_refused_with_the_cheaper_options():
    grids = [BlockGrid(4096, 4096, 256, 256), BlockGrid(4096, 1024, 256, 256)]
    exact = [BlockScorer(g, "grad_abs_mean", f"m{i}") for i, g in enumerate(grids)]
    need = 2 * 4 * (4096 * 4096 + 4096 * 1024)
    refusal = r"grad_abs_mean needs 160.0 MiB .* 160.0 MiB is free.*grad_l1 \(0.0 MiB.*accumulator_device=cpu"
    with pytest.raises(ValueError, match=refusal) as caught:
        check_accumulator_memory(exact, "cuda:0", available=need)
    assert "\n" not in str(caught.value)
    assert check_accumulator_memory(exact, "cuda:0", available=2 * need) == need
    light = [BlockScorer(g, "grad_l1", f"m{i}") for i, g in enumerate(grids)]
    assert check_accumulator_memory(light, "cuda:0", available=need // 1000) == 2 * 4 * (256 + 64)
    with pytest.raises(ValueError) as on_cpu:
        check_accumulator_memory(exact, "cpu", available=need)
    assert "accumulator_device" not in str(on_cpu.value)  # already on the host: only grad_l1 is offered


def test_out_of_disk_while_saving_a_delta_keeps_the_previous_file(tmp_path, monkeypatch):
    import smt.core.io

    target = tmp_path / "delta.safetensors"
    atomic_save_safetensors({"a": torch.ones(2)}, target, {"format": "x"})
    before = target.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 7)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(smt.core.io, "save_file", full_disk)
    with pytest.raises(WriteFailedError, match=f"{target} was not written .No space left on device.") as caught:
        atomic_save_safetensors({"a": torch.zeros(2)}, target, {"format": "x"})
    assert "\n" not in str(caught.value)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["delta.safetensors"]


def test_atomic_checkpoint_io_refuses_storage_options_and_unsafe_loads(tmp_path):
    checkpoint_io = AtomicCheckpointIO()
    checkpoint_io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "a.ckpt")
    assert torch.equal(checkpoint_io.load_checkpoint(tmp_path / "a.ckpt")["state_dict"]["w"], torch.ones(3))
    assert oct((tmp_path / "a.ckpt").stat().st_mode & 0o777) != "0o600"
    with pytest.raises(ValueError, match="weights_only=False"):
        checkpoint_io.load_checkpoint(tmp_path / "a.ckpt", weights_only=False)
    with pytest.raises(TypeError, match="storage_options"):
        checkpoint_io.save_checkpoint({"state_dict": {}}, tmp_path / "b.ckpt", storage_options={"x": 1})


def epochs_of(loader, epochs: int) -> list[list[int]]:
    return [[int(i) for batch in loader for i in batch] for _ in range(epochs)]


def test_resumable_loader_resumes_mid_epoch_and_keeps_later_epochs_order():
    def make(trained):
        return ResumableLoader(list(range(10)), batch_size=2, shuffle=True,
                               generator=torch.Generator().manual_seed(3), trained_batches=lambda: trained)  # fmt: skip

    reference = epochs_of(make(0), 3)
    assert reference[0] != reference[1]  # each epoch its own order

    interrupted = make(2)  # saved after 2 batches of epoch 1
    epochs_of(interrupted, 1)
    next(iter(interrupted))
    state = interrupted.state_dict()
    resumed = make(0)
    resumed.load_state_dict(state)
    assert epochs_of(resumed, 2) == [reference[1][4:], reference[2]]

    at_epoch_end = make(5)  # saved after the whole of epoch 0
    epochs_of(at_epoch_end, 1)
    resumed = make(0)
    resumed.load_state_dict(at_epoch_end.state_dict())
    assert epochs_of(resumed, 2) == reference[1:]
