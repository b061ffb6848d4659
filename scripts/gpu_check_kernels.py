"""The kernel phase of ``scripts/gpu_check.py``: the block ops of ``smt.kernels`` against dense GEMMs.

Three tables, each row checked against ``smt.kernels.reference`` on the same inputs before it is timed:

- ``block_dw``: ``block_weight_grad`` (``dΔ_b = Σ_t g[t, rows_b]ᵀ · x[t, cols_b]``) vs the same work done by
  cuBLAS: one batched dense GEMM over the selected tiles, pre-gathered into contiguous ``[k, bo, T]`` and
  ``[k, T, bi]`` operands (what an ideal block kernel could reach), and, for scale, the rate of the full
  dense ``dyᵀx`` of the layer. TFLOP/s count ``2·T·Σ|block|``.
- ``block_scores``: fused ``block_scores(…, "sq")`` (the ``grad_sq`` warm-up criterion) vs one dense ``dyᵀx``,
  and the peak memory it allocates next to the reference, which forms ``G`` in chunks.
- ``delta_matmul``: the additive forward, ``y = x·W0ᵀ`` then ``block_delta_matmul``, vs the materialising one,
  ``materialize(W0, Δ)`` then ``x·W_effᵀ``; and the transposed product of its backward.

Timings are medians of ``repeats`` runs after ``warmups`` calls: CUDA events on GPU, wall time on CPU (where the
ops run in the Triton interpreter and the numbers mean nothing).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from smt.kernels import reference
from smt.kernels.blocks import BlockGrid, BlockPlan

Record = Callable[[str, dict], None]
"""``record(table, row)``: adds one row to a result table and writes the tables out at once."""


@dataclass(frozen=True)
class KernelSizes:
    """Shapes, densities and repeat counts of the kernel phase."""

    weights: dict[str, tuple[int, int]]
    tokens: int
    blocks: tuple[int, ...]
    densities: tuple[float, ...]
    delta_densities: tuple[float, ...]
    repeats: int
    warmups: int
    dtype: torch.dtype = torch.bfloat16
    tolerance: dict[str, float] = field(default_factory=lambda: {"dw": 1e-3, "scores": 1e-3, "delta": 2e-2})
    """Largest error accepted, relative to the reference's largest value (dW and scores sum exact products of
    bf16 numbers in fp32, so only the order differs; the delta matmuls round once into a bf16 ``out``)."""

    @classmethod
    def gpu(cls) -> KernelSizes:
        """~1B Llama layers (q/o, gate/up) and a 7B q/o, at the end-to-end phase's 4096 tokens per step."""
        weights = {"1B q/o 2048×2048": (2048, 2048), "1B gate/up 5632×2048": (5632, 2048),
                   "7B q/o 4096×4096": (4096, 4096)}  # fmt: skip
        return cls(weights, 4096, (64, 128, 256), (0.005, 0.01, 0.05), (0.01, 0.05), repeats=20, warmups=3)

    @classmethod
    def dry_run(cls) -> KernelSizes:
        """Tiny shapes (one ragged) for the Triton interpreter on CPU."""
        weights = {"tiny 64×48": (64, 48), "tiny ragged 40×36": (40, 36)}
        return cls(weights, 32, (8, 16), (0.05, 0.25), (0.25,), repeats=2, warmups=1)


def elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Time of one call of ``fn`` in ms: CUDA events on GPU (waits for the work it queued), ``perf_counter`` on CPU."""
    if device.type != "cuda":
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmups: int) -> float:
    """Median of ``repeats`` timed calls of ``fn`` in ms, after ``warmups`` untimed ones."""
    for _ in range(warmups):
        fn()
    return statistics.median(elapsed_ms(fn, device) for _ in range(repeats))


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory ``fn`` allocates at its peak beyond what is held before it, in MiB; None off GPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - held) / 2**20


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |got − expected| / max |expected|``: a long sum's error scales with its terms, not its value."""
    scale = expected.float().abs().max().clamp_min(1e-12)
    return float((got.float() - expected.float()).abs().max() / scale)


def random_plan(grid: BlockGrid, density: float, device: torch.device) -> BlockPlan:
    """``max(1, round(density · blocks))`` distinct blocks drawn uniformly (the seed is fixed by the caller)."""
    k = max(1, round(density * grid.num_blocks))
    return BlockPlan.build(grid, grid.all_blocks()[torch.randperm(grid.num_blocks)[:k]].to(device))


def gathered_tiles(dy: torch.Tensor, x: torch.Tensor, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected tiles' operands as contiguous ``[k, bo, T]`` and ``[k, T, bi]``: a dense batched GEMM's input."""
    rows, _ = plan.grid.tile_rows(plan.index[:, 0])
    cols, _ = plan.grid.tile_cols(plan.index[:, 1])
    tokens, (k, bo), bi = dy.shape[0], rows.shape, cols.shape[1]
    g = dy.index_select(1, rows.reshape(-1)).view(tokens, k, bo).permute(1, 2, 0).contiguous()
    xs = x.index_select(1, cols.reshape(-1)).view(tokens, k, bi).permute(1, 0, 2).contiguous()
    return g, xs


def block_dw_rows(sizes: KernelSizes, ops, device: torch.device, record: Record, name: str, shape) -> bool:
    """``block_dw`` rows of one weight; returns whether every row matched the reference."""
    x, dy = _inputs(sizes, shape, device)
    dense_ms = _timer(sizes, device)(partial(torch.matmul, dy.T, x))
    all_ok = True
    for block in sizes.blocks:
        for density in sizes.densities:
            plan = random_plan(BlockGrid(*shape, block, block), density, device)
            row = block_dw_row(sizes, ops, device, x, dy, plan)
            dense_tflops = 2 * sizes.tokens * shape[0] * shape[1] / dense_ms / 1e9
            row.update(dense_full_ms=dense_ms, dense_full_tflops=dense_tflops,
                       of_dense_full=row["block_tflops"] / dense_tflops)  # fmt: skip
            all_ok &= row["matches_reference"]
            record("block_dw", {"weight": name, "block": block, "density": density, **row})
    return all_ok


def block_dw_row(sizes: KernelSizes, ops, device: torch.device, x, dy, plan: BlockPlan) -> dict:
    """Block dW of one selection: checked against the reference, timed against cuBLAS on the same tiles."""
    time_it = _timer(sizes, device)
    x_cols = ops.gather_columns(x, plan)
    error = relative_error(ops.block_weight_grad(dy, x_cols, plan), reference.block_weight_grad(dy, x_cols, plan))
    tiles_ms = time_it(partial(torch.bmm, *gathered_tiles(dy, x, plan)))
    block_ms = time_it(partial(ops.block_weight_grad, dy, x_cols, plan))
    flops = 2 * sizes.tokens * plan.grid.numel_of(plan.index)
    block_tflops, tiles_tflops = flops / block_ms / 1e9, flops / tiles_ms / 1e9
    return {"k": plan.k, "tokens": sizes.tokens, "block_ms": block_ms, "tiles_bmm_ms": tiles_ms,
            "block_tflops": block_tflops, "tiles_bmm_tflops": tiles_tflops, "of_tiles_bmm": block_tflops / tiles_tflops,
            "rel_error": error, "matches_reference": error <= sizes.tolerance["dw"]}  # fmt: skip


def block_scores_rows(sizes: KernelSizes, ops, device: torch.device, record: Record, name: str, shape) -> bool:
    """``block_scores`` rows of one weight (one per block size); returns whether all matched the reference."""
    x, dy = _inputs(sizes, shape, device)
    time_it = _timer(sizes, device)
    dense_ms = time_it(partial(torch.matmul, dy.T, x))
    all_ok = True
    for block in sizes.blocks:
        grid = BlockGrid(*shape, block, block)
        fused = partial(ops.block_scores, dy, x, grid, "sq")
        unfused = partial(reference.block_scores, dy, x, grid, "sq")
        error = relative_error(fused(), unfused())
        fused_ms = time_it(fused)
        all_ok &= error <= sizes.tolerance["scores"]
        record("block_scores", {
            "weight": name, "block": block, "tokens": sizes.tokens, "reduction": "sq", "scores_ms": fused_ms,
            "dense_dw_ms": dense_ms, "of_dense_dw": fused_ms / dense_ms, "reference_ms": time_it(unfused),
            "extra_mib": peak_extra_mib(fused, device), "reference_extra_mib": peak_extra_mib(unfused, device),
            "dense_dw_mib": grid.numel * dy.element_size() / 2**20,
            "rel_error": error, "matches_reference": error <= sizes.tolerance["scores"],
        })  # fmt: skip
    return all_ok


def delta_matmul_rows(sizes: KernelSizes, ops, device: torch.device, record: Record, name: str, shape) -> bool:
    """``delta_matmul`` rows of one weight; returns whether every row matched the reference."""
    x, dy = _inputs(sizes, shape, device)
    weight = (torch.randn(*shape, device=device) * 0.02).to(sizes.dtype)
    dense_ms = _timer(sizes, device)(partial(torch.matmul, x, weight.T))
    all_ok = True
    for block in sizes.blocks:
        for density in sizes.delta_densities:
            plan = random_plan(BlockGrid(*shape, block, block), density, device)
            row = delta_matmul_row(sizes, ops, device, x, dy, weight, plan)
            all_ok &= row["matches_reference"]
            record("delta_matmul", {"weight": name, "block": block, "density": density, "dense_ms": dense_ms, **row})
    return all_ok


def delta_matmul_row(sizes: KernelSizes, ops, device: torch.device, x, dy, weight, plan: BlockPlan) -> dict:
    """The additive and the materialising forward of one selection, and the transposed product of the backward."""
    time_it = _timer(sizes, device)
    delta = (torch.randn(plan.k, *plan.grid.tile_shape, device=device) * 0.01).to(sizes.dtype)
    y, dx = x @ weight.T, torch.zeros_like(x)
    expected = reference.block_delta_matmul(x.float(), delta.float(), plan, y.float())
    error = relative_error(ops.block_delta_matmul(x, delta, plan, y.clone()), expected)
    materialized_ms = time_it(partial(materialized_forward, ops, x, weight, delta, plan))
    additive_ms = time_it(partial(additive_forward, ops, x, weight, delta, plan))
    return {"k": plan.k, "tokens": sizes.tokens,
            "materialize_ms": time_it(partial(ops.materialize, weight, delta, plan)),
            "delta_matmul_ms": time_it(partial(ops.block_delta_matmul, x, delta, plan, y)),
            "delta_matmul_t_ms": time_it(partial(ops.block_delta_matmul_t, dy, delta, plan, dx)),
            "materialize_fwd_ms": materialized_ms, "additive_fwd_ms": additive_ms,
            "additive_of_materialize": additive_ms / materialized_ms,
            "rel_error": error, "matches_reference": error <= sizes.tolerance["delta"]}  # fmt: skip


def materialized_forward(ops, x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, plan: BlockPlan):
    """``x · (W0 + scatter Δ)ᵀ``: one weight copy, one dense GEMM (the ``materialize`` forward)."""
    return x @ ops.materialize(weight, delta, plan).T


def additive_forward(ops, x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, plan: BlockPlan):
    """``x · W0ᵀ + Σ_b x[:, cols_b] · Δ_bᵀ``: the dense GEMM, then the grouped delta matmul (``additive``)."""
    return ops.block_delta_matmul(x, delta, plan, x @ weight.T)


def _inputs(sizes: KernelSizes, shape: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random layer input ``x`` ``[T, in]`` and output gradient ``dy`` ``[T, out]`` in the phase's dtype."""
    x = torch.randn(sizes.tokens, shape[1], device=device).to(sizes.dtype)
    return x, torch.randn(sizes.tokens, shape[0], device=device).to(sizes.dtype)


def _timer(sizes: KernelSizes, device: torch.device) -> Callable[[Callable[[], object]], float]:
    return lambda fn: median_ms(fn, device, sizes.repeats, sizes.warmups)


def run_kernels(sizes: KernelSizes, device: torch.device, record: Record, deadline: Callable[[], float]) -> list[str]:
    """Every kernel table, weight by weight (so a short budget loses the last weights, not a whole table), until
    ``deadline()`` (seconds left) runs out.

    Returns:
        One line per problem: a table with rows that do not match the reference, or weights skipped for time.
    """
    from smt.kernels import backend_for

    ops = backend_for("triton", device)  # refuses in one line where Triton cannot run (CPU without the interpreter)
    problems = []
    for name, shape in sizes.weights.items():
        for table, rows in (("block_dw", block_dw_rows), ("block_scores", block_scores_rows),
                            ("delta_matmul", delta_matmul_rows)):  # fmt: skip
            if deadline() <= 0:
                problems.append(f"{table}: {name} skipped, the phase's time budget ran out")
                continue
            torch.manual_seed(0)
            if not rows(sizes, ops, device, record, name, shape):
                problems.append(f"{table}: {name} does not match the reference (see rel_error)")
    return problems
