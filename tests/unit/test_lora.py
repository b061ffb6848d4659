"""LoRA export: truncated SVD of each module's Δ, written in PEFT's layout and loaded by ``peft.PeftModel``."""

import copy
import json

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

from smt import Selection, SMTConfig, apply_selection
from smt.adapters.lora import REPORT_NAME, dense_deltas, export_lora, low_rank
from smt.core.model import find_targets, get_bank, module_grids


def test_low_rank_is_the_truncated_svd_of_the_covered_submatrix():
    delta = torch.zeros(12, 10)
    u, v = torch.randn(4, 3), torch.randn(3, 5)
    delta[4:8, 2:7] = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v  # rank 3, inside one block
    singular = torch.linalg.svdvals(delta)
    for rank, expected in [(1, (singular[1:3].square().sum() / singular.square().sum()).sqrt()), (3, 0.0), (8, 0.0)]:
        lora_b, lora_a, error = low_rank(delta, rank)
        assert lora_b.shape == (12, rank) and lora_a.shape == (rank, 10)
        assert error == pytest.approx(float(expected), abs=1e-6)
        assert float(torch.linalg.matrix_norm(delta - lora_b @ lora_a)) == pytest.approx(
            float(expected) * float(torch.linalg.matrix_norm(delta)), abs=1e-5
        )
    assert lora_b[:4].abs().sum() == 0 and lora_a[:, :2].abs().sum() == 0  # rows/columns outside Δ stay 0
    assert low_rank(torch.zeros(6, 4), 2)[2] == 0.0


def tuning_model(factory, config, seed=0):
    """A base and a copy tuning random blocks with random Δ (what a trained checkpoint looks like)."""
    generator = torch.Generator().manual_seed(seed)
    base = factory()
    grids = module_grids(find_targets(base, config.target_modules), config.block_size)
    index = {name: torch.tensor([[0, 0], [grid.n_row_blocks - 1, 1]]) for name, grid in grids.items()}
    model = apply_selection(copy.deepcopy(base), Selection(index, grids)).eval()
    with torch.no_grad():
        for slot in get_bank(model).slots:
            slot.copy_(0.1 * torch.randn(slot.shape, generator=generator))
    return base.eval(), model


CASES = [
    (tiny_llama, SMTConfig(target_modules=["q_proj", "v_proj"], block_size=16)),
    (tiny_gpt2, SMTConfig(target_modules=["c_attn", "c_fc"], block_size=16)),  # Conv1D: fan_in_fan_out
]


@pytest.mark.parametrize("factory, config", CASES, ids=["llama", "gpt2"])
def test_full_rank_adapter_loads_in_peft_and_reproduces_the_tuned_model(tmp_path, factory, config):
    from peft import PeftModel

    base, model = tuning_model(factory, config)
    ids = torch.randint(0, 128, (2, 16))
    rank = 32  # two blocks of 16 columns: Δ has rank ≤ 32 in every module
    report = export_lora(model, tmp_path / "adapter", rank, "org/tiny", torch.float32, ids)
    assert max(report.modules.values()) < 1e-6 and report.output_error < 1e-5
    config_file = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_file["base_model_name_or_path"] == "org/tiny" and config_file["fan_in_fan_out"] == (
        factory is tiny_gpt2
    )
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_low_rank_adapter_reports_the_error_peft_actually_shows(tmp_path):
    from peft import PeftModel

    base, model = tuning_model(tiny_llama, CASES[0][1])
    ids = torch.randint(0, 128, (2, 16))
    report = export_lora(model, tmp_path / "adapter", 2, None, torch.float32, ids)
    saved = json.loads((tmp_path / "adapter" / REPORT_NAME).read_text())
    assert saved["rank"] == 2 and saved["modules"] == pytest.approx(report.modules)
    assert set(report.modules) == set(dense_deltas(model)) and min(report.modules.values()) > 0.1
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        exact, y_base = model(input_ids=ids).logits, base(input_ids=ids).logits
        lost = torch.linalg.vector_norm(peft_model(input_ids=ids).logits - exact)
    assert float(lost / torch.linalg.vector_norm(exact - y_base)) == pytest.approx(report.output_error, rel=1e-3)
    assert "| **output**" in report.table()


def test_rank_below_one_is_refused(tmp_path):
    _, model = tuning_model(tiny_llama, CASES[0][1])
    with pytest.raises(ValueError, match="at least 1"):
        export_lora(model, tmp_path / "adapter", 0)
    assert not (tmp_path / "adapter").exists()


def test_delta_file_on_its_base_converts_like_the_tuning_model(tmp_path):
    from smt import save_delta
    from smt.adapters.lora import export_lora_from_file

    base, model = tuning_model(tiny_gpt2, CASES[1][1])
    path = save_delta(model, tmp_path / "d.safetensors", "org/tiny", "float32")
    ids = torch.randint(0, 128, (2, 16))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    from_file = export_lora_from_file(base, path, tmp_path / "from_file", 4, torch.float32, ids)
    from_model = export_lora(model, tmp_path / "from_model", 4, None, torch.float32, ids)
    assert from_file.modules == pytest.approx(from_model.modules, abs=1e-6)
    assert from_file.output_error == pytest.approx(from_model.output_error, rel=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # the base is left as it was
    config = json.loads((tmp_path / "from_file" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny" and config["fan_in_fan_out"] is True
