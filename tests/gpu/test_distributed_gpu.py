"""DDP and FSDP2 on CUDA (NCCL): the CPU tests' scripts on GPUs. Skipped without CUDA; with one GPU they run one
rank, which still goes through NCCL's collectives and the CUDA kernels (several GPUs: set SMT_GPUS).

    pytest -m gpu tests/gpu/test_distributed_gpu.py
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
GPUS = int(os.environ.get("SMT_GPUS", "1"))

SCRIPT = """
import sys; sys.path[:0] = [{integration!r}, {tests!r}]
from distributed_modules import RecordPerRank, ShardedRegressor
from fsdp_script import FullyShardedRegressor
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from smt import SparseMatrixTuning
from smt.core.config import RegrowthConfig
seed_everything(0)
kind, devices = sys.argv[1], int(sys.argv[2])
fsdp = kind == "fsdp"
smt = SparseMatrixTuning(target_modules=["up", "down"], block_size=4, num_blocks=3, warmup_steps=3,
                         submodule="net" if fsdp else None, regrowth=RegrowthConfig(every=2, accumulate=2, rate=0.5))
strategy = ModelParallelStrategy(devices, 1) if fsdp else DDPStrategy(process_group_backend="nccl")
module = FullyShardedRegressor(8 * devices) if fsdp else ShardedRegressor(8 * devices)
callbacks = [smt, RecordPerRank(sys.argv[3], smt)]
Trainer(accelerator="gpu", devices=devices, strategy=strategy, max_steps=8, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_checkpointing=False).fit(module)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_ranks_agree_on_gpus(tmp_path, kind):
    here = Path(__file__).resolve().parent
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(integration=str(here.parent / "integration"), tests=str(here.parent)))
    done = subprocess.run([sys.executable, str(script), kind, str(GPUS), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [torch.load(p, weights_only=False) for p in sorted(tmp_path.glob("rank*.pt"))]
    assert len(records) == GPUS and len({r["fingerprint"] for r in records}) == 1
    assert len(records[0]["regrowth"]) == 2  # both regrowth events ran (their swaps depend on the data per rank)
    for record in records[1:]:
        for name, value in records[0]["state"].items():
            assert torch.equal(record["state"][name].cpu(), value.cpu()), name
