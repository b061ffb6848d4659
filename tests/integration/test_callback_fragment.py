"""``callbacks/smt.yaml`` added to a LightningCLI app that is not smt's, the way its header says.

The app (a LightningModule and a plain ``LightningCLI``, defined here) has a config with a callback of its
own; ``--trainer.callbacks+=callbacks/smt.yaml`` must append SMT to it, and the overrides that follow
(``--trainer.callbacks.<arg>``) must reach the appended callback.
"""

import pytest
import torch
import yaml
from conftest import REPO
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from plain_modules import StopAfterSteps, assert_only_selected_blocks_changed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from smt import SparseMatrixTuning
from smt.core.model import get_bank

FRAGMENT = REPO / "callbacks" / "smt.yaml"


class ForeignRegressor(LightningModule):
    """Someone else's model: an MLP on fixed random data, SGD with momentum over ``self.parameters()``."""

    def __init__(self, hidden: int = 32, lr: float = 0.1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, hidden), nn.Tanh(), nn.Linear(hidden, 4))
        self.lr = lr
        self.initial = {name: p.detach().clone() for name, p in self.named_parameters()}  # not a parameter

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)  # momentum: state per param

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 16, generator=generator), torch.randn(64, 4, generator=generator))
        return DataLoader(data, batch_size=8)


def write_app_config(folder) -> str:
    path = folder / "app.yaml"
    path.write_text(
        "seed_everything: 0\n"
        "trainer:\n"
        "  max_steps: 6\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        "  enable_model_summary: false\n"
        "  callbacks:\n"
        "    - class_path: plain_modules.StopAfterSteps\n"
        "      init_args: {steps: 100}\n"
    )
    return str(path)


def test_fragment_appends_the_callback_and_takes_overrides(tmp_path):
    overrides = ["--trainer.callbacks.target_modules=[body.0]", "--trainer.callbacks.block_size=8",
                 "--trainer.callbacks.density=0.25", "--trainer.callbacks.warmup_steps=2"]  # fmt: skip
    args = ["fit", "--config", write_app_config(tmp_path), f"--trainer.callbacks+={FRAGMENT}", *overrides]
    cli = LightningCLI(ForeignRegressor, args=args, save_config_kwargs={"overwrite": True})

    kinds = [type(cb) for cb in cli.trainer.callbacks]
    assert StopAfterSteps in kinds and SparseMatrixTuning in kinds  # appended, the app's own callback kept
    smt = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SparseMatrixTuning))
    assert smt.config.target_modules == ["body.0"] and smt.config.block_size == 8
    assert smt.config.density == 0.25 and smt.config.warmup_steps == 2 and smt.config.criterion == "grad_sq"
    assert cli.trainer.global_step == 6 and smt.phase == "tuning" and smt.steps_scored == 2
    assert smt.selection.num_blocks == 2  # 25 % of body.0's 32×16 weights in 8×8 blocks
    assert {id(p) for p in cli.trainer.optimizers[0].state} == {id(p) for p in get_bank(cli.model).slots}
    assert_only_selected_blocks_changed(cli.model, cli.model.initial)


def test_fragment_with_equals_replaces_the_apps_callbacks(tmp_path):
    args = ["--config", write_app_config(tmp_path), f"--trainer.callbacks={FRAGMENT}"]
    cli = LightningCLI(ForeignRegressor, args=args, run=False)
    kinds = [type(cb) for cb in cli.trainer.callbacks]
    assert SparseMatrixTuning in kinds and StopAfterSteps not in kinds


@pytest.mark.parametrize("fragment", sorted((REPO / "callbacks").glob("*.yaml")), ids=lambda p: p.name)
def test_every_fragment_parses_and_builds_its_callback(fragment, tmp_path):
    written = yaml.safe_load(fragment.read_text())
    assert "--trainer.callbacks+=callbacks/" + fragment.name in fragment.read_text()  # the header shows the command
    args = ["--config", write_app_config(tmp_path), f"--trainer.callbacks+={fragment}"]
    cli = LightningCLI(ForeignRegressor, args=args, run=False)
    module, _, name = written["class_path"].rpartition(".")
    built = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == name and type(cb).__module__.startswith(module)]
    assert len(built) == 1 and StopAfterSteps in [type(cb) for cb in cli.trainer.callbacks]
