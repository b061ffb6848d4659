"""SparseBlockLinear against dense autograd: block-only dW, dense dX, memory, frozen weights."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from smt import Selection, SMTConfig, apply_selection
from smt.core.model import get_bank, sparse_layers
from smt.kernels.blocks import BlockGrid

GEOMETRIES = [  # (d_in, d_out, block): square, ragged, non-square, row strips, column strips
    (8, 8, (4, 4)),
    (10, 7, (4, 3)),
    (12, 9, (3, 4)),
    (10, 6, (1, -1)),
    (10, 6, (-1, 2)),
]


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _conv1d(d_in, d_out):
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(d_out, d_in)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


def _random_selection(out_f, in_f, block, k, name="proj"):
    from smt.kernels.blocks import resolve_block_size

    grid = BlockGrid(out_f, in_f, *resolve_block_size(block, (out_f, in_f), name))
    index = grid.all_blocks()[torch.randperm(grid.num_blocks)[: min(k, grid.num_blocks)]]
    return Selection({name: index}, {name: grid})


def _fill_random(model):
    bank = get_bank(model)
    with torch.no_grad():
        for layer in sparse_layers(model).values():
            ids = layer.slot_ids()
            if not ids:
                continue
            mask = layer.grid.tile_mask(layer.plan().index)
            for slot, m in zip(ids, mask):
                bank.slots[slot].copy_(torch.randn_like(bank.slots[slot]) * m)


def _dense_reference(model, selection, x, transposed=False):
    """Dense autograd on W = W0 + Δ: returns (y, dx, dW in logical [out, in] layout)."""
    layer = sparse_layers(model)["proj"]
    w = (layer.weight.t() if transposed else layer.weight).detach().clone() + layer.delta_weight()
    w.requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    bias = layer.bias.detach() if layer.bias is not None else None
    y = torch.nn.functional.linear(xr, w, bias)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), xr.grad, w.grad


@pytest.mark.parametrize("d_in, d_out, block", GEOMETRIES)
@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1d"])
@pytest.mark.parametrize("mode", ["materialize", "additive"])
@pytest.mark.parametrize("leading", [(7,), (2, 5)])
def test_block_gradients_equal_dense_blocks(d_in, d_out, block, kind, mode, leading):
    base = {
        "linear": lambda: nn.Linear(d_in, d_out),
        "linear_nobias": lambda: nn.Linear(d_in, d_out, bias=False),
        "conv1d": lambda: _conv1d(d_in, d_out),
    }[kind]()
    model = Holder(base)
    selection = _random_selection(d_out, d_in, block, k=3)
    apply_selection(model, selection, SMTConfig(forward=mode))
    _fill_random(model)
    x = torch.randn(*leading, d_in, requires_grad=True)
    y = model(x)
    (y * torch.linspace(-1, 1, d_out)).sum().backward()
    y_ref, dx_ref, dw_ref = _dense_reference(model, selection, x, transposed=kind == "conv1d")
    layer = sparse_layers(model)["proj"]
    bank = get_bank(model)
    got = torch.stack([bank.slots[s].grad for s in layer.slot_ids()])
    grid, index = layer.grid, layer.plan().index
    want = grid.gather(dw_ref, index)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad, dx_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got[:, : grid.block_rows, : grid.block_cols], want, rtol=1e-5, atol=1e-6)
    assert (got[:, : grid.block_rows, : grid.block_cols] * ~grid.tile_mask(index)).abs().sum() == 0
    assert layer.weight.grad is None and not layer.weight.requires_grad


def _train(model, steps, lr=0.1, mode="materialize"):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 3, model.up.in_features)
        model(x).square().mean().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("mode", ["materialize", "additive"])
def test_weights_outside_blocks_stay_bit_identical_and_merge_is_exact(mode):
    from helpers import TwoLayer

    model = TwoLayer(10, 14, 6)
    before = copy.deepcopy(model.state_dict())
    grid_up, grid_down = BlockGrid(14, 10, 4, 4), BlockGrid(6, 14, 4, 4)
    selection = Selection(
        {"up": torch.tensor([[0, 1], [3, 2]]), "down": torch.tensor([[1, 3]])}, {"up": grid_up, "down": grid_down}
    )
    apply_selection(model, selection, SMTConfig(forward=mode))
    _train(model, 5)
    after = model.state_dict()
    for key in before:  # frozen storage untouched: Δ lives only in the slots
        assert torch.equal(before[key], after[key]), key
    x = torch.randn(3, 10)
    y_live = model(x)
    for layer in sparse_layers(model).values():
        layer.merge()
    merged = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("smt_bank")}
    assert torch.allclose(model(x), y_live, atol=1e-6)
    expected = torch.zeros(14, 10, dtype=torch.bool)
    expected[0:4, 4:8] = True  # block (0, 1)
    expected[12:14, 8:10] = True  # block (3, 2), ragged: 2×2
    assert torch.equal(merged["up.weight"] != before["up.weight"], expected)
    for layer in sparse_layers(model).values():
        layer.unmerge()
    for key in before:
        assert torch.equal(before[key], model.state_dict()[key]), key


def test_saved_activation_memory_scales_with_selected_columns():
    d_in, d_out, tokens = 256, 64, 512
    model = Holder(nn.Linear(d_in, d_out))
    grid = BlockGrid(d_out, d_in, 16, 16)
    # 3 blocks reading 2 distinct column blocks: 32 of 256 input columns.
    selection = Selection({"proj": torch.tensor([[0, 3], [2, 3], [1, 9]])}, {"proj": grid})
    apply_selection(model, selection)
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(tokens, d_in, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    delta_bytes = 3 * 16 * 16 * 4
    input_bytes = x.numel() * x.element_size()
    assert sum(saved) <= input_bytes * 32 / d_in + delta_bytes + 1024
    y.sum().backward()  # and it still trains


def test_layer_without_blocks_saves_nothing():
    from helpers import TwoLayer

    model = TwoLayer(10, 14, 6)
    apply_selection(
        model,
        Selection({"up": torch.tensor([[1, 1]])}, {"up": BlockGrid(14, 10, 4, 4), "down": BlockGrid(6, 14, 4, 4)}),
    )
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(5, 10)
    hidden = torch.tanh(model.up(x)).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.down(hidden)
    # Only the frozen weight itself (a view of it, for dX) is kept: no activation.
    weight_storage = model.down.weight.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == weight_storage for t in saved)


def test_gradient_checkpointing_and_accumulation_match_plain_backward():
    from helpers import TwoLayer

    torch.manual_seed(1)
    model = TwoLayer(10, 14, 6)
    selection = Selection(
        {"up": torch.tensor([[0, 1], [3, 2]]), "down": torch.tensor([[1, 3]])},
        {"up": BlockGrid(14, 10, 4, 4), "down": BlockGrid(6, 14, 4, 4)},
    )
    apply_selection(model, selection)
    _fill_random(model)
    x = torch.randn(8, 10)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in get_bank(model).slots]
    for p in get_bank(model).slots:
        p.grad = None
    for half in x.chunk(2):  # two micro-batches, checkpointed: recompute must not double-count
        checkpoint(model, half, use_reentrant=False).square().sum().backward()
    for a, b in zip(plain, get_bank(model).slots):
        assert torch.allclose(a, b.grad, rtol=1e-5, atol=1e-6)


def test_autocast_bf16_runs_and_tracks_fp32():
    model = Holder(nn.Linear(16, 8))
    apply_selection(model, Selection({"proj": torch.tensor([[0, 0], [1, 1]])}, {"proj": BlockGrid(8, 16, 4, 8)}))
    _fill_random(model)
    x = torch.randn(6, 16)
    y32 = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = model(x)
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float(), y32, rtol=0.05, atol=0.05)
    y16.float().sum().backward()
    assert all(s.grad is not None and s.grad.dtype == torch.float32 for s in get_bank(model).slots)


def test_bf16_model_with_fp32_slots():
    model = Holder(nn.Linear(16, 8)).to(torch.bfloat16)
    apply_selection(model, Selection({"proj": torch.tensor([[0, 1]])}, {"proj": BlockGrid(8, 16, 4, 8)}))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    model(x).float().sum().backward()
    slot = get_bank(model).slots[0]
    assert slot.dtype == torch.float32 and slot.grad.dtype == torch.float32 and slot.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["materialize", "additive"])
def test_no_grad_forward_matches_training_forward(mode):
    from helpers import TwoLayer

    model = TwoLayer(10, 14, 6)
    apply_selection(model, Selection({"up": torch.tensor([[0, 1], [3, 2]])},
                                     {"up": BlockGrid(14, 10, 4, 4), "down": BlockGrid(6, 14, 4, 4)}),
                    SMTConfig(forward=mode))  # fmt: skip
    _fill_random(model)
    x = torch.randn(2, 3, 10)
    with torch.no_grad():
        fast = model(x)
    assert torch.allclose(fast, model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_full_warmup_gets_the_dense_weight_gradient_while_scoring(kind):
    """While W0 requires grad (smt.warmup_updates=full) the tap's layer returns dW0 = gᵀx, as dense autograd does."""
    from smt.core.model import inject, start_scoring

    torch.manual_seed(0)
    layer = _conv1d(10, 7) if kind == "conv1d" else nn.Linear(10, 7)
    reference = copy.deepcopy(layer)
    model = Holder(layer)
    inject(model, SMTConfig(target_modules=["proj"], block_size=(4, 3), num_blocks=2))
    start_scoring(model, SMTConfig(target_modules=["proj"], block_size=(4, 3), num_blocks=2))
    model.proj.weight.requires_grad_(True)
    x = torch.randn(3, 5, 10)
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(model.proj.weight.grad, reference.weight.grad)
    model.proj.weight.requires_grad_(False)  # after the selection: no dense gradient is formed
    model.proj.weight.grad = None
    model(x).square().sum().backward()
    assert model.proj.weight.grad is None
