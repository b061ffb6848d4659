"""SHiRA export: a block delta as a PEFT SHiRA adapter, entry for entry.

``PeftModel.from_pretrained`` must load what smt writes and reproduce the tuned model's logits within 1e-5, with
ragged blocks, modules tuned unevenly (padding to one r), and from a delta file as from a model.
"""

import copy
import json

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

from smt import Selection, SMTConfig, apply_selection, save_delta
from smt.adapters.shira import export_shira, export_shira_from_file, shira_rank
from smt.core.model import find_targets, get_bank, module_grids

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def tuned_model(factory, config, blocks_of):
    """A base and a copy tuning the blocks ``blocks_of(grid)`` of each target with random Δ."""
    generator = torch.Generator().manual_seed(0)
    base = factory().eval()
    grids = module_grids(find_targets(base, config.target_modules), config.block_size)
    index = {name: torch.tensor(blocks_of(grid)) for name, grid in grids.items()}
    model = apply_selection(copy.deepcopy(base), Selection(index, grids)).eval()
    with torch.no_grad():
        for slot in get_bank(model).slots:
            slot.copy_(0.1 * torch.randn(slot.shape, generator=generator))
    return base, model


def peft_logits(base, folder) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()(input_ids=IDS).logits


def test_peft_loads_the_adapter_and_reproduces_the_tuned_logits(tmp_path):
    # 24-wide blocks on 64-wide weights: ragged last row/column; q gets 3 blocks, v 1 (padding evens them out)
    config = SMTConfig(target_modules=["q_proj", "v_proj"], block_size=24)
    base, model = tuned_model(
        tiny_llama, config, lambda g: [[0, 0], [2, 2], [1, 2]] if g.out_features == 64 else [[1, 0]]
    )
    with torch.no_grad():
        expected, untuned = model(input_ids=IDS).logits, base(input_ids=IDS).logits
    report = export_shira(model, tmp_path / "shira", "org/tiny", torch.float32)

    assert (peft_logits(base, tmp_path / "shira") - expected).abs().max() < 1e-5
    assert (untuned - expected).abs().max() > 1e-2  # the delta matters
    q_entries = 24 * 24 + 16 * 16 + 24 * 16  # q is 64×64: blocks (0,0), (2,2) (16×16 ragged), (1,2) (24×16)
    v_entries = 8 * 24  # v is 32×64: block (1,0) keeps 8 of its 24 rows
    assert report.tuned == 2 * (q_entries + v_entries)  # two layers
    assert report.rank == max(-(-q_entries // (64 + 64)), -(-v_entries // (32 + 64))) == 10
    assert report.padding == 2 * (10 * 128 - q_entries + 10 * 96 - v_entries)
    saved = json.loads((tmp_path / "shira" / "adapter_config.json").read_text())
    assert (
        saved["peft_type"] == "SHIRA" and saved["r"] == report.rank and saved["base_model_name_or_path"] == "org/tiny"
    )


def test_a_delta_file_converts_without_the_model(tmp_path):
    config = SMTConfig(target_modules=["q_proj"], block_size=16)
    base, model = tuned_model(tiny_llama, config, lambda g: [[0, 1], [3, 3]])
    save_delta(model, tmp_path / "delta.safetensors", dtype="bfloat16")
    report = export_shira_from_file(tmp_path / "delta.safetensors", tmp_path / "shira", torch.bfloat16)
    from smt import load_delta

    bf16_tuned = load_delta(copy.deepcopy(base), tmp_path / "delta.safetensors").eval()
    with torch.no_grad():
        expected = bf16_tuned(input_ids=IDS).logits
    assert report.padding == 2 * (report.rank * 128 - 2 * 256)
    assert (peft_logits(base, tmp_path / "shira") - expected).abs().max() < 1e-5  # the same bf16 Δ, exactly


def test_what_shira_cannot_hold_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^smt export --peft: SHiRA gives every module .* r=3, more than b's 4×4"):
        shira_rank({"a": (600, 100, 100), "b": (1, 4, 4)})
    config = SMTConfig(target_modules=["c_attn"], block_size=16)
    _, gpt2 = tuned_model(tiny_gpt2, config, lambda g: [[0, 0]])
    with pytest.raises(ValueError, match=r"Conv1D; SHiRA adapts nn.Linear only \(use --lora\)$"):
        export_shira(gpt2, tmp_path / "shira")
