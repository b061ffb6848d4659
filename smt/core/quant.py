"""Quantized (bitsandbytes) base weights and 8-bit optimizers: building, loading, dequantizing, re-quantizing.

A 4-bit (``nf4``/``fp4``) or 8-bit (``int8``) base stays quantized while SMT trains: the wrapped layer
adds its blocks on top, ``y = base(x) + Σ_b x[:, cols_b]·Δ_bᵀ``, and the warm-up scores blocks from
``dW = dyᵀx``, which is the gradient w.r.t. the *dequantized* weight ``W̃ = deq(Q)`` because
``y_base = x·W̃ᵀ``. SMT itself never dequantizes a weight to train or score; bitsandbytes' own
forward/backward dequantizes one weight at a time, as it does without SMT.

Taking Δ out into a quantized base (``smt.adapters.merge``): ``W = deq(Q) + Δ`` is saved in bf16/fp16 (exact up to
that rounding), or re-quantized, ``Q' = quant(deq(Q) + Δ)``, with the error ``max |deq(Q') − (deq(Q) + Δ)|``
reported — quantization error is never introduced silently. Here: the layer-level pieces (dequantize, re-quantize).

Nothing here imports bitsandbytes at import time: it is imported when a quantized setting is used.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
SKIPPED_MODULES = ("lm_head",)
"""Left in full precision, as transformers' ``BitsAndBytesConfig`` loading does (the output projection)."""
INT8_THRESHOLD = 6.0
"""LLM.int8() outlier threshold: transformers' ``llm_int8_threshold`` default."""
BNB_LAYERS = ("Linear4bit", "Linear8bitLt")
"""The bitsandbytes layer classes (and their subclasses) that hold quantized weights."""


# --- checking --------------------------------------------------------------------------------------------


def require_bitsandbytes(quantization: str, device: torch.device | str = "cpu", field: str = "model.quantization"):
    """Import bitsandbytes and prove it runs a quantized layer on ``device``; return the module.

    Raises:
        ValueError: ``quantization`` is unknown, bitsandbytes does not import, or it cannot run on ``device``.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"{field}={quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    try:
        import bitsandbytes
    except Exception as err:  # ImportError, or a broken native library
        raise ValueError(
            f"{field}={quantization!r} needs bitsandbytes, which does not import here ({_first_line(err)}); "
            f"`pip install bitsandbytes` or set {field}=none"
        ) from err
    try:
        probe = quantize_linear(nn.Linear(64, 64), quantization, torch.float32, True, device)
        probe(torch.ones(2, 64, device=device))
    except Exception as err:
        raise ValueError(
            f"{field}={quantization!r}: bitsandbytes {bitsandbytes.__version__} cannot run it on {device} here "
            f"({_first_line(err)}); set {field}=none or use a device bitsandbytes supports"
        ) from err
    return bitsandbytes


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:120]}" if text else type(err).__name__


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is quantized storage, which cannot hold ``W0 + Δ`` in place: smt's one answer.

    True for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (or a subclass: ``LinearNF4``, ``LinearFP4``; a 4-bit
    weight stored as bf16 bytes counts too) and for any other layer whose weight is not a float tensor. A wrapped
    layer answers for its base (``SparseBlockLinear.quantized``).
    """
    if _bitsandbytes_layer(module):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point


def _bitsandbytes_layer(module: nn.Module, kinds: tuple[str, ...] = BNB_LAYERS) -> bool:
    return any(kind.__name__ in kinds and kind.__module__.startswith("bitsandbytes") for kind in type(module).__mro__)


def has_quantized_layers(model: nn.Module) -> bool:
    """Whether any layer of ``model`` (wrapped or not) is quantized, by :func:`is_quantized`."""
    return any(is_quantized(getattr(module, "base", module)) for module in model.modules())


# --- building -------------------------------------------------------------------------------------------


def bnb_config(quantization: str, compute_dtype: torch.dtype, double_quant: bool):
    """transformers' ``BitsAndBytesConfig`` for ``from_pretrained`` (None for ``none``)."""
    from transformers import BitsAndBytesConfig

    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantize_linear(
    linear: nn.Linear, quantization: str, compute_dtype: torch.dtype, double_quant: bool, device="cpu"
) -> nn.Module:
    """A bitsandbytes copy of ``linear`` with its weight quantized on ``device`` (the bias stays float)."""
    import bitsandbytes as bnb

    weight = linear.weight.detach().float()
    has_bias = linear.bias is not None
    if quantization == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, has_bias, has_fp16_weights=False, threshold=INT8_THRESHOLD
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, has_bias, compute_dtype, double_quant, quantization
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=double_quant, quant_type=quantization, module=layer
        )
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer = layer.to(device)  # bitsandbytes quantizes on the move to a device
    make_loadable(layer)
    return layer


def quantize_linear_layers(
    model: nn.Module, quantization: str, compute_dtype: torch.dtype, double_quant: bool = True, device="cpu"
) -> int:
    """Replace every ``nn.Linear`` of ``model`` (except ``lm_head`` and tied weights) by a quantized copy.

    For models built from a config (tests, debug runs); pretrained folders load through ``bnb_config``.

    Returns:
        The number of layers quantized.
    """
    tied = _tied_parameter_ids(model)
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and name.rsplit(".", 1)[-1] not in SKIPPED_MODULES
        and id(module.weight) not in tied
    ]
    for name in names:
        linear = model.get_submodule(name)
        model.set_submodule(name, quantize_linear(linear, quantization, compute_dtype, double_quant, device))
    return len(names)


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


# --- training through quantized layers --------------------------------------------------------------------


def keep_trainable(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference, and undo any repacking done already.

    On CPUs with AVX512-BF16, bitsandbytes (≥ 0.48) rewrites a ``Linear4bit`` weight *in place* into a packed
    layout on its first eval-mode forward with an input that needs no gradient — a validation pass. From then on
    every forward runs ``gemv_4bit``, which has no backward: the gradient through that layer is silently zero, so
    nothing below it learns (and the warm-up scores nothing). Any model SMT trains must opt out of it.

    Returns:
        How many layers had already been repacked and were restored to the trainable layout.
    """
    restored = 0
    for layer in model.modules():
        if not _bitsandbytes_layer(layer, ("Linear4bit",)):
            continue
        layer.support_avx512bf16_for_cpu = False  # the switch bitsandbytes reads before repacking
        state = getattr(layer.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack

            layer.weight.data, layer.weight.quant_state = unpack(layer.weight.data, state)
            restored += 1
    return restored


# --- state dicts ------------------------------------------------------------------------------------------


def make_loadable(module: nn.Module) -> None:
    """Let quantized layers load their own state dict back (bitsandbytes 0.50 refuses it on CPU).

    ``Linear4bit`` reports its quant-state entries (``weight.absmax``, ``weight.quant_map``, …) as
    unexpected; ``Linear8bitLt`` loses ``SCB`` once a forward moved it into ``state``. A pre-hook per
    layer takes those entries, rebuilds the quant state, and leaves ``weight`` to the ordinary copy.
    """
    for layer in module.modules():
        if _bitsandbytes_layer(layer) and not getattr(layer, "_smt_loadable", False):
            layer._register_load_state_dict_pre_hook(_load_quant_state, with_module=True)
            layer._smt_loadable = True


def _load_quant_state(layer, state_dict, prefix, *args) -> None:
    if _bitsandbytes_layer(layer, ("Linear4bit",)):
        from bitsandbytes.functional import QuantState

        stem = prefix + "weight."
        entries = {key[len(stem) :]: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(stem)]}
        if entries:
            layer.weight.quant_state = QuantState.from_dict(entries, device=layer.weight.device)
        return
    scb = state_dict.pop(prefix + "SCB", None)
    if scb is not None:
        target = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
        if target is None:
            raise ValueError(f"{prefix.rstrip('.')}: this Linear8bitLt is not quantized yet; quantize before loading")
        target.copy_(scb)


def quant_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model`` holding frozen quantized storage: every key of a quantized layer but its bias."""
    layers = {name for name, module in model.named_modules() if is_quantized(getattr(module, "base", module))}
    keys = set()
    for key in model.state_dict():
        owner = next((name for name in layers if key.startswith(name + ".")), None)
        if owner is not None and key != owner + ".bias":
            keys.add(key)
    return keys


# --- dequantizing and re-quantizing -----------------------------------------------------------------------


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 ``[out, in]`` weight a quantized layer computes with (one weight at a time)."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    if _bitsandbytes_layer(layer, ("Linear4bit",)):
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bnbf.int8_vectorwise_dequant(weight.data, scb).float()


def quantization_of(layer: nn.Module) -> tuple[str, torch.dtype, bool]:
    """``(quantization, compute_dtype, double_quant)`` of a quantized layer, to re-quantize it alike."""
    if _bitsandbytes_layer(layer, ("Linear8bitLt",)):
        return "int8", torch.float32, False
    state = layer.weight.quant_state
    return state.quant_type, layer.compute_dtype or torch.float32, state.nested


@torch.no_grad()
def requantize(layer: nn.Module, weight: torch.Tensor) -> tuple[nn.Module, float, float]:
    """A new layer like ``layer`` holding ``quant(weight)``, with ``max |deq − weight|`` and that ÷ ``max |weight|``."""
    quantization, compute_dtype, double_quant = quantization_of(layer)
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
    plain.weight.copy_(weight)
    if layer.bias is not None:
        plain.bias.copy_(layer.bias.float())
    fresh = quantize_linear(plain, quantization, compute_dtype, double_quant, weight.device)
    error = float((dequantized_weight(fresh) - weight.float()).abs().max())
    return fresh, error, error / max(float(weight.abs().max()), 1e-30)


# --- optimizers -------------------------------------------------------------------------------------------


def build_optimizer(
    name: str, params: list[nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float, device
) -> torch.optim.Optimizer:
    """``adamw`` (torch), ``adamw8bit`` or ``paged_adamw8bit`` (bitsandbytes; paged only on CUDA, else a warning).

    8-bit state is used for every parameter of at least 256 elements (a 16×16 block), not bitsandbytes'
    4096 default: SMT's parameters are block slots, and most blocks are smaller than 64×64.

    Raises:
        ValueError: unknown name, or bitsandbytes does not import.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"model.optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")
    kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except Exception as err:
        raise ValueError(
            f"model.optimizer={name!r} needs bitsandbytes, which does not import here ({_first_line(err)}); "
            "use model.optimizer=adamw"
        ) from err
    if name == "paged_adamw8bit" and torch.device(device).type != "cuda":
        warnings.warn(
            f"model.optimizer=paged_adamw8bit: paging needs CUDA, this run is on {torch.device(device).type}; "
            "using adamw8bit (same 8-bit state, not paged)",
            stacklevel=2,
        )
        name = "adamw8bit"
    kind = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return kind(params, min_8bit_size=256, **kwargs)


def tensor_bytes(tensors) -> int:
    """Total bytes of an iterable of tensors (each storage counted once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (moments, 8-bit quantization maps, …)."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values())
