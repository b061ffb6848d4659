"""Putting SMT into a model and taking it out again (no Lightning here).

The life of a model: ``inject`` (freeze, wrap targets, add a bank of K slots) → ``start_scoring`` /
training steps / ``select_blocks`` (warm-up) → ``apply_selection`` (slots on the chosen blocks, Δ
trained) → ``save_delta`` or ``merge_delta`` (``smt.core.merge``: plain modules with ``W0 + Δ``).
``apply_selection`` also
works on a fresh model and injects what it needs, so a saved selection or delta skips the warm-up.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import replace

import torch
from torch import nn

from smt.core.bank import BlockBank
from smt.core.config import SMTConfig
from smt.core.layer import SparseBlockLinear
from smt.core.patterns import name_matcher, no_match_error
from smt.core.quant import is_quantized, keep_trainable
from smt.core.scoring import BlockScorer
from smt.core.selection import Pool, Selection, assign_pools, budget_blocks, select_top_k
from smt.kernels.blocks import BlockGrid, resolve_block_size

BANK_NAME = "smt_bank"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- finding and wrapping targets ---------------------------------------------------------------------


def linear_geometry(module: nn.Module) -> tuple[int, int, bool, bool] | None:
    """``(out, in, transposed, quantized)`` of a Linear-like module, or None if it is not one."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return module.nf, module.nx, True, False
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False, is_quantized(module)
    return None


def find_targets(model: nn.Module, target_modules: str | list[str]) -> dict[str, nn.Module]:
    """Modules named by ``target_modules``: a list of name suffixes, or one regex matched against the whole name.

    Raises:
        ValueError: nothing matches (the message shows a real layer name), or a match is not a Linear-like layer.
    """
    matches = name_matcher(target_modules, "smt.target_modules")
    found = {n: m for n, m in model.named_modules() if n and BANK_NAME not in n and matches(n)}
    if not found:
        linear = [n for n, m in model.named_modules() if linear_geometry(m) is not None and BANK_NAME not in n]
        what = f"module of {type(model).__name__}"
        raise no_match_error("smt.target_modules", target_modules, linear, what)
    shared = _shared_weights(model)
    for name, module in found.items():
        if id(getattr(module, "weight", None)) in shared:
            raise ValueError(
                f"smt.target_modules matches {name}, whose weight is tied to {shared[id(module.weight)]}; "
                "merging Δ would change both: leave it out of the targets"
            )
        if linear_geometry(module) is None and not isinstance(module, SparseBlockLinear):
            raise ValueError(
                f"smt.target_modules matches {name} ({type(module).__name__}), which is not a Linear layer; "
                "narrow the pattern"
            )
    return found


def _shared_weights(model: nn.Module) -> dict[int, str]:
    """``id(parameter) → names`` of parameters that appear under more than one name (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {key: " and ".join(found) for key, found in names.items() if len(found) > 1}


def module_grids(targets: dict[str, nn.Module], block_size) -> dict[str, BlockGrid]:
    """The block grid of each target (block size resolved per module, ``-1`` = full dimension)."""
    grids = {}
    for name, module in targets.items():
        out_features, in_features, _, _ = linear_geometry(module)
        bo, bi = resolve_block_size(block_size, (out_features, in_features), name)
        grids[name] = BlockGrid(out_features, in_features, bo, bi)
    return grids


def plan_pools(config: SMTConfig, grids: dict[str, BlockGrid]) -> list[Pool]:
    """The budget as pools of modules with a fixed block count each (one pool without ``config.pools``)."""
    if not config.pools:
        k = budget_blocks(grids, config.num_blocks, config.budget_density, "smt", config.budget_lora_rank)
        return [Pool("all", tuple(grids), k)]
    members = assign_pools(list(grids), {name: p.pattern for name, p in config.pools.items()})
    pools = []
    for name, modules in members.items():
        if modules:
            p = config.pools[name]
            sub = {m: grids[m] for m in modules}
            pools.append(Pool(name, tuple(modules), budget_blocks(sub, p.num_blocks, p.density, f"smt.pools.{name}")))
    return pools


def inject(
    model: nn.Module,
    config: SMTConfig,
    capacity: int | None = None,
    grids: dict[str, BlockGrid] | None = None,
    targets: dict[str, nn.Module] | None = None,
) -> BlockBank:
    """Freeze ``model``, wrap its targets in ``SparseBlockLinear`` and add a bank of ``K`` slots.

    Args:
        model: any ``nn.Module`` (a transformers model, or a plain one).
        config: targets, block size, budget, forward mode, kernels.
        capacity: ``K`` to use instead of the budget's (e.g. the size of a saved selection).
        grids: per-module grids to use instead of ``config.block_size`` (e.g. a saved selection's).
        targets: the modules ``config.target_modules`` names in ``model``, when the caller has found them already.

    Returns:
        The bank, registered on ``model`` as ``smt_bank``.

    Raises:
        ValueError: bad targets, block size or budget; the model already has a bank. Nothing is changed then.
    """
    if get_bank(model) is not None:
        raise ValueError("this model already has an smt bank; inject once, or start from a fresh model")
    targets = find_targets(model, config.target_modules) if targets is None else targets
    grids = module_grids(targets, config.block_size) if grids is None else {name: grids[name] for name in targets}
    k = capacity if capacity is not None else sum(p.k for p in plan_pools(config, grids))
    tile = (max(g.block_rows for g in grids.values()), max(g.block_cols for g in grids.values()))
    device = next(iter(targets.values())).weight.device
    layers = {
        name: _wrap(module, grids[name], config) for name, module in targets.items()
    }  # may raise: nothing changed yet
    shapes = [g.shape for g in grids.values()]
    blocks = [g.tile_shape for g in grids.values()]
    bank = BlockBank(list(grids), shapes, blocks, tile, k, DTYPES[config.delta_dtype], device)
    for param in model.parameters():
        param.requires_grad_(False)
    keep_trainable(model)  # bitsandbytes' CPU inference repacking would cut every gradient through the base
    for position, (name, layer) in enumerate(layers.items()):
        layer.attach(bank, position)
        model.set_submodule(name, layer)
    model.add_module(BANK_NAME, bank)
    return bank


def _wrap(module: nn.Module, grid: BlockGrid, config: SMTConfig) -> SparseBlockLinear:
    _, _, transposed, quantized = linear_geometry(module)
    mode = config.forward
    if mode == "auto":
        mode = "additive" if quantized else "materialize"
    if mode == "materialize" and quantized:
        raise ValueError("smt.forward='materialize' cannot write into a quantized weight; use 'additive' or 'auto'")
    return SparseBlockLinear(module, grid, transposed, mode, config.kernel)


def inject_from_state(model: nn.Module, state_dict: dict, config: SMTConfig | None = None) -> BlockBank:
    """Re-create the bank a state dict was saved with (targets, block shapes, K), ready for ``load_state_dict``.

    Raises:
        ValueError: the state dict holds no smt bank, or its modules do not fit ``model``.
    """
    state = state_dict.get(f"{BANK_NAME}._extra_state")
    if not isinstance(state, dict) or f"{BANK_NAME}.map" not in state_dict:
        raise ValueError("this checkpoint holds no smt bank; was it trained with the SparseMatrixTuning callback?")
    names = list(state["modules"])
    targets = find_targets(model, exact_pattern(names))
    missing = set(names) - set(targets)
    if missing:
        raise ValueError(f"checkpoint tunes {sorted(missing)[0]}, which this model does not have; use its base model")
    grids = {}
    for name, (bo, bi) in zip(names, state["block_shapes"]):
        out_features, in_features, _, _ = linear_geometry(targets[name])
        grids[name] = BlockGrid(out_features, in_features, bo, bi)
    capacity = state_dict[f"{BANK_NAME}.map"].shape[0]
    return inject(model, _config_for(names, config), capacity=capacity, grids=grids, targets=targets)


def exact_pattern(names) -> str:
    """A ``target_modules`` regex matching exactly these module names."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _config_for(names, config: SMTConfig | None) -> SMTConfig:
    """``config`` (forward mode, kernels, Δ dtype) targeting exactly ``names``; the budget comes from elsewhere."""
    budget = {"num_blocks": None, "density": None, "pools": None, "budget_lora_rank": None}
    return replace(config or SMTConfig(), target_modules=exact_pattern(names), **budget)


def get_bank(model: nn.Module) -> BlockBank | None:
    """The bank of ``model``, or of the one submodule that carries it (see :func:`bank_holder`); None if none."""
    bank = getattr(bank_holder(model), BANK_NAME, None)
    return bank if isinstance(bank, BlockBank) else None


def bank_holder(model: nn.Module) -> nn.Module:
    """The module the bank is registered on: ``model`` itself, or the one submodule of it that carries a bank.

    The callback puts the bank on the network that holds the targets (a LightningModule's ``self.model``), so
    ``merge_delta``, ``save_delta`` and friends work on that network and on the LightningModule around it alike;
    module names in the bank, selections and delta files are relative to the holder.

    Raises:
        ValueError: several submodules carry a bank (name one of them).
    """
    if isinstance(getattr(model, BANK_NAME, None), BlockBank):
        return model
    holders = [name for name, m in model.named_modules() if isinstance(getattr(m, BANK_NAME, None), BlockBank)]
    if len(holders) > 1:
        raise ValueError(f"{', '.join(holders)} each carry an smt bank; call this on one of them")
    return model.get_submodule(holders[0]) if holders else model


def sparse_layers(model: nn.Module) -> dict[str, SparseBlockLinear]:
    """The wrapped layers by name relative to the bank's holder, in the bank's module order."""
    holder = bank_holder(model)
    bank = _require_bank(holder)
    return {name: holder.get_submodule(name) for name in bank.module_names}


def _require_bank(model: nn.Module) -> BlockBank:
    bank = get_bank(model)
    if bank is None:
        raise ValueError("this model has no smt bank; call smt.inject or smt.apply_selection first")
    return bank


# --- warm-up and selection ----------------------------------------------------------------------------


def start_scoring(model: nn.Module, config: SMTConfig) -> dict[str, BlockScorer]:
    """Attach a ``BlockScorer`` to every wrapped layer (the bank must not be tuning yet)."""
    scorers = {}
    for name, layer in sparse_layers(model).items():
        scorers[name] = BlockScorer(layer.grid, config.criterion, name, config.seed, config.accumulator_device)
        layer.scorer = scorers[name]
    return scorers


def stop_scoring(model: nn.Module) -> None:
    """Detach every wrapped layer's ``BlockScorer`` (the forward stops tapping scores)."""
    for layer in sparse_layers(model).values():
        layer.scorer = None


def select_blocks(
    model: nn.Module,
    config: SMTConfig,
    scorers: dict[str, BlockScorer],
    warmup_steps: int = 0,
    model_id: str | None = None,
) -> Selection:
    """Choose blocks from the scorers' accumulated scores under ``config``'s budget and limits."""
    layers = sparse_layers(model)
    grids = {name: layer.grid for name, layer in layers.items()}
    scores = {name: scorers[name].scores(_float_or_none(logical_weight(layer))) for name, layer in layers.items()}
    pools = plan_pools(config, grids)
    capacity = _require_bank(model).capacity
    if sum(p.k for p in pools) != capacity:
        raise ValueError(f"the budget gives {sum(p.k for p in pools)} blocks but the bank holds {capacity}")
    blocks = select_top_k(
        scores, grids, pools, config.max_blocks_per_module, config.min_blocks_per_module, config.allocation
    )
    budget = {"pools": {n: vars(p) for n, p in config.pools.items()}} if config.pools else _budget_dict(config)
    return Selection(blocks, grids, config.criterion, budget, warmup_steps, model_id, scores)


def _budget_dict(config: SMTConfig) -> dict:
    if config.budget_lora_rank is not None:
        return {"lora_rank": config.budget_lora_rank}
    return {"num_blocks": config.num_blocks} if config.num_blocks is not None else {"density": config.budget_density}


def logical_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` view of a Linear-like (or wrapped) module's weight (GPT-2 ``Conv1D`` stores ``[in, out]``)."""
    transposed = module.transposed if isinstance(module, SparseBlockLinear) else linear_geometry(module)[2]
    return module.weight.t() if transposed else module.weight


def _float_or_none(weight: torch.Tensor) -> torch.Tensor | None:
    return weight if weight.dtype.is_floating_point else None


def apply_selection(model: nn.Module, selection: Selection, config: SMTConfig | None = None) -> nn.Module:
    """Point the bank at ``selection`` and start tuning (injecting first if the model has no bank).

    Args:
        model: a model with a bank of ``selection.num_blocks`` slots, or a fresh one.
        selection: the blocks to tune.
        config: forward mode, kernels and Δ dtype for injection (targets and block size come from the selection).

    Returns:
        ``model``, with every weight frozen except the bank's slots.

    Raises:
        ValueError: the selection does not fit the model (names, shapes, block count). Nothing is changed then.
    """
    holder = bank_holder(model)  # a bank on a submodule (the callback's placement) takes the selection there
    check_selection_fits(holder, selection)
    bank = get_bank(holder)
    if bank is None:
        bank = inject(
            holder, _config_for(selection.grids, config), capacity=selection.num_blocks, grids=dict(selection.grids)
        )
    elif selection.num_blocks != bank.capacity:
        raise ValueError(
            f"selection has {selection.num_blocks} blocks but the model's bank holds {bank.capacity}; "
            "use the same budget, or apply the selection to a fresh model"
        )
    bank.assign(selection.blocks)
    bank.provenance = {
        "criterion": selection.criterion,
        "budget": selection.budget,
        "warmup_steps": selection.warmup_steps,
        "model_id": selection.model_id,
    }
    bank.tuning = True
    stop_scoring(holder)
    return model


def check_selection_fits(model: nn.Module, selection: Selection) -> None:
    """Raise ``ValueError`` unless every module of ``selection`` exists in ``model`` with the same shape."""
    model = bank_holder(model)
    modules = dict(model.named_modules())
    bank = get_bank(model)
    if bank is not None and set(bank.module_names) != set(selection.grids):
        raise ValueError("selection targets other modules than the model's bank; use the same smt.target_modules")
    for name, grid in selection.grids.items():
        module = modules.get(name)
        if isinstance(module, SparseBlockLinear) and module.grid.tile_shape != grid.tile_shape:
            raise ValueError(
                f"selection/delta uses {grid.block_rows}×{grid.block_cols} blocks for {name} but the model's bank "
                f"uses {module.grid.block_rows}×{module.grid.block_cols}; use the same smt.block_size or a fresh model"
            )
        geometry = _logical_shape(module)
        if geometry != (grid.out_features, grid.in_features):
            raise ValueError(
                f"selection/delta does not fit this model: {name} is "
                f"{'missing' if module is None else f'{geometry}'} here but {grid.out_features}×{grid.in_features} "
                "in the file; use the base model it was made for"
            )
    model_id = getattr(getattr(model, "config", None), "_name_or_path", None)
    if selection.model_id and model_id and selection.model_id != model_id:
        warnings.warn(f"selection was made on {selection.model_id!r}, applying it to {model_id!r}", stacklevel=3)


def _logical_shape(module: nn.Module | None) -> tuple[int, int] | None:
    if module is None:
        return None
    if isinstance(module, SparseBlockLinear):
        return module.grid.out_features, module.grid.in_features
    geometry = linear_geometry(module)
    return None if geometry is None else geometry[:2]


def current_selection(model: nn.Module) -> Selection:
    """The live selection of a tuning model (what its bank's map says)."""
    bank = _require_bank(model)
    grids = {name: layer.grid for name, layer in sparse_layers(model).items()}
    provenance = bank.provenance
    return Selection(
        bank.blocks(),
        grids,
        provenance.get("criterion", "manual"),
        provenance.get("budget", {}),
        provenance.get("warmup_steps", 0),
        provenance.get("model_id"),
    )
