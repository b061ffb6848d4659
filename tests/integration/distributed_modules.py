"""A LightningModule fed by a real ``DataLoader`` (so DDP's distributed sampler shards it) and a recorder callback.

Why a single process can reproduce a 2-rank DDP run exactly:

- Lightning always gives a training loader a shuffling ``DistributedSampler`` (seed ``PL_GLOBAL_SEED``, epoch 0 here).
  A single process that sees, at optimizer step ``s``, rank 0's batch ``s`` and then rank 1's batch ``s`` as two
  micro-batches (``accumulate_grad_batches=2``, ``InterleavedSampler``) sees the same union of batches.
- Gradients: DDP averages the ranks' gradients, ``(G₀ + G₁)/2``; Lightning divides each accumulated micro-batch's loss
  by 2, so the single process sums ``G₀/2 + G₁/2``: the same gradient, up to fp32 rounding of the sum.
- Scores: each rank taps its own unscaled ``dy``; smt sums them across ranks. The single process taps ``dy/2`` per
  micro-batch, so ``grad_sq`` scores (squares) are exactly 4 × smaller there: the same ranking, the same selection.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from helpers import TwoLayer
from lightning.pytorch import Callback, LightningModule
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

from smt.core.model import get_bank

WORLD, BATCH = 2, 4


def regression_data(samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, 10, generator=generator)
    return TensorDataset(x, torch.sin(2 * x[:, :6]))


class InterleavedSampler(Sampler[int]):
    """One process's sample order that replays ``world`` DDP ranks' batches as consecutive micro-batches.

    Each epoch's shards are the ones Lightning's sampler gives each rank (``seed`` = the ``seed_everything`` value);
    Lightning calls ``set_epoch`` on this sampler as it does on its own.
    """

    def __init__(self, samples: int, seed: int = 0, world: int = WORLD, batch: int = BATCH) -> None:
        self.samples, self.seed, self.world, self.batch, self.epoch = samples, seed, world, batch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        shards = []
        for rank in range(self.world):
            sampler = DistributedSampler(range(self.samples), self.world, rank, shuffle=True, seed=self.seed)
            sampler.set_epoch(self.epoch)
            shards.append(list(sampler))
        order = []
        for start in range(0, len(shards[0]), self.batch):
            for shard in shards:
                order += shard[start : start + self.batch]
        return iter(order)

    def __len__(self) -> int:
        return self.samples


class ShardedRegressor(LightningModule):
    """``TwoLayer`` on a fixed regression data set; AdamW over the trainable parameters.

    Args:
        samples: data set size (a multiple of ``WORLD × BATCH``).
        order: explicit sample order (the single-process reference); None = the loader's (DDP shards it).
    """

    def __init__(self, samples: int = WORLD * BATCH, order: Sampler | None = None) -> None:
        super().__init__()
        self.data, self.order = regression_data(samples), order
        self.net = TwoLayer(d_in=10, hidden=14, d_out=6)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=BATCH, sampler=self.order)


class RecordPerRank(Callback):
    """Writes ``<folder>/rank<r>.pt`` at the end of ``fit`` on every rank: weights, map, the selection and scores.

    Spawned or forked ranks cannot hand objects back to the test, so each leaves a file.
    """

    def __init__(self, folder: str | Path, smt) -> None:
        self.folder, self.smt = Path(folder), smt

    def on_train_end(self, trainer, pl_module) -> None:
        selection = self.smt.selection
        record = {
            "world_size": trainer.world_size,
            "state": {k: full(v) for k, v in pl_module.state_dict().items() if torch.is_tensor(v)},
            "map": get_bank(self.smt.target(pl_module)).map.clone(),
            "fingerprint": None if selection is None else selection.fingerprint(),
            "scores": None if selection is None or selection.scores is None else dict(selection.scores),
            "regrowth": [] if self.smt.regrower is None else list(self.smt.regrower.history),
            "pid": os.getpid(),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.folder / f"rank{trainer.global_rank}.pt")


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, unsharded copy (FSDP2 parameters are ``DTensor`` shards; gathering them is a collective)."""
    tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return tensor.detach().clone()


def load_records(folder: str | Path) -> list[dict]:
    return [torch.load(path, weights_only=False) for path in sorted(Path(folder).glob("rank*.pt"))]


def fit_regressor(folder, devices: int, smt, ckpt_path=None, checkpoint_every=None, find_unused=False) -> list[dict]:
    """One fit of ``ShardedRegressor`` with the ``smt`` callback; every rank leaves ``folder/rank<r>.pt``.

    ``devices=1`` is the single-process reference: both ranks' batches as ``WORLD`` accumulated micro-batches.
    """
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy

    seed_everything(0)
    samples = WORLD * BATCH
    module = ShardedRegressor(samples, None if devices > 1 else InterleavedSampler(samples, seed=0))
    callbacks = [smt, RecordPerRank(folder, smt)]
    if checkpoint_every:
        callbacks.append(
            ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=checkpoint_every, save_top_k=-1)
        )
    strategy = DDPStrategy(start_method="fork", find_unused_parameters=find_unused) if devices > 1 else "auto"
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=8,
        accumulate_grad_batches=1 if devices > 1 else WORLD, callbacks=callbacks,
        enable_checkpointing=bool(checkpoint_every), default_root_dir=folder,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, ckpt_path=ckpt_path)
    return load_records(folder)
