"""fp16 with a GradScaler: overflowing warm-up steps make the scaler back off, and the warm-up still ends."""

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from smt import SparseMatrixTuning


class Regressor(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 1))

    def smt_target(self) -> nn.Module:
        return self.net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x).squeeze(-1) - y).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_overflowing_warmup_backs_off_and_selects():
    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(64, 16), torch.randn(64)), batch_size=4)
    smt = SparseMatrixTuning(target_modules=["0", "2"], block_size=4, num_blocks=3, warmup_steps=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # every early fp16 step overflows
    trainer = Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[smt],
                      plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])  # fmt: skip
    module = Regressor()
    before = {k: v.clone() for k, v in module.state_dict().items() if "smt_bank" not in k}
    trainer.fit(module, data)
    assert scaler.get_scale() < 2.0**40  # the overflow reached the scaler through the slots' gradients
    assert smt.phase == "tuning" and smt.steps_scored == 3
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen weights untouched throughout
