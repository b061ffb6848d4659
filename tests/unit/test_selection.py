"""Choosing blocks: hand-checkable cases, budgets, limits, ties, pools, save/load, heatmap."""

import pytest
import torch

from smt import SMTConfig
from smt.core.model import plan_pools
from smt.core.selection import Pool, Selection, budget_blocks, select_top_k
from smt.kernels.blocks import BlockGrid

GRID = BlockGrid(16, 16, 4, 4)  # a 4×4-block weight


def _scores(*values):
    return torch.tensor(values, dtype=torch.float32).view(4, 4)


def test_global_top_k_hand_case():
    scores = {"a": _scores(*range(16)), "b": _scores(*[0.5] * 15, 100.0)}
    chosen = select_top_k(scores, {"a": GRID, "b": GRID}, [Pool("all", ("a", "b"), 3)])
    assert chosen["b"].tolist() == [[3, 3]]  # 100
    assert chosen["a"].tolist() == [[3, 2], [3, 3]]  # 15 and 14


def test_ties_break_by_module_name_then_row_major():
    scores = {"b": torch.ones(4, 4), "a": torch.ones(4, 4)}
    chosen = select_top_k(scores, {"a": GRID, "b": GRID}, [Pool("all", ("b", "a"), 5)])
    assert chosen["a"].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]
    assert chosen["b"].numel() == 0
    again = select_top_k(scores, {"a": GRID, "b": GRID}, [Pool("all", ("a", "b"), 5)])
    assert all(torch.equal(chosen[n], again[n]) for n in chosen)


def test_per_module_limits():
    scores = {"a": _scores(*range(16)), "b": _scores(*range(16)) * 0.01}
    grids = {"a": GRID, "b": GRID}
    capped = select_top_k(scores, grids, [Pool("all", ("a", "b"), 4)], max_per_module=2)
    assert capped["a"].shape[0] == 2 and capped["b"].tolist() == [[3, 2], [3, 3]]
    floored = select_top_k(scores, grids, [Pool("all", ("a", "b"), 4)], min_per_module=1)
    assert floored["b"].tolist() == [[3, 3]] and floored["a"].shape[0] == 3
    with pytest.raises(ValueError, match="max_blocks_per_module"):
        select_top_k(scores, grids, [Pool("all", ("a", "b"), 5)], max_per_module=2)
    with pytest.raises(ValueError, match="min_blocks_per_module"):
        select_top_k(scores, grids, [Pool("all", ("a", "b"), 1)], min_per_module=1)


def test_density_budget_counts_ragged_blocks_by_real_size():
    ragged = BlockGrid(10, 10, 4, 4)  # 9 blocks, 100 weights: mean block 100/9
    assert budget_blocks({"m": ragged}, None, 0.25, "smt") == round(0.25 * 9)
    assert budget_blocks({"m": GRID}, None, 0.125, "smt") == 2
    assert budget_blocks({"m": GRID}, 5, None, "smt") == 5
    with pytest.raises(ValueError, match="exceeds the 16 eligible blocks"):
        budget_blocks({"m": GRID}, 17, None, "smt")
    chosen = Selection({"m": torch.tensor([[2, 2]])}, {"m": ragged})
    assert chosen.num_params == 4 and chosen.density == pytest.approx(0.04)


def test_pools_give_attention_and_mlp_their_own_budgets():
    grids = {"l.0.attn.q_proj": GRID, "l.0.attn.v_proj": GRID, "l.0.mlp.up_proj": GRID}
    config = SMTConfig(
        pools={"attention": {"pattern": r".*attn.*", "num_blocks": 2}, "mlp": {"pattern": ["up_proj"], "density": 0.25}}
    )
    pools = plan_pools(config, grids)
    assert [(p.name, p.k, len(p.modules)) for p in pools] == [("attention", 2, 2), ("mlp", 4, 1)]
    scores = {n: torch.rand(4, 4) for n in grids}
    chosen = select_top_k(scores, grids, pools)
    assert chosen["l.0.mlp.up_proj"].shape[0] == 4
    assert chosen["l.0.attn.q_proj"].shape[0] + chosen["l.0.attn.v_proj"].shape[0] == 2
    with pytest.raises(ValueError, match="matches no pool"):
        plan_pools(SMTConfig(pools={"attention": {"pattern": ".*attn.*", "num_blocks": 1}}), grids)


def test_nonfinite_scores_never_select():
    scores = {"a": _scores(*range(15), float("nan"))}
    with pytest.raises(ValueError, match="not finite"):
        select_top_k(scores, {"a": GRID}, [Pool("all", ("a",), 2)])


def test_save_load_round_trip_and_heatmap(tmp_path):
    grids = {
        "model.layers.0.self_attn.v_proj": GRID,
        "model.layers.1.self_attn.v_proj": GRID,
        "model.layers.0.self_attn.q_proj": BlockGrid(8, 16, 4, 4),
    }
    blocks = {
        "model.layers.0.self_attn.v_proj": torch.tensor([[3, 1], [0, 2]]),
        "model.layers.0.self_attn.q_proj": torch.tensor([[1, 3]]),
    }
    scores = {n: torch.rand(g.shape) for n, g in grids.items()}
    selection = Selection(blocks, grids, "grad_sq", {"density": 0.01}, 100, "tiny-llama", scores)
    path = selection.save(tmp_path / "sel.safetensors")
    loaded = Selection.load(path)
    assert loaded.fingerprint() == selection.fingerprint()
    assert loaded.grids == selection.grids and loaded.model_id == "tiny-llama" and loaded.warmup_steps == 100
    assert loaded.blocks["model.layers.0.self_attn.v_proj"].tolist() == [[0, 2], [3, 1]]  # row-major
    assert all(torch.equal(loaded.scores[n], scores[n]) for n in scores)
    png = selection.heatmap(tmp_path / "sel.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_selection_files_are_refused(tmp_path, damage):
    path = Selection({"m": torch.tensor([[0, 0]])}, {"m": GRID}).save(tmp_path / "s.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-9])
    elif damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    else:
        path.unlink()
    with pytest.raises(ValueError, match="s.safetensors") as err:
        Selection.load(path)
    assert "\n" not in str(err.value)


def test_proportional_allocation_spreads_the_budget_by_module_size():
    small = BlockGrid(16, 16, 4, 4)  # 16 blocks, 256 weights
    large = BlockGrid(16, 48, 4, 4)  # 48 blocks, 768 weights
    scores = {"a": _scores(*range(16)) * 100, "b": torch.arange(48.0).view(4, 12)}
    grids = {"a": small, "b": large}
    greedy = select_top_k(scores, grids, [Pool("all", ("a", "b"), 8)])
    assert greedy["a"].shape[0] == 8 and greedy["b"].numel() == 0  # the scores alone put everything in "a"
    spread = select_top_k(scores, grids, [Pool("all", ("a", "b"), 8)], allocation="proportional")
    assert spread["a"].tolist() == [[3, 2], [3, 3]]  # 8 · 256/1024 = 2: a's best two
    assert spread["b"].tolist() == [[3, 6], [3, 7], [3, 8], [3, 9], [3, 10], [3, 11]]  # 6: b's best six


def test_proportional_quotas_sum_to_k_under_limits():
    from smt.core.selection import proportional_quotas

    grids = [BlockGrid(16, 16, 4, 4), BlockGrid(16, 16, 4, 4), BlockGrid(16, 48, 4, 4)]
    assert proportional_quotas(grids, 10, [0, 0, 0], None) == [2, 2, 6]
    assert proportional_quotas(grids, 7, [0, 0, 0], None) == [2, 1, 4]  # 1.4, 1.4, 4.2: the largest remainder first
    assert sum(proportional_quotas(grids, 11, [0, 0, 0], None)) == 11
    assert proportional_quotas(grids, 10, [0, 0, 0], 3) == [3, 3, 3]  # the cap leaves room for 9 only
    assert proportional_quotas(grids, 40, [0, 0, 0], 14) == [13, 13, 14]  # 10, 10, 30: the capped excess re-shared
    assert proportional_quotas(grids, 10, [3, 0, 0], None) == [3, 2, 5]  # a minimum is kept, the rest re-shared
    assert proportional_quotas(grids, 64, [0, 0, 0], None) == [13, 13, 38]  # 12.8, 12.8, 38.4


def test_allocation_is_checked_before_any_model_loads():
    with pytest.raises(ValueError, match="smt.allocation='spread' is not one of global, proportional"):
        SMTConfig(allocation="spread")
