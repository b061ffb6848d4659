"""The bank sits on the attribute that holds the targets.

``Regressor`` keeps its network in ``self.net``: the bank goes on ``module.net`` with the network's own names, so
``merge_delta(module.net)`` and ``save_delta(module.net, …)`` work.
"""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from plain_modules import QUIET, Regressor

from smt import SparseMatrixTuning, merge_delta, save_delta
from smt.adapters.delta import read_delta
from smt.core.model import bank_holder, get_bank, inject

pytestmark = pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")

WARMUP, MAX_STEPS = 3, 6


def run(root, ckpt_path=None):
    seed_everything(0)
    module = Regressor("trainable")
    smt = SparseMatrixTuning(target_modules=["net.up", "down"], block_size=4, num_blocks=3, warmup_steps=WARMUP)
    checkpoints = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = Trainer(max_steps=MAX_STEPS, callbacks=[smt, checkpoints], **(QUIET | {"enable_checkpointing": True}))
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, smt


def test_the_bank_goes_on_the_network_and_the_api_works_from_either_side(tmp_path):
    module, smt = run(tmp_path)
    assert bank_holder(module) is module.net and get_bank(module) is get_bank(module.net)
    assert set(smt.selection.grids) == {"up", "down"}  # the network's own names, not net.up
    state = torch.load(tmp_path / "step=6.ckpt", weights_only=False)["state_dict"]
    assert "net.smt_bank.map" in state and "smt_bank.map" not in state
    assert not any(p.requires_grad for n, p in module.named_parameters() if "smt_bank" not in n)
    x = torch.randn(5, 10)
    tuned = module.net(x)
    save_delta(module, tmp_path / "delta.safetensors")  # the LightningModule or its network: the same file
    assert set(read_delta(tmp_path / "delta.safetensors")[0].grids) == {"up", "down"}
    merged = merge_delta(module.net)
    assert get_bank(module) is None and torch.allclose(merged(x), tuned, atol=1e-6)


def test_a_saved_selection_goes_on_the_network(tmp_path):
    _, smt = run(tmp_path)
    path = smt.selection.save(tmp_path / "selection.safetensors")
    module = Regressor("trainable")  # target_modules left at the default (q, k, v): the selection names the modules
    reuse = SparseMatrixTuning(block_size=4, num_blocks=3, warmup_steps=0, selection_path=str(path))
    Trainer(max_steps=2, callbacks=[reuse], **QUIET).fit(module)
    assert bank_holder(module) is module.net and get_bank(module.net).tuning
    expected = {n.removeprefix("net."): b.tolist() for n, b in smt.selection.blocks.items() if len(b)}
    assert {n: b.tolist() for n, b in get_bank(module).blocks().items()} == expected


def test_several_banks_are_named_not_guessed():
    module = Regressor()
    module.other = Regressor().net
    inject(module.net, smt_config := SparseMatrixTuning(["up"], block_size=4, num_blocks=1).config)
    inject(module.other, smt_config)
    with pytest.raises(ValueError, match=r"^net, other each carry an smt bank; call this on one of them$"):
        get_bank(module)


class Wrapped(torch.nn.Module):
    """A network whose own names start with the LightningModule's attribute (``net.up`` inside ``module.net``), as
    ``model.layers…`` inside ``module.model`` for a transformers causal LM."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class WrappedRegressor(Regressor):
    def build_net(self) -> torch.nn.Module:
        return Wrapped(super().build_net())


def run_wrapped(root, ckpt_path=None, selection_path=None):
    seed_everything(0)
    module = WrappedRegressor("trainable")
    smt = SparseMatrixTuning(
        target_modules=["up", "down"], block_size=4, num_blocks=3, warmup_steps=0 if selection_path else WARMUP,
        selection_path=selection_path,
    )  # fmt: skip
    checkpoints = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = Trainer(max_steps=MAX_STEPS, callbacks=[smt, checkpoints], **(QUIET | {"enable_checkpointing": True}))
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, smt


def test_network_names_that_start_with_the_attribute_are_not_renamed(tmp_path):
    """``net.up`` inside ``module.net`` is already the network's name: a saved selection and a resume inside the
    warm-up keep it."""
    module, smt = run_wrapped(tmp_path / "reference")
    assert bank_holder(module) is module.net and set(smt.selection.grids) == {"net.up", "net.down"}
    path = smt.selection.save(tmp_path / "selection.safetensors")

    _, reuse = run_wrapped(tmp_path / "reuse", selection_path=str(path))
    assert {n: b.tolist() for n, b in reuse.selection.blocks.items()} == {
        n: b.tolist() for n, b in smt.selection.blocks.items()
    }

    resumed, _ = run_wrapped(tmp_path / "resumed", ckpt_path=tmp_path / "reference" / "step=2.ckpt")
    for slot, expected in zip(get_bank(resumed).slots, get_bank(module).slots, strict=True):
        assert torch.equal(slot, expected)
