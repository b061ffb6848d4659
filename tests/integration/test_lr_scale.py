"""``smt.lr_scale``: the slots train at the optimizer's LR × lr_scale in a param group of their own.

Under AdamW a group's LR scales its update exactly, so lr_scale=3 at LR x must train the blocks bit for bit like
lr_scale=1 at LR 3x; other trainable parameters keep the optimizer's LR; an optimizer with no slot group is
refused in one line, since the scale would silently not apply.
"""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from plain_modules import QUIET, Regressor, effective_weights

from smt import SparseMatrixTuning
from smt.lightning.cli import main
from smt.lightning.param_groups import SLOTS_FLAG, param_groups

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
STEPS = 8


class GroupedRegressor(Regressor):
    """``Regressor`` whose optimizer is built from smt's param groups, as the docs tell a user's module to."""

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(param_groups(self.trainer, params, self.lr), weight_decay=0.1)


def fit(module: Regressor, lr_scale: float, **smt_args) -> tuple[Trainer, SparseMatrixTuning]:
    seed_everything(0)
    smt = SparseMatrixTuning(
        target_modules=["up", "down"], block_size=2, num_blocks=6, warmup_steps=2, submodule="net",
        lr_scale=lr_scale, **smt_args,
    )  # fmt: skip
    trainer = Trainer(max_steps=STEPS, callbacks=[smt], **QUIET)
    trainer.fit(module)
    return trainer, smt


def test_lr_scale_trains_the_blocks_exactly_as_the_scaled_lr_does():
    seed_everything(0)
    scaled = GroupedRegressor(lr=0.01)
    before = {name: layer.weight.detach().clone() for name, layer in scaled.net.named_children()}
    fit(scaled, lr_scale=3.0)
    seed_everything(0)
    plain = GroupedRegressor(lr=0.03)
    fit(plain, lr_scale=1.0)
    after = effective_weights(scaled.net)
    assert any(not torch.equal(before[name], after[name]) for name in after)  # it trained
    for name, value in effective_weights(plain.net).items():
        assert torch.equal(after[name], value), name


def test_the_slots_get_the_scaled_lr_and_the_other_trainable_weights_keep_the_optimizers():
    trainer, _ = fit(GroupedRegressor(lr=0.01), lr_scale=4.0, trainable_modules=["up.bias"])
    groups = trainer.optimizers[0].param_groups
    slots = [g for g in groups if g.get(SLOTS_FLAG)]
    rest = [g for g in groups if not g.get(SLOTS_FLAG)]
    assert len(slots) == 1 and slots[0]["lr"] == pytest.approx(0.04)
    assert len(rest) == 1 and rest[0]["lr"] == pytest.approx(0.01)
    assert [p.shape for p in rest[0]["params"]] == [torch.Size([14])]  # up.bias, trained densely


def test_an_optimizer_without_a_slot_group_is_refused_unless_the_scale_is_one():
    with pytest.raises(ValueError, match=r"smt.lr_scale=2.0 needs the slots in a param group of their own"):
        fit(Regressor(optimizer_params="trainable", lr=0.01), lr_scale=2.0)
    fit(Regressor(optimizer_params="trainable", lr=0.01), lr_scale=1.0)


def test_a_scale_that_is_not_positive_is_refused_before_anything_loads():
    with pytest.raises(ValueError, match=r"smt.lr_scale=0.0 must be > 0"):
        SparseMatrixTuning(target_modules=["up"], num_blocks=1, lr_scale=0.0)


def test_smt_fit_gives_the_slots_their_scaled_lr(tmp_path, train_file, monkeypatch):
    from conftest import DEBUG_CONFIG

    from smt.lightning.checkpoint_io import read_checkpoint

    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(DEBUG_CONFIG), "--data.train_path", str(train_file),
                 "--model.lr=0.002", "--smt.lr_scale=2.5", "--model.slim_checkpoints=false"]) == 0  # fmt: skip
    (path,) = (tmp_path / "runs" / "debug" / "checkpoints").glob("*.ckpt")
    checkpoint = read_checkpoint(path)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [(g[SLOTS_FLAG], g["initial_lr"]) for g in groups] == [(True, pytest.approx(0.005))]
