"""Warm-up scoring: every criterion against a dense reference from full gradients."""

import pytest
import torch
from torch import nn

from smt import SMTConfig
from smt.core.model import inject, sparse_layers, start_scoring
from smt.core.scoring import BlockScorer
from smt.kernels.blocks import BlockGrid


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


def _per_token_grads(model, x2d):
    """Each token's own dW ``[T, out, in]`` (the loss is a sum over tokens, so they do not interact)."""
    weight = model.proj.weight.detach().clone().requires_grad_(True)
    grads = []
    for row in x2d:
        weight.grad = None
        torch.nn.functional.linear(row[None], weight, model.proj.bias.detach()).pow(2).sum().backward()
        grads.append(weight.grad.clone())
    return torch.stack(grads)


def _expected_scale_free(criterion, per_token, grid, x2d_list):
    n = grid.block_numels.float()
    if criterion == "grad_snr":
        total = 0
        for tokens in per_token:
            signal, noise = tokens.sum(0).abs(), tokens.square().sum(0).sqrt()
            total = total + grid.reduce_tiles(torch.where(noise > 0, signal / noise, 0.0), "sum") / n
        return total
    numerator = sum(grid.reduce_tiles(tokens.sum(0), "sq") for tokens in per_token)
    starts = range(0, grid.in_features, grid.block_cols)
    energy = sum(torch.stack([x[:, c : c + grid.block_cols].square().sum() for c in starts]) for x in x2d_list)
    rows = torch.tensor([len(range(r, min(r + grid.block_rows, grid.out_features)))
                         for r in range(0, grid.out_features, grid.block_rows)], dtype=torch.float32)  # fmt: skip
    return numerator / (rows[:, None] * energy)


@pytest.mark.parametrize("criterion", ["grad_snr", "grad_sq_xnorm"])
def test_scale_free_scores_match_per_token_reference(criterion):
    model = Holder()
    config = SMTConfig(target_modules=["proj"], block_size=(3, 4), num_blocks=2, criterion=criterion)
    batches = [torch.randn(2, 5, 10), torch.randn(3, 10)]
    x2d = [b.reshape(-1, 10) for b in batches]
    per_token = [_per_token_grads(model, x) for x in x2d]
    inject(model, config)
    scorers = start_scoring(model, config)
    for x in batches:
        model(x).pow(2).sum().backward()
    assert scorers["proj"].commit()
    grid = sparse_layers(model)["proj"].grid
    got = scorers["proj"].scores()
    assert torch.allclose(got, _expected_scale_free(criterion, per_token, grid, x2d), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("criterion", ["grad_snr", "grad_sq_xnorm", "grad_sq"])
def test_scale_free_scores_ignore_an_outlier_input_channel(criterion):
    """Scaling input columns 0-3 by 50 (an outlier channel) moves grad_sq's ranking, not the scale-free ones'."""
    grid = BlockGrid(8, 8, 4, 4)
    g, x = torch.randn(64, 8), torch.randn(64, 8)
    loud = x.clone()
    loud[:, :4] *= 50.0

    def scores(inputs):
        scorer = BlockScorer(grid, criterion, name="m")
        scorer.observe(g, inputs)
        scorer.commit()
        return scorer.scores()

    quiet_scores, loud_scores = scores(x), scores(loud)
    if criterion == "grad_sq":
        assert torch.allclose(loud_scores[:, 0], quiet_scores[:, 0] * 2500, rtol=1e-4)
    elif criterion == "grad_snr":
        assert torch.allclose(loud_scores, quiet_scores, rtol=1e-4)
    else:  # only the input energy is divided out: the ranking within each column block is kept
        assert torch.allclose(loud_scores.argsort(0), quiet_scores.argsort(0))
        assert loud_scores[:, 0].max() < 50 * quiet_scores.max()


@pytest.mark.parametrize("criterion", ["grad_snr", "grad_sq_xnorm", "grad_sq"])
def test_scores_are_per_element_on_ragged_blocks(criterion):
    """Uniform gradients score every block alike, the short last row and column blocks included."""
    grid = BlockGrid(6, 7, 4, 4)
    scorer = BlockScorer(grid, criterion, name="m")
    scorer.observe(torch.ones(5, 6), torch.ones(5, 7))
    scorer.commit()
    scores = scorer.scores()
    assert torch.allclose(scores, scores[0, 0].expand_as(scores)), scores


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
