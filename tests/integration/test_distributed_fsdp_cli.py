"""``smt fit`` with ``configs/distributed/fsdp.yaml`` on 2 CPU processes: SMTLanguageModel shards itself (FSDP2),
both ranks train the same blocks and rank 0 writes a delta gathered from the shards."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smt.adapters.delta import read_delta

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.filterwarnings("ignore")
def test_smt_fit_under_fsdp2_writes_a_whole_delta(tmp_path):
    labels = {(a, b): str(a > b).lower() for a in range(12) for b in range(12)}
    rows = [{"instruction": f"Is {a} greater than {b}?", "input": "", "answer": label,
             "output": f"the correct answer is {label}"} for (a, b), label in labels.items()]  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(rows))
    command = [
        sys.executable, "-m", "smt", "fit", "--config", str(REPO / "configs/debug.yaml"),
        "--config", str(REPO / "configs/distributed/fsdp.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy.init_args.data_parallel_size=2", "--data.train_path=train.json",
        f"--trainer.default_root_dir={tmp_path / 'run'}", f"--model.delta_path={tmp_path / 'delta.safetensors'}",
        "--smt.save_selection=null", "--trainer.enable_checkpointing=false",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    selection, deltas, _ = read_delta(tmp_path / "delta.safetensors")
    assert sum(len(b) for b in selection.blocks.values()) == 4  # debug.yaml's num_blocks, whole (not a shard)
    for name, delta in deltas.items():
        assert delta.shape == (len(selection.blocks[name]), 16, 16)
        assert torch.isfinite(delta).all() and delta.abs().max() > 0  # trained, gathered from both shards
