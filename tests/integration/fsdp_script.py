"""FSDP2 on CPU: ``python fsdp_script.py FOLDER`` trains ``ShardedRegressor`` under ``ModelParallelStrategy``
(2 ranks, gloo) once per forward mode and leaves ``FOLDER/<mode>/rank<r>.pt`` (``test_distributed_fsdp.py`` reads them).

A script, not a pytest-run Trainer: ``ModelParallelStrategy`` launches rank 1 by re-running ``sys.argv``.
"""

import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from distributed_modules import BATCH, WORLD, RecordPerRank, ShardedRegressor  # noqa: E402
from lightning.pytorch import Trainer, seed_everything  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from smt import SparseMatrixTuning  # noqa: E402
from smt.core.config import RegrowthConfig  # noqa: E402
from smt.core.layer import SparseBlockLinear  # noqa: E402
from smt.lightning.distributed import release_process_group, shard_network  # noqa: E402

MAX_STEPS, WARMUP = 8, 3


class FullyShardedRegressor(ShardedRegressor):
    """Each tuned layer its own FSDP unit; ``net`` (which holds smt's bank) the enclosing one."""

    def configure_model(self) -> None:
        shard_network(self.net, self.device_mesh["data_parallel"], unit_types=(SparseBlockLinear,))


def run(folder: Path, forward: str) -> None:
    seed_everything(0)
    smt = SparseMatrixTuning(
        target_modules=["up", "down"], block_size=4, num_blocks=3, warmup_steps=WARMUP, forward=forward,
        submodule="net", regrowth=RegrowthConfig(every=2, accumulate=2, rate=0.5),
    )  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", devices=WORLD,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        max_steps=MAX_STEPS, callbacks=[smt, RecordPerRank(folder / forward, smt)], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(FullyShardedRegressor(WORLD * BATCH))


if __name__ == "__main__":
    for mode in ("materialize", "additive"):
        run(Path(sys.argv[1]), mode)
    release_process_group()  # gloo left to interpreter shutdown can abort a run that passed (SIGABRT)
    # The results are the rank files, already written. Leave without interpreter shutdown: C++ threads
    # torn down there still aborted a passing CI run now and then ("terminate called without an active
    # exception"), which the test reads as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
