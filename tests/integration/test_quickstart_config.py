"""``configs/quickstart.yaml`` parses with smt's CLI parser and its numbers agree with its comments (no model load).

``test_shipped_configs.py`` checks that every config parses; this adds what only the quickstart promises: the
SmolLM2 folder ``scripts/prepare_smollm2.py`` writes, one pass over the training slice, and a block size and
budget that fit SmolLM2's q/k/v shapes at about the papers' density.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from smt.lightning.cli import main
from smt.lightning.pretrained import DEFAULT_SMOLLM2_DIR

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "quickstart.yaml"
SMOLLM2_QKV_SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576)}


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The config as ``smt fit --config configs/quickstart.yaml --print_config`` resolves it (nothing is built)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_opens_with_the_launch_command() -> None:
    head = CONFIG.read_text().splitlines()[:4]
    assert all(line.startswith("#") for line in head)
    assert any("smt fit --config configs/quickstart.yaml" in line for line in head)


def test_model_and_task(resolved: dict) -> None:
    assert Path(resolved["model"]["model"]) == DEFAULT_SMOLLM2_DIR
    assert resolved["model"]["eval_mode"] == "likelihood"
    assert resolved["model"]["dtype"] == "float32"
    assert resolved["data"]["test_paths"] and resolved["data"]["val_split"]
    assert resolved["trainer"]["accelerator"] == "cpu"


def test_one_pass_over_the_training_slice(resolved: dict) -> None:
    data, trainer = resolved["data"], resolved["trainer"]
    assert data["limit_train"] == trainer["max_steps"] * data["batch_size"]
    assert trainer["max_steps"] % trainer["val_check_interval"] == 0  # the last step is validated


def test_smt_budget_fits_smollm2(resolved: dict) -> None:
    from smt.lightning.callback import SparseMatrixTuning

    smt = resolved["smt"]
    SparseMatrixTuning(**smt)  # the callback validates its own arguments
    size = smt["block_size"]
    blocks_per_layer = sum((rows // size) * (cols // size) for rows, cols in SMOLLM2_QKV_SHAPES.values())
    assert all(rows % size == 0 and cols % size == 0 for rows, cols in SMOLLM2_QKV_SHAPES.values())
    density = smt["num_blocks"] / (30 * blocks_per_layer)  # 30 layers
    assert 0.005 <= density <= 0.015  # about the papers' 0.84 % of q, k, v
    assert smt["warmup_steps"] < resolved["trainer"]["max_steps"] // 2
