"""Where the callback puts the bank inside a LightningModule, and how checkpoints from the old placement load.

A LightningModule usually keeps its network in one attribute (``self.model = AutoModelForCausalLM…``). The bank
goes on that attribute, so module names in the bank, selections and delta files are the network's own
(``model.layers.0.self_attn.q_proj``, what a fresh ``AutoModelForCausalLM`` has) and ``merge_delta(module.model)``
works. The patterns a user writes still match names as the LightningModule has them (``model.model.layers…``, or
suffixes), as before: :func:`config_for_holder` turns them into the holder's exact names. When the targets sit in
several attributes, or directly on the LightningModule, or the one attribute is a container (``ModuleList``,
``Sequential``, ``ModuleDict``: a child there would join its iteration), the bank stays on the LightningModule.

Runs written before this placement kept the bank on the LightningModule (keys ``smt_bank.*``, module names
``model.layers…``); :func:`relocate_root_bank` rewrites such a state dict for the new place as it loads.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

from torch import nn

from smt.core.config import SMTConfig
from smt.core.model import BANK_NAME, exact_pattern, find_targets, sparse_layers
from smt.core.patterns import name_matcher, no_match_error
from smt.core.selection import Selection, assign_pools

CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def holding_attribute(root: nn.Module, target_modules: str | list[str]) -> str:
    """The attribute of ``root`` that holds every target (``"model"``), or ``""`` for ``root`` itself.

    Raises:
        ValueError: ``target_modules`` matches nothing in ``root`` (see ``find_targets``).
    """
    names = find_targets(root, target_modules)
    heads = {name.split(".", 1)[0] for name in names}
    if len(heads) != 1:
        return ""
    head = heads.pop()
    if head in names or isinstance(root.get_submodule(head), CONTAINERS):
        return ""
    return head


def holding_attribute_of(root: nn.Module, names: list[str]) -> str:
    """:func:`holding_attribute` for a saved selection's module names, whichever placement saved them.

    Names that all exist in ``root`` were saved with the bank on the LightningModule (before this placement);
    otherwise they are relative to the one attribute under which they all exist. ``""`` when neither fits (the
    selection is then checked against ``root`` and refused in one line).
    """
    modules = dict(root.named_modules())
    if all(name in modules for name in names):
        return holding_attribute(root, exact_pattern(names))
    holders = [
        attribute
        for attribute, child in root.named_children()
        if not isinstance(child, CONTAINERS) and all(f"{attribute}.{name}" in modules for name in names)
    ]
    return holders[0] if len(holders) == 1 else ""


def config_for_holder(config: SMTConfig, root: nn.Module, prefix: str) -> SMTConfig:
    """``config`` for the holder at ``prefix``: its patterns, matched as ``root`` names its modules (what the user
    wrote them against), turned into the exact names of the matched modules relative to the holder."""
    if not prefix:
        return config
    names = list(find_targets(root, config.target_modules))
    relative = {name: name.removeprefix(prefix + ".") for name in names}
    pools = None
    if config.pools:
        members = assign_pools(names, {pool: p.pattern for pool, p in config.pools.items()})
        pools = {
            pool: replace(p, pattern=exact_pattern(relative[n] for n in members[pool]))
            for pool, p in config.pools.items()
        }
    return replace(config, target_modules=exact_pattern(relative.values()), pools=pools)


def train_densely(root: nn.Module, patterns: str | list[str], network: nn.Module) -> None:
    """Train the parameters of ``root`` named by ``patterns`` (or owned by a module they name) densely, beside the
    blocks (``smt.trainable_modules``: a new head, norms); the weights smt tunes in blocks (in ``network``) stay out.

    Raises:
        ValueError: ``patterns`` match nothing (the message shows a real name).
    """
    matches = name_matcher(patterns, "smt.trainable_modules")
    targeted = {id(layer.weight) for layer in sparse_layers(network).values()}
    hits = 0
    for name, param in root.named_parameters():
        owner = name.rpartition(".")[0]
        if (matches(name) or matches(owner)) and id(param) not in targeted and BANK_NAME not in name:
            param.requires_grad_(True)
            hits += 1
    if hits == 0:
        owners = [n for n, m in root.named_modules() if n and BANK_NAME not in n and _owns_parameters(m)]
        what = f"module or parameter of {type(root).__name__} outside the targeted weights"
        raise no_match_error("smt.trainable_modules", patterns, owners, what)


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def relocate_root_bank(state_dict: dict, prefix: str) -> None:
    """Move a bank saved on the root (``smt_bank.*``) to ``<prefix>.smt_bank.*``, in place; a no-op otherwise.

    The bank's module names lose ``<prefix>.``, as names relative to the new holder.
    """
    old = BANK_NAME + "."
    if not prefix or f"{prefix}.{old}map" in state_dict or f"{old}map" not in state_dict:
        return
    for key in [k for k in state_dict if k.startswith(old)]:
        value = state_dict.pop(key)
        if key == f"{old}_extra_state" and isinstance(value, dict):
            value = {**value, "modules": [name.removeprefix(prefix + ".") for name in value["modules"]]}
        state_dict[f"{prefix}.{key}"] = value


def relative_names(by_name: dict, prefix: str, known: Collection[str] = ()) -> dict:
    """``{name: value}`` with ``<prefix>.`` taken off names saved relative to the root (old placement).

    Names that are all in ``known`` (the holder's own names) are kept as they are: a network's names may start with
    the attribute that holds it (``model.layers…`` inside ``module.model``) without being root-relative.
    """
    if not prefix or not by_name or all(name in known for name in by_name):
        return by_name
    if not all(name.startswith(prefix + ".") for name in by_name):
        return by_name
    return {name.removeprefix(prefix + "."): value for name, value in by_name.items()}


def relative_regrowth_state(state: dict, prefix: str, known: Collection[str] = ()) -> dict:
    """A ``Regrower.state_dict()`` with its per-module entries named relative to ``prefix`` (see ``relative_names``)."""
    return {
        **state,
        "scorers": relative_names(state["scorers"], prefix, known),
        "ema": relative_names(state["ema"], prefix, known),
    }


def relative_selection(selection: Selection, prefix: str, known: Collection[str] = ()) -> Selection:
    """A selection saved with root-relative names (old placement), renamed for the holder at ``prefix``."""
    grids = relative_names(selection.grids, prefix, known)
    if grids is selection.grids:
        return selection
    return Selection(
        relative_names(selection.blocks, prefix, known),
        grids,
        selection.criterion,
        selection.budget,
        selection.warmup_steps,
        selection.model_id,
        None if selection.scores is None else relative_names(selection.scores, prefix, known),
    )
