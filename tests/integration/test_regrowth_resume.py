"""Regrowth inside Lightning: events happen, and a resume in the middle of a scoring window continues exactly."""

import torch
from helpers import TwoLayer
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from smt import SparseMatrixTuning
from smt.core.config import RegrowthConfig
from smt.core.model import get_bank


class Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TwoLayer(10, 16, 8)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.net(x) - torch.sin(x[:, :8])).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2)


def _loader():
    torch.manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(8, 10)), batch_size=8)  # one batch per epoch: no replay on resume


def _callback():
    regrowth = RegrowthConfig(every=3, accumulate=2, rate=0.5, schedule="constant", prune="delta_change")
    return SparseMatrixTuning(target_modules=["up", "down"], block_size=4, num_blocks=5, warmup_steps=2,
                              regrowth=regrowth)  # fmt: skip


def _trainer(tmp_path, steps, extra=()):
    return Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, callbacks=[_callback(), *extra],
                   enable_checkpointing=bool(extra))  # fmt: skip


def _final(model):
    bank = get_bank(model)  # no smt_target(): the bank sits on the LightningModule itself
    return bank.map.clone(), [p.detach().clone() for p in bank.slots]


def _in_window(path) -> bool:
    states = torch.load(path, weights_only=True)["callbacks"].values()
    return any((s.get("regrowth") or {}).get("scorers") for s in states)


def test_regrowth_events_and_resume_mid_window(tmp_path):
    plain = Net()
    trainer = _trainer(tmp_path / "a", 14)
    trainer.fit(plain, _loader())
    callback = trainer.callbacks[0]
    assert [h["step"] for h in callback.regrower.history] == [3, 6, 9, 12]
    assert sum(h["swapped"] for h in callback.regrower.history) > 0
    expected_map, expected_slots = _final(plain)

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    first = Net()
    _trainer(tmp_path / "b", 9, [checkpoints]).fit(first, _loader())
    # The first checkpoint taken with a scoring window open (scores of one step held, the event still ahead).
    mid_window = next(path for path in sorted((tmp_path / "ckpt").glob("*.ckpt")) if _in_window(path))

    resumed = Net()
    trainer = _trainer(tmp_path / "c", 14)
    trainer.fit(resumed, _loader(), ckpt_path=mid_window)
    got_map, got_slots = _final(resumed)
    assert torch.equal(got_map, expected_map)
    for got, want in zip(got_slots, expected_slots):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
