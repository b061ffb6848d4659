"""The Triton ops on a CUDA device against the PyTorch reference, in bf16, fp16 and fp32, on realistic shapes.

Run with ``TRITON_INTERPRET=0 python -m pytest tests/gpu -q`` (skipped without CUDA by tests/conftest.py;
``TRITON_INTERPRET=0`` because that conftest defaults it to 1, which would interpret the kernels). The reference
runs in fp32 on the same (already rounded) inputs: half × half products are exact in fp32, so block
dW and scores differ from it only by summation order; the delta matmuls also round once into ``out``. Shapes:
square, ragged, odd blocks, full-height strips and output-channel strips (``block_size: [1, -1]``). The last test
runs a wrapped layer through warm-up, selection and a bf16-mixed step with each kernel setting.
"""

import copy
import os

import pytest
import torch
from torch import nn

from smt.core.config import SMTConfig
from smt.core.model import apply_selection, get_bank, inject, select_blocks, sparse_layers, start_scoring
from smt.kernels import backend_for, reference
from smt.kernels.blocks import BlockGrid, BlockPlan

pytestmark = pytest.mark.gpu

SHAPES = [  # (out, in, bo, bi, tokens)
    pytest.param((1024, 4096, 256, 256, 2048), id="gqa-1024x4096"),
    pytest.param((1100, 4100, 256, 256, 1000), id="ragged-256"),
    pytest.param((1030, 770, 100, 70, 333), id="odd-blocks"),
    pytest.param((512, 768, 512, 64, 512), id="full-height-strips"),
    pytest.param((300, 1030, 1, 1030, 257), id="output-channel-strips"),
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


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _layer_step(base: nn.Module, x: torch.Tensor, kernel: str, forward: str, selection=None):
    """Warm-up step (scores), selection, then one bf16-mixed tuning step of a wrapped layer: what it computed."""
    model = _Holder(copy.deepcopy(base))
    config = SMTConfig(target_modules=["proj"], block_size=256, num_blocks=5, forward=forward, kernel=kernel)
    inject(model, config)
    scorers = start_scoring(model, config)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()  # outside autocast, as Lightning's bf16-mixed runs it
    scorers["proj"].commit()
    chosen = select_blocks(model, config, scorers)
    apply_selection(model, selection or chosen)
    generator = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for slot in get_bank(model).slots:
            slot.copy_(torch.randn(slot.shape, device="cuda", generator=generator) * 0.01)
    inputs = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(inputs)
    y.float().square().mean().backward()
    slots = torch.stack([slot.grad for slot in get_bank(model).slots])
    return chosen, scorers["proj"].scores(), y, inputs.grad, slots, sparse_layers(model)["proj"].kernel


@pytest.mark.parametrize("forward", ["materialize", "additive"])
def test_layer_backward_matches_the_torch_kernels(triton_ops, forward):
    """A wrapped fp32 layer under bf16 autocast (what ``bf16-mixed`` runs), ragged grid: warm-up scores, output,
    input gradient and slot gradients agree between ``kernel="triton"`` and ``kernel="torch"``."""
    base = nn.Linear(1100, 700, device="cuda")  # 3×5 blocks of 256², the last row and column ragged
    x = torch.randn(4, 300, 1100, device="cuda")
    torch_run = _layer_step(base, x, "torch", forward)
    triton_run = _layer_step(base, x, "triton", forward, selection=torch_run[0])  # same blocks, whatever the ties
    assert (torch_run[5], triton_run[5]) == ("torch", "triton")
    _assert_close_scaled(triton_run[1], torch_run[1], 1e-3)  # warm-up scores
    # The additive forward rounds Σ x·Δᵀ into the bf16 output once (Triton) or per block (torch), so y, and through
    # it dy, may differ by a bf16 step there; the materialising forward computes the same dense GEMM either way.
    slot_rtol = 1e-3 if forward == "materialize" else 2e-2
    for got, expected, rtol in zip(triton_run[2:5], torch_run[2:5], (2e-2, 2e-2, slot_rtol)):  # y, dx, slot grads
        _assert_close_scaled(got, expected.float(), rtol)
