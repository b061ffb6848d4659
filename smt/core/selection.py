"""Choosing the blocks to tune, and the ``Selection`` artifact that records the choice.

``select_top_k`` ranks every candidate block of a pool by score and takes the best ``K``:

- ``K`` is fixed by the budget before any score is seen (``num_blocks``, or ``density`` × the pool's
  targeted parameters ÷ its mean real block size), so the bank of trainable slots never changes shape.
- Ties break deterministically: higher score first, then module name order, then row-major position.
- ``allocation="global"``: ``min_per_module`` blocks of every module are taken first (its best ones), then the
  rest greedily across modules, skipping modules already at ``max_per_module``. The budget follows the scores, so
  it can pile into a few modules (and a few input columns) whose gradients are largest early on.
- ``allocation="proportional"``: module ``m`` first gets a quota ``q_m ≈ K · n_m / Σ n`` (``n`` = its weights;
  largest remainders make the quotas sum to ``K``; clipped to its block count and the per-module limits, the
  excess handed to the modules with room, largest remainder first), then its best ``q_m`` blocks by score. The
  budget is spread like LoRA's rank over every module, and the scores only pick *where inside* each module.

A ``Selection`` saves as safetensors (``<module>.smt_index`` ``[k, 2]`` int32, optional
``<module>.smt_scores``) with JSON metadata (grids, criterion, budget, warm-up steps, model id), and
draws a heatmap of the chosen blocks per layer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smt.core.patterns import Pattern, name_matcher, no_match_error
from smt.kernels.blocks import BlockGrid

FORMAT = "smt.selection"
FORMAT_VERSION = 1


@dataclass
class Selection:
    """Which blocks of which modules are tuned, and where the choice came from.

    Attributes:
        blocks: module name → int64 ``[k, 2]`` (row block, column block), sorted row-major.
        grids: module name → its ``BlockGrid`` (every targeted module, also those with no block).
        criterion: the score used (provenance).
        budget: the budget as configured, e.g. ``{"density": 0.01}`` (provenance).
        warmup_steps: optimizer steps scored before the choice (provenance).
        model_id: name or path of the base model (provenance; checked when a selection is loaded onto a model).
        scores: optional module name → ``[n_rb, n_cb]`` fp32 scores the choice was made from.
    """

    blocks: dict[str, torch.Tensor]
    grids: dict[str, BlockGrid]
    criterion: str = "manual"
    budget: dict = field(default_factory=dict)
    warmup_steps: int = 0
    model_id: str | None = None
    scores: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        for name, index in self.blocks.items():
            if name not in self.grids:
                raise ValueError(f"selection lists blocks for {name} but has no grid for it")
            self.grids[name].check_index(index, name)
            self.blocks[name] = _sorted(index.long().cpu())

    @property
    def num_blocks(self) -> int:
        return sum(int(index.shape[0]) for index in self.blocks.values())

    @property
    def num_params(self) -> int:
        """Real number of tuned weights (ragged blocks counted by their size)."""
        return sum(self.grids[name].numel_of(index) for name, index in self.blocks.items())

    @property
    def density(self) -> float:
        """Tuned fraction of all targeted weights."""
        return self.num_params / max(1, sum(grid.numel for grid in self.grids.values()))

    def fingerprint(self) -> str:
        """Short hash of grids and blocks: equal on every rank iff the selections are equal."""
        digest = hashlib.sha256()
        for name in sorted(self.grids):
            grid = self.grids[name]
            digest.update(
                f"{name}:{grid.out_features},{grid.in_features},{grid.block_rows},{grid.block_cols};".encode()
            )
            if name in self.blocks:
                digest.update(self.blocks[name].to(torch.int64).numpy().tobytes())
        return digest.hexdigest()[:16]

    def summary(self) -> str:
        """One line for logs: blocks, tuned weights, density, modules touched."""
        touched = sum(1 for index in self.blocks.values() if index.shape[0])
        return (
            f"{self.num_blocks} blocks, {self.num_params:,} weights ({100 * self.density:.3f} % of targeted), "
            f"{touched}/{len(self.grids)} modules, criterion {self.criterion}"
        )

    def save(self, path: str | Path) -> Path:
        """Write the selection (safetensors + JSON metadata); returns the path."""
        from smt.core.io import atomic_save_safetensors

        tensors = {f"{name}.smt_index": index.to(torch.int32).contiguous() for name, index in self.blocks.items()}
        for name, score in (self.scores or {}).items():
            tensors[f"{name}.smt_scores"] = score.float().contiguous()
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "grids": json.dumps({n: _grid_list(g) for n, g in self.grids.items()}),
            "criterion": self.criterion,
            "budget": json.dumps(self.budget),
            "warmup_steps": str(self.warmup_steps),
            "model_id": self.model_id or "",
        }
        return atomic_save_safetensors(tensors, Path(path), metadata)

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        """Read a selection file, validating format, version, grids and indices.

        Raises:
            ValueError: missing, truncated or corrupted file, another format, a newer version, or bad indices.
        """
        from smt.core.io import parse_count, parse_grids, parse_json, read_safetensors

        where = f"selection file {path}"
        tensors, meta = read_safetensors(Path(path), FORMAT, FORMAT_VERSION, "selection")
        grids = parse_grids(meta.get("grids"), where)
        budget = parse_json(meta.get("budget", "{}"), where, "budget", dict)
        warmup = parse_count(meta.get("warmup_steps"), where, "warmup_steps")
        blocks, scores = _split_tensors(tensors, grids, path)
        try:
            return cls(
                blocks, grids, meta.get("criterion", ""), budget, warmup, meta.get("model_id") or None, scores or None
            )
        except ValueError as err:  # bad indices: say which file holds them
            raise ValueError(f"{where}: {err}; re-create it with `smt select`") from None

    def heatmap(self, path: str | Path) -> Path:
        """Draw the selected blocks per layer as a PNG (one panel per module kind); returns the path."""
        from smt.core.heatmap import draw_selection

        return draw_selection(self, Path(path))


def _sorted(index: torch.Tensor) -> torch.Tensor:
    if index.shape[0] == 0:
        return index.reshape(0, 2)
    order = torch.argsort(index[:, 0] * (int(index[:, 1].max()) + 1) + index[:, 1])
    return index[order]


def _grid_list(grid: BlockGrid) -> list[int]:
    return [grid.out_features, grid.in_features, grid.block_rows, grid.block_cols]


def _split_tensors(tensors: dict, grids: dict, path) -> tuple[dict, dict]:
    blocks, scores = {}, {}
    for key, value in tensors.items():
        name, _, kind = key.rpartition(".")
        if name not in grids or kind not in ("smt_index", "smt_scores"):
            raise ValueError(f"selection file {path}: unexpected entry {key!r}; it was not written by smt")
        if kind == "smt_scores" and (tuple(value.shape) != grids[name].shape or not value.dtype.is_floating_point):
            raise ValueError(
                f"selection file {path}: scores of {name} are {tuple(value.shape)} {value.dtype}, "
                f"expected float {grids[name].shape}"
            )
        (blocks if kind == "smt_index" else scores)[name] = value.long() if kind == "smt_index" else value
    return blocks, scores


# --- choosing blocks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """Modules that share one budget of ``k`` blocks."""

    name: str
    modules: tuple[str, ...]
    k: int


def lora_weights(grids: dict[str, BlockGrid], rank: int) -> int:
    """Trainable weights of LoRA of ``rank`` on these modules: ``rank · (out + in)`` per ``out × in`` matrix."""
    return sum(rank * (g.out_features + g.in_features) for g in grids.values())


def lora_equal_blocks(grids: dict[str, BlockGrid], rank: int) -> int:
    """Blocks holding as many weights as LoRA of ``rank`` on the same modules (users think in LoRA ranks; PEFT's
    SHiRA states its budget the same way): ``Σ rank · (out + in)`` over the mean block size, at least one.

    Example:
        >>> lora_equal_blocks({"q": BlockGrid(576, 576, 64, 64)}, rank=8)  # 8 · 1152 weights / 64² per block
        2
    """
    eligible = sum(g.num_blocks for g in grids.values())
    mean_block = sum(g.numel for g in grids.values()) / eligible
    return max(1, round(lora_weights(grids, rank) / mean_block))


def budget_blocks(
    grids: dict[str, BlockGrid], num_blocks: int | None, density: float | None, label: str, lora_rank: int | None = None
) -> int:
    """Turn a budget (a block count, a density, or a LoRA rank to match) into a block count ``K`` for modules with
    ``grids``, before any score is known.

    Raises:
        ValueError: the budget exceeds the eligible blocks or rounds to nothing.
    """
    eligible = sum(g.num_blocks for g in grids.values())
    if lora_rank is not None:
        num_blocks = lora_equal_blocks(grids, lora_rank)
    elif num_blocks is None:
        params = sum(g.numel for g in grids.values())
        mean_block = params / eligible
        num_blocks = max(1, round(density * params / mean_block))
    if num_blocks > eligible:
        raise ValueError(
            f"{label}: budget of {num_blocks} blocks exceeds the {eligible} eligible blocks of {len(grids)} modules; "
            "lower num_blocks/density/budget_lora_rank or use smaller blocks"
        )
    return num_blocks


def select_top_k(
    scores: dict[str, torch.Tensor],
    grids: dict[str, BlockGrid],
    pools: list[Pool],
    max_per_module: int | None = None,
    min_per_module: int = 0,
    allocation: str = "global",
) -> dict[str, torch.Tensor]:
    """Choose the best ``pool.k`` blocks of each pool.

    Args:
        scores: module name → ``[n_rb, n_cb]`` finite scores (higher = more important).
        grids: module name → grid.
        pools: disjoint groups of modules, each with its block count.
        max_per_module: at most this many blocks in one module.
        min_per_module: at least this many blocks in every module (all of its blocks if it has fewer).
        allocation: ``global`` (best blocks anywhere in the pool) or ``proportional`` (each module's share of the
            budget fixed by its size first, then its best blocks).

    Returns:
        module name → int64 ``[k, 2]`` chosen blocks (every module of every pool, possibly empty).

    Raises:
        ValueError: the limits make a pool's budget impossible, or a score is not finite.
    """
    chosen: dict[str, torch.Tensor] = {}
    for pool in pools:
        chosen.update(_select_pool(pool, scores, grids, max_per_module, min_per_module, allocation))
    return chosen


def _select_pool(pool: Pool, scores, grids, max_per_module, min_per_module, allocation) -> dict[str, torch.Tensor]:
    names = sorted(pool.modules)
    flat = torch.cat([scores[n].float().flatten().cpu() for n in names])
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"pool {pool.name}: block scores are not finite; refusing to select from them")
    owner = torch.cat([torch.full((grids[n].num_blocks,), i) for i, n in enumerate(names)])
    start = torch.tensor([0] + [grids[n].num_blocks for n in names]).cumsum(0)
    order = torch.sort(flat, descending=True, stable=True).indices  # stable: ties keep (module, row-major)
    mins = [min(min_per_module, grids[n].num_blocks) for n in names]
    if sum(mins) > pool.k:
        raise ValueError(
            f"pool {pool.name}: min_blocks_per_module={min_per_module} × {len(names)} modules needs {sum(mins)} "
            f"blocks but the budget is {pool.k}; lower the minimum or raise the budget"
        )
    if allocation == "proportional":
        quotas = proportional_quotas([grids[n] for n in names], pool.k, mins, max_per_module)
        taken = _take(order, owner.tolist(), quotas, max_per_module, pool.k)
    else:
        taken = _take(order, owner.tolist(), mins, max_per_module, pool.k)
    if int(taken.sum()) < pool.k:
        raise ValueError(
            f"pool {pool.name}: max_blocks_per_module={max_per_module} leaves room for only {int(taken.sum())} of "
            f"{pool.k} blocks; raise the limit or lower the budget"
        )
    result = {}
    for m, name in enumerate(names):
        local = torch.nonzero(taken[start[m] : start[m + 1]]).flatten()
        ncb = grids[name].n_col_blocks
        result[name] = torch.stack([local // ncb, local % ncb], dim=1)
    return result


def proportional_quotas(grids: list[BlockGrid], k: int, mins: list[int], cap: int | None) -> list[int]:
    """Blocks per module in proportion to its weights, summing to ``k`` (fewer only when the limits leave no room).

    Each module gets ``floor(k · n_m / Σ n)``, then one more by largest remainder until the sum is ``k``; a
    quota above the module's room (its blocks, ``cap``) is cut and the blocks left over go round again to
    the modules with room, in the same order. Ties break by module order, so with fewer blocks than modules the
    modules that get one are chosen by size and then by name, not by score (``global`` is the better choice there).
    """
    rooms = [min(g.num_blocks, cap if cap is not None else g.num_blocks) for g in grids]
    quotas = [min(m, r) for m, r in zip(mins, rooms)]
    weights = [float(g.numel) for g in grids]
    while sum(quotas) < k:
        open_ = [i for i, (q, r) in enumerate(zip(quotas, rooms)) if q < r]
        if not open_:
            break
        left, total = k - sum(quotas), sum(weights[i] for i in open_)
        # the whole budget's fair share per module, minus what it already holds (its minimum or earlier rounds)
        share = {i: max(0.0, (left + sum(quotas[j] for j in open_)) * weights[i] / total - quotas[i]) for i in open_}
        grant = {i: min(int(share[i]), rooms[i] - quotas[i]) for i in open_}
        if sum(grant.values()) == 0:
            by_remainder = sorted(open_, key=lambda i: (-(share[i] - int(share[i])), i))
            grant = {i: 1 if n < left else 0 for n, i in enumerate(by_remainder)}
        for i, extra in grant.items():
            quotas[i] += min(extra, k - sum(quotas))
    return quotas


def _take(order: torch.Tensor, owner: list[int], mins: list[int], cap: int | None, k: int) -> torch.Tensor:
    """Mark the chosen candidates: each module's best ``mins`` first, then the best others under ``cap``."""
    taken = torch.zeros(order.numel(), dtype=torch.bool)
    if not any(mins) and cap is None:
        taken[order[:k]] = True
        return taken
    counts = [0] * len(mins)
    ranked = order.tolist()
    for position in ranked:
        if counts[owner[position]] < mins[owner[position]]:
            taken[position] = True
            counts[owner[position]] += 1
    cap = k if cap is None else cap
    for position in ranked:
        if sum(counts) == k:
            break
        if not taken[position] and counts[owner[position]] < cap:
            taken[position] = True
            counts[owner[position]] += 1
    return taken


def assign_pools(module_names: list[str], pool_patterns: dict[str, Pattern]) -> dict[str, list[str]]:
    """Put each module in the first pool whose pattern matches its whole name (or a listed suffix).

    Raises:
        ValueError: a pool's pattern matches no target module, or a module matches no pool.
    """
    matchers = {pool: name_matcher(pattern, f"smt.pools.{pool}.pattern") for pool, pattern in pool_patterns.items()}
    for pool, matches in matchers.items():
        if not any(matches(name) for name in module_names):
            raise no_match_error(f"smt.pools.{pool}.pattern", pool_patterns[pool], module_names, "target module")
    members: dict[str, list[str]] = {pool: [] for pool in pool_patterns}
    for name in module_names:
        pool = next((p for p, matches in matchers.items() if matches(name)), None)
        if pool is None:
            raise ValueError(
                f"smt.pools: target module {name} matches no pool pattern; add a pool or narrow target_modules"
            )
        members[pool].append(name)
    return members
