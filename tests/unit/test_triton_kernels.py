"""The Triton ops against the PyTorch reference, in fp32 under ``TRITON_INTERPRET=1`` (set by tests/conftest.py).

Inputs are fresh random draws; buffers an op adds into start as random garbage (never zeros), and
the ragged corners of Δ tiles hold NaN, which the kernels must never read. Shapes are tiny because
the interpreter is slow; the interpreter uses 16-wide tiles, so blocks wider than 16 span several
tiles and odd block shapes exercise every mask.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from smt.kernels import backend_for, reference
from smt.kernels.blocks import BlockGrid, BlockPlan

SHAPES = [  # (out, in, bo, bi)
    pytest.param((8, 8, 4, 4), id="square"),
    pytest.param((10, 7, 4, 3), id="ragged-both"),
    pytest.param((40, 33, 20, 18), id="multi-tile-ragged"),
    pytest.param((37, 40, 37, 16), id="full-height-strips"),
    pytest.param((12, 5, 2, 5), id="full-width-strips"),
]
TOKENS = 13  # not a multiple of the 16-token tile
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ops():
    """The Triton op modules; skips where Triton cannot run on this machine."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("these tests run Triton on CPU tensors: they need TRITON_INTERPRET=1 set before triton is imported")

    # By module path: the package re-exports the op ``block_scores``, which shadows its submodule's name.
    def module(name):
        return importlib.import_module(f"smt.kernels.triton.{name}")

    return SimpleNamespace(grad=module("block_grad"), scores=module("block_scores"), delta=module("delta_matmul"))


def _plan(grid: BlockGrid, k: int) -> BlockPlan:
    k = min(k, grid.num_blocks)
    return BlockPlan.build(grid, grid.all_blocks()[torch.randperm(grid.num_blocks)[:k]])


def _tiles_with_nan_corners(plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Δ tiles: (clean, with NaN where a ragged tile lies outside the weight)."""
    mask = plan.grid.tile_mask(plan.index)
    clean = torch.randn(plan.k, *plan.grid.tile_shape) * mask
    return clean, torch.where(mask, clean, torch.full_like(clean, float("nan")))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 1000])
def test_block_weight_grad_matches_reference(ops, shape, k):
    grid = BlockGrid(*shape)
    plan = _plan(grid, k)
    x, dy = torch.randn(TOKENS, grid.in_features), torch.randn(TOKENS, grid.out_features)
    x_cols = reference.gather_columns(x, plan)
    got = ops.grad.block_weight_grad(dy, x_cols, plan)
    expected = reference.block_weight_grad(dy, x_cols, plan)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not got[~grid.tile_mask(plan.index)].any(), "ragged parts of dΔ must be exactly 0"


@pytest.mark.parametrize("splits", [2, 3])
def test_block_weight_grad_split_k_matches_reference(ops, splits):
    grid = BlockGrid(40, 33, 20, 18)
    plan = _plan(grid, 2)
    x, dy = torch.randn(40, grid.in_features), torch.randn(40, grid.out_features)
    x_cols = reference.gather_columns(x, plan)
    got = ops.grad.block_weight_grad_split(dy, x_cols, plan, splits)
    torch.testing.assert_close(got, reference.block_weight_grad(dy, x_cols, plan), rtol=1e-5, atol=1e-5)


def test_block_ops_accept_expanded_and_strided_inputs(ops):
    grid = BlockGrid(10, 7, 4, 3)
    plan = _plan(grid, 3)
    dy = torch.randn(1, grid.out_features).expand(TOKENS, -1)  # stride 0, as autograd can hand over
    x = torch.randn(grid.in_features, TOKENS).T  # column-major
    x_cols = reference.gather_columns(x, plan)
    got = ops.grad.block_weight_grad(dy, x_cols.T.contiguous().T, plan)
    torch.testing.assert_close(got, reference.block_weight_grad(dy, x_cols, plan), rtol=1e-5, atol=1e-5)
    scores = ops.scores.block_scores(dy, x, grid, "abs")
    torch.testing.assert_close(scores, reference.block_scores(dy, x, grid, "abs"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["abs", "sq", "sum"])
def test_block_scores_match_reference(ops, shape, reduction):
    grid = BlockGrid(*shape)
    x, dy = torch.randn(TOKENS, grid.in_features), torch.randn(TOKENS, grid.out_features)
    expected = reference.block_scores(dy, x, grid, reduction)
    for got in (ops.scores.block_scores(dy, x, grid, reduction), ops.scores.fused_block_scores(dy, x, grid, reduction)):
        assert got.dtype == torch.float32 and got.shape == grid.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_block_scores_reject_unknown_reduction(ops):
    grid = BlockGrid(8, 8, 4, 4)
    with pytest.raises(ValueError, match="'max'"):
        ops.scores.fused_block_scores(torch.randn(4, 8), torch.randn(4, 8), grid, "max")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 1000])
def test_delta_matmuls_match_reference(ops, shape, k):
    grid = BlockGrid(*shape)
    plan = _plan(grid, k)
    clean, poisoned = _tiles_with_nan_corners(plan)
    x, dy = torch.randn(TOKENS, grid.in_features), torch.randn(TOKENS, grid.out_features)
    for op, inp, width in (
        ("block_delta_matmul", x, grid.out_features),
        ("block_delta_matmul_t", dy, grid.in_features),
    ):
        garbage = torch.randn(TOKENS, width) * 100
        expected = getattr(reference, op)(inp, clean, plan, garbage.clone())
        out = garbage.clone()
        assert getattr(ops.delta, op)(inp, poisoned, plan, out) is out
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_delta_matmul_adds_into_strided_out_in_place(ops):
    grid = BlockGrid(40, 33, 20, 18)
    plan = _plan(grid, 3)
    clean, poisoned = _tiles_with_nan_corners(plan)
    x = torch.randn(TOKENS, grid.in_features)
    out = torch.randn(grid.out_features, TOKENS).T  # column-major view: must be written through
    expected = reference.block_delta_matmul(x, clean, plan, out.clone())
    ops.delta.block_delta_matmul(x, poisoned, plan, out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_empty_selection_is_a_no_op(ops):
    grid = BlockGrid(10, 7, 4, 3)
    plan = BlockPlan.build(grid, torch.zeros(0, 2, dtype=torch.int64))
    x, dy = torch.randn(TOKENS, grid.in_features), torch.randn(TOKENS, grid.out_features)
    assert ops.grad.block_weight_grad(dy, reference.gather_columns(x, plan), plan).shape == (0, 4, 3)
    out = torch.randn(TOKENS, grid.out_features)
    assert torch.equal(ops.delta.block_delta_matmul(x, torch.empty(0, 4, 3), plan, out.clone()), out)


def test_backend_for_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from smt.kernels import triton as triton_ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = backend_for("triton", "cpu")
    assert backend.name == "triton"
    assert backend.block_weight_grad is triton_ops.block_weight_grad
    assert backend.gather_columns is reference.gather_columns
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="kernel='triton' cannot run on cpu"):
        backend_for("triton", "cpu")
    assert backend_for("auto", "cpu").name == "torch"


def test_bench_script_small_cpu_mode_prints_a_table():
    script = REPO / "scripts" / "bench_kernels.py"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--small"], capture_output=True, text=True, env=env, timeout=60
    )
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3 and "block dW" in lines[0], run.stdout
    refused = subprocess.run([sys.executable, str(script), "--device", "cpu"], capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(ops, dtype):
    """Half operands (upcast before ``tl.dot`` here): dW and scores come back fp32, ``out`` keeps its dtype."""
    grid = BlockGrid(40, 33, 20, 18)
    plan = _plan(grid, 3)
    x, dy = torch.randn(TOKENS, grid.in_features, dtype=dtype), torch.randn(TOKENS, grid.out_features, dtype=dtype)
    x_cols = reference.gather_columns(x, plan)
    got = ops.grad.block_weight_grad(dy, x_cols, plan)
    torch.testing.assert_close(got, reference.block_weight_grad(dy.float(), x_cols.float(), plan), rtol=1e-5, atol=1e-5)
    scores = ops.scores.block_scores(dy, x, grid, "sq")
    torch.testing.assert_close(scores, reference.block_scores(dy.float(), x.float(), grid, "sq"), rtol=1e-5, atol=1e-4)
    clean, _ = _tiles_with_nan_corners(plan)
    garbage = torch.randn(TOKENS, grid.out_features, dtype=dtype) * 10
    out = ops.delta.block_delta_matmul(x, clean.to(dtype), plan, garbage.clone())
    expected = reference.block_delta_matmul(x.float(), clean.to(dtype).float(), plan, garbage.float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=2e-2)


COMPILE_FOR_GPUS = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from smt.kernels.triton.block_grad import _block_grad_kernel
from smt.kernels.triton.block_scores import _block_scores_kernel
from smt.kernels.triton.delta_matmul import _grouped_delta_kernel

ALIGNED = {"tokens", "out_features", "in_features", "stride_dy", "stride_x", "tokens_per_split", "out_extent",
           "in_extent", "stride_inp", "stride_out_t", "stride_delta_b", "stride_delta_o"}
KERNELS = [  # kernel, pointer arguments (None: the operand dtype), constexprs
    (_block_grad_kernel, {"dy_ptr": None, "x_ptr": None, "out_ptr": "*fp32", "index_ptr": "*i64",
                          "col_slot_ptr": "*i64"}, dict(BLOCK_ROWS=256, BLOCK_COLS=100)),
    (_block_scores_kernel, {"dy_ptr": None, "x_ptr": None, "partial_ptr": "*fp32"},
     dict(BLOCK_ROWS=256, BLOCK_COLS=100, REDUCTION=1, GROUP=8)),
    (_grouped_delta_kernel, {"inp_ptr": None, "delta_ptr": None, "out_ptr": None, "index_ptr": "*i64",
                             "order_ptr": "*i64", "group_start_ptr": "*i64"},
     dict(OUT_BLOCK=256, IN_BLOCK=100, IN_COORD=1)),
]
TILES = {"TILE_M": 128, "TILE_N": 128, "TILE_K": 64, "TILE_T": 128, "TILE_O": 128, "TILE_I": 64}
found = {}
for arch, dtype in ((90, "bf16"), (80, "fp32")):
    for fn, pointers, constexprs in KERNELS:
        consts = {k: v for k, v in {**constexprs, **TILES}.items() if k in fn.arg_names}
        consts.update(CAST_FP32=dtype == "fp32", PRECISION="tf32")
        signature = {n: "i32" for n in fn.arg_names}
        signature.update({n: kind or f"*{dtype}" for n, kind in pointers.items()})
        signature.update({n: "constexpr" for n in consts})
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in pointers or n in ALIGNED}
        source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
        ptx = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8, "num_stages": 3})
        found[f"{fn.__name__}/sm{arch}/{dtype}"] = [f for f in ("wgmma", "mma.sync") if f in ptx.asm["ptx"]]
json.dump(found, sys.stdout)
"""


def test_kernels_compile_for_hopper_and_ampere_without_a_gpu(tmp_path):
    """Lower every kernel to PTX/cubin (bf16 on sm_90, fp32 on sm_80) with the wheel's ptxas: catches GPU-only
    compile errors here, and checks that ``tl.dot`` lands on tensor cores (wgmma / mma.sync)."""
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPUS], capture_output=True, text=True, env=env, timeout=120)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("this triton build has no ptxas")
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert len(found) == 6
    for name, features in found.items():
        assert features == (["wgmma"] if "sm90" in name else ["mma.sync"]), (name, features)
