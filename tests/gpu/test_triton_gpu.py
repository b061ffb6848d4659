"""The Triton ops on a CUDA device against the PyTorch reference, in bf16, fp16 and fp32, on realistic shapes.

Run with ``TRITON_INTERPRET=0 python -m pytest tests/gpu -q`` (skipped without CUDA by tests/conftest.py;
``TRITON_INTERPRET=0`` because that conftest defaults it to 1, which would interpret the kernels). The reference
runs in fp32 on the same (already rounded) inputs: half × half products are exact in fp32, so block
dW and scores differ from it only by summation order; the delta matmuls also round once into ``out``.
"""

import os

import pytest
import torch

from smt.kernels import backend_for, reference
from smt.kernels.blocks import BlockGrid, BlockPlan

pytestmark = pytest.mark.gpu

SHAPES = [  # (out, in, bo, bi, tokens)
    pytest.param((1024, 4096, 256, 256, 2048), id="gqa-1024x4096"),
    pytest.param((1100, 4100, 256, 256, 1000), id="ragged-256"),
    pytest.param((1030, 770, 100, 70, 333), id="odd-blocks"),
    pytest.param((512, 768, 512, 64, 512), id="full-height-strips"),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
RTOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}
"""Relative tolerance of the delta matmuls (``out`` is rounded into its dtype); dW and scores use 1e-4."""


@pytest.fixture
def triton_ops():
    """The Triton backend, compiled: tests/conftest.py defaults TRITON_INTERPRET to 1, which would interpret it."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would interpret the kernels; run `TRITON_INTERPRET=0 pytest tests/gpu`")
    return backend_for("triton", "cuda")


def _case(shape, dtype, k):
    out_features, in_features, bo, bi, tokens = shape
    grid = BlockGrid(out_features, in_features, bo, bi)
    k = min(k, grid.num_blocks)
    plan = BlockPlan.build(grid, grid.all_blocks()[torch.randperm(grid.num_blocks)[:k]].cuda())
    x = torch.randn(tokens, in_features, device="cuda").to(dtype)
    dy = torch.randn(tokens, out_features, device="cuda").to(dtype)
    return grid, plan, x, dy


def _assert_close_scaled(got, expected, rtol):
    """``|got - expected| ≤ rtol · max|expected|``: a long sum's error scales with its terms, not its value."""
    scale = expected.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=rtol * scale.item())


def test_auto_dispatch_picks_triton_on_cuda():
    pytest.importorskip("triton")
    assert backend_for("auto", "cuda").name == "triton"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 12])
def test_block_weight_grad_matches_reference(triton_ops, shape, dtype, k):
    grid, plan, x, dy = _case(shape, dtype, k)
    x_cols = reference.gather_columns(x, plan)
    got = triton_ops.block_weight_grad(dy, x_cols, plan)
    assert got.dtype == torch.float32
    _assert_close_scaled(got, reference.block_weight_grad(dy.float(), x_cols.float(), plan), 1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["abs", "sq", "sum"])
def test_block_scores_match_reference(triton_ops, shape, dtype, reduction):
    grid, _, x, dy = _case(shape, dtype, 1)
    got = triton_ops.block_scores(dy, x, grid, reduction)
    expected = reference.block_scores(dy.float(), x.float(), grid, reduction)
    _assert_close_scaled(got, expected, 1e-4 if reduction != "sum" else 1e-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_matmuls_match_reference(triton_ops, shape, dtype):
    grid, plan, x, dy = _case(shape, dtype, 12)
    delta = (torch.randn(plan.k, *grid.tile_shape, device="cuda") * 0.1).to(dtype)
    poisoned = torch.where(grid.tile_mask(plan.index), delta, torch.full_like(delta, float("nan")))
    clean = delta * grid.tile_mask(plan.index)
    cases = (("block_delta_matmul", x, grid.out_features), ("block_delta_matmul_t", dy, grid.in_features))
    for op, inp, width in cases:
        garbage = torch.randn(inp.shape[0], width, device="cuda").to(dtype)
        expected = getattr(reference, op)(inp.float(), clean.float(), plan, garbage.to(torch.float32, copy=True))
        got = getattr(triton_ops, op)(inp, poisoned, plan, garbage.clone())
        assert got.dtype == dtype
        _assert_close_scaled(got, expected, RTOL[dtype])


def test_expanded_grad_output_is_accepted(triton_ops):
    grid, plan, x, _ = _case((1024, 4096, 256, 256, 2048), torch.bfloat16, 4)
    dy = torch.randn(1, grid.out_features, device="cuda").to(torch.bfloat16).expand(x.shape[0], -1)
    x_cols = reference.gather_columns(x, plan)
    got = triton_ops.block_weight_grad(dy, x_cols, plan)
    _assert_close_scaled(got, reference.block_weight_grad(dy.float(), x_cols.float(), plan), 1e-4)


def test_fused_scores_allocate_no_weight_sized_buffer(triton_ops):
    grid, _, x, dy = _case((4096, 4096, 256, 256, 2048), torch.bfloat16, 1)
    triton_ops.block_scores(dy, x, grid, "abs")  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    triton_ops.block_scores(dy, x, grid, "abs")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - held
    assert extra < grid.numel * 2 / 64, f"fused scores allocated {extra} bytes for a {grid.numel}-weight matrix"
