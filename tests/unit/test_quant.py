"""SMT on bitsandbytes bases (real ``Linear4bit`` / ``Linear8bitLt`` on CPU), against dense autograd.

The reference for a quantized layer is the dense ``nn.Linear`` holding its dequantized weight ``deq(Q)``:
the quantized model computes ``base(x) + x_cols·Δᵀ`` and must give that dense model's block gradients
``dW[rows_b, cols_b] = Σ_t g[t, rows_b]ᵀ x[t, cols_b]`` and warm-up scores, with the quantized bytes untouched.
"""

import sys

import pytest
import torch
from helpers import TwoLayer
from torch import nn

from smt import BlockGrid, Selection, SMTConfig, apply_selection
from smt.adapters.merge import dequantized_state_dict
from smt.core.merge import merge_delta, merged
from smt.core.model import get_bank, inject, select_blocks, sparse_layers, start_scoring
from smt.core.quant import (
    build_optimizer,
    dequantized_weight,
    is_quantized,
    keep_trainable,
    quant_state_keys,
    quantize_linear,
    quantize_linear_layers,
    requantize,
    require_bitsandbytes,
)

bnb = pytest.importorskip("bitsandbytes")

BLOCK = 16
SHAPES = {"up": (64, 128), "down": (32, 64)}  # (out, in)
SELECTED = {"up": torch.tensor([[0, 1], [2, 7], [3, 0]]), "down": torch.tensor([[1, 3], [0, 0]])}
KINDS = [  # (quantization, compute dtype, double quant): every 4-bit variant in fp32, nf4 in bf16, int8
    ("nf4", torch.float32, True),
    ("nf4", torch.float32, False),
    ("fp4", torch.float32, True),
    ("fp4", torch.float32, False),
    ("nf4", torch.bfloat16, True),
    ("int8", torch.float32, False),
]
KIND_IDS = [f"{q}-{str(d).removeprefix('torch.')}-{'dq' if dq else 'single'}" for q, d, dq in KINDS]


def quantized_and_dense(quantization: str, compute_dtype: torch.dtype, double_quant: bool):
    """A TwoLayer with bitsandbytes layers and the dense TwoLayer holding their dequantized weights."""
    torch.manual_seed(0)
    quantized = TwoLayer(128, 64, 32)
    assert quantize_linear_layers(quantized, quantization, compute_dtype, double_quant) == 2
    dense = TwoLayer(128, 64, 32)
    with torch.no_grad():
        for name in SHAPES:
            getattr(dense, name).weight.copy_(dequantized_weight(getattr(quantized, name)))
        dense.up.bias.copy_(quantized.up.bias.float())
    return quantized, dense


def dense_weight_grads(dense: TwoLayer, x: torch.Tensor, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``dL/dW`` of the dense model with ``W = deq(Q) + Δ`` (plain autograd, whole weights)."""
    with torch.no_grad():
        for name, delta in deltas.items():
            getattr(dense, name).weight += delta
    weights = {name: getattr(dense, name).weight.requires_grad_(True) for name in SHAPES}
    loss(dense(x)).backward()
    return {name: w.grad for name, w in weights.items()}


def loss(y: torch.Tensor) -> torch.Tensor:
    return (y.float() - 0.1).square().mean()


def tiles(dense: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.stack([dense[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK] for r, c in index.tolist()])


def selection() -> Selection:
    grids = {name: BlockGrid(*shape, BLOCK, BLOCK) for name, shape in SHAPES.items()}
    return Selection(dict(SELECTED), grids)


def assert_near(got: torch.Tensor, want: torch.Tensor, compute_dtype: torch.dtype) -> None:
    got, want = got.detach(), want.detach()
    """fp32 compute: equal to rounding; bf16 compute: within 2 % of the largest value (8-bit mantissa products)."""
    if compute_dtype == torch.float32:
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-6)
    else:
        assert float((got.float() - want.float()).abs().max()) <= 2e-2 * float(want.abs().max())


@pytest.mark.parametrize(("quantization", "compute_dtype", "double_quant"), KINDS, ids=KIND_IDS)
def test_block_gradients_equal_the_dense_dequantized_model(quantization, compute_dtype, double_quant):
    quantized, dense = quantized_and_dense(quantization, compute_dtype, double_quant)
    apply_selection(quantized, selection())
    bank = get_bank(quantized)
    with torch.no_grad():
        for slot in bank.slots:
            slot.normal_(0, 0.05)  # a non-zero Δ: the additive path and dx through Δ are exercised
    deltas = {}
    for m, name in enumerate(bank.module_names):
        deltas[name] = torch.zeros(SHAPES[name])
        BlockGrid(*SHAPES[name], BLOCK, BLOCK).scatter_(
            deltas[name], bank.index_of(m), bank.stacked(bank.slot_ids(m), (BLOCK, BLOCK)).detach()
        )
    x = torch.randn(3, 5, 128)
    x_q, x_d = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = quantized(x_q)
    loss(y).backward()
    expected = dense_weight_grads(dense, x_d, deltas)

    assert_near(y, dense(x), compute_dtype)
    assert_near(x_q.grad, x_d.grad, compute_dtype)
    for m, name in enumerate(bank.module_names):
        got = torch.stack([bank.slots[s].grad for s in bank.slot_ids(m)])
        assert_near(got, tiles(expected[name], bank.index_of(m)), compute_dtype)


@pytest.mark.parametrize(
    ("quantization", "compute_dtype", "double_quant"),
    [KINDS[0], KINDS[2], KINDS[5]],
    ids=[KIND_IDS[0], KIND_IDS[2], KIND_IDS[5]],
)
def test_warmup_scores_equal_the_dense_gradient_block_mean_squares(quantization, compute_dtype, double_quant):
    quantized, dense = quantized_and_dense(quantization, compute_dtype, double_quant)
    config = SMTConfig(target_modules=["up", "down"], block_size=BLOCK, num_blocks=5)
    inject(quantized, config)
    scorers = start_scoring(quantized, config)
    x = torch.randn(4, 128)
    loss(quantized(x)).backward()
    for scorer in scorers.values():
        scorer.commit()
    expected = dense_weight_grads(dense, x, {})
    for name, scorer in scorers.items():
        grid = BlockGrid(*SHAPES[name], BLOCK, BLOCK)
        dense_scores = expected[name].view(grid.n_row_blocks, BLOCK, grid.n_col_blocks, BLOCK).square().mean((1, 3))
        torch.testing.assert_close(scorer.scores(), dense_scores, rtol=1e-4, atol=1e-10)
    chosen = select_blocks(quantized, config, scorers)
    assert chosen.num_blocks == 5


def quantized_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {key: state[key].clone() for key in quant_state_keys(model)}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_training_leaves_the_quantized_storage_byte_identical(quantization):
    quantized, _ = quantized_and_dense(quantization, torch.float32, True)
    before = quantized_bytes(quantized)
    assert any(key.endswith("absmax") or key.endswith("SCB") for key in before)
    apply_selection(quantized, selection())
    optimizer = build_optimizer(
        "adamw8bit", [p for p in quantized.parameters() if p.requires_grad], 1e-2, (0.9, 0.999), 0.0, "cpu"
    )
    x = torch.randn(8, 128)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        value = loss(quantized(x))
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < losses[0]
    assert all(
        optimizer.state[slot]["state1"].dtype == torch.uint8 for slot in get_bank(quantized).slots
    )  # 8-bit moments
    after = quantized_bytes(quantized)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_smt_adds_no_dequantization_of_its_own(monkeypatch):
    """A training step with SMT dequantizes exactly as often as bitsandbytes does without it (one weight at a time)."""
    import bitsandbytes.functional as bnbf

    calls = []
    original = bnbf.dequantize_4bit
    monkeypatch.setattr(bnbf, "dequantize_4bit", lambda *a, **k: calls.append(a[0].numel()) or original(*a, **k))
    plain, _ = quantized_and_dense("nf4", torch.float32, True)
    x = torch.randn(4, 128, requires_grad=True)
    loss(plain(x)).backward()
    without = list(calls)
    calls.clear()
    tuned, _ = quantized_and_dense("nf4", torch.float32, True)
    apply_selection(tuned, selection())
    loss(tuned(x)).backward()
    assert calls == without and len(without) >= 2


def input_gradient(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``dL/dx`` through ``layer`` in training mode: zero or missing when the layer's backward is cut."""
    layer.train()
    x = x.clone().requires_grad_(True)
    loss(layer(x)).backward()
    return torch.zeros_like(x) if x.grad is None else x.grad


def test_keep_trainable_restores_a_repacked_4bit_layer_and_opts_it_out():
    """bitsandbytes repacks a ``Linear4bit`` on an eval forward without grad (AVX512-BF16 CPUs): no backward after."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from bitsandbytes.nn.modules import has_avx512bf16

    layer = quantize_linear(nn.Linear(64, 64), "nf4", torch.float32, True)
    x = torch.randn(5, 64)
    expected, weight = input_gradient(layer, x), dequantized_weight(layer)
    layer.eval()
    if has_avx512bf16():
        with torch.no_grad():
            layer(x)  # a validation pass: bitsandbytes repacks here
    else:  # AVX2-only CPUs never repack; do to the layer what bitsandbytes' forward does on AVX512-BF16 ones
        state = layer.weight.quant_state
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data, state)
        layer.support_avx512bf16_for_cpu = True
    assert layer.weight.quant_state.packing_format_for_cpu

    assert keep_trainable(layer) == 1
    assert not layer.weight.quant_state.packing_format_for_cpu and not layer.support_avx512bf16_for_cpu
    # Repacking stored the scales in bf16 (and re-quantizes double-quant scales on the way back): close, not equal.
    torch.testing.assert_close(dequantized_weight(layer), weight, rtol=0.02, atol=1e-3)
    torch.testing.assert_close(input_gradient(layer, x), expected, rtol=0.02, atol=1e-4)
    layer.eval()
    with torch.no_grad():
        layer(x)  # opted out: no repacking, on any CPU
    assert not layer.weight.quant_state.packing_format_for_cpu and keep_trainable(layer) == 0


def test_int8_layers_have_no_eval_mode_trap():
    """``Linear8bitLt`` computes an eval forward with another kernel, but changes no state the training path reads."""
    layer = quantize_linear(nn.Linear(64, 64), "int8", torch.float32, False)
    x = torch.randn(5, 64)
    expected = input_gradient(layer, x)
    assert expected.abs().max() > 0
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert keep_trainable(layer) == 0 and torch.equal(input_gradient(layer, x), expected)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_state_dict_loads_back_strictly_into_a_fresh_model(quantization):
    trained, _ = quantized_and_dense(quantization, torch.float32, True)
    apply_selection(trained, selection())
    with torch.no_grad():
        get_bank(trained).slots[0].fill_(0.3)
    x = torch.randn(4, 128)
    expected = trained(x)  # after a forward Linear8bitLt keeps its scales elsewhere: the hook finds them
    torch.manual_seed(1)
    fresh = TwoLayer(128, 64, 32)
    quantize_linear_layers(fresh, quantization, torch.float32, True)
    fresh(x)
    apply_selection(fresh, selection())
    fresh.load_state_dict(trained.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_dequantized_state_dict_holds_w0_plus_delta_in_plain_keys():
    quantized, dense = quantized_and_dense("nf4", torch.float32, True)
    apply_selection(quantized, selection())
    with torch.no_grad():
        get_bank(quantized).slots[0].fill_(0.5)
    state = dequantized_state_dict(quantized, torch.float32)
    assert set(state) == {"up.weight", "up.bias", "down.weight"}
    expected = dense.up.weight.detach().clone()
    r, c = SELECTED["up"][0].tolist()
    expected[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK] += 0.5
    torch.testing.assert_close(state["up.weight"], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_requantize_reports_its_error_bound(quantization):
    quantized, dense = quantized_and_dense(quantization, torch.float32, True)
    target = dense.up.weight.detach() + 0.01 * torch.randn(64, 128)
    fresh, error, relative = requantize(quantized.up, target)
    assert type(fresh) is type(quantized.up)
    assert error == pytest.approx(float((dequantized_weight(fresh) - target).abs().max()))
    assert 0 < error and relative == pytest.approx(error / float(target.abs().max()))
    # int8: about half a step of max|row|/127 (0.0039);
    # 4-bit: half the widest code gap (nf4 0.28, fp4 0.33) times a block's absmax
    assert relative <= (0.005 if quantization == "int8" else 0.17)


def test_optimizer_choices():
    params = [nn.Parameter(torch.zeros(16, 16))]
    assert type(build_optimizer("adamw", params, 1e-3, (0.9, 0.99), 0.0, "cpu")) is torch.optim.AdamW
    assert type(build_optimizer("adamw8bit", params, 1e-3, (0.9, 0.99), 0.0, "cpu")) is bnb.optim.AdamW8bit
    with pytest.warns(UserWarning, match="paged_adamw8bit: paging needs CUDA"):
        assert type(build_optimizer("paged_adamw8bit", params, 1e-3, (0.9, 0.99), 0.0, "cpu")) is bnb.optim.AdamW8bit
    with pytest.raises(ValueError, match="model.optimizer='sgd' is not one of"):
        build_optimizer("sgd", params, 1e-3, (0.9, 0.99), 0.0, "cpu")


def test_bad_quantization_settings_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"^model.quantization='nf3' is not one of none, nf4, fp4, int8$"):
        require_bitsandbytes("nf3")
    with pytest.raises(ValueError, match=r"model.quantization='nf4': bitsandbytes .* cannot run it on meta") as info:
        require_bitsandbytes("nf4", "meta")
    assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(
        ValueError, match=r"model.quantization='int8' needs bitsandbytes, which does not import"
    ) as info:
        require_bitsandbytes("int8")
    assert "\n" not in str(info.value) and "model.quantization=none" in str(info.value)


def test_one_answer_to_is_the_base_quantized():
    """``is_quantized`` is the one test: bitsandbytes layers and their subclasses, 4-bit bytes stored as bf16
    included (a dtype check would call that weight float), and any layer whose weight is not a float tensor."""
    bf16_storage = bnb.nn.Linear4bit(64, 64, quant_storage=torch.bfloat16)
    weight = bnb.nn.Params4bit(bf16_storage.weight.data, False, quant_storage=torch.bfloat16, module=bf16_storage)
    bf16_storage.weight = weight
    bf16_storage = bf16_storage.to("cpu")  # bitsandbytes quantizes on the move
    assert bf16_storage.weight.dtype == torch.bfloat16 and is_quantized(bf16_storage)
    assert is_quantized(bnb.nn.LinearNF4(64, 64)) and is_quantized(quantize_linear(nn.Linear(64, 64), "int8", None, 0))
    int_weight = nn.Linear(4, 4)
    int_weight.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    assert is_quantized(int_weight) and not is_quantized(nn.Linear(4, 4))
    quantized, _ = quantized_and_dense("nf4", torch.float32, True)
    apply_selection(quantized, selection())
    assert all(layer.quantized for layer in sparse_layers(quantized).values())


def test_merged_leaves_a_quantized_base_additive_and_merge_delta_refuses_it():
    quantized, _ = quantized_and_dense("nf4", torch.float32, True)
    apply_selection(quantized, selection())
    with torch.no_grad():
        for slot in get_bank(quantized).slots:
            slot.normal_(0, 0.1)
    x, before = torch.randn(3, 128), quantized_bytes(quantized)
    with torch.no_grad():
        tuned = quantized(x)
        with merged(quantized):  # the quantized bytes cannot hold W0 + Δ: the forward keeps adding Δ
            inside = quantized(x)
    torch.testing.assert_close(inside, tuned, rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in quantized_bytes(quantized).items())
    with pytest.raises(ValueError, match=r"^cannot merge into up \(Linear4bit\): quantized storage cannot hold"):
        merge_delta(quantized)
    assert get_bank(quantized) is not None  # nothing changed
