"""``smt.warmup_updates=full`` under DDP: two CPU ranks (gloo, forked) against one process over the same batches.

The dense weights train for the warm-up's 3 steps and then stop getting gradients, which DDP accepts only with
``find_unused_parameters=True`` (plain DDP is refused in one line). Both ranks end identical, equal to one process
that sees both ranks' batches as accumulated micro-batches, and resume from inside the warm-up (step 2) and after it
(step 4) to the uninterrupted run's weights.
"""

from types import SimpleNamespace

import pytest
import torch
from distributed_modules import BATCH, WORLD, ShardedRegressor, fit_regressor
from lightning.pytorch import seed_everything
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from smt import SparseMatrixTuning
from smt.lightning.full_warmup import check_full_warmup

pytestmark = pytest.mark.filterwarnings(
    "ignore:You're resuming from a checkpoint that ended before the epoch ended",
    "ignore:.*does not have many workers",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

WARMUP, SAMPLES = 3, WORLD * BATCH
DENSE = ("net.up.weight", "net.up.bias", "net.down.weight")


def run(folder, devices: int, ckpt_path=None, checkpoint_every: int | None = None):
    """One fit with a full warm-up (DDP with find_unused_parameters); every rank leaves ``folder/rank<r>.pt``."""
    smt = SparseMatrixTuning(
        target_modules=["up", "down"], block_size=4, num_blocks=3, warmup_steps=WARMUP, warmup_updates="full"
    )
    return fit_regressor(folder, devices, smt, ckpt_path, checkpoint_every, find_unused=True)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_full_warmup")
    return folder, run(folder, devices=WORLD, checkpoint_every=2)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_ranks_end_identical_and_equal_one_process(ddp, tmp_path):
    _, (rank0, rank1) = ddp
    assert rank0["fingerprint"] == rank1["fingerprint"] and max_difference(rank0["state"], rank1["state"]) == 0.0
    (single,) = run(tmp_path, devices=1)
    assert rank0["fingerprint"] == single["fingerprint"]
    assert max_difference(rank0["state"], single["state"]) <= 1e-5
    seed_everything(0)
    initial = ShardedRegressor(SAMPLES).state_dict()
    assert all(not torch.equal(rank0["state"][name], initial[name]) for name in DENSE)  # the warm-up trained them


@pytest.mark.parametrize("step", [2, 4], ids=["inside-warmup", "after-warmup"])
def test_resume_under_ddp_matches_the_uninterrupted_run(ddp, tmp_path, step):
    folder, (reference, _) = ddp
    for record in run(tmp_path, devices=WORLD, ckpt_path=folder / f"step={step}.ckpt"):
        if step < WARMUP:  # the selection is made after resuming, from both ranks' partial scores
            assert record["fingerprint"] == reference["fingerprint"]
        assert torch.equal(record["map"], reference["map"])
        assert max_difference(record["state"], reference["state"]) == 0.0


@pytest.mark.parametrize(
    ("strategy", "hparams", "message"),
    [
        (DDPStrategy(find_unused_parameters=False), {}, "use strategy=ddp_find_unused_parameters_true$"),
        (DeepSpeedStrategy.__new__(DeepSpeedStrategy), {}, "not supported under DeepSpeedStrategy"),
        (DDPStrategy(find_unused_parameters=True), {"slim_checkpoints": True, "model": "m"}, "slim_checkpoints=false$"),
    ],
)
def test_what_a_full_warmup_cannot_run_under_is_refused_in_one_line(strategy, hparams, message):
    with pytest.raises(ValueError, match=message) as caught:
        check_full_warmup(SimpleNamespace(strategy=strategy), SimpleNamespace(hparams=hparams), torch.nn.Linear(4, 4))
    assert "\n" not in str(caught.value)
