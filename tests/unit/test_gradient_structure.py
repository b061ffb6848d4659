"""``scripts/gradient_structure.py``: the shares each budget-equal structure can follow, on gradients with known
structure (no model: the measured batches are built by hand)."""

from __future__ import annotations

import pytest
import torch
from helpers import import_script


@pytest.fixture(scope="module")
def structure():
    return import_script("gradient_structure")


def test_block_sum_covers_ragged_edges(structure):
    values = torch.arange(6 * 10, dtype=torch.float32).reshape(6, 10)
    sums = structure.block_sum(values, 4)
    assert sums.shape == (2, 3) and float(sums.sum()) == float(values.sum())
    assert float(sums[1, 2]) == float(values[4:, 8:].sum())


def _batches(gradient: torch.Tensor, noise: float, count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [gradient + noise * torch.randn(gradient.shape, generator=generator) for _ in range(count)]


def test_rank_one_gradient_is_all_within_lora_reach_and_an_outlier_column_is_within_blocks(structure):
    rows, cols, side = 64, 64, 16
    u, v = torch.randn(rows), torch.zeros(cols)
    v[5] = 30.0  # one outlier input channel carries the gradient, as SmolLM2's do
    v += 0.1 * torch.randn(cols)
    gradient = torch.outer(u, v)
    warm = _batches(gradient, 0.0, 3, 0)
    later = _batches(gradient, 0.0, 4, 1)
    late, late_sq = sum(later), sum(g.square() for g in later)
    budget = 4 * side * side  # four blocks: the outlier column's whole height
    result = structure.shares({"m": late}, {"m": late_sq}, [{"m": g} for g in warm], 4, budget, 1, (side,))
    assert result["rank"][0] == pytest.approx(1.0, abs=1e-5)  # rank 1 holds the whole gradient
    sq, l1, _, newton = result[f"grad_sq blocks {side}"]
    assert sq > 0.95  # the outlier column's blocks hold nearly all of Σ G² ...
    assert newton == pytest.approx(4 / 16)  # ... but only their share of the weights' Newton gain
    rand_sq, _, _, rand_newton = result[f"random blocks {side}"]
    assert rand_sq < 0.5 and rand_newton == pytest.approx(4 / 16)  # noiseless batches: every weight gains alike


def test_grad_sq_chases_large_noisy_weights_where_the_newton_gain_is_in_consistent_ones(structure):
    rows, cols, side = 32, 32, 16

    def batches(count: int) -> list[torch.Tensor]:
        out = []
        for index in range(count):
            batch = torch.zeros(rows, cols)
            batch[:16, :16] = 0.1  # small but consistent: block (0, 0)
            batch[16:, 16:] = 5.0 * (1 if index % 2 else -1)  # large but sign-flipping: block (1, 1) sums to zero
            out.append(batch)
        return out

    warm, later = batches(4), batches(4)
    late, late_sq = sum(later), sum(g.square() for g in later)
    result = structure.shares({"m": late}, {"m": late_sq}, [{"m": g} for g in warm], 4, side * side, 1, (side,))
    assert result[f"best blocks by newton {side}"][3] == pytest.approx(1.0)
    assert result[f"batch-SNR blocks {side}"][3] == pytest.approx(1.0)  # the scale-free pick finds the gain
    assert result[f"grad_sq blocks {side}"][3] == pytest.approx(0.0)  # grad_sq takes the loud block, worth nothing
