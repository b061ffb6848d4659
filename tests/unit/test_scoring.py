"""Warm-up scoring: every criterion against a dense reference from full gradients."""

import pytest
import torch
from torch import nn

from smt import SMTConfig
from smt.blocks import BlockGrid
from smt.model import inject, sparse_layers, start_scoring
from smt.scoring import BlockScorer


class Holder(nn.Module):
    def __init__(self, d_in=10, d_out=7):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def _dense_grads(model, batches):
    """Per micro-batch dense dW (logical [out, in]) from plain autograd on a copy."""
    weight = model.proj.weight.detach().clone().requires_grad_(True)
    grads = []
    for x in batches:
        weight.grad = None
        torch.nn.functional.linear(x, weight, model.proj.bias.detach()).pow(2).sum().backward()
        grads.append(weight.grad.clone())
    return grads


def _expected(criterion, grads, grid, weight):
    n = grid.block_numels.float()
    if criterion == "grad_sq":
        return sum(grid.reduce_tiles(g, "sq") for g in grads) / n
    if criterion == "grad_l1":
        return sum(grid.reduce_tiles(g, "abs") for g in grads) / n
    if criterion == "grad_mean_abs":
        return grid.reduce_tiles(sum(grads), "sum").abs() / n
    if criterion == "grad_abs_mean":
        return grid.reduce_tiles(sum(grads).abs(), "sum") / n
    return grid.reduce_tiles(weight.abs(), "sum") / n


@pytest.mark.parametrize("criterion", ["grad_sq", "grad_l1", "grad_mean_abs", "grad_abs_mean", "weight_abs_mean"])
def test_scores_match_dense_reference(criterion):
    model = Holder()
    config = SMTConfig(target_modules=["proj"], block_size=(3, 4), num_blocks=2, criterion=criterion)
    batches = [torch.randn(2, 5, 10), torch.randn(3, 10)]
    grads = _dense_grads(model, [b.reshape(-1, 10) for b in batches])
    inject(model, config)
    scorers = start_scoring(model, config)
    for x in batches:  # two micro-batches of one optimizer step
        model(x).pow(2).sum().backward()
        weight = model.proj.weight
        assert not weight.requires_grad and weight.grad is None
    assert scorers["proj"].commit()
    grid = sparse_layers(model)["proj"].grid
    got = scorers["proj"].scores(model.proj.weight)
    assert torch.allclose(got, _expected(criterion, grads, grid, model.proj.weight.detach()), rtol=1e-5, atol=1e-7)
    assert scorers["proj"].micro_batches == (2 if criterion != "weight_abs_mean" else 0)


def test_first_layer_with_frozen_input_is_scored():
    # Nothing upstream requires grad and the layer holds no provisional slot: the tap must still fire.
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    config = SMTConfig(target_modules=["0", "1"], block_size=3, num_blocks=1)
    inject(model, config)
    scorers = start_scoring(model, config)
    model(torch.randn(4, 6)).sum().backward()
    assert all(s.commit() for s in scorers.values())
    assert all(s.total is not None and s.total.abs().sum() > 0 for s in scorers.values())


def test_loss_scale_is_divided_out_and_nonfinite_steps_are_discarded():
    grid = BlockGrid(8, 8, 4, 4)
    x, g = torch.randn(5, 8), torch.randn(5, 8)
    plain, scaled = BlockScorer(grid, "grad_sq", "m"), BlockScorer(grid, "grad_sq", "m")
    plain.observe(g, x)
    scaled.loss_scale = 1024.0
    scaled.observe(g * 1024.0, x)
    assert plain.commit() and scaled.commit()
    assert torch.allclose(plain.scores(), scaled.scores(), rtol=1e-5)
    before = scaled.total.clone()
    scaled.observe(torch.full_like(g, float("inf")), x)
    assert not scaled.commit()
    assert torch.equal(scaled.total, before) and scaled.skipped_steps == 1 and scaled.steps == 1


def test_random_is_seeded_and_refuses_missing_or_nonfinite_scores():
    grid = BlockGrid(8, 8, 4, 4)
    a, b = BlockScorer(grid, "random", "m", seed=3), BlockScorer(grid, "random", "m", seed=3)
    assert torch.equal(a.scores(), b.scores())
    assert not torch.equal(a.scores(), BlockScorer(grid, "random", "other", seed=3).scores())
    with pytest.raises(ValueError, match="no finite warm-up gradient"):
        BlockScorer(grid, "grad_sq", "m").scores()
    with pytest.raises(ValueError, match="not one of"):
        BlockScorer(grid, "nope", "m")


def test_state_dict_round_trip_and_reduce_hook():
    grid = BlockGrid(8, 8, 4, 4)
    scorer = BlockScorer(grid, "grad_mean_abs", "m")
    scorer.observe(torch.randn(3, 8), torch.randn(3, 8))
    scorer.commit()
    clone = BlockScorer(grid, "grad_mean_abs", "m")
    clone.load_state_dict(scorer.state_dict())
    assert torch.equal(clone.scores(), scorer.scores())
    clone.reduce_(lambda t: t * 2)  # what an all-reduce over two identical ranks gives
    assert torch.allclose(clone.scores(), 2 * scorer.scores())
    assert BlockScorer(grid, "grad_abs_mean", "m").accumulator_bytes() == 2 * 4 * 64
