"""Delta files and merging on tiny transformers models: round trips, exactness, size, refusals."""

import copy
import json

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

from smt import Selection, SMTConfig, apply_selection, load_delta, merge_delta, save_delta, trainable_summary
from smt.core.model import get_bank, inject, select_blocks, start_scoring


def _tuned(model_factory, config, steps=3):
    torch.manual_seed(0)
    base = model_factory()
    model = copy.deepcopy(base)
    inject(model, config)
    scorers = start_scoring(model, config)
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    for s in scorers.values():
        s.commit()
    apply_selection(model, select_blocks(model, config, scorers, 1, "tiny"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return base, model, ids


CONFIGS = [
    (tiny_llama, SMTConfig(target_modules=["q_proj", "v_proj"], block_size=16, num_blocks=5)),
    (tiny_llama, SMTConfig(target_modules=["v_proj", "up_proj"], block_size=(24, 20), density=0.05)),  # ragged
    (tiny_gpt2, SMTConfig(target_modules=["c_attn", "c_fc"], block_size=16, num_blocks=4)),  # Conv1D
]


@pytest.mark.parametrize("factory, config", CONFIGS)
def test_save_load_merge_round_trips(tmp_path, factory, config):
    base, model, ids = _tuned(factory, config)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    path = save_delta(model, tmp_path / "d.safetensors", dtype="float32")
    fresh = load_delta(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    merged = merge_delta(fresh)
    assert get_bank(merged) is None and type(merged) is type(base)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
    assert set(merged.state_dict()) == set(base_state)  # a plain model again


def test_unmerge_restores_bits_and_merge_matches_forward():
    _, model, ids = _tuned(tiny_llama, CONFIGS[0][1])
    layers = [m for m in model.modules() if hasattr(m, "merge") and hasattr(m, "slot_ids")]
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with torch.no_grad():
        live = model(input_ids=ids).logits
        for layer in layers:
            layer.merge()
        assert torch.allclose(model(input_ids=ids).logits, live, atol=1e-5)
        for layer in layers:
            layer.unmerge()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if torch.is_tensor(v))


def test_delta_is_about_two_bytes_per_tuned_weight_in_bf16(tmp_path):
    config = SMTConfig(target_modules=["q_proj", "v_proj", "up_proj"], block_size=32, num_blocks=6)
    _, model, _ = _tuned(lambda: tiny_llama(hidden=128), config)
    path = save_delta(model, tmp_path / "d.safetensors")
    tuned = trainable_summary(model).tuned_weights
    assert tuned == 6 * 32 * 32
    assert 2 * tuned <= path.stat().st_size <= 2 * tuned * 1.1 + 4096


def test_state_dict_after_selection_loads_strictly_into_fresh_injection():
    config = CONFIGS[0][1]
    base, model, ids = _tuned(tiny_llama, config)
    fresh = copy.deepcopy(base)
    inject(fresh, config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert get_bank(fresh).tuning
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


# --- bad input: one line, names the field, nothing half-applied ------------------------------------


def _one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    "config_kwargs, message",
    [
        ({"target_modules": ["nope_proj"]}, "matches no module"),
        ({"target_modules": ["embed_tokens"]}, "not a Linear layer"),
        ({"target_modules": ["q_proj"], "block_size": 512}, "does not fit"),
        ({"target_modules": ["q_proj"], "block_size": 16, "num_blocks": 10_000}, "exceeds the"),
    ],
)
def test_bad_targets_and_budgets_change_nothing(config_kwargs, message):
    model = tiny_llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message) as err:
        inject(model, SMTConfig(**config_kwargs))
    _one_line(err)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert get_bank(model) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_blocks": 0}, "smt.num_blocks=0"),
        ({"num_blocks": 3, "density": 0.1}, "both set"),
        ({"density": 1.5}, "smt.density=1.5"),
        ({"criterion": "magic"}, "smt.criterion"),
        ({"target_modules": []}, "smt.target_modules"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        SMTConfig(**kwargs)
    _one_line(err)


def test_config_takes_every_registered_criterion(monkeypatch):
    """``SMTConfig.criterion`` is checked against the scoring registry itself, so a registered criterion is accepted."""
    from smt.core import scoring

    monkeypatch.setitem(scoring.CRITERIA, "mine", scoring.Criterion("mine", None, lambda acc, grid, weight: None))
    assert SMTConfig(criterion="mine").criterion == "mine"
    assert {"grad_snr", "grad_sq_xnorm"} <= set(scoring.CRITERIA)


def test_delta_for_another_model_is_refused_without_changes(tmp_path):
    _, model, _ = _tuned(tiny_llama, CONFIGS[0][1])
    path = save_delta(model, tmp_path / "d.safetensors")
    other = tiny_llama(hidden=32)
    with pytest.raises(ValueError, match="does not fit this model") as err:
        load_delta(other, path)
    _one_line(err)
    assert get_bank(other) is None and all(p.requires_grad for p in other.parameters())


@pytest.mark.parametrize("damage", ["truncate", "nan", "future", "shape"])
def test_damaged_delta_files_are_refused(tmp_path, damage):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, model, _ = _tuned(tiny_llama, CONFIGS[0][1])
    path = save_delta(model, tmp_path / "d.safetensors")
    tensors = load_file(path)
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    key = next(k for k in tensors if k.endswith("smt_delta"))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        if damage == "nan":
            tensors[key][0, 0, 0] = float("nan")
        elif damage == "future":
            meta["format_version"] = "99"
        else:
            grids = json.loads(meta["grids"])
            name = key.rsplit(".", 1)[0]
            grids[name][2] = 8
            meta["grids"] = json.dumps(grids)
        save_file(tensors, path, metadata=meta)
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="d.safetensors|newer") as err:
        load_delta(fresh, path)
    _one_line(err)
    assert get_bank(fresh) is None


def test_selection_of_wrong_size_for_existing_bank_is_refused():
    config = CONFIGS[0][1]
    _, model, _ = _tuned(tiny_llama, config)
    grids = {n: m.grid for n, m in model.named_modules() if hasattr(m, "grid")}
    small = Selection({next(iter(grids)): torch.tensor([[0, 0]])}, grids)
    with pytest.raises(ValueError, match="bank holds 5"):
        apply_selection(model, small)
