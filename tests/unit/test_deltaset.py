"""DeltaSet: several deltas on one plain base, switched in place — exactness, fusion, bf16 bound, refusals."""

import copy
import json

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

from smt import Selection, SMTConfig, apply_selection, load_delta, merge_delta, save_delta
from smt.adapters.deltaset import DeltaSet, same_base
from smt.adapters.merge import fuse_deltas_
from smt.core.model import find_targets, get_bank, logical_weight, module_grids

LLAMA = SMTConfig(target_modules=["q_proj", "v_proj", "up_proj"], block_size=(24, 20), num_blocks=6)  # ragged
GPT2 = SMTConfig(target_modules=["c_attn", "c_fc"], block_size=16, num_blocks=5)  # Conv1D, [in, out] storage


def write_delta(base, config, path, seed, dtype="float32", base_model_id=None):
    """A delta of random blocks with random Δ on ``base`` (no training needed to test the plumbing)."""
    generator = torch.Generator().manual_seed(seed)
    grids = module_grids(find_targets(base, config.target_modules), config.block_size)
    names = list(grids)
    blocks = {name: [] for name in names}
    while sum(map(len, blocks.values())) < config.num_blocks:
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        grid = grids[name]
        block = [int(torch.randint(grid.n_row_blocks, (1,), generator=generator)),
                 int(torch.randint(grid.n_col_blocks, (1,), generator=generator))]  # fmt: skip
        if block not in blocks[name]:
            blocks[name].append(block)
    index = {n: torch.tensor(b, dtype=torch.long).reshape(-1, 2) for n, b in blocks.items()}
    model = apply_selection(copy.deepcopy(base), Selection(index, grids))
    with torch.no_grad():
        for slot in get_bank(model).slots:
            slot.copy_(0.05 * torch.randn(slot.shape, generator=generator))
    return save_delta(model, path, base_model_id, dtype)


def weights_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bits(model, expected):
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


@pytest.mark.parametrize("factory, config", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2)], ids=["llama", "gpt2"])
def test_switching_a_b_a_is_bit_exact_and_equals_merge_in_fp32(tmp_path, factory, config):
    base = factory()
    paths = {
        name: write_delta(base, config, tmp_path / f"{name}.safetensors", seed) for name, seed in [("a", 1), ("b", 2)]
    }
    merged = {name: weights_of(merge_delta(load_delta(copy.deepcopy(base), p))) for name, p in paths.items()}
    original = weights_of(base)
    deltas = DeltaSet(base)
    for name, path in paths.items():
        deltas.add(name, path)
    assert_bits(base, original)  # loading writes nothing
    for name in ["a", "b", "a", "b", "a"]:
        deltas.activate(name)
        assert_bits(base, merged[name])  # the same bits as W0 + Δ merged once
    deltas.deactivate()
    assert_bits(base, original)


def test_active_model_forward_equals_the_smt_model(tmp_path):
    base = tiny_llama()
    path = write_delta(base, LLAMA, tmp_path / "a.safetensors", 1)
    tuning = load_delta(copy.deepcopy(base), path).eval()
    deltas = DeltaSet(base.eval())
    deltas.add("a", path)
    deltas.activate("a")
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, tuning(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_fused_activation_is_the_weighted_sum_where_blocks_overlap(tmp_path):
    base = tiny_llama()
    config = SMTConfig(target_modules=["q_proj"], block_size=32, num_blocks=6)  # 8 blocks: a and b overlap
    a = write_delta(base, config, tmp_path / "a.safetensors", 1)
    b = write_delta(base, config, tmp_path / "b.safetensors", 2)
    dense = {}
    for weight, path in [(1.0, a), (0.5, b)]:
        tuned = load_delta(copy.deepcopy(base), path)
        for name, layer in tuned.named_modules():
            if hasattr(layer, "delta_weight"):
                dense[name] = dense.get(name, 0) + weight * layer.delta_weight()
    expected = {name: logical_weight(base.get_submodule(name)) + delta for name, delta in dense.items()}
    original = weights_of(base)
    fused = fuse_deltas_(copy.deepcopy(base), [a, b], [1.0, 0.5])
    deltas = DeltaSet(base)
    deltas.add("a", a)
    deltas.add("b", b)
    deltas.activate({"a": 1.0, "b": 0.5})
    for name, weight in expected.items():
        torch.testing.assert_close(logical_weight(base.get_submodule(name)), weight, rtol=0, atol=1e-6)
        assert torch.equal(logical_weight(fused.get_submodule(name)), logical_weight(base.get_submodule(name)))
    deltas.activate("b")
    deltas.deactivate()
    assert_bits(base, original)


def test_bf16_switching_is_exact_and_within_one_rounding_of_fp32(tmp_path):
    reference = tiny_llama()
    base = copy.deepcopy(reference).to(torch.bfloat16)
    reference.load_state_dict({k: v.float() for k, v in base.state_dict().items()})  # the same W0, in fp32
    paths = [write_delta(reference, LLAMA, tmp_path / f"{n}.safetensors", n, "bfloat16") for n in (1, 2)]
    original = weights_of(base)
    deltas, exact = DeltaSet(base), DeltaSet(reference)
    for name, path in zip("ab", paths):
        deltas.add(name, path)
        exact.add(name, path)
    deltas.activate("a")
    first = weights_of(base)
    deltas.activate("b")
    deltas.activate("a")
    assert_bits(base, first)  # A → B → A lands on A's bits in bf16 too
    exact.activate("a")
    for name, value in base.state_dict().items():
        wanted = reference.state_dict()[name]
        assert (value.float() - wanted).abs().le(wanted.abs() * 2.0**-8).all(), name  # ≤ one bf16 rounding
    deltas.deactivate()
    assert_bits(base, original)


def test_adding_while_active_keeps_the_active_delta_and_the_base(tmp_path):
    base = tiny_llama()
    config = SMTConfig(target_modules=["q_proj"], block_size=32, num_blocks=6)
    a = write_delta(base, config, tmp_path / "a.safetensors", 1)
    b = write_delta(base, config, tmp_path / "b.safetensors", 2)
    original = weights_of(base)
    expected_a = weights_of(merge_delta(load_delta(copy.deepcopy(base), a)))
    deltas = DeltaSet(base)
    deltas.add("a", a)
    deltas.activate("a")
    deltas.add("b", b)  # overlapping blocks: W0 must be saved, not W0 + Δa
    assert deltas.active == {"a": 1.0}
    assert_bits(base, expected_a)
    deltas.deactivate()
    assert_bits(base, original)


def test_same_base_compares_the_model_name_not_the_folder():
    assert same_base("HuggingFaceTB/SmolLM2-135M-Instruct", "artifacts/models/SmolLM2-135M-Instruct/")
    assert same_base(None, "anything") and same_base("x", "")
    assert not same_base("org/llama-7b", "org/llama-13b")


# --- bad input: one line, base untouched, the set unchanged --------------------------------------------


def damage(path, how):
    """Rewrite a delta file with one defect."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    tensors = load_file(path)
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    if how == "nan":
        key = next(k for k in tensors if k.endswith("smt_delta"))
        tensors[key][0, 0, 0] = float("nan")
    elif how == "future version":
        meta["format_version"] = "2"
    save_file(tensors, path, metadata=meta)
    return path


BAD = {
    "another base (shape)": (
        lambda tmp: write_delta(tiny_llama(hidden=48), LLAMA, tmp / "x.safetensors", 3),
        "does not fit",
    ),
    "another base (id)": (
        lambda tmp: write_delta(tiny_llama(), LLAMA, tmp / "x.safetensors", 3, base_model_id="org/other-model"),
        "was made for base 'org/other-model'",
    ),
    "future version": (
        lambda tmp: damage(write_delta(tiny_llama(), LLAMA, tmp / "x.safetensors", 3), "future version"),
        "newer",
    ),
    "nan": (lambda tmp: damage(write_delta(tiny_llama(), LLAMA, tmp / "x.safetensors", 3), "nan"), "non-finite"),
    "truncated": (
        lambda tmp: damage(write_delta(tiny_llama(), LLAMA, tmp / "x.safetensors", 3), "truncated"),
        "truncated",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_deltas_are_refused_in_one_line_with_the_base_untouched(tmp_path, case):
    make, message = BAD[case]
    base = tiny_llama()
    base.config._name_or_path = "org/tiny-model"
    good = write_delta(base, LLAMA, tmp_path / "good.safetensors", 1)
    deltas = DeltaSet(base)
    deltas.add("good", good)
    deltas.activate("good")
    active = weights_of(base)
    bad = make(tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        deltas.add("bad", bad)
    assert "\n" not in str(err.value)
    assert_bits(base, active) and list(deltas.deltas) == ["good"] and deltas.active == {"good": 1.0}
    deltas.deactivate()
    plain = weights_of(base)
    with pytest.raises(ValueError, match=message):
        fuse_deltas_(base, [good, bad])  # merge: the good file is not applied either
    assert_bits(base, plain)


def test_unknown_name_and_bad_weights_change_nothing(tmp_path):
    base = tiny_llama()
    deltas = DeltaSet(base)
    deltas.add("a", write_delta(base, LLAMA, tmp_path / "a.safetensors", 1))
    deltas.activate("a")
    active = weights_of(base)
    for bad, message in [("nope", "no delta named 'nope'"), ({"a": float("nan")}, "finite")]:
        with pytest.raises(ValueError, match=message):
            deltas.activate(bad)
        assert_bits(base, active)
    with pytest.raises(ValueError, match="already holds"):
        deltas.add("a", tmp_path / "a.safetensors")
    assert json.loads(json.dumps(deltas.active)) == {"a": 1.0}
