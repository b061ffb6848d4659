"""Fused block scores: a per-block reduction of ``G = gᵀx`` that never writes ``G``.

For the full ``n_rb × n_cb`` grid of a weight with blocks ``(bo, bi)``::

    S[r, c] = Σ_{i ∈ rows_r, j ∈ cols_c} f(G[i, j]),    G = Σ_t g[t, :]ᵀ x[t, :]

with ``f(v) = |v|`` (``"abs"``), ``v²`` (``"sq"``) or ``v`` (``"sum"``). One program computes one
``(m × n)`` tile of ``G`` in registers over all tokens (tiles never straddle two blocks; ragged parts
are masked to 0), reduces it to a scalar, and writes that partial into ``[tiles_per_block, n_rb,
n_cb]``; a second pass sums the few partials of each block. The only allocation is that small
buffer, never a ``[out, in]`` matrix.

``"sum"`` factorises as ``S = (g·1_rows)ᵀ (x·1_cols)``, which costs ``O(T·(out + in))`` instead of a
GEMM, so ``block_scores`` takes that path for it; the kernel still implements it (``fused_block_scores``).

Launch grid: ``(n_rb·⌈bo/m⌉ · n_cb·⌈bi/n⌉,)``, in grouped order (``GROUP_M`` row tiles share column
tiles) for L2 reuse.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smt.kernels.blocks import BlockGrid
from smt.kernels.triton.tiling import dot_mode, gemm_tiles, mma

REDUCTIONS = {"sum": 0, "abs": 1, "sq": 2}
GROUP_M = 8


@triton.jit
def _grouped_tile(pid, n_m, n_n, GROUP: tl.constexpr):
    """Map a flat program id to ``(tile_m, tile_n)`` so that ``GROUP`` consecutive row tiles share column tiles."""
    per_group = GROUP * n_n
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_m - first_m, GROUP)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _block_scores_kernel(
    dy_ptr, x_ptr, partial_ptr,
    tokens, out_features, in_features, stride_dy, stride_x, n_row_blocks, n_col_blocks,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, REDUCTION: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr, GROUP: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tiles_m: tl.constexpr = (BLOCK_ROWS + TILE_M - 1) // TILE_M
    tiles_n: tl.constexpr = (BLOCK_COLS + TILE_N - 1) // TILE_N
    pid_m, pid_n = _grouped_tile(tl.program_id(0), n_row_blocks * tiles_m, n_col_blocks * tiles_n, GROUP)
    row_block, col_block = pid_m // tiles_m, pid_n // tiles_n
    local_r = (pid_m % tiles_m) * TILE_M + tl.arange(0, TILE_M)
    local_c = (pid_n % tiles_n) * TILE_N + tl.arange(0, TILE_N)
    rows, cols = row_block * BLOCK_ROWS + local_r, col_block * BLOCK_COLS + local_c
    row_ok = (local_r < BLOCK_ROWS) & (rows < out_features)
    col_ok = (local_c < BLOCK_COLS) & (cols < in_features)
    acc = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
    for t0 in range(0, tokens, TILE_K):
        t = (t0 + tl.arange(0, TILE_K)).to(tl.int64)
        t_ok = t < tokens
        g = tl.load(dy_ptr + t[None, :] * stride_dy + rows[:, None], mask=row_ok[:, None] & t_ok[None, :], other=0.0)
        x = tl.load(x_ptr + t[:, None] * stride_x + cols[None, :], mask=t_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(g, x, acc, CAST_FP32, PRECISION)
    if REDUCTION == 1:
        acc = tl.abs(acc)
    elif REDUCTION == 2:
        acc = acc * acc
    tile_in_block = (pid_m % tiles_m) * tiles_n + pid_n % tiles_n
    slot = (tile_in_block * n_row_blocks + row_block) * n_col_blocks + col_block
    tl.store(partial_ptr + slot, tl.sum(tl.sum(acc, 1), 0))


def fused_block_scores(dy: torch.Tensor, x: torch.Tensor, grid: BlockGrid, reduction: str) -> torch.Tensor:
    """The kernel for any of ``"sum" | "abs" | "sq"``: ``[n_rb, n_cb]`` fp32 (see the module docstring)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"block score reduction {reduction!r} is not one of {tuple(REDUCTIONS)}")
    dy, x = dy.contiguous(), x.contiguous()
    bo, bi = grid.tile_shape
    tiles = gemm_tiles(bo, bi, dy.dtype, dy.device)
    tiles_m, tiles_n = triton.cdiv(bo, tiles.m), triton.cdiv(bi, tiles.n)
    partial = torch.empty(tiles_m * tiles_n, *grid.shape, dtype=torch.float32, device=dy.device)
    programs = grid.num_blocks * tiles_m * tiles_n
    _block_scores_kernel[(programs,)](
        dy, x, partial,
        dy.shape[0], grid.out_features, grid.in_features, dy.stride(0), x.stride(0),
        grid.n_row_blocks, grid.n_col_blocks,
        BLOCK_ROWS=bo, BLOCK_COLS=bi, REDUCTION=REDUCTIONS[reduction],
        TILE_M=tiles.m, TILE_N=tiles.n, TILE_K=tiles.depth, GROUP=GROUP_M,
        **dot_mode(dy, x), **tiles.launch_options,
    )  # fmt: skip
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)


def block_scores(dy: torch.Tensor, x: torch.Tensor, grid: BlockGrid, reduction: str) -> torch.Tensor:
    """Per-block reduction of ``G = gᵀx`` without forming ``G``: ``[n_rb, n_cb]`` fp32.

    Args:
        dy: output gradient ``[T, out_features]`` (any strides; made contiguous).
        x: layer input ``[T, in_features]``.
        grid: the weight's block grid.
        reduction: ``"abs"`` (``Σ|G|``), ``"sq"`` (``Σ G²``) or ``"sum"`` (signed ``Σ G``).

    Returns:
        fp32 ``[n_rb, n_cb]``.

    Raises:
        ValueError: an unknown ``reduction``.
    """
    if reduction == "sum":
        return _signed_sums(dy, x, grid)
    return fused_block_scores(dy, x, grid, reduction)


def _signed_sums(dy: torch.Tensor, x: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """``S = (g·1_rows)ᵀ (x·1_cols)``: segment sums of ``g`` and ``x`` over each block's rows and columns."""
    g_rows = _segment_sums(dy, grid.block_rows, grid.n_row_blocks)
    x_cols = _segment_sums(x, grid.block_cols, grid.n_col_blocks)
    return g_rows.T @ x_cols


def _segment_sums(m: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """fp32 sums of ``m`` ``[T, n]`` over consecutive column segments of ``size``: ``[T, count]``, last may be short."""
    padded = torch.nn.functional.pad(m, (0, count * size - m.shape[1]))
    return padded.view(m.shape[0], count, size).sum(2, dtype=torch.float32)
