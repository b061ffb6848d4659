"""A training ``DataLoader`` that resumes mid-epoch on the batch an interrupted run would have trained next.

Lightning restores a run's step and batch index from a checkpoint, but restarts a plain ``DataLoader`` at
its first batch (the resumed run trains batches 0, 1, … again where the original went on with k, k+1, …),
and a freshly seeded shuffling generator repeats epoch 0's order in every later epoch. ``ResumableLoader``
implements Lightning's ``state_dict``/``load_state_dict`` loader interface:

- saved: the shuffling generator's state when the current epoch's iterator was made, its state now, and
  how many batches of the epoch were trained (asked of the caller: Lightning prefetches one batch, so the
  loader's own count would be one ahead);
- restored mid-epoch: the epoch-start state (the same permutation) and the trained batches skipped;
  restored at an epoch's end: the current state, so the next epoch draws the order it would have drawn.

Skipped batches are collated and dropped (the data is pre-tokenized, so this is cheap).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """``DataLoader`` whose shuffle order and position survive a checkpoint.

    Example:
        >>> loader = ResumableLoader(range(8), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
        >>> [batch.tolist() for batch in loader][:1]  # doctest: +SKIP
        [[6, 2]]

    Args:
        trained_batches: returns how many batches of the current epoch were trained (called when a checkpoint
            is written); default: none.
        *args, **kwargs: as for ``DataLoader``.
    """

    def __init__(self, *args: Any, trained_batches: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained_batches = trained_batches
        self._epoch_start_state: torch.Tensor | None = None
        self._restore_state: torch.Tensor | None = None
        self._skip = 0

    def __iter__(self):
        if self.generator is not None:
            if self._restore_state is not None:
                self.generator.set_state(self._restore_state)
                self._restore_state = None
            self._epoch_start_state = self.generator.get_state()
        iterator = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            if next(iterator, None) is None:
                break
        return iterator

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands: shuffling states and trained batches (Lightning stores it in the checkpoint)."""
        trained = int(self.trained_batches()) if self.trained_batches is not None else 0
        return {
            "trained_batches": trained,
            "epoch_start_generator": self._epoch_start_state,
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the first untrained batch of the saved epoch, or at the start of the next one."""
        trained = int(state.get("trained_batches", 0))
        if trained < len(self):
            self._restore_state, self._skip = state.get("epoch_start_generator"), trained
        else:
            self._restore_state, self._skip = state.get("generator"), 0
        if self.generator is None:
            self._restore_state = None
