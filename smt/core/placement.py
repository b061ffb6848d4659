"""Where the callback puts the bank inside a LightningModule.

A LightningModule usually keeps its network in one attribute (``self.model = AutoModelForCausalLM…``). The bank
goes on that attribute, so module names in the bank, selections and delta files are the network's own
(``model.layers.0.self_attn.q_proj``, what a fresh ``AutoModelForCausalLM`` has) and ``merge_delta(module.model)``
works. The patterns a user writes match names as the LightningModule has them (``model.model.layers…``, or
suffixes): :func:`place` turns them into the holder's exact names. When the targets sit in
several attributes, or directly on the LightningModule, or the one attribute is a container (``ModuleList``,
``Sequential``, ``ModuleDict``: a child there would join its iteration), the bank stays on the LightningModule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from smt.core.config import SMTConfig
from smt.core.model import BANK_NAME, exact_pattern, find_targets, sparse_layers
from smt.core.patterns import name_matcher, no_match_error
from smt.core.selection import assign_pools

CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


@dataclass(frozen=True)
class Placement:
    """Where the bank goes in a LightningModule, with the targets found there once."""

    attribute: str
    """The attribute of the root that holds every target (``"model"``), or ``""`` for the root itself."""
    targets: dict[str, nn.Module]
    """The target modules by name relative to that holder, for ``inject(…, targets=…)``."""
    config: SMTConfig
    """The config with its patterns as the holder's exact names (what the selection and the bank name)."""


def place(root: nn.Module, config: SMTConfig) -> Placement:
    """Find ``config``'s targets in ``root`` once, and the holder of them all (see the module docstring).

    Raises:
        ValueError: ``target_modules`` matches nothing in ``root`` (see ``find_targets``).
    """
    found = find_targets(root, config.target_modules)
    attribute = _holder(root, list(found))
    if not attribute:
        return Placement("", found, config)
    relative = {name: name.removeprefix(attribute + ".") for name in found}
    pools = None
    if config.pools:
        members = assign_pools(list(found), {pool: p.pattern for pool, p in config.pools.items()})
        pools = {
            pool: replace(p, pattern=exact_pattern(relative[n] for n in members[pool]))
            for pool, p in config.pools.items()
        }
    holder_config = replace(config, target_modules=exact_pattern(relative.values()), pools=pools)
    return Placement(attribute, {relative[name]: module for name, module in found.items()}, holder_config)


def _holder(root: nn.Module, names: list[str]) -> str:
    """The one attribute of ``root`` under which every name sits, unless it is a target or a container; else ``""``."""
    heads = {name.split(".", 1)[0] for name in names}
    if len(heads) != 1:
        return ""
    head = heads.pop()
    if head in names or isinstance(root.get_submodule(head), CONTAINERS):
        return ""
    return head


def holding_attribute_of(root: nn.Module, names: list[str]) -> str:
    """The holder for a saved selection's module names.

    Names that all exist in ``root`` were saved with the bank on ``root`` itself (its targets sit in several
    attributes or a container); otherwise they are relative to the one attribute under which they all exist. ``""``
    when neither fits (the selection is then checked against ``root`` and refused in one line).
    """
    modules = dict(root.named_modules())
    if all(name in modules for name in names):
        return _holder(root, names)
    holders = [
        attribute
        for attribute, child in root.named_children()
        if not isinstance(child, CONTAINERS) and all(f"{attribute}.{name}" in modules for name in names)
    ]
    return holders[0] if len(holders) == 1 else ""


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
