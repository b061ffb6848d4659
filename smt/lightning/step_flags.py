"""One all-rank reduction per optimizer step for every per-step decision of smt's callbacks.

Several callbacks need, at each optimizer step, a decision that is the same on every rank: ``NonFiniteGuard`` (was
the step finite?), ``SparseMatrixTuning`` (were the warm-up or regrowth taps finite? did any slot move, when the
progress check is due?) and ``PreemptionCheckpoint`` (did any rank get SIGTERM?). Reducing each flag on its own
and reading it on the host would cost a pipeline stall per read on a GPU, and a collective per reduction. Here each
callback registers a *source* in ``setup``: a function that returns its flag when asked (a 0-dim tensor, or a plain
number when it is known on the host). The first callback that needs a decision in a step asks every source, stacks
the flags into one vector, sums it over ranks (one ``strategy.reduce``) and reads it on the host once
(``tolist``); the others read that result. On one device with host-only flags nothing touches a tensor.

Example:
    >>> flags = step_flags(trainer)  # doctest: +SKIP
    >>> flags.add("guard", lambda: (~finite).float())  # in setup  # doctest: +SKIP
    >>> flags.totals(trainer, key)["guard"] > 0  # some rank had a bad step  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

Flag = torch.Tensor | float | bool
ATTRIBUTE = "smt_step_flags"


class StepFlags:
    """The per-step flags of one trainer's callbacks, reduced over ranks together (see the module docstring)."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], Flag]] = {}
        self.reductions = 0  # how many vectors were reduced (tests and benchmarks count them)
        self._key: Hashable | None = None
        self._totals: dict[str, float] = {}

    def add(self, name: str, source: Callable[[], Flag]) -> None:
        """Register (or replace) ``name``'s flag; every rank must register the same names in the same order."""
        self.sources[name] = source
        self._key = None

    def totals(self, trainer, key: Hashable) -> dict[str, float]:
        """Each source's flag summed over ranks for the step ``key`` (e.g. ``(epoch, batch_idx)``).

        The first call for a new ``key`` asks every source and reduces them all (every rank must make it, as with any
        collective); later calls for the same ``key`` return that result.
        """
        if key != self._key:
            self._totals, self._key = self._reduce(trainer), key
        return self._totals

    def _reduce(self, trainer) -> dict[str, float]:
        flags = {name: source() for name, source in self.sources.items()}
        if trainer.world_size == 1 and not any(isinstance(flag, torch.Tensor) for flag in flags.values()):
            return {name: float(flag) for name, flag in flags.items()}
        device = trainer.strategy.root_device
        vector = torch.stack([torch.as_tensor(flag, dtype=torch.float32).to(device) for flag in flags.values()])
        self.reductions += 1
        return dict(zip(flags, trainer.strategy.reduce(vector, reduce_op="sum").tolist()))  # the step's one host read


def step_flags(trainer) -> StepFlags:
    """The trainer's ``StepFlags``, made on first use (kept on the trainer: every callback of a run shares it)."""
    flags = getattr(trainer, ATTRIBUTE, None)
    if flags is None:
        flags = StepFlags()
        setattr(trainer, ATTRIBUTE, flags)
    return flags
