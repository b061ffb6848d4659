"""Launch settings shared by the block kernels: tile sizes, matmul operand precision, the inner ``mma``.

A weight block ``(bo, bi)`` need not be a power of two (ragged edges, odd sizes such as 10×7), but
``tl.arange`` sizes must be. Every kernel therefore tiles *inside* a block with power-of-two tiles
``≥ 16`` (the smallest ``tl.dot`` shape on GPUs) and masks the parts that fall outside the block or
the weight. Accumulation is always fp32.

Operands are cast to fp32 before ``tl.dot`` when (a) the kernel runs in the Triton interpreter
(``tl.dot`` on bf16 returns garbage there), (b) either operand is fp32 or (c) the two dtypes differ.
fp32 products follow ``torch.backends.cuda.matmul.allow_tf32`` (``"tf32"`` or ``"ieee"``), so the
Triton ops round like the torch reference they replace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

HALF_DTYPES = (torch.bfloat16, torch.float16)
MIN_TILE = 16
"""Smallest tile edge: ``tl.dot`` needs every dimension ≥ 16 on NVIDIA GPUs."""
INTERPRETER_TILE = 16
"""Tile edge under the interpreter (CPU): small programs keep tests quick and exercise multi-tile blocks."""


@dataclass(frozen=True)
class GemmTiles:
    """Tile sizes of one launch: an ``m × n`` output tile reduced over ``depth`` at a time.

    Attributes:
        m: output-tile rows.
        n: output-tile columns.
        depth: reduction slab per loop iteration.
        num_warps: warps per program (GPU only).
        num_stages: software-pipelining depth (GPU only).
    """

    m: int
    n: int
    depth: int
    num_warps: int
    num_stages: int

    @property
    def launch_options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def tile_edge(extent: int, cap: int) -> int:
    """The power-of-two tile edge for a dimension of ``extent``: ``next_pow2(extent)`` clamped to ``[16, cap]``."""
    return max(MIN_TILE, min(cap, triton.next_power_of_2(max(extent, 1))))


def gemm_tiles(m_extent: int, n_extent: int, dtype: torch.dtype, device: torch.device) -> GemmTiles:
    """Tiles for an ``m_extent × n_extent`` output (one block, or a block's side) on ``device``.

    GPU defaults are the usual Hopper/Ampere sweet spot for a bf16 GEMM (128×128×64, 8 warps, 3
    stages); fp32 operands halve the reduction slab to keep shared memory per stage the same.
    """
    if device.type != "cuda":
        edge = INTERPRETER_TILE
        return GemmTiles(tile_edge(m_extent, edge), tile_edge(n_extent, edge), edge, 1, 1)
    m, n = tile_edge(m_extent, 128), tile_edge(n_extent, 128)
    depth = 64 if dtype in HALF_DTYPES else 32
    return GemmTiles(m, n, depth, 8 if m * n >= 128 * 128 else 4, 3)


def dot_mode(*tensors: torch.Tensor) -> dict[str, object]:
    """``CAST_FP32`` and ``PRECISION`` constexprs for a kernel whose ``tl.dot`` reads ``tensors``."""
    dtypes = {t.dtype for t in tensors}
    on_gpu = all(t.device.type == "cuda" for t in tensors)
    native = on_gpu and len(dtypes) == 1 and dtypes <= set(HALF_DTYPES)
    tf32 = on_gpu and torch.backends.cuda.matmul.allow_tf32
    return {"CAST_FP32": not native, "PRECISION": "tf32" if tf32 else "ieee"}


@triton.jit
def mma(a, b, acc, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a · b`` with fp32 accumulation; operands upcast to fp32 when ``CAST_FP32``."""
    if CAST_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)
