"""Block weight gradient as one grouped GEMM over the selected blocks.

For the ``k`` selected blocks ``b = (r_b, c_b)`` of a weight with blocks ``(bo, bi)``::

    dΔ_b = Σ_t g[t, rows_b]ᵀ · x[t, cols_b]          fp32 [k, bo, bi], ragged parts 0

``x`` is the saved-column copy (``reference.gather_columns``): block ``b`` reads its columns at
offset ``col_slot[b] · bi``. One program computes one ``(m × n)`` tile of one block, reducing over
a range of tokens. When there are too few tiles to fill the GPU (small ``k``), the tokens are split
into ``S`` ranges (split-K): each program writes its partial tile into ``[S, k, bo, bi]`` and a
second pass sums over ``S``, which keeps the result deterministic (no atomics).

Launch grid: ``(k · ⌈bo/m⌉ · ⌈bi/n⌉, S)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smt.kernels.blocks import BlockPlan
from smt.kernels.triton.tiling import dot_mode, gemm_tiles, mma

TARGET_PROGRAMS = 264
"""Programs wanted in flight before split-K stops helping: two waves on a 132-SM H100."""
MIN_TOKENS_PER_SPLIT = 128
"""Each split reduces at least this many tokens, so partial sums stay cheap relative to the GEMM."""


@triton.jit
def _block_grad_kernel(
    dy_ptr, x_ptr, out_ptr, index_ptr, col_slot_ptr,
    tokens, num_blocks, out_features, in_features, stride_dy, stride_x, tokens_per_split,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tiles_n: tl.constexpr = (BLOCK_COLS + TILE_N - 1) // TILE_N
    tiles_per_block: tl.constexpr = ((BLOCK_ROWS + TILE_M - 1) // TILE_M) * tiles_n
    block = tl.program_id(0) // tiles_per_block
    tile = tl.program_id(0) % tiles_per_block
    split = tl.program_id(1)
    local_r = (tile // tiles_n) * TILE_M + tl.arange(0, TILE_M)
    local_c = (tile % tiles_n) * TILE_N + tl.arange(0, TILE_N)
    rows = tl.load(index_ptr + 2 * block) * BLOCK_ROWS + local_r
    row_ok = (local_r < BLOCK_ROWS) & (rows < out_features)
    col_ok = (local_c < BLOCK_COLS) & (tl.load(index_ptr + 2 * block + 1) * BLOCK_COLS + local_c < in_features)
    x_cols = tl.load(col_slot_ptr + block) * BLOCK_COLS + local_c
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, tokens)
    acc = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
    for t0 in range(start, end, TILE_K):
        t = (t0 + tl.arange(0, TILE_K)).to(tl.int64)
        t_ok = t < end
        g = tl.load(dy_ptr + t[None, :] * stride_dy + rows[:, None], mask=row_ok[:, None] & t_ok[None, :], other=0.0)
        x = tl.load(x_ptr + t[:, None] * stride_x + x_cols[None, :], mask=t_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(g, x, acc, CAST_FP32, PRECISION)
    tile_base = (split * num_blocks + block).to(tl.int64) * (BLOCK_ROWS * BLOCK_COLS)
    out = out_ptr + tile_base + local_r[:, None] * BLOCK_COLS + local_c[None, :]
    tl.store(out, acc, mask=(local_r < BLOCK_ROWS)[:, None] & (local_c < BLOCK_COLS)[None, :])


def split_count(programs: int, tokens: int, device: torch.device) -> int:
    """How many token ranges to split the reduction into so that about ``TARGET_PROGRAMS`` run at once."""
    if device.type != "cuda" or programs >= TARGET_PROGRAMS:
        return 1
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, programs), tokens // MIN_TOKENS_PER_SPLIT))


def block_weight_grad_split(dy: torch.Tensor, x_cols: torch.Tensor, plan: BlockPlan, splits: int) -> torch.Tensor:
    """``block_weight_grad`` with an explicit number of token splits (``splits ≥ 1``)."""
    grid, k = plan.grid, plan.k
    bo, bi = grid.tile_shape
    dy, x_cols = dy.contiguous(), x_cols.contiguous()
    tokens = dy.shape[0]
    partial = torch.empty(splits, k, bo, bi, dtype=torch.float32, device=dy.device)
    if k == 0:
        return partial.sum(0)
    tiles = gemm_tiles(bo, bi, dy.dtype, dy.device)
    per_split = triton.cdiv(triton.cdiv(tokens, splits), tiles.depth) * tiles.depth
    launch = (k * triton.cdiv(bo, tiles.m) * triton.cdiv(bi, tiles.n), splits)
    _block_grad_kernel[launch](
        dy, x_cols, partial, plan.index.contiguous(), plan.col_slot.contiguous(),
        tokens, k, grid.out_features, grid.in_features, dy.stride(0), x_cols.stride(0), max(per_split, 1),
        BLOCK_ROWS=bo, BLOCK_COLS=bi, TILE_M=tiles.m, TILE_N=tiles.n, TILE_K=tiles.depth,
        **dot_mode(dy, x_cols), **tiles.launch_options,
    )  # fmt: skip
    return partial[0] if splits == 1 else partial.sum(0)


def block_weight_grad(dy: torch.Tensor, x_cols: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """``dΔ_b = g[:, rows_b]ᵀ · x[:, cols_b]`` for every selected block, fp32 ``[k, bo, bi]``, ragged parts 0.

    Args:
        dy: output gradient ``[T, out_features]`` (any strides; made contiguous).
        x_cols: the saved input columns ``[T, plan.saved_columns]`` from ``gather_columns``.
        plan: the selection's ``BlockPlan``.

    Returns:
        fp32 ``[k, bo, bi]``; entries outside the weight (ragged blocks) are 0.
    """
    bo, bi = plan.grid.tile_shape
    tiles = gemm_tiles(bo, bi, dy.dtype, dy.device)
    programs = plan.k * triton.cdiv(bo, tiles.m) * triton.cdiv(bi, tiles.n)
    return block_weight_grad_split(dy, x_cols, plan, split_count(programs, dy.shape[0], dy.device))
