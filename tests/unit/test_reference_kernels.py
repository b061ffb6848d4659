"""The PyTorch reference kernels against dense autograd math on small, hand-sized cases."""

import pytest
import torch

from smt.kernels import backend_for, reference
from smt.kernels.blocks import BlockGrid, BlockPlan

SHAPES = [  # (out, in, bo, bi): square, ragged both ways, non-square blocks, row and column strips
    (8, 8, 4, 4),
    (10, 7, 4, 3),
    (9, 12, 9, 4),
    (12, 5, 2, 5),
]


def _random_index(grid: BlockGrid, k: int) -> torch.Tensor:
    return grid.all_blocks()[torch.randperm(grid.num_blocks)[:k]]


def _dense(tiles: torch.Tensor, grid: BlockGrid, index: torch.Tensor) -> torch.Tensor:
    return grid.scatter_add_(torch.zeros(grid.out_features, grid.in_features, dtype=tiles.dtype), index, tiles)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3])
def test_block_weight_grad_equals_dense_blocks(shape, k):
    grid = BlockGrid(*shape)
    index = _random_index(grid, min(k, grid.num_blocks))
    plan = BlockPlan.build(grid, index)
    x, g = torch.randn(13, grid.in_features), torch.randn(13, grid.out_features)
    x_cols = reference.gather_columns(x, plan)
    assert x_cols.shape[1] == plan.saved_columns
    got = reference.block_weight_grad(g, x_cols, plan)
    assert torch.allclose(got, grid.gather(g.T @ x, index), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["sum", "abs", "sq"])
def test_block_scores_match_full_gradient(shape, reduction):
    grid = BlockGrid(*shape)
    x, g = torch.randn(11, grid.in_features), torch.randn(11, grid.out_features)
    expected = grid.reduce_tiles(g.T @ x, reduction)
    assert torch.allclose(reference.block_scores(g, x, grid, reduction), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_delta_matmuls_and_materialize_equal_dense(shape):
    grid = BlockGrid(*shape)
    index = _random_index(grid, min(2, grid.num_blocks))
    plan = BlockPlan.build(grid, index)
    delta = torch.randn(index.shape[0], *grid.tile_shape) * grid.tile_mask(index)
    dense = _dense(delta, grid, index)
    x, g = torch.randn(5, grid.in_features), torch.randn(5, grid.out_features)
    y = reference.block_delta_matmul(x, delta, plan, torch.zeros(5, grid.out_features))
    assert torch.allclose(y, x @ dense.T, atol=1e-5)
    dx = reference.block_delta_matmul_t(g, delta, plan, torch.zeros(5, grid.in_features))
    assert torch.allclose(dx, g @ dense, atol=1e-5)
    w0 = torch.randn(grid.out_features, grid.in_features)
    assert torch.equal(reference.materialize(w0, delta, plan), w0 + dense)
    assert torch.equal(reference.materialize(w0.T.contiguous().T, delta, plan), w0 + dense)


def test_backend_dispatch_and_forced_triton_error():
    assert backend_for("torch", "cpu").name == "torch"
    assert backend_for("auto", "cpu").name == "torch"
    with pytest.raises(ValueError, match="smt.kernel="):
        backend_for("cuda-magic", "cpu")


def test_reductions_stay_fp32_inside_an_autocast_region():
    grid = BlockGrid(64, 96, 32, 32)
    plan = BlockPlan.build(grid, grid.all_blocks()[:3])
    x, g = torch.randn(40, 96), torch.randn(40, 64)
    x_cols = reference.gather_columns(x, plan)
    plain = reference.block_weight_grad(g, x_cols, plan), reference.block_scores(g, x, grid, "sq")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a backward run inside autocast sees this region
        cast = reference.block_weight_grad(g, x_cols, plan), reference.block_scores(g, x, grid, "sq")
    for a, b in zip(plain, cast):
        assert b.dtype == torch.float32 and torch.equal(a, b)
