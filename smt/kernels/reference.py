"""PyTorch reference kernels for block-sparse tuning (CPU, and everywhere Triton does not run).

Notation: ``x`` is the layer input flattened to ``[T, in]``, ``g = dy`` the output gradient ``[T, out]``,
``Δ`` the tiles ``[k, bo, bi]`` of the ``k`` selected blocks ``index = [(r_b, c_b)]``.

- block weight gradient:   ``dΔ_b = Σ_t g[t, rows_b]ᵀ · x[t, cols_b]``             (``block_weight_grad``)
- block scores:            ``S[r, c] = reduce_{tile (r, c)} (gᵀx)``                  (``block_scores``)
- additive delta forward:  ``y[:, rows_b] += x[:, cols_b] · Δ_bᵀ``                   (``block_delta_matmul``)
- its input gradient:      ``dx[:, cols_b] += g[:, rows_b] · Δ_b``                   (``block_delta_matmul_t``)
- materialize:             ``W_eff = W0 + scatter(Δ)``                               (``materialize``)

Saved columns: only the *distinct* input column blocks the selection reads are copied for backward
(``gather_columns``), in ascending order; block ``b`` reads its columns at offset ``col_slot[b] · bi``.
The only ragged column block is the last one of the grid, so it is always stored last and every
offset stays a multiple of ``bi``.

All functions accumulate in fp32 and bound their transient memory by working in chunks. The two reductions
(weight gradient, scores) also switch off an enclosing autocast: a backward run inside ``torch.autocast`` would
otherwise recast their fp32 matmuls to bf16 and round the result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from smt.kernels.blocks import BlockGrid, BlockPlan

CHUNK_BYTES = 64 * 2**20
"""Transient-memory bound for chunked reductions (bytes of fp32 work space)."""


def _without_autocast(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def run(dy: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(device_type=dy.device.type, enabled=False):
            return fn(dy, *args, **kwargs)

    return run


def gather_columns(x: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Copy of the input columns of ``plan.col_blocks`` (ascending): ``[T, Σ widths]``, real widths only."""
    start = plan.col_blocks * plan.grid.block_cols
    columns = (start[:, None] + torch.arange(plan.grid.block_cols, device=start.device)).flatten()
    # Only the grid's last column block can be ragged and it sorts last: truncating keeps the layout.
    return x.index_select(1, columns[: plan.saved_columns])


def _take(m: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``m[:, index]`` for a ``[k, n]`` index as ``[T, k, n]``: one ``index_select`` (advanced indexing with a 2-D
    index goes through the generic gather kernel, measured ~7× slower on CPU)."""
    return m.index_select(1, index.reshape(-1)).view(m.shape[0], *index.shape)


def _chunks(count: int, per_item_bytes: int) -> range:
    step = max(1, CHUNK_BYTES // max(per_item_bytes, 1))
    return range(0, count, step), step


@_without_autocast
def block_weight_grad(dy: torch.Tensor, x_cols: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """``dΔ_b = g[:, rows_b]ᵀ · x[:, cols_b]`` for every selected block, fp32 ``[k, bo, bi]``, ragged parts 0.

    ``x_cols`` is the saved-column copy from ``gather_columns``.
    """
    grid, index, col_slot = plan.grid, plan.index, plan.col_slot
    bo, bi = grid.tile_shape
    k, tokens = index.shape[0], dy.shape[0]
    out = torch.empty(k, bo, bi, dtype=torch.float32, device=dy.device)
    rows, row_valid = grid.tile_rows(index[:, 0])
    offsets = torch.arange(bi, device=dy.device)
    cols = (col_slot[:, None].long() * bi + offsets).clamp_max(x_cols.shape[1] - 1)
    _, col_valid = grid.tile_cols(index[:, 1])
    starts, step = _chunks(k, tokens * (bo + bi) * 4)
    for s in starts:
        e = min(s + step, k)
        g = _take(dy, rows[s:e]).float().permute(1, 2, 0)  # [kc, bo, T]
        xs = _take(x_cols, cols[s:e]).float().permute(1, 0, 2)  # [kc, T, bi]
        out[s:e] = torch.bmm(g, xs)
    return out * (row_valid[:, :, None] & col_valid[:, None, :])


@_without_autocast
def block_scores(dy: torch.Tensor, x: torch.Tensor, grid: BlockGrid, reduction: str) -> torch.Tensor:
    """Per-block reduction of ``G = gᵀx`` without keeping G: ``[n_rb, n_cb]`` fp32.

    ``sum`` (signed tile sum) factorises as ``(g·1_rows)ᵀ (x·1_cols)`` and never forms G. ``abs`` (``Σ|G|``)
    and ``sq`` (``Σ G²``) form G a few row blocks at a time, at most ``CHUNK_BYTES`` at once.
    """
    g32, x32 = dy.float(), x.float()
    if reduction == "sum":
        return _segment_sums(g32, grid.block_rows, grid.n_row_blocks).T @ _segment_sums(
            x32, grid.block_cols, grid.n_col_blocks
        )
    out = torch.empty(grid.shape, dtype=torch.float32, device=dy.device)
    starts, step = _chunks(grid.n_row_blocks, grid.block_rows * grid.in_features * 4)
    for s in starts:
        e = min(s + step, grid.n_row_blocks)
        r0, r1 = s * grid.block_rows, min(e * grid.block_rows, grid.out_features)
        part = BlockGrid(r1 - r0, grid.in_features, grid.block_rows, grid.block_cols)
        out[s:e] = part.reduce_tiles(g32[:, r0:r1].T @ x32, reduction)
    return out


def _segment_sums(m: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """Sum ``m`` ``[T, n]`` over consecutive column segments of ``size``: ``[T, count]`` (last may be short)."""
    padded = torch.nn.functional.pad(m, (0, count * size - m.shape[1]))
    return padded.view(m.shape[0], count, size).sum(2)


def block_delta_matmul(x: torch.Tensor, delta: torch.Tensor, plan: BlockPlan, out: torch.Tensor) -> torch.Tensor:
    """``out[:, rows_b] += x[:, cols_b] · Δ_bᵀ`` for every block, in place on ``out`` ``[T, out_features]``."""
    rows, row_valid = plan.grid.tile_rows(plan.index[:, 0])
    cols, col_valid = plan.grid.tile_cols(plan.index[:, 1])
    return _block_matmul_into(x, cols, col_valid, delta.transpose(1, 2), rows, row_valid, out)


def block_delta_matmul_t(dy: torch.Tensor, delta: torch.Tensor, plan: BlockPlan, out: torch.Tensor) -> torch.Tensor:
    """``out[:, cols_b] += g[:, rows_b] · Δ_b`` for every block, in place on ``out`` ``[T, in_features]``."""
    rows, row_valid = plan.grid.tile_rows(plan.index[:, 0])
    cols, col_valid = plan.grid.tile_cols(plan.index[:, 1])
    return _block_matmul_into(dy, rows, row_valid, delta, cols, col_valid, out)


def _block_matmul_into(src, src_index, src_valid, delta, out_index, out_valid, out: torch.Tensor) -> torch.Tensor:
    """``out[:, out_index_b] += src[:, src_index_b] · delta_b`` (``delta`` oriented ``[k, src, out]``), in chunks."""
    tokens = src.shape[0]
    starts, step = _chunks(delta.shape[0], tokens * (src_index.shape[1] + out_index.shape[1]) * 4)
    for s in starts:
        e = min(s + step, delta.shape[0])
        gathered = (_take(src, src_index[s:e]) * src_valid[s:e]).to(delta.dtype).permute(1, 0, 2)  # [kc, T, src]
        part = torch.bmm(gathered, delta[s:e]) * out_valid[s:e, None, :]  # [kc, T, out]
        out.index_add_(1, out_index[s:e].reshape(-1), part.permute(1, 0, 2).reshape(tokens, -1).to(out.dtype))
    return out


def materialize(weight: torch.Tensor, delta: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """``W0 + scatter(Δ)`` as a new contiguous ``[out, in]`` tensor in ``weight``'s dtype; ``weight`` is untouched.

    The sum is formed in fp32 and rounded once, so a bf16 base gets ``round(W0 + Δ)``.
    """
    result = weight.clone(memory_format=torch.contiguous_format)
    if plan.full.numel():
        # Flat offsets into the contiguous copy: index_select/index_copy_ on them are ~14× faster on CPU than
        # the 2-D advanced-index read-modify-write, and this runs in every training forward.
        flat = result.view(-1)
        offsets = (plan.full_rows[:, :, None] * result.shape[1] + plan.full_cols[:, None, :]).reshape(-1)
        tiles = flat.index_select(0, offsets).float() + delta[plan.full].float().reshape(-1)
        flat.index_copy_(0, offsets, tiles.to(result.dtype))
    for position, r0, r1, c0, c1 in plan.ragged:
        tile = result[r0:r1, c0:c1]
        tile.copy_(tile.float() + delta[position, : r1 - r0, : c1 - c0].float())
    return result
