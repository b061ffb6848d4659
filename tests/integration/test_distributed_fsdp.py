"""FSDP2 on CPU (``ModelParallelStrategy``, 2 ranks, gloo) against one process over the same global batches.

``fsdp_script.py`` runs in a subprocess (the strategy re-launches ``sys.argv`` for rank 1), once per forward mode:
each tuned layer its own FSDP unit, the network holding the bank the enclosing one (``shard_network``, in
``smt.lightning.distributed``).
Warm-up, selection and regrowth must give the single process's blocks, and bit-identical weights on both ranks.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_modules import BATCH, WORLD, InterleavedSampler, RecordPerRank, ShardedRegressor, load_records
from lightning.pytorch import Trainer, seed_everything

from smt import SparseMatrixTuning
from smt.core.config import RegrowthConfig

SCRIPT = Path(__file__).parent / "fsdp_script.py"
pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*LeafSpec")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    done = subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def single_process(folder: Path, forward: str) -> dict:
    seed_everything(0)
    smt = SparseMatrixTuning(
        target_modules=["up", "down"], block_size=4, num_blocks=3, warmup_steps=3, forward=forward,
        submodule="net", regrowth=RegrowthConfig(every=2, accumulate=2, rate=0.5),
    )  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=8, accumulate_grad_batches=WORLD,
        callbacks=[smt, RecordPerRank(folder, smt)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(ShardedRegressor(WORLD * BATCH, InterleavedSampler(WORLD * BATCH)))
    return load_records(folder)[0]


@pytest.mark.parametrize("forward", ["materialize", "additive"])
def test_fsdp2_equals_one_process_over_the_same_global_batches(fsdp, tmp_path, forward):
    rank0, rank1 = load_records(fsdp / forward)
    single = single_process(tmp_path, forward)
    assert rank0["world_size"] == WORLD and rank0["pid"] != rank1["pid"]
    assert rank0["fingerprint"] == rank1["fingerprint"] == single["fingerprint"]
    assert rank0["regrowth"] == single["regrowth"] and [e["swapped"] for e in single["regrowth"]] == [1, 0]
    assert torch.equal(rank0["map"], single["map"])
    for name, value in single["state"].items():
        assert torch.equal(rank0["state"][name], rank1["state"][name]), name
        torch.testing.assert_close(rank0["state"][name], value, rtol=0, atol=1e-6)
