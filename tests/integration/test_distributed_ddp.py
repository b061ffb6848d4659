"""Two DDP ranks on CPU (gloo, forked workers) against one process over the same global batches.

One DDP run (8 optimizer steps: warm-up 3, then tuning with regrowth every 2 steps over 2 scored steps) writes
a checkpoint every 2 steps. It must:
- select the same blocks on both ranks and end with bit-identical weights on both ranks, with DDP's default
  ``find_unused_parameters=False`` (a slot without a gradient would make DDP raise);
- equal a single process that sees both ranks' batches as two accumulated micro-batches (why that is the same
  global batch, and why its ``grad_sq`` scores are exactly 4× smaller: ``distributed_modules.py``);
- resume from step 2 (inside the warm-up: partial scores of *both* ranks must survive) and from step 4 (inside a
  regrowth scoring window) to the uninterrupted run's weights and map.

``ddp_fork`` rather than ``ddp``: plain ``ddp`` re-launches ``sys.argv``, which inside pytest re-runs the session.
"""

import pytest
import torch
from distributed_modules import BATCH, WORLD, ShardedRegressor, fit_regressor
from lightning.pytorch import seed_everything

from smt import SparseMatrixTuning
from smt.core.config import RegrowthConfig

pytestmark = pytest.mark.filterwarnings(
    "ignore:You're resuming from a checkpoint that ended before the epoch ended",
    "ignore:.*does not have many workers",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)",
)

WARMUP, SAMPLES = 3, WORLD * BATCH  # 8 steps, one batch per rank and epoch: resume replays nothing


def run(folder, devices: int, ckpt_path=None, checkpoint_every: int | None = None):
    """One fit (8 steps, warm-up 3, regrowth); every rank leaves ``folder/rank<r>.pt``. ``devices=1``: the reference."""
    smt = SparseMatrixTuning(
        target_modules=["up", "down"], block_size=4, num_blocks=3, warmup_steps=WARMUP,
        regrowth=RegrowthConfig(every=2, accumulate=2, rate=0.5),
    )  # fmt: skip
    return fit_regressor(folder, devices, smt, ckpt_path, checkpoint_every)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    return folder, run(folder, devices=WORLD, checkpoint_every=2)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    (record,) = run(tmp_path_factory.mktemp("single"), devices=1)
    return record


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_ranks_select_the_same_blocks_and_end_identical(ddp):
    _, (rank0, rank1) = ddp
    assert rank0["world_size"] == rank1["world_size"] == WORLD and rank0["pid"] != rank1["pid"]
    assert rank0["fingerprint"] == rank1["fingerprint"]
    assert torch.equal(rank0["map"], rank1["map"])
    assert max_difference(rank0["state"], rank1["state"]) == 0.0
    assert [e["swapped"] for e in rank0["regrowth"]] == [1, 0]  # regrowth moved a block, identically on both


def test_ddp_equals_one_process_over_the_same_global_batches(ddp, single):
    _, (rank0, _) = ddp
    assert rank0["fingerprint"] == single["fingerprint"]
    for name, scores in single["scores"].items():  # summed over ranks = WORLD² × the single process's (dy/2)²
        torch.testing.assert_close(rank0["scores"][name], WORLD**2 * scores, rtol=1e-6, atol=0)
    assert rank0["regrowth"] == single["regrowth"]
    assert torch.equal(rank0["map"], single["map"])
    assert max_difference(rank0["state"], single["state"]) <= 1e-6


def test_frozen_weights_are_untouched_and_slots_trained(ddp, single):
    _, (rank0, _) = ddp
    seed_everything(0)
    initial = ShardedRegressor(SAMPLES).state_dict()
    for name in ("net.up.weight", "net.up.bias", "net.down.weight"):
        assert torch.equal(rank0["state"][name], initial[name])
    assert any(rank0["state"][f"net.smt_bank.slots.{i}"].abs().sum() > 0 for i in range(3))  # bank on self.net


@pytest.mark.parametrize("step", [2, 4], ids=["inside-warmup", "inside-regrowth-window"])
def test_resume_under_ddp_matches_the_uninterrupted_run(ddp, tmp_path, step):
    folder, (reference, _) = ddp
    resumed = run(tmp_path, devices=WORLD, ckpt_path=folder / f"step={step}.ckpt")
    for record in resumed:
        if step < WARMUP:  # the selection is made after resuming, from both ranks' partial scores
            assert record["fingerprint"] == reference["fingerprint"]
            for name, scores in reference["scores"].items():
                torch.testing.assert_close(record["scores"][name], scores, rtol=1e-6, atol=0)
        assert record["regrowth"] == reference["regrowth"]
        assert torch.equal(record["map"], reference["map"])
        assert max_difference(record["state"], reference["state"]) == 0.0
