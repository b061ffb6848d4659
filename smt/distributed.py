"""Keeping ranks in agreement: summed score state, one selection everywhere, strategies smt can run under.

Every rank taps its own shard of the data. Decisions need the sum over ranks ``S = Σ_r S_r``, and a checkpoint
(written by rank 0 alone) must carry that sum too: on resume rank 0 restarts from ``S`` and every other rank from
0, so the next reduction again gives the uninterrupted run's total. The EMA of regrowth's ``ma`` criterion is
linear in the scores, so the same holds for it.

This module sits beside ``smt/callbacks.py`` (it knows Lightning's strategies); the core below it does not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from smt.regrowth import Regrower
from smt.scoring import BlockScorer

Reduce = Callable[[torch.Tensor], torch.Tensor]


# --- score state across ranks ------------------------------------------------------------------------


def summed_scorer_states(scorers: dict[str, BlockScorer], reduce: Reduce) -> dict[str, dict]:
    """State dicts of ``scorers`` with their totals summed over ranks (every rank must call this, in step)."""
    states = {}
    for name, scorer in scorers.items():
        twin = copy.copy(scorer)  # reduce a copy: the live totals keep counting only this rank's batches
        twin.total = None if scorer.total is None else scorer.total.clone()
        twin.reduce_(reduce)
        states[name] = twin.state_dict()
    return states


def summed_regrowth_state(regrower: Regrower, reduce: Reduce) -> dict:
    """``regrower.state_dict()`` with its open window's scores and its EMAs summed over ranks."""
    ema = {name: reduce(value.clone()).cpu() for name, value in regrower.ema.items()}
    return {**regrower.state_dict(), "scorers": summed_scorer_states(regrower.scorers, reduce), "ema": ema}


def zeroed_scorer_states(states: dict[str, dict]) -> dict[str, dict]:
    """What a rank other than 0 resumes from: the same shapes, no score (rank 0 carries the sum)."""
    return {
        name: {**state, "total": None if state["total"] is None else torch.zeros_like(state["total"])}
        for name, state in states.items()
    }


def zeroed_regrowth_state(state: dict) -> dict:
    return {
        **state,
        "scorers": zeroed_scorer_states(state["scorers"]),
        "ema": {name: torch.zeros_like(value) for name, value in state["ema"].items()},
    }


# --- one selection on every rank -----------------------------------------------------------------------


def check_same_selection(fingerprint: str, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Raise on every rank unless every rank's selection has this ``fingerprint`` (16 hex digits).

    Every rank gathers every fingerprint, so all of them stop together (a one-sided error would leave the others
    waiting in the next collective).

    Raises:
        RuntimeError: the ranks selected different blocks; names the ranks that differ from rank 0.
    """
    mine = torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.int64)
    gathered = all_gather(mine).reshape(-1, mine.numel())
    fingerprints = [bytes(row.tolist()).hex() for row in gathered]
    differing = [rank for rank, value in enumerate(fingerprints) if value != fingerprints[0]]
    if differing:
        raise RuntimeError(
            f"smt: ranks {differing} selected other blocks than rank 0 (fingerprints {fingerprints}); "
            "block scores were not reduced identically across ranks"
        )
