"""SpIEL-style dynamic prune and regrow, at block granularity, with fixed shapes.

Every ``R = every`` tuning steps (``t`` counts optimizer steps since selection), in each module:

    n_m   = module m's share of round(p(t) · K), split in proportion to its k_m by largest remainder (at block
            granularity a module holds few blocks, so ⌊p · k_m⌋ alone would round most events to nothing)
    p(t)  = rate · (1 − t/T) (linear) | rate · ½(1 + cos πt/T) (cosine) | rate
    drop  = the n active blocks with the smallest prune score: ‖Δ_b‖ (``delta_norm``), or how far Δ_b moved since
            the previous event, ‖Δ_b − Δ_b(prev)‖ (``delta_change``; every block starts at Δ = 0, so change since
            growth would equal the norm)
    grow  = the n inactive blocks (not just dropped) with the largest growth score, where growth is the
            fp32 block score Σ_mb ‖G_mb[b]‖² over the last ``A = accumulate`` steps (``ag``), or its EMA (``ma``)

The dropped slots move to the grown blocks (``BlockBank.move_slots``: Δ = 0 there), and their optimizer
state is removed so the next step starts it fresh; kept slots and their state are untouched. The bank's
parameter set never changes, so DDP/FSDP and the optimizer are unaware. Scores are reduced across ranks
(``reduce``) before any decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from smt.core.config import RegrowthConfig
from smt.core.model import get_bank, sparse_layers
from smt.core.scoring import BlockScorer


def regrowth_rate(config: RegrowthConfig, step: int, total: int) -> float:
    """p(t): the fraction of each module's blocks replaced at tuning step ``step`` of ``total``."""
    if step > total:
        return 0.0
    progress = step / max(1, total)
    if config.schedule == "constant":
        return config.rate
    if config.schedule == "cosine":
        return config.rate * 0.5 * (1 + math.cos(math.pi * progress))
    return config.rate * (1 - progress)


def swap_counts(sizes: list[int], fraction: float) -> list[int]:
    """Split ``round(fraction · Σ sizes)`` swaps over modules in proportion to ``sizes`` (largest remainder)."""
    quotas = [fraction * size for size in sizes]
    counts = [int(q) for q in quotas]
    left = round(fraction * sum(sizes)) - sum(counts)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: max(0, left)]:
        counts[i] += 1
    return [min(c, size) for c, size in zip(counts, sizes)]


def plan_swaps(
    active: torch.Tensor, prune_scores: torch.Tensor, growth: torch.Tensor, count: int
) -> tuple[list[int], torch.Tensor]:
    """Which active blocks to drop and which inactive blocks to grow, for one module.

    Args:
        active: ``[k, 2]`` blocks held now.
        prune_scores: ``[k]`` (lower = drop first; ties: first listed).
        growth: ``[n_rb, n_cb]`` growth scores (higher = grow first; ties: row-major).
        count: blocks to swap (capped by the candidates available).

    Returns:
        Positions in ``active`` to drop, and the ``[n, 2]`` blocks to grow in their place (same order).
    """
    if count <= 0 or active.shape[0] == 0:
        return [], active.new_zeros(0, 2)
    candidates = torch.ones(growth.shape, dtype=torch.bool)
    candidates[active[:, 0], active[:, 1]] = False  # kept and just-dropped blocks are both excluded
    flat = torch.where(candidates.flatten(), growth.flatten().float(), torch.tensor(float("-inf")))
    count = min(count, int(candidates.sum()), active.shape[0])
    grow_flat = torch.sort(flat, descending=True, stable=True).indices[:count]
    drop = torch.sort(prune_scores.float().cpu(), stable=True).indices[:count].tolist()
    n_cb = growth.shape[1]
    return drop, torch.stack([grow_flat // n_cb, grow_flat % n_cb], dim=1)


class Regrower:
    """Drives regrowth for one model: scoring windows, events, optimizer-state resets, resumable state.

    Args:
        config: the regrowth settings.
        total_steps: tuning steps of the run (``T`` of the schedule, unless ``config.until`` is set).
    """

    def __init__(self, config: RegrowthConfig, total_steps: int) -> None:
        self.config = config
        self.total = config.until if config.until is not None else total_steps
        self.step = 0
        self.scorers: dict[str, BlockScorer] = {}
        self.ema: dict[str, torch.Tensor] = {}
        self.previous: torch.Tensor | None = None  # all slots' Δ at the last event (delta_change)
        self.history: list[dict] = []

    # --- when -----------------------------------------------------------------------------------------

    def is_event(self, step: int) -> bool:
        return step > 0 and step % self.config.every == 0 and regrowth_rate(self.config, step, self.total) > 0

    def in_window(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, since selection) is one of the A scored before an event."""
        next_event = math.ceil(step / self.config.every) * self.config.every
        return self.is_event(next_event) and next_event - step < self.config.accumulate

    # --- scoring --------------------------------------------------------------------------------------

    def open_window(self, model: nn.Module) -> None:
        """Attach fp32 block scorers (``grad_sq``) to every layer for the coming steps."""
        if self.scorers:
            return
        for name, layer in sparse_layers(model).items():
            self.scorers[name] = BlockScorer(layer.grid, "grad_sq", name)
            layer.scorer = self.scorers[name]

    def commit_step(self, accept: bool | None = None) -> None:
        """Close one optimizer step of the window; ``accept=False`` discards it (a non-finite step somewhere)."""
        for name, scorer in self.scorers.items():
            if scorer.commit(accept) and self.config.criterion == "ma" and scorer.total is not None:
                previous = self.ema.get(name)
                current = scorer.total.float().cpu()
                decay = self.config.ma_decay
                self.ema[name] = current if previous is None else decay * previous + (1 - decay) * current
                scorer.total = None

    def _close_window(self, model: nn.Module) -> None:
        for layer in sparse_layers(model).values():
            layer.scorer = None
        self.scorers = {}

    # --- events -----------------------------------------------------------------------------------------

    def event(self, model: nn.Module, optimizers: list, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Prune and regrow every module now (after the optimizer step). Returns the event's report."""
        bank = get_bank(model)
        fraction = regrowth_rate(self.config, self.step, self.total)
        growth = self._growth_scores(reduce)
        report = {"step": self.step, "rate": fraction, "swapped": 0, "dropped_score": [], "grown_score": []}
        layers = sparse_layers(model)
        counts = swap_counts(
            [len(layer.slot_ids()) if name in growth else 0 for name, layer in layers.items()], fraction
        )
        for position, ((name, layer), count) in enumerate(zip(layers.items(), counts)):
            slots = layer.slot_ids()
            if not slots or count == 0:
                continue
            active = layer.plan().index.cpu()
            prune = self._prune_scores(bank, slots, layer.grid.tile_shape)
            drop, grow = plan_swaps(active, prune, growth[name], count)
            if not drop:
                continue
            moved = [slots[i] for i in drop]
            report["dropped_score"] += prune[drop].tolist()
            report["grown_score"] += growth[name][grow[:, 0], grow[:, 1]].tolist()
            bank.move_slots(moved, position, grow)
            self._reset(bank, moved, optimizers)
            report["swapped"] += len(moved)
        self._close_window(model)
        if self.config.prune == "delta_change":
            self.previous = bank.detached(list(range(bank.capacity)), bank.tile_shape)  # a fresh stack
        self.history.append({"step": self.step, "swapped": report["swapped"], "rate": fraction})
        return report

    def _growth_scores(self, reduce) -> dict[str, torch.Tensor]:
        if self.config.criterion == "ma":
            return {name: reduce(score.clone()).float().cpu() for name, score in self.ema.items()}
        scores = {}
        for name, scorer in self.scorers.items():
            if scorer.total is not None:
                scores[name] = reduce(scorer.total.clone()).float().cpu()
        return scores

    def _prune_scores(self, bank, slots: list[int], tile_shape) -> torch.Tensor:
        delta = bank.detached(slots, tile_shape).float()
        if self.config.prune == "delta_change" and self.previous is not None:
            delta = delta - self.previous[slots, : tile_shape[0], : tile_shape[1]].to(delta.device).float()
        return delta.flatten(1).norm(dim=1).cpu()

    @staticmethod
    def _reset(bank, moved: list[int], optimizers: list) -> None:
        for slot in moved:
            for optimizer in optimizers:
                optimizer.state.pop(bank.slots[slot], None)

    # --- resume -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "scorers": {name: s.state_dict() for name, s in self.scorers.items()},
            "ema": dict(self.ema),
            "previous": None if self.previous is None else self.previous.cpu(),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        self.step = int(state["step"])
        self.ema = dict(state["ema"])
        self.previous = state["previous"]
        self.history = list(state["history"])
        if state["scorers"]:
            self.open_window(model)
            for name, scorer_state in state["scorers"].items():
                self.scorers[name].load_state_dict(scorer_state)


def describe_event(report: dict) -> str:
    """One line on a regrowth event's report: blocks swapped, the rate, and the scores of what went and came."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return (
        f"swapped {report['swapped']} blocks (rate {report['rate']:.3f}); mean |Δ| dropped "
        f"{mean(report['dropped_score']):.3g}, mean growth score of grown {mean(report['grown_score']):.3g}"
    )
