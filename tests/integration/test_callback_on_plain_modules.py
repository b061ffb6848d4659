"""``SparseMatrixTuning`` on LightningModules that are not smt's: warm-up, optimizer contents, frozen weights.

The modules (``plain_modules.py``) bring their own ``training_step`` and ``configure_optimizers`` (AdamW
over ``self.parameters()``, or over a filtered list), as a user's project would.
"""

import pytest
import torch
from lightning.pytorch import Trainer
from plain_modules import (
    QUIET,
    LazyRegressor,
    Probe,
    Regressor,
    TinyCausalLM,
    assert_only_selected_blocks_changed,
    parameters_snapshot,
)

from smt import SparseMatrixTuning
from smt.core.model import get_bank

WARMUP = 3


def fit(module, smt: SparseMatrixTuning, max_steps: int = 7) -> tuple[Trainer, Probe]:
    probe = Probe(smt)
    trainer = Trainer(max_steps=max_steps, callbacks=[probe, smt], **QUIET)
    trainer.fit(module)
    return trainer, probe


def regressor_callback(**overrides) -> SparseMatrixTuning:
    args = {"target_modules": ["up", "down"], "block_size": 4, "num_blocks": 3, "warmup_steps": WARMUP}
    return SparseMatrixTuning(**(args | overrides))


def optimizer_params(trainer: Trainer) -> list[torch.nn.Parameter]:
    return [p for group in trainer.optimizers[0].param_groups for p in group["params"]]


def assert_warmup_changed_nothing(probe: Probe, warmup: int, trainable: tuple[torch.nn.Parameter, ...] = ()) -> None:
    """During the warm-up no parameter moved and the optimizer held no state, up to the step that selected."""
    assert [r["phase"] for r in probe.before_step[:warmup]] == ["warmup"] * warmup
    assert [r["optimizer_state"] for r in probe.before_step[:warmup]] == [0] * warmup  # incl. right before selection
    for record in probe.after_step[:warmup]:
        assert record["optimizer_state"] == 0
        for name, value in record["params"].items():
            assert torch.equal(value, probe.initial[name]), f"{name} moved at step {record['step']} of the warm-up"
    assert [r["phase"] for r in probe.after_step[: warmup + 1]] == ["warmup"] * (warmup - 1) + ["tuning"] * 2
    slots = [name for name in probe.initial if "smt_bank.slots." in name]
    assert slots and all(not probe.after_step[warmup - 1]["params"][n].any() for n in slots)  # Δ = 0 at selection
    assert any(probe.after_step[warmup]["params"][n].any() for n in slots)  # the first tuning step trains them


@pytest.mark.parametrize("optimizer_params_kind", ["all", "trainable"])
def test_plain_module_trains_only_selected_blocks(optimizer_params_kind):
    module = Regressor(optimizer_params_kind)
    before_fit = parameters_snapshot(module)
    smt = regressor_callback()
    trainer, probe = fit(module, smt)

    assert_warmup_changed_nothing(probe, WARMUP)
    bank = get_bank(module)
    slots = {id(p) for p in bank.slots}
    in_optimizer = optimizer_params(trainer)
    if optimizer_params_kind == "trainable":
        assert {id(p) for p in in_optimizer} == slots and len(in_optimizer) == len(slots) == 3
    else:  # self.parameters(): frozen weights are in the optimizer, but none requires grad or gets state
        assert {id(p) for p in in_optimizer if p.requires_grad} == slots
    assert {id(p) for p in trainer.optimizers[0].state} == slots
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 3 * 4 * 4
    assert smt.selection is not None and smt.selection.num_blocks == 3 and smt.steps_scored == WARMUP
    assert_only_selected_blocks_changed(module, before_fit)


def test_trainable_modules_train_beside_the_blocks_but_not_during_warmup():
    module = Regressor("trainable")
    before_fit = parameters_snapshot(module)
    smt = regressor_callback(trainable_modules=r"net\.up\.bias")
    trainer, probe = fit(module, smt)

    assert_warmup_changed_nothing(probe, WARMUP)
    expected = {id(p) for p in get_bank(module).slots} | {id(module.net.up.bias)}
    assert {id(p) for p in optimizer_params(trainer)} == expected
    assert {id(p) for p in trainer.optimizers[0].state} == expected
    assert_only_selected_blocks_changed(module, before_fit, trained=("net.up.bias",))


def test_gpt2_conv1d_module_with_filtered_optimizer():
    torch.manual_seed(0)
    module = TinyCausalLM()
    before_fit = parameters_snapshot(module)
    smt = SparseMatrixTuning(target_modules=["c_attn"], block_size=16, num_blocks=4, warmup_steps=2)
    trainer, probe = fit(module, smt, max_steps=5)

    assert_warmup_changed_nothing(probe, 2)
    assert {id(p) for p in optimizer_params(trainer)} == {id(p) for p in get_bank(module).slots}
    # the bank sits on self.model (the GPT-2 network): names are the transformers model's own
    assert set(smt.selection.blocks) <= {f"transformer.h.{i}.attn.c_attn" for i in range(2)}
    assert_only_selected_blocks_changed(module, before_fit)


def test_layers_built_in_configure_model_get_the_bank():
    module = LazyRegressor("trainable")
    assert module.net is None  # nothing to wrap at the callback's setup: injection must wait for configure_model
    smt = regressor_callback()
    trainer, probe = fit(module, smt)

    bank = get_bank(module)
    assert bank is not None and bank.tuning
    assert {id(p) for p in optimizer_params(trainer)} == {id(p) for p in bank.slots}
    assert type(module.net.up).__name__ == "SparseBlockLinear"
    assert_warmup_changed_nothing(probe, WARMUP)
    assert_only_selected_blocks_changed(module, probe.initial)
