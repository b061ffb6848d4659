"""Benchmark the Triton block kernels against dense GEMMs on LLaMA-7B layer shapes; prints a markdown table.

GPU run (one command, from the repo root: the GPU tests, then the table into docs/kernels_bench.md):

    export TRITON_INTERPRET=0 PYTHONPATH=.; python -m pytest tests/gpu -q -ra; \
        python scripts/bench_kernels.py | tee docs/kernels_bench.md

CPU smoke mode (tiny shapes, the torch reference instead of Triton; exercises this script only):

    python scripts/bench_kernels.py --device cpu --small

For each weight (4096×4096, 11008×4096, GQA 1024×4096), tokens T and density (share of 256×256 blocks):

- block dW: ``smt.kernels`` ``block_weight_grad`` on the saved columns vs the dense ``dyᵀ·x`` GEMM, and
  TFLOP/s on the selected tiles (``2·T·Σ|block|``) vs the dense GEMM's (target: ≥ 80 %);
- fused scores: ``block_scores(…, "abs")`` vs one dense dW GEMM (target ≤ 1.1×) and the peak extra
  memory it allocates (``torch.cuda.max_memory_allocated`` delta; target: far below the dW size);
- layer backward: dense dX + block dW vs dense dX + dense dW.

Times are medians over ``--repeats`` runs, with CUDA events on GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily so that a refused run answers at once
    import torch

LLAMA_7B_WEIGHTS = {
    "q/o 4096×4096": (4096, 4096),
    "up/gate 11008×4096": (11008, 4096),
    "GQA k/v 1024×4096": (1024, 4096),
}
SMALL_WEIGHTS = {"small 256×128": (256, 128), "small 96×160": (96, 160)}
HEADER = (
    "| weight | T | density | k | dense dW ms | block dW ms | dense TFLOP/s | block TFLOP/s | block/dense | "
    "scores ms | scores/dense dW | scores extra MiB (dW MiB) | bwd dense ms | bwd block ms |"
)


@dataclass(frozen=True)
class Settings:
    """What to run: device, dtype, shapes, tokens, densities, block size, repeats."""

    device: str
    small: bool
    dtype: str
    weights: dict[str, tuple[int, int]]
    tokens: list[int]
    densities: list[float]
    block: int
    repeats: int


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes and the torch reference (CPU smoke mode)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.005, 0.01, 0.05])
    parser.add_argument("--block", type=int, default=None, help="square block edge (default 256, 32 with --small)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.small:
        parser.exit(2, "bench_kernels.py measures GPU kernels; on CPU only `--device cpu --small` (smoke mode) runs\n")
    return Settings(
        device=args.device,
        small=args.small,
        dtype=args.dtype or ("float32" if args.small else "bfloat16"),
        weights=SMALL_WEIGHTS if args.small else LLAMA_7B_WEIGHTS,
        tokens=args.tokens or ([64, 128] if args.small else [2048, 4096, 8192, 16384]),
        densities=args.densities if not args.small else [0.05, 0.25],
        block=args.block or (32 if args.small else 256),
        repeats=args.repeats or (3 if args.small else 20),
    )


def median_ms(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of ``fn`` in ms after two warm-up calls (CUDA events on GPU)."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def kernel_ops(settings: Settings):
    """The ops under test: Triton on CUDA, the torch reference in the CPU smoke mode."""
    from smt.kernels import backend_for

    return backend_for("torch" if settings.small else "triton", settings.device)


@dataclass(frozen=True)
class Layer:
    """One layer's backward inputs and its dense baselines (times in ms)."""

    name: str
    x: torch.Tensor
    dy: torch.Tensor
    weight: torch.Tensor
    dense_dw_ms: float
    dense_bwd_ms: float
    scores_ms: float
    scores_extra_mib: float | None

    @property
    def dense_tflops(self) -> float:
        tokens, (out_features, in_features) = self.x.shape[0], self.weight.shape
        return 2 * tokens * out_features * in_features / self.dense_dw_ms / 1e9


def bench_layer(name: str, shape: tuple[int, int], tokens: int, settings: Settings, ops) -> Layer:
    """Random ``x``, ``dy``, ``W`` for one weight and token count, and the timings that do not depend on density."""
    import torch
    from gpu_check_kernels import peak_extra_mib  # the GPU check's allocator probe; imported once torch is set up

    from smt.kernels.blocks import BlockGrid

    dtype, device, repeats = getattr(torch, settings.dtype), settings.device, settings.repeats
    x = torch.randn(tokens, shape[1], dtype=dtype, device=device)
    dy = torch.randn(tokens, shape[0], dtype=dtype, device=device)
    weight = torch.randn(*shape, dtype=dtype, device=device)
    grid = BlockGrid(*shape, settings.block, settings.block)
    return Layer(
        name,
        x,
        dy,
        weight,
        dense_dw_ms=median_ms(lambda: dy.T @ x, repeats, device),
        dense_bwd_ms=median_ms(lambda: (dy @ weight, dy.T @ x), repeats, device),
        scores_ms=median_ms(lambda: ops.block_scores(dy, x, grid, "abs"), repeats, device),
        scores_extra_mib=peak_extra_mib(lambda: ops.block_scores(dy, x, grid, "abs"), torch.device(device)),
    )


def bench_row(layer: Layer, density: float, settings: Settings, ops) -> tuple[str, float]:
    """One table row and block/dense TFLOP/s: block dW and block layer backward at ``density`` vs ``layer``'s."""
    import torch

    from smt.kernels.blocks import BlockGrid, BlockPlan

    x, dy, weight, device, repeats = layer.x, layer.dy, layer.weight, settings.device, settings.repeats
    grid = BlockGrid(*weight.shape, settings.block, settings.block)
    k = max(1, round(density * grid.num_blocks))
    plan = BlockPlan.build(grid, grid.all_blocks()[torch.randperm(grid.num_blocks)[:k]].to(device))
    x_cols = ops.gather_columns(x, plan)
    block_dw = median_ms(lambda: ops.block_weight_grad(dy, x_cols, plan), repeats, device)
    block_bwd = median_ms(lambda: (dy @ weight, ops.block_weight_grad(dy, x_cols, plan)), repeats, device)
    block_tflops = 2 * x.shape[0] * grid.numel_of(plan.index) / block_dw / 1e9
    dw_mib = grid.numel * x.element_size() / 2**20
    extra = "n/a" if layer.scores_extra_mib is None else f"{layer.scores_extra_mib:.3g}"
    ratio = block_tflops / layer.dense_tflops
    row = (
        f"| {layer.name} | {x.shape[0]} | {density:.1%} | {k} | {layer.dense_dw_ms:.3f} | {block_dw:.3f} | "
        f"{layer.dense_tflops:.3g} | {block_tflops:.3g} | {ratio:.0%} | "
        f"{layer.scores_ms:.3f} | {layer.scores_ms / layer.dense_dw_ms:.2f}× | {extra} ({dw_mib:.3g}) | "
        f"{layer.dense_bwd_ms:.3f} | {block_bwd:.3f} |"
    )
    return row, ratio


def describe(settings: Settings) -> str:
    """One line naming the machine, versions and what runs."""
    import torch

    if settings.device == "cuda":
        import triton

        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    else:
        where = f"CPU smoke mode (torch reference, not Triton), torch {torch.__version__}"
    return f"{where}; {settings.dtype}; {settings.block}×{settings.block} blocks; median of {settings.repeats}"


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        print("bench_kernels.py: no CUDA device here; on CPU only `--device cpu --small` runs", file=sys.stderr)
        return 2
    if settings.device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_kernels.py: TRITON_INTERPRET=1 would time the interpreter; unset it", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    ops = kernel_ops(settings)
    print(describe(settings) + "\n")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    dw_ratios, scores_ratios = [], []
    for name, shape in settings.weights.items():
        for tokens in settings.tokens:
            layer = bench_layer(name, shape, tokens, settings, ops)
            scores_ratios.append(layer.scores_ms / layer.dense_dw_ms)
            for density in settings.densities:
                row, ratio = bench_row(layer, density, settings, ops)
                dw_ratios.append(ratio)
                print(row, flush=True)
    print(
        f"\nTargets: block dW ≥ 80 % of dense TFLOP/s in {sum(r >= 0.8 for r in dw_ratios)}/{len(dw_ratios)} rows; "
        f"fused scores ≤ 1.1× dense dW in {sum(r <= 1.1 for r in scores_ratios)}/{len(scores_ratios)} layers."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
