"""Guards against a run that trains nothing and still ends green.

A cut backward (a frozen or detached path, a quantized base whose backward is missing, labels all masked)
makes SMT train nothing without any error: every Δ stays exactly 0. Three checks make that loud:

- at selection: every gradient-based block score is exactly 0 → no gradient reached any targeted module;
- ``after`` tuning optimizer steps with lr > 0 (and at the end of a shorter run): every slot still exactly 0
  (slots start at Δ = 0 after selection; only a step whose gradient is nonzero moves one, and regrowth zeroes
  only the swapped ones) → one flag, taken right after that step (``look``) and reduced over ranks with the next
  reduction the caller makes anyway (``check``), stops the run;
- when a delta or merged model is about to be written: Δ = 0 everywhere → refused. A run at lr 0 trains
  nothing either, so its delta is refused too (the step check does not count steps at lr 0).

Nothing here imports Lightning: the callback and the module pass their tensors and decisions in.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

WHAT_TO_CHECK = "frozen or detached paths (no_grad, .detach()), a quantized base's backward, labels all masked"


class NothingTrainedError(RuntimeError):
    """A run or checkpoint holds no training: Δ is exactly 0 in every slot, or no gradient reached a target."""


def check_gradients_reached(scorers: dict, steps: int) -> list[str]:
    """Refuse a warm-up whose gradient-based scores are all exactly 0; return the modules that got no gradient.

    Args:
        scorers: the ``BlockScorer`` of each targeted module, summed over ranks.
        steps: warm-up steps scored (for the message).

    Raises:
        NothingTrainedError: every gradient criterion's score is exactly 0.
    """
    totals = {name: s.total for name, s in scorers.items() if s.criterion.needs_gradients}
    silent = [name for name, total in totals.items() if total is None or not bool(total.any())]
    if totals and len(silent) == len(totals):
        raise NothingTrainedError(
            f"every block score of the {steps}-step warm-up is exactly 0: no gradient reached any targeted "
            f"module ({_names(silent)}); check {WHAT_TO_CHECK}"
        )
    return silent


def check_warmup_fits(warmup_steps: int, total_steps: float) -> None:
    """Refuse a warm-up that would use up the whole run of ``total_steps`` optimizer steps (nothing would be tuned).

    Raises:
        ValueError: ``warmup_steps`` ≥ ``total_steps`` (an unbounded run, ``inf``, always fits).
    """
    if total_steps != float("inf") and warmup_steps >= total_steps:
        raise ValueError(
            f"smt.warmup_steps={warmup_steps} is not shorter than the run ({int(total_steps)} optimizer steps); "
            "lower smt.warmup_steps or train longer (trainer.max_steps / max_epochs)"
        )


def local_slots_moved(slots: Iterable[torch.Tensor]) -> torch.Tensor:
    """1.0 if this rank's part of any slot is nonzero, else 0.0: a 0-dim tensor (no host sync; sum it over ranks)."""
    local = [s.to_local() if hasattr(s, "to_local") else s for s in slots]  # FSDP2 slots are DTensor shards
    return torch.stack([t.detach().ne(0).any() for t in local]).any().float()


def slots_learning_rate_positive(optimizers: Iterable[torch.optim.Optimizer], slots: Iterable[torch.Tensor]) -> bool:
    """Whether some optimizer updates a slot with lr > 0 in this step (host floats only: no sync)."""
    ids = {id(slot) for slot in slots}
    groups = [group for opt in optimizers for group in opt.param_groups]
    return any(group["lr"] > 0 for group in groups if any(id(p) in ids for p in group["params"]))


def refuse_all_zero_delta(moved: bool, action: str) -> None:
    """Raise instead of doing ``action`` (``write …``, ``export …``) when Δ is exactly 0 in every slot.

    Raises:
        NothingTrainedError: nothing moved.
    """
    if not moved:
        raise NothingTrainedError(
            f"Δ is exactly 0 in every slot (lr 0, or no gradient reached the blocks): refusing to {action}; "
            f"check model.lr and {WHAT_TO_CHECK}"
        )


class ProgressCheck:
    """When to check that Δ moved: once, after ``after`` tuning optimizer steps with lr > 0 (0 = never).

    Example:
        >>> check = ProgressCheck(after=2)
        >>> check.count_step(lr_positive=True); check.count_step(lr_positive=True); check.due
        True
    """

    def __init__(self, after: int) -> None:
        if after < 0:
            raise ValueError(f"smt.check_progress_after={after} must be ≥ 0 (0 = never check)")
        self.after, self.steps, self.checked, self.due = after, 0, False, False
        self.pending: torch.Tensor | None = None  # this rank's flag, taken and not yet decided

    def look(self, slots: Iterable[torch.Tensor]) -> None:
        """Take this rank's "a slot moved" flag now (``local_slots_moved``: no host sync); ``check`` decides it."""
        self.pending = local_slots_moved(slots)

    def count_step(self, lr_positive: bool) -> None:
        """Count one tuning optimizer step; it makes the check due at the ``after``-th one with lr > 0."""
        if self.after and lr_positive and not self.checked:
            self.steps += 1
            self.due = self.steps >= self.after

    @property
    def due_at_end(self) -> bool:
        """A run shorter than ``after`` steps is checked when it ends, if any step had lr > 0."""
        return bool(self.after) and not self.checked and self.steps > 0

    def check(self, moved: bool) -> None:
        """Record the all-rank decision; raise if nothing moved.

        Raises:
            NothingTrainedError: every slot is still exactly 0.
        """
        self.checked, self.due, self.pending = True, False, None
        if not moved:
            raise NothingTrainedError(
                f"Δ is still exactly 0 in every slot after {self.steps} tuning steps with lr > 0: nothing is "
                f"training; check {WHAT_TO_CHECK} (smt.check_progress_after=0 turns this check off)"
            )

    def state_dict(self) -> dict:
        return {"steps": self.steps, "checked": self.checked}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.checked = int(state.get("steps", 0)), bool(state.get("checked", False))
        self.due = bool(self.after) and not self.checked and self.steps >= self.after


def _names(names: list[str], shown: int = 3) -> str:
    more = f", … {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
