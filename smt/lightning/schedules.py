"""Learning-rate schedules that begin after the SMT warm-up.

The warm-up's optimizer steps update nothing, but Lightning still steps the LR scheduler through
them. ``after_warmup`` shifts any step-wise multiplier so that step ``offset`` is the schedule's step 0:

    lr(t) = base_lr · f(max(0, t − offset))
"""

from __future__ import annotations

import math
from collections.abc import Callable


def after_warmup(multiplier: Callable[[int], float], offset: int) -> Callable[[int], float]:
    """``multiplier`` delayed by ``offset`` steps (use with ``torch.optim.lr_scheduler.LambdaLR``)."""

    def delayed(step: int) -> float:
        return multiplier(max(0, step - offset))

    return delayed


def warmup_cosine(
    total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0, kind: str = "cosine"
) -> Callable[[int], float]:
    """Linear LR warm-up to 1, then ``cosine``/``linear`` decay to ``min_ratio`` at ``total_steps``, or ``constant``."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"model.scheduler={kind!r} is not one of cosine, linear, constant")

    def multiplier(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape

    return multiplier
