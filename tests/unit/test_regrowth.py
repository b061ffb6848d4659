"""Regrowth: the swap decision on hand-made cases, schedules, optimizer state, frozen weights, windows."""

import copy

import pytest
import torch
from helpers import TwoLayer

from smt import Selection, apply_selection
from smt.core.config import RegrowthConfig
from smt.core.model import get_bank, sparse_layers
from smt.core.regrowth import Regrower, plan_swaps, regrowth_rate
from smt.kernels.blocks import BlockGrid


def test_plan_swaps_hand_case():
    active = torch.tensor([[0, 0], [0, 1], [1, 1]])
    prune = torch.tensor([0.5, 0.1, 0.3])  # drop order: position 1, then 2
    growth = torch.tensor([[9.0, 8.0], [7.0, 6.0], [1.0, 5.0]])  # (0,0),(0,1),(1,1) are active: not candidates
    drop, grow = plan_swaps(active, prune, growth, 2)
    assert drop == [1, 2]
    assert grow.tolist() == [[1, 0], [2, 1]]  # 7.0 then 5.0


def test_plan_swaps_never_regrows_a_block_dropped_in_the_same_event_and_caps_count():
    active = torch.tensor([[0, 0], [0, 1]])
    growth = torch.tensor([[100.0, 100.0], [1.0, 0.0]])  # the dropped blocks score best, but are excluded
    drop, grow = plan_swaps(active, torch.tensor([0.0, 0.0]), growth, 5)
    assert len(drop) == 2 and grow.tolist() == [[1, 0], [1, 1]]
    drop, grow = plan_swaps(active, torch.zeros(2), growth, 0)
    assert drop == [] and grow.shape == (0, 2)


@pytest.mark.parametrize(
    "schedule, expected", [("linear", [0.2, 0.1, 0.0]), ("cosine", [0.2, 0.1, 0.0]), ("constant", [0.2, 0.2, 0.2])]
)
def test_rate_schedules(schedule, expected):
    config = RegrowthConfig(rate=0.2, schedule=schedule)
    got = [regrowth_rate(config, t, 100) for t in (0, 50, 100)]
    assert got == pytest.approx(expected, abs=1e-9)
    assert regrowth_rate(config, 101, 100) == 0.0


def test_windows_and_events():
    regrower = Regrower(RegrowthConfig(every=5, accumulate=2, schedule="constant"), total_steps=20)
    assert [s for s in range(1, 21) if regrower.in_window(s)] == [4, 5, 9, 10, 14, 15, 19, 20]
    assert [s for s in range(1, 21) if regrower.is_event(s)] == [5, 10, 15, 20]
    linear = Regrower(RegrowthConfig(every=5, accumulate=2), total_steps=10)
    assert not linear.is_event(10)  # the linear rate is 0 at the end: no event, no scoring window
    assert not linear.in_window(9)


def _model_with_selection():
    torch.manual_seed(0)
    model = TwoLayer(10, 16, 8)
    grids = {"up": BlockGrid(16, 10, 4, 4), "down": BlockGrid(8, 16, 4, 4)}
    selection = Selection({"up": torch.tensor([[0, 0], [1, 1], [2, 2], [3, 0]]), "down": torch.tensor([[0, 0]])}, grids)
    apply_selection(model, selection)
    return model


def _step(model, optimizer, regrower=None):
    optimizer.zero_grad()
    model(torch.randn(6, 10)).square().mean().backward()
    if regrower is not None and regrower.scorers:
        regrower.commit_step()
    optimizer.step()


def test_event_swaps_lowest_delta_resets_their_state_and_keeps_the_rest():
    model = _model_with_selection()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("smt_bank")}
    bank = get_bank(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    regrower = Regrower(RegrowthConfig(every=3, accumulate=2, rate=0.5, schedule="constant"), total_steps=30)
    for step in range(1, 4):
        if regrower.in_window(step):
            regrower.open_window(model)
        _step(model, optimizer, regrower)
        regrower.step = step
    up = sparse_layers(model)["up"]
    before_index = up.plan().index.clone()
    with torch.no_grad():  # make the drop order known: slot of block (1,1) smallest, then (3,0)
        for slot, scale in zip(up.slot_ids(), [4.0, 0.01, 3.0, 0.02]):
            bank.slots[slot].mul_(0).add_(scale)
    kept_state = {s: copy.deepcopy(optimizer.state[bank.slots[s]]) for s in up.slot_ids()}
    report = regrower.event(model, [optimizer], reduce=lambda t: t)
    assert report["swapped"] == 2  # round(0.5 · 5) = 2 swaps: largest remainders go to up (2.0 vs 0.5)
    after = {tuple(b) for b in up.plan().index.tolist()}
    assert {(0, 0), (2, 2)} <= after and not {(1, 1), (3, 0)} & after
    assert len(after - {tuple(b) for b in before_index.tolist()}) == 2
    for slot in up.slot_ids():
        block = tuple(up.plan().index[up.slot_ids().index(slot)].tolist())
        if block in {(0, 0), (2, 2)}:  # kept: Δ and optimizer state untouched
            assert torch.equal(optimizer.state[bank.slots[slot]]["exp_avg"], kept_state[slot]["exp_avg"])
        else:  # grown: Δ = 0 and no optimizer state until the next step
            assert bank.slots[slot].abs().sum() == 0 and bank.slots[slot] not in optimizer.state
    assert not regrower.scorers and all(layer.scorer is None for layer in sparse_layers(model).values())
    _step(model, optimizer)  # trains on after the swap
    state = model.state_dict()
    assert all(torch.equal(frozen[k], state[k]) for k in frozen)


def test_dropped_blocks_return_to_pretrained_weights_in_merged_output():
    model = _model_with_selection()
    pretrained = model.up.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    regrower = Regrower(RegrowthConfig(every=1, accumulate=1, rate=1.0, schedule="constant"), total_steps=10)
    regrower.open_window(model)
    _step(model, optimizer, regrower)
    regrower.step = 1
    old = {tuple(b) for b in sparse_layers(model)["up"].plan().index.tolist()}
    regrower.event(model, [optimizer], reduce=lambda t: t)
    with torch.no_grad():
        for layer in sparse_layers(model).values():
            layer.merge()
    grid = BlockGrid(16, 10, 4, 4)
    for block in old:  # every old block was dropped (rate 1): merged weight there is exactly W0
        assert torch.equal(
            grid.gather(model.up.weight.detach(), torch.tensor([block])), grid.gather(pretrained, torch.tensor([block]))
        )


def test_state_dict_round_trip_mid_window():
    model = _model_with_selection()
    regrower = Regrower(RegrowthConfig(every=4, accumulate=2, criterion="ma", prune="delta_change"), total_steps=40)
    regrower.open_window(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _step(model, optimizer, regrower)
    state = regrower.state_dict()
    clone_model = copy.deepcopy(model)
    for layer in sparse_layers(clone_model).values():
        layer.scorer = None
    restored = Regrower(RegrowthConfig(every=4, accumulate=2, criterion="ma", prune="delta_change"), total_steps=40)
    restored.load_state_dict(state, clone_model)
    assert set(restored.scorers) == set(regrower.scorers)
    assert all(torch.equal(restored.ema[n], regrower.ema[n]) for n in regrower.ema)
    assert all(layer.scorer is restored.scorers[name] for name, layer in sparse_layers(clone_model).items())


def test_swap_counts_split_by_largest_remainder():
    from smt.core.regrowth import swap_counts

    assert swap_counts([3, 3, 0, 6], 0.16) == [1, 0, 0, 1]  # round(1.92) = 2: the largest remainders win
    assert swap_counts([10, 10], 0.2) == [2, 2]
    assert swap_counts([1, 1, 1], 1.0) == [1, 1, 1]
    assert swap_counts([5], 0.0) == [0]


def test_event_resets_bitsandbytes_8bit_optimizer_state():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = TwoLayer(128, 128, 64)
    grids = {"up": BlockGrid(128, 128, 64, 64), "down": BlockGrid(64, 128, 64, 64)}  # 4096-weight blocks: 8-bit state
    apply_selection(model, Selection({"up": torch.tensor([[0, 0], [1, 1]]), "down": torch.tensor([[0, 1]])}, grids))
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    regrower = Regrower(RegrowthConfig(every=1, accumulate=1, rate=1.0, schedule="constant"), total_steps=10)
    regrower.open_window(model)
    optimizer.zero_grad()
    model(torch.randn(6, 128)).square().mean().backward()
    regrower.commit_step()
    optimizer.step()
    bank = get_bank(model)
    assert all(bank.slots[s] in optimizer.state and "state1" in optimizer.state[bank.slots[s]] for s in range(3))
    regrower.step = 1
    report = regrower.event(model, [optimizer], reduce=lambda t: t)
    assert report["swapped"] == 3
    assert all(bank.slots[s] not in optimizer.state for s in range(3))
    optimizer.zero_grad()
    model(torch.randn(6, 128)).square().mean().backward()
    optimizer.step()  # fresh 8-bit state is created for the grown slots
    assert all(optimizer.state[bank.slots[s]]["state1"].dtype == torch.uint8 for s in range(3))
