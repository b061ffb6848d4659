"""Each setting is declared once (``SMTConfig``, extended by ``CallbackConfig``) and checked there, before any model."""

from dataclasses import fields

import pytest

from smt import SMTConfig, SparseMatrixTuning
from smt.core.scoring import CRITERIA, gradient_free_criteria
from smt.core.selection import lora_equal_blocks, lora_weights
from smt.kernels.blocks import BlockGrid
from smt.lightning.callback_config import CallbackConfig


def test_the_callback_takes_every_config_field_as_its_argument():
    """A field added to SMTConfig reaches the callback (and ``--smt.<field>``, see test_cli_help) with no other edit."""
    values = {"block_size": 8, "num_blocks": 3, "warmup_steps": 2, "seed": 7, "submodule": "net"}
    callback = SparseMatrixTuning(["up"], **values)
    assert {f.name for f in fields(SMTConfig)} <= {f.name for f in fields(CallbackConfig)}
    assert callback.config.target_modules == ["up"] and all(getattr(callback.config, k) == v for k, v in values.items())
    with pytest.raises(TypeError, match="no_such_field"):
        SparseMatrixTuning(no_such_field=1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"block_size": (4, 0)}, r"^smt.block_size=\(4, 0\) has cols=0; use a positive size or -1 \(full\)$"),
        ({"block_size": (1, 2, 3)}, "must be an int or a pair"),
        ({"budget_lora_rank": 8, "num_blocks": 4}, "budget of its own"),
        ({"budget_lora_rank": 0}, "must be ≥ 1"),
        ({"criterion": "nope"}, "is not one of"),
        ({"warmup_steps": 0, "criterion": "grad_sq"}, "needs a selection_path or a gradient-free criterion"),
        ({"warmup_updates": "dense"}, r"^smt.warmup_updates='dense' is not one of none, full$"),
        ({"warmup_updates": "full", "warmup_steps": 0, "criterion": "random"}, "needs smt.warmup_steps ≥ 1"),
        ({"warmup_lr": 1e-5}, "needs smt.warmup_updates=full"),
        ({"warmup_updates": "full", "warmup_lr": 0.0}, "a value > 0"),
        ({"warmup_updates": "full", "selection_path": "s.safetensors"}, "which smt.selection_path skips"),
    ],
)
def test_shape_independent_checks_run_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        CallbackConfig(**settings)


def test_gradient_free_criteria_come_from_the_registry():
    assert set(gradient_free_criteria()) == {name for name, c in CRITERIA.items() if not c.needs_gradients}
    assert {"random", "weight_abs_mean"} <= set(gradient_free_criteria()) and "grad_sq" not in gradient_free_criteria()
    assert CallbackConfig(warmup_steps=0, criterion="random").warmup_steps == 0


def test_lora_equal_budget_counts_r_times_out_plus_in():
    grids = {"q": BlockGrid(576, 576, 64, 64), "k": BlockGrid(192, 576, 64, 64), "v": BlockGrid(192, 576, 64, 64)}
    assert lora_weights(grids, 8) == 8 * (1152 + 768 + 768) == 21504
    assert lora_equal_blocks(grids, 8) == round(21504 / 64**2) == 5
    strips = {"q": BlockGrid(576, 576, 1, 576)}  # whole output rows: one block is one row of 576 weights
    assert lora_equal_blocks(strips, 8) == 16


def test_budget_lora_rank_sizes_the_bank():
    from torch import nn

    from smt import inject

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64))
    bank = inject(model, SMTConfig(target_modules=["0", "1"], block_size=8, budget_lora_rank=2))
    assert bank.capacity == round(2 * (96 + 96) / 64) == 6
