"""Per-block importance scores of one target weight, from taps on its input and output gradient.

For a micro-batch with layer input ``x`` ``[T, in]`` and output gradient ``g`` ``[T, out]`` the weight
gradient is ``G = gᵀx``. It is never stored: each criterion reduces it tile by tile to an
``[n_rb, n_cb]`` fp32 map, summed over every micro-batch of the warm-up:

==================  ==========================================  ===============================
criterion           score of block b (n_b = its real size)      state kept per module
==================  ==========================================  ===============================
``grad_sq``         Σ_mb ‖G_mb[b]‖² / n_b                       ``[n_rb, n_cb]``
``grad_l1``         Σ_mb Σ|G_mb[b]| / n_b                       ``[n_rb, n_cb]``
``grad_mean_abs``   |Σ_mb Σ G_mb[b]| / n_b   (linear in g)      ``[n_rb, n_cb]``
``grad_abs_mean``   Σ|Σ_mb G_mb[b]| / n_b    (SMT's README)     ``[out, in]`` fp32 (exact)
``weight_abs_mean`` Σ|W[b]| / n_b                               none
``random``          uniform, seeded by (seed, module name)      none
``grad_snr``        Σ_mb mean_{i∈b} |G_mb,i| / √(Σ_t G_t,i²)    ``[n_rb, n_cb]``
``grad_sq_xnorm``   Σ_mb ‖G_mb[b]‖² / (r_b Σ_mb Σ_t ‖x_t[cols_b]‖²)  ``[2, n_rb, n_cb]``
==================  ==========================================  ===============================

``G_t = g_tᵀx_t`` is one token's gradient. ``grad_snr`` is the mean per-element signal-to-noise ratio of the
tokens' gradients, ``|Σ_t G_t| / √(Σ_t G_t²)``: ~1 when the tokens disagree in sign, up to √T when they agree.
It is what an Adam-like optimiser can use (a consistent direction), and unlike ``grad_sq`` it does not grow
with the input's scale: scaling an input column or an output row by c leaves it unchanged, so outlier
activation channels (a few input features carrying most of the energy in LLMs) do not take the whole budget.
``grad_sq_xnorm`` divides ``grad_sq`` by the energy of the input columns the block reads (per element: r_b is
the block's row count), removing that one factor only. Both are memory-light (block-sized state; the snr tap
forms ``G`` and ``(g²)ᵀ(x²)`` a few row blocks at a time during the warm-up only).

``grad_abs_mean`` is not linear in g, so it cannot be reduced per micro-batch: the exact value needs the
summed gradient of the whole weight (4 bytes per weight, e.g. 6.5 GB for LLaMA-7B's q, k, v, which
``accumulator_device="cpu"`` moves off the GPU). ``grad_l1`` is its memory-light upper bound
(triangle inequality), and equal to it when one micro-batch is scored.

Under fp16 loss scaling ``g`` is divided by the scaler's scale; a step whose contribution is not finite
(the scaler skips it too) is discarded on ``commit`` and counted, never added.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from smt.kernels import reference
from smt.kernels.blocks import BlockGrid


@dataclass(frozen=True)
class Criterion:
    """How a criterion turns taps into scores.

    Attributes:
        name: registry key.
        reduction: per-micro-batch tile reduction of G (``sum``, ``abs``, ``sq``), ``full`` for an exact
            weight-sized accumulator, ``tap`` for a criterion with its own ``tap``, or None when no gradient
            is needed.
        finalize: ``(accumulated, grid, weight) -> [n_rb, n_cb]`` fp32 scores.
    """

    name: str
    reduction: str | None
    finalize: Callable[[torch.Tensor | None, BlockGrid, torch.Tensor | None], torch.Tensor]
    tap: Callable[[torch.Tensor, torch.Tensor, BlockGrid, object, float], torch.Tensor] | None = None
    """``(dy, x, grid, ops, loss_scale) -> state contribution`` for criteria that are not one tile reduction."""
    stacked: int = 1
    """How many ``[n_rb, n_cb]`` maps the state holds (``[stacked, n_rb, n_cb]`` when more than one)."""

    @property
    def needs_gradients(self) -> bool:
        return self.reduction is not None


def _per_element(acc: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    return acc / grid.block_numels.to(acc.device)


CRITERIA: dict[str, Criterion] = {}


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name`` (the one check of a criterion's name, for the config and the scorers).

    Raises:
        ValueError: no criterion is registered under ``name``.
    """
    if name not in CRITERIA:
        raise ValueError(f"smt.criterion={name!r} is not one of {', '.join(CRITERIA)}")
    return CRITERIA[name]


def gradient_free_criteria() -> tuple[str, ...]:
    """The registered criteria that score without gradients: they need no warm-up (``smt.warmup_steps: 0``)."""
    return tuple(name for name, criterion in CRITERIA.items() if not criterion.needs_gradients)


def register_criterion(criterion: Criterion) -> None:
    """Add a criterion to the registry (a name may be registered once)."""
    if criterion.name in CRITERIA:
        raise ValueError(f"criterion {criterion.name!r} is already registered")
    CRITERIA[criterion.name] = criterion


register_criterion(Criterion("grad_sq", "sq", lambda acc, grid, w: _per_element(acc, grid)))
register_criterion(Criterion("grad_l1", "abs", lambda acc, grid, w: _per_element(acc, grid)))
register_criterion(Criterion("grad_mean_abs", "sum", lambda acc, grid, w: _per_element(acc.abs(), grid)))
register_criterion(
    Criterion("grad_abs_mean", "full", lambda acc, grid, w: _per_element(grid.reduce_tiles(acc.float(), "abs"), grid))
)
register_criterion(
    Criterion("weight_abs_mean", None, lambda acc, grid, w: _per_element(grid.reduce_tiles(w.float(), "abs"), grid))
)


def _snr_tap(dy: torch.Tensor, x: torch.Tensor, grid: BlockGrid, ops, scale: float) -> torch.Tensor:
    """Per block, the mean over its elements of ``|Σ_t G_t| / √(Σ_t G_t²)`` for one micro-batch (scale-free)."""
    g32, x32 = dy.float(), x.float()
    x_sq = x32.square()
    out = torch.empty(grid.shape, dtype=torch.float32, device=dy.device)
    starts, step = reference._chunks(grid.n_row_blocks, 2 * grid.block_rows * grid.in_features * 4)
    for s in starts:
        e = min(s + step, grid.n_row_blocks)
        r0, r1 = s * grid.block_rows, min(e * grid.block_rows, grid.out_features)
        signal = (g32[:, r0:r1].T @ x32).abs_()
        noise = (g32[:, r0:r1].square().T @ x_sq).sqrt_()
        ratio = torch.where(noise > 0, signal / noise.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        part = BlockGrid(r1 - r0, grid.in_features, grid.block_rows, grid.block_cols)
        out[s:e] = part.reduce_tiles(ratio, "sum")
    return out / grid.block_numels.to(out.device)


def _xnorm_tap(dy: torch.Tensor, x: torch.Tensor, grid: BlockGrid, ops, scale: float) -> torch.Tensor:
    """``[‖G[b]‖², Σ_t ‖x_t[cols_b]‖²]`` for one micro-batch (the second map repeats over row blocks)."""
    energy = ops.block_scores(dy, x, grid, "sq")
    if not _unit(scale):
        energy = energy / (scale * scale)
    columns = reference._segment_sums(x.float().square(), grid.block_cols, grid.n_col_blocks).sum(0)
    # × the block's row count, so the ratio is per element: a ragged last row block is not ranked lower for
    # holding fewer rows (the column energy already counts the block's columns).
    rows = torch.full((grid.n_row_blocks,), float(grid.block_rows), device=x.device)
    rows[-1] = grid.out_features - grid.block_rows * (grid.n_row_blocks - 1)
    return torch.stack([energy, rows[:, None] * columns])


def _ratio(acc: torch.Tensor, grid: BlockGrid, weight: torch.Tensor | None) -> torch.Tensor:
    numerator, denominator = acc[0], acc[1]
    return torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


register_criterion(Criterion("grad_snr", "tap", lambda acc, grid, w: acc, tap=_snr_tap))
register_criterion(Criterion("grad_sq_xnorm", "tap", _ratio, tap=_xnorm_tap, stacked=2))


def _random_scores(acc: torch.Tensor | None, grid: BlockGrid, weight: torch.Tensor | None) -> torch.Tensor:
    raise RuntimeError("random scores are drawn by BlockScorer.scores, which knows the seed")  # pragma: no cover


register_criterion(Criterion("random", None, _random_scores))


def _unit(scale: float | torch.Tensor) -> bool:
    """Whether ``scale`` is the 1.0 of a run without loss scaling (a scaler's tensor is never compared: no sync)."""
    return not isinstance(scale, torch.Tensor) and scale == 1.0


class BlockScorer:
    """Accumulates the block scores of one module over the warm-up.

    Example:
        >>> grid = BlockGrid(8, 8, 4, 4)
        >>> scorer = BlockScorer(grid, "grad_sq", name="q_proj")
        >>> scorer.observe(torch.ones(3, 8), torch.ones(3, 8)); scorer.commit()
        True
        >>> scorer.scores().shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        grid: BlockGrid,
        criterion: str,
        name: str,
        seed: int = 0,
        accumulator_device: str | torch.device | None = None,
    ) -> None:
        self.grid, self.name, self.seed = grid, name, seed
        self.criterion = get_criterion(criterion)
        self.accumulator_device = accumulator_device
        self.loss_scale = 1.0
        self.total: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None
        self.micro_batches = 0
        self.steps = 0
        self.skipped_steps = 0

    def accumulator_bytes(self) -> int:
        """Bytes of accumulator state this scorer keeps (``total`` plus one pending step)."""
        if self.criterion.reduction is None:
            return 0
        per = self.grid.numel if self.criterion.reduction == "full" else self.grid.num_blocks * self.criterion.stacked
        return 2 * 4 * per

    def observe(self, dy: torch.Tensor, x: torch.Tensor, ops=reference) -> None:
        """Add one micro-batch: ``dy`` ``[T, out]`` and ``x`` ``[T, in]`` (2-D, any float dtype).

        ``ops`` is the kernel backend of the calling layer (``smt.kernels.backend_for``): on CUDA the fused
        Triton score kernel, which never writes a weight-sized gradient.
        """
        if not self.criterion.needs_gradients:
            return
        reduction = self.criterion.reduction
        scale = self.loss_scale
        if reduction == "tap":
            contribution = self.criterion.tap(dy, x, self.grid, ops, scale)
        elif reduction == "full":
            g = dy.float() if _unit(scale) else dy.float() / scale
            contribution = (g.T @ x.float()).to(self.accumulator_device or dy.device)
        else:
            contribution = ops.block_scores(dy, x, self.grid, reduction)
            if not _unit(scale):
                contribution = contribution / (scale * scale if reduction == "sq" else scale)
        self.pending = contribution if self.pending is None else self.pending.add_(contribution)
        self.micro_batches += 1

    def pending_finite(self) -> bool:
        """Whether the micro-batches observed since the last ``commit`` are all finite (one host sync)."""
        return self.pending is None or bool(torch.isfinite(self.pending).all())

    def commit(self, accept: bool | None = None) -> bool:
        """Close one optimizer step: add its micro-batches, or discard them. Returns whether they were added.

        Args:
            accept: the caller's decision for this step (the callback decides once for every module and rank,
                so all scorers count the same steps); None decides from this scorer's own finiteness.
        """
        if accept is None:
            accept = self.pending_finite()
        pending, self.pending = self.pending, None
        if pending is None:
            return accept
        if not accept:
            self.skipped_steps += 1
            return False
        self.total = pending if self.total is None else self.total.add_(pending.to(self.total.device))
        self.steps += 1
        return True

    def reduce_(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the accumulated state across ranks with ``all_reduce`` (in place), so every rank selects alike."""
        if self.criterion.needs_gradients:
            if self.total is None:
                device = self.accumulator_device or "cpu"
                self.total = torch.zeros(self._state_shape(), dtype=torch.float32, device=device)
            home = self.total.device  # an offloaded accumulator goes back home: only one is on the GPU at a time
            self.total = all_reduce(self.total).to(home)

    def scores(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Final ``[n_rb, n_cb]`` fp32 scores (``weight`` is the logical ``[out, in]`` weight, for weight criteria).

        Raises:
            ValueError: scores are not finite, or a gradient criterion saw no finite step.
        """
        if self.criterion.name == "random":
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(self.name.encode()))
            return torch.rand(self.grid.shape, generator=generator)
        if self.criterion.needs_gradients and self.total is None:
            raise ValueError(
                f"{self.name}: no finite warm-up gradient was scored (criterion {self.criterion.name}); "
                "check the loss, or raise smt.warmup_steps"
            )
        if self.criterion.name == "weight_abs_mean" and weight is None:
            raise ValueError(
                f"{self.name}: criterion weight_abs_mean needs a float weight, but this base is quantized; "
                "use a gradient criterion such as grad_sq"
            )
        scores = self.criterion.finalize(self.total, self.grid, weight).float().cpu()
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"{self.name}: block scores are not finite; refusing to select from them")
        return scores

    def _state_shape(self) -> tuple[int, ...]:
        if self.criterion.reduction == "full":
            return self.grid.out_features, self.grid.in_features
        if self.criterion.stacked > 1:
            return self.criterion.stacked, *self.grid.shape
        return self.grid.shape

    def state_dict(self) -> dict:
        """What resume needs: the accumulated scores (pending micro-batches of an unfinished step are dropped)."""
        return {
            "total": None if self.total is None else self.total.cpu(),
            "micro_batches": self.micro_batches,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        total = state["total"]
        if total is not None and tuple(total.shape) != self._state_shape():
            raise ValueError(
                f"{self.name}: saved scores have shape {tuple(total.shape)}, expected {self._state_shape()}; "
                "the checkpoint was made with another block size or model"
            )
        self.total = total
        self.micro_batches, self.steps = state["micro_batches"], state["steps"]
        self.skipped_steps = state["skipped_steps"]


# --- memory check ---------------------------------------------------------------------------------

MEMORY_HEADROOM = 0.8  # accumulators may take at most this fraction of the free memory: activations need the rest


def available_memory(device: str | torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable`` of /proc/meminfo), None if unknown."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_accumulator_memory(
    scorers: list[BlockScorer], device: str | torch.device, available: int | None = None
) -> int:
    """Refuse, before the warm-up starts, accumulators that would not fit in ``device``'s free memory.

    Args:
        scorers: the warm-up's scorers (their ``accumulator_bytes`` are summed).
        device: where the accumulators live (``accumulator_device``, else the training device).
        available: free bytes (default: measured with ``available_memory``).

    Returns:
        The estimated accumulator bytes.

    Raises:
        ValueError: the estimate exceeds ``MEMORY_HEADROOM`` of the free memory; names the cheaper alternatives.
    """
    need = sum(scorer.accumulator_bytes() for scorer in scorers)
    available = available_memory(device) if available is None else available
    if need == 0 or available is None or need <= MEMORY_HEADROOM * available:
        return need
    criterion = scorers[0].criterion.name
    light = sum(2 * 4 * scorer.grid.num_blocks for scorer in scorers)
    offload = "" if torch.device(device).type == "cpu" else ", or smt.accumulator_device=cpu (same scores, host memory)"
    raise ValueError(
        f"smt.criterion={criterion} needs {_gib(need)} of warm-up accumulators on {device} but only "
        f"{_gib(available)} is free; use smt.criterion=grad_l1 ({_gib(light)}, its memory-light upper bound){offload}"
    )


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"
