"""Block-sparse delta matmuls for the additive path, without gathering the input.

For the ``k`` selected blocks ``b = (r_b, c_b)`` with tiles ``Δ_b`` ``(bo, bi)``::

    forward:         y[:, rows_b]  += x[:, cols_b] · Δ_bᵀ        (block_delta_matmul)
    input gradient:  dx[:, cols_b] += g[:, rows_b] · Δ_b         (block_delta_matmul_t)

Both are one *grouped* kernel: the blocks are grouped by the output block they write (row block
for the forward, column block for the transpose), and one program owns a ``(tokens × outputs)``
tile of one output block: it loops over that group's blocks, reads the matching input columns
straight from ``x`` (or ``g``) and the tile of ``Δ_b``, accumulates in fp32, then adds its sum
into ``out`` once. No two programs write the same elements, so there are no atomics and no races.
Ragged parts of ``Δ`` are never read.

Launch grid: ``(⌈T/t⌉, n_groups · ⌈output block/n⌉)``; programs of empty groups do nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smt.kernels.blocks import BlockPlan
from smt.kernels.triton.tiling import dot_mode, gemm_tiles, mma


@triton.jit
def _grouped_delta_kernel(
    inp_ptr, delta_ptr, out_ptr, index_ptr, order_ptr, group_start_ptr,
    tokens, out_extent, in_extent, stride_inp, stride_out_t, stride_out_f,
    stride_delta_b, stride_delta_o, stride_delta_i,
    OUT_BLOCK: tl.constexpr, IN_BLOCK: tl.constexpr, IN_COORD: tl.constexpr,
    TILE_T: tl.constexpr, TILE_O: tl.constexpr, TILE_I: tl.constexpr,
    CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tiles_o: tl.constexpr = (OUT_BLOCK + TILE_O - 1) // TILE_O
    group = tl.program_id(1) // tiles_o
    t = (tl.program_id(0) * TILE_T + tl.arange(0, TILE_T)).to(tl.int64)
    local_o = (tl.program_id(1) % tiles_o) * TILE_O + tl.arange(0, TILE_O)
    outputs = group * OUT_BLOCK + local_o
    t_ok, o_ok = t < tokens, (local_o < OUT_BLOCK) & (outputs < out_extent)
    first, last = tl.load(group_start_ptr + group), tl.load(group_start_ptr + group + 1)
    acc = tl.zeros((TILE_T, TILE_O), dtype=tl.float32)
    for j in range(first, last):
        block = tl.load(order_ptr + j)
        in_start = tl.load(index_ptr + 2 * block + IN_COORD) * IN_BLOCK
        delta_tile = delta_ptr + block * stride_delta_b + local_o[None, :] * stride_delta_o
        for i0 in range(0, IN_BLOCK, TILE_I):
            local_i = i0 + tl.arange(0, TILE_I)
            i_ok = (local_i < IN_BLOCK) & (in_start + local_i < in_extent)
            inputs = inp_ptr + t[:, None] * stride_inp + in_start + local_i[None, :]
            a = tl.load(inputs, mask=t_ok[:, None] & i_ok[None, :], other=0.0)
            d = tl.load(delta_tile + local_i[:, None] * stride_delta_i, mask=i_ok[:, None] & o_ok[None, :], other=0.0)
            acc = mma(a, d, acc, CAST_FP32, PRECISION)
    target = out_ptr + t[:, None] * stride_out_t + outputs[None, :] * stride_out_f
    o_ok = o_ok & (local_o * 0 + last > first)  # empty group: write nothing
    mask = t_ok[:, None] & o_ok[None, :]
    total = tl.load(target, mask=mask, other=0.0).to(tl.float32) + acc
    tl.store(target, total.to(out_ptr.dtype.element_ty), mask=mask)


def _group_by(keys: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of blocks by ``keys``, CSR ``starts [count + 1]``: group ``g`` is ``order[starts[g]:starts[g + 1]]``.

    No host sync (unlike ``bincount`` on CUDA): the launch grid covers every possible group anyway.
    """
    order = torch.argsort(keys, stable=True)
    starts = torch.searchsorted(keys[order], torch.arange(count + 1, device=keys.device))
    return order, starts


def _grouped_delta(inp: torch.Tensor, delta: torch.Tensor, plan: BlockPlan, out: torch.Tensor, transpose: bool):
    """``out[:, output block] += Σ_b inp[:, input block of b] · D_b``; ``D_b = Δ_bᵀ`` forward, ``Δ_b`` transposed."""
    grid, index = plan.grid, plan.index.contiguous()
    if index.shape[0] == 0 or inp.shape[0] == 0:
        return out
    inp, tokens = inp.contiguous(), inp.shape[0]
    if transpose:  # outputs are input features: group by column block, reduce over a block's rows
        out_coord, (in_block, out_block), in_extent = 1, grid.tile_shape, grid.out_features
        stride_o, stride_i = delta.stride(2), delta.stride(1)
    else:  # outputs are output features: group by row block, reduce over a block's columns
        out_coord, (out_block, in_block), in_extent = 0, grid.tile_shape, grid.in_features
        stride_o, stride_i = delta.stride(1), delta.stride(2)
    n_groups = grid.shape[out_coord]
    order, starts = _group_by(index[:, out_coord], n_groups)
    tiles = gemm_tiles(tokens, out_block, delta.dtype, inp.device)
    tile_i = gemm_tiles(in_block, in_block, delta.dtype, inp.device).depth
    launch = (triton.cdiv(tokens, tiles.m), n_groups * triton.cdiv(out_block, tiles.n))
    _grouped_delta_kernel[launch](
        inp, delta, out, index, order, starts,
        tokens, out.shape[1], in_extent, inp.stride(0), out.stride(0), out.stride(1),
        delta.stride(0), stride_o, stride_i,
        OUT_BLOCK=out_block, IN_BLOCK=in_block, IN_COORD=1 - out_coord,
        TILE_T=tiles.m, TILE_O=tiles.n, TILE_I=tile_i,
        **dot_mode(inp, delta), **tiles.launch_options,
    )  # fmt: skip
    return out


def block_delta_matmul(x: torch.Tensor, delta: torch.Tensor, plan: BlockPlan, out: torch.Tensor) -> torch.Tensor:
    """``out[:, rows_b] += x[:, cols_b] · Δ_bᵀ`` for every block, in place on ``out`` ``[T, out_features]``.

    Args:
        x: layer input ``[T, in_features]``.
        delta: tiles ``[k, bo, bi]``; entries outside the weight (ragged blocks) are never read.
        plan: the selection's ``BlockPlan``.
        out: ``[T, out_features]``, updated in place (any strides); fp32 sums are rounded once into its dtype.

    Returns:
        ``out``.
    """
    return _grouped_delta(x, delta, plan, out, transpose=False)


def block_delta_matmul_t(dy: torch.Tensor, delta: torch.Tensor, plan: BlockPlan, out: torch.Tensor) -> torch.Tensor:
    """``out[:, cols_b] += g[:, rows_b] · Δ_b`` for every block, in place on ``out`` ``[T, in_features]``.

    Args:
        dy: output gradient ``[T, out_features]`` (any strides; made contiguous).
        delta: tiles ``[k, bo, bi]``; entries outside the weight are never read.
        plan: the selection's ``BlockPlan``.
        out: ``[T, in_features]``, updated in place.

    Returns:
        ``out``.
    """
    return _grouped_delta(dy, delta, plan, out, transpose=True)
