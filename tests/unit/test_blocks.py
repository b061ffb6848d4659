"""BlockGrid geometry: ragged edges, strips, gather/scatter, tile reductions, block-size resolution."""

import pytest
import torch

from smt.kernels.blocks import BlockGrid, BlockPlan, resolve_block_size


def test_ragged_grid_counts_real_block_sizes():
    grid = BlockGrid(10, 7, 4, 3)
    assert grid.shape == (3, 3)
    assert grid.block_shape(2, 2) == (2, 1)
    assert grid.block_numels.tolist() == [[12, 12, 4], [12, 12, 4], [6, 6, 2]]
    assert int(grid.block_numels.sum()) == 70


def test_strips_are_ordinary_grids():
    rows = BlockGrid(12, 8, 1, 8)  # one output channel per block
    assert rows.shape == (12, 1) and rows.block_shape(5, 0) == (1, 8)
    assert resolve_block_size([1, -1], (12, 8), "v_proj") == (1, 8)
    assert resolve_block_size(-1, (12, 8), "v_proj") == (12, 8)


def test_gather_and_scatter_round_trip_with_ragged_tiles():
    grid = BlockGrid(10, 7, 4, 3)
    w = torch.arange(70.0).view(10, 7)
    index = torch.tensor([[2, 2], [0, 1]])
    tiles = grid.gather(w, index)
    assert tiles.shape == (2, 4, 3)
    assert tiles[0].tolist() == [[62.0, 0, 0], [69.0, 0, 0], [0, 0, 0], [0, 0, 0]]  # ragged corner, padding 0
    assert torch.equal(tiles[1], w[0:4, 3:6])
    target = torch.zeros(10, 7)
    grid.scatter_(target, index, tiles)
    grid.scatter_add_(target, index, tiles)
    expected = torch.zeros(10, 7)
    expected[8:10, 6:7] = 2 * w[8:10, 6:7]
    expected[0:4, 3:6] = 2 * w[0:4, 3:6]
    assert torch.equal(target, expected)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_flat_gather_and_scatter_match_a_loop_on_any_strides_with_padding_ignored(layout):
    """The flat-offset ops on a row-major weight, a GPT-2 ``Conv1D`` view (``[in, out]`` storage, ``.t()``) and a
    view with gaps between rows; ragged tiles carry garbage outside the weight, which must change nothing."""
    grid = BlockGrid(10, 7, 4, 3)
    index = torch.tensor([[2, 2], [0, 1], [2, 0], [1, 2]])  # the ragged corner, a full block, both ragged edges
    storage = {"contiguous": torch.zeros(10, 7), "transposed": torch.zeros(7, 10), "sliced": torch.zeros(10, 9)}
    weight = {"contiguous": lambda t: t, "transposed": lambda t: t.t(), "sliced": lambda t: t[:, 1:8]}[layout](
        storage[layout]
    )
    before = torch.randn(10, 7)
    weight.copy_(before)
    tiles = torch.randn(4, 4, 3) * 100  # garbage in the padding too
    expected_set, expected_add = before.clone(), before.clone()
    for (r, c), tile in zip(index.tolist(), tiles):
        (r0, r1), (c0, c1) = grid.row_range(r), grid.col_range(c)
        expected_set[r0:r1, c0:c1] = tile[: r1 - r0, : c1 - c0]
        expected_add[r0:r1, c0:c1] += tile[: r1 - r0, : c1 - c0]
    gathered = grid.gather(weight, index)
    assert torch.equal(gathered, grid.gather(before, index)) and torch.equal(
        gathered * ~grid.tile_mask(index), 0 * gathered
    )
    grid.scatter_(weight, index, tiles)
    assert torch.equal(weight, expected_set)
    weight.copy_(before)
    grid.scatter_add_(weight, index, tiles)
    assert torch.equal(weight, expected_add)
    if layout == "sliced":
        assert not storage[layout][:, 0].any() and not storage[layout][:, 8].any()  # the gaps are untouched


def test_reduce_tiles_hand_case():
    grid = BlockGrid(4, 4, 2, 2)
    m = torch.tensor([[1.0, -1, 2, 2], [1, 1, 2, 2], [0, 0, -3, 0], [0, 0, 0, 0]])
    assert grid.reduce_tiles(m, "sum").tolist() == [[2.0, 8.0], [0.0, -3.0]]
    assert grid.reduce_tiles(m, "abs").tolist() == [[4.0, 8.0], [0.0, 3.0]]
    assert grid.reduce_tiles(m, "sq").tolist() == [[4.0, 16.0], [0.0, 9.0]]


def test_plan_saves_only_distinct_columns():
    grid = BlockGrid(8, 10, 4, 4)  # column blocks 0..2, last is 2 wide
    plan = BlockPlan.build(grid, torch.tensor([[0, 2], [1, 2], [1, 0]]))
    assert plan.col_blocks.tolist() == [0, 2] and plan.col_slot.tolist() == [1, 1, 0]
    assert plan.saved_columns == 4 + 2


@pytest.mark.parametrize(
    "block, shape, message",
    [
        (64, (32, 128), "does not fit"),
        ((0, 4), (8, 8), "positive size"),
        ((1, 2, 3), (8, 8), "pair"),
    ],
)
def test_bad_block_sizes_are_one_line_errors(block, shape, message):
    with pytest.raises(ValueError, match=message) as err:
        resolve_block_size(block, shape, "q_proj")
    assert "\n" not in str(err.value)


def test_check_index_refuses_out_of_range_and_duplicates():
    grid = BlockGrid(8, 8, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        grid.check_index(torch.tensor([[2, 0]]), "m")
    with pytest.raises(ValueError, match="twice"):
        grid.check_index(torch.tensor([[1, 0], [1, 0]]), "m")
