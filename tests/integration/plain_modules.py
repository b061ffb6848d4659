"""LightningModules that are not smt's, and a probe callback, for testing ``SparseMatrixTuning`` on user code.

Batches are a function of the global step (a generator seeded with the step), not of the loader's
position: a plain ``DataLoader`` restarts from its first batch when a run resumes mid-epoch, and
resuming from an epoch-end checkpoint replays a batch (Lightning #19815). Keyed by step, a resumed run
sees exactly the batches of an uninterrupted one, so resume tests compare weights bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import TwoLayer, tiny_gpt2
from lightning.pytorch import Callback, LightningModule
from torch.utils.data import DataLoader

from smt.core.merge import merged
from smt.core.model import bank_holder, get_bank, sparse_layers

LOADER_LENGTH = 64
QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


class Regressor(LightningModule):
    """``TwoLayer`` (10 → 14 → 6) regressing a fixed function; AdamW with weight decay.

    Args:
        optimizer_params: ``all`` = ``AdamW(self.parameters())``; ``trainable`` = only ``requires_grad`` ones.
        lr: AdamW learning rate.
    """

    def __init__(self, optimizer_params: str = "all", lr: float = 0.05) -> None:
        super().__init__()
        self.optimizer_params, self.lr = optimizer_params, lr
        self.net = self.build_net()

    def build_net(self) -> torch.nn.Module | None:
        return TwoLayer(d_in=10, hidden=14, d_out=6)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(8, 10, generator=generator)
        return x, torch.sin(2 * x[:, :6])

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = self.batch_at(self.global_step)
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer_params == "trainable":
            params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(LOADER_LENGTH), batch_size=1)


class LazyRegressor(Regressor):
    """``Regressor`` whose network exists only after ``configure_model`` (as with FSDP-style setups)."""

    def build_net(self) -> torch.nn.Module | None:
        return None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = TwoLayer(d_in=10, hidden=14, d_out=6)


class TinyCausalLM(LightningModule):
    """A tiny GPT-2 (``Conv1D`` layers, transposed weights) trained on random tokens; filtered AdamW."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2(layers=2, hidden=32, vocab=128)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.global_step)
        ids = torch.randint(0, 128, (4, 16), generator=generator)
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01, weight_decay=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(LOADER_LENGTH), batch_size=1)


def parameters_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class Probe(Callback):
    """Records SMT's phase and the optimizer's state around every optimizer step.

    Put it *before* the ``SparseMatrixTuning`` callback: Lightning calls callbacks in list order, so
    ``on_before_optimizer_step`` here sees the step before SMT acts on it (on the last warm-up step:
    right before the selection).
    """

    def __init__(self, smt) -> None:
        self.smt = smt
        self.before_step: list[dict] = []
        self.after_step: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = parameters_snapshot(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not hasattr(self, "start_phase"):  # after every callback's on_train_start (SMT settles its phase there)
            self.start_phase, self.start_steps_scored = self.smt.phase, self.smt.steps_scored

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before_step.append(
            {"step": trainer.global_step, "phase": self.smt.phase, "optimizer_state": len(optimizer.state)}
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        optimizer = trainer.optimizers[0]
        self.after_step.append(
            {
                "step": trainer.global_step,
                "phase": self.smt.phase,
                "steps_scored": self.smt.steps_scored,
                "optimizer_state": len(optimizer.state),
                "params": parameters_snapshot(pl_module),
            }
        )

    @property
    def scoring_steps(self) -> int:
        return sum(record["phase"] == "warmup" for record in self.before_step)


def selected_mask(layer, blocks: torch.Tensor) -> torch.Tensor:
    """Boolean mask, in the layer's stored weight layout, of the elements under ``blocks`` ``[k, 2]``."""
    grid = layer.grid
    mask = torch.zeros(grid.out_features, grid.in_features, dtype=torch.bool)
    rows, cols = grid.block_rows, grid.block_cols
    for row, col in blocks.tolist():
        mask[row * rows : (row + 1) * rows, col * cols : (col + 1) * cols] = True
    return mask.t() if layer.transposed else mask


def effective_weights(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``W0 + Δ`` of every wrapped layer (stored layout), read inside ``merged``; the model is unchanged after."""
    with merged(network):
        return {name: layer.weight.detach().clone() for name, layer in sparse_layers(network).items()}


def assert_only_selected_blocks_changed(
    network: torch.nn.Module, before: dict[str, torch.Tensor], trained: tuple[str, ...] = ()
) -> None:
    """Stored weights are bit-identical to ``before`` (except ``trained`` ones, which must have changed), and the
    effective weights ``W0 + Δ`` differ from ``before`` only inside the selected blocks."""
    bank = get_bank(network)
    assert bank is not None and bank.tuning
    after = {name: p.detach() for name, p in network.named_parameters() if "smt_bank" not in name.split(".")}
    assert set(after) == set(before) - {n for n in before if "smt_bank" in n.split(".")}
    for name, value in after.items():
        if name in trained:
            assert not torch.equal(value, before[name]), f"{name} was meant to train but did not change"
        else:
            assert torch.equal(value, before[name]), f"{name} changed"
    blocks = bank.blocks()
    changed_somewhere = False
    holder = bank_holder(network)  # the bank sits on the attribute holding the targets: names are relative to it
    prefix = next(f"{n}." if n else "" for n, m in network.named_modules() if m is holder)
    for name, weight in effective_weights(network).items():
        base = before[f"{prefix}{name}.weight"]
        mask = selected_mask(sparse_layers(network)[name], blocks.get(name, torch.empty(0, 2, dtype=torch.long)))
        assert torch.equal(weight[~mask], base[~mask]), f"{name}: a weight outside the selected blocks changed"
        changed_somewhere |= not torch.equal(weight[mask], base[mask])
    assert changed_somewhere, "no selected block was trained"


class StopAfterSteps(Callback):
    """Asks the trainer to stop after ``steps`` optimizer steps (as an early-stopping rule or a time limit would)."""

    def __init__(self, steps: int = 1) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class DropSlotGradients(Callback):
    """After the selection every slot's gradient is dropped before the optimizer step: Δ never moves."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bank = get_bank(pl_module)
        if bank is not None and bank.tuning:
            for slot in bank.slots:
                slot.grad = None
