"""Several delta files on one plain base model, switched in place (adapter hot-swap and fusion).

For every delta and targeted weight the set keeps the flat positions ``P`` the delta touches, Δ there
(fp32) and the original values ``W0[P]``, read on ``add``, and the merged values ``round(W0[P] + Δ[P])``, made
when the delta is first activated alone. Activating one delta writes its merged values; deactivating writes
``W0[P]`` back. A switch is therefore two ``index_copy_`` per module, the cost of a scatter of the delta's size,
with no arithmetic. Activating
several deltas with weights ``{d: w_d}`` (fusion) writes, over the union of their positions,

    W[P] = round(W0[P] + Σ_d w_d · Δ_d[P])      (the sum in fp32, one rounding to the weight's dtype)

Restoring saved values, rather than subtracting Δ again (``W0 + Δ − Δ`` is not ``W0`` in floating point),
makes A → B → A land on exactly A's bits in any dtype; A's values are ``W0 + Δ_A`` rounded once, so a
bf16 base differs from the fp32 reference by at most one bf16 rounding. Memory per loaded delta and tuned weight:
8 bytes of position, 4 of Δ, W0 and (once activated alone) W0 + Δ in the weight's dtype. A one-shot merge keeps
neither (``smt.adapters.merge.fuse_deltas_``: positions and Δ of every file, then one module at a time).

Every delta is validated on ``add`` (file format, finiteness, module names and shapes against the base,
base model id) before anything is stored or written.

Example:
    >>> deltas = DeltaSet(model)  # doctest: +SKIP
    >>> deltas.add("math", "math.safetensors"); deltas.add("code", "code.safetensors")  # doctest: +SKIP
    >>> deltas.activate("math")            # model now answers with the math delta  # doctest: +SKIP
    >>> deltas.activate({"math": 0.5, "code": 0.5})   # a fused (weighted) delta  # doctest: +SKIP
    >>> deltas.deactivate()                # the base, bit for bit  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from smt.adapters.delta import read_delta
from smt.adapters.warm_base import check_warm_base, warm_tag_of
from smt.core.model import check_selection_fits, logical_weight
from smt.core.quant import is_quantized
from smt.core.selection import Selection


@dataclass(frozen=True)
class ModuleDelta:
    """One delta on one weight: flat storage positions of its real (non-ragged) entries, Δ there in fp32,
    and, once on a model, the weight's values there without (``originals``) and with (``merged``) Δ."""

    positions: torch.Tensor
    values: torch.Tensor
    originals: torch.Tensor | None = None
    merged: torch.Tensor | None = None


def same_base(expected: str | None, found: str | None) -> bool:
    """Whether two base model ids name the same model (unknown ids match anything).

    A model is often known by a hub id in one place and a local folder in another
    (``HuggingFaceTB/SmolLM2-135M-Instruct`` vs ``artifacts/models/SmolLM2-135M-Instruct``), so the last
    path component decides.
    """
    if not expected or not found:
        return True
    return Path(expected.rstrip("/")).name == Path(found.rstrip("/")).name


def read_delta_for(
    model: nn.Module, path: str | Path, base_model_id: str | None = None
) -> tuple[Selection, dict[str, torch.Tensor]]:
    """Read a delta file and check it against a plain ``model`` without changing anything.

    Args:
        model: the base model the delta will be applied to.
        path: the delta file.
        base_model_id: the base's id; default ``model.config._name_or_path``. ``""`` skips the id check.

    Returns:
        ``(selection, module → Δ [k, bo, bi])`` as ``read_delta`` gives them.

    Raises:
        ValueError: invalid file, another base (names, shapes or id), or a weight that cannot take a delta.
    """
    selection, deltas, meta = read_delta(path)
    check_delta_fits(model, selection, meta, path, base_model_id)
    return selection, deltas


def check_delta_fits(
    model: nn.Module, selection: Selection, meta: dict[str, str], path: str | Path, base_model_id: str | None = None
) -> None:
    """Raise unless a delta file read by ``read_delta`` fits the plain ``model`` (see :func:`read_delta_for`).

    Raises:
        ValueError: another base (names, shapes or id; a full warm-up's delta needs its warmed base), or a weight
            that cannot take a delta.
    """
    tag = warm_tag_of(meta.get("provenance"))
    check_warm_base(model, tag, path)
    if tag is not None:  # the warmed base is a folder of its own name, and its tag already proved it is the one
        base_model_id = ""
    if base_model_id is None:
        base_model_id = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not same_base(base_model_id, meta.get("base_model_id")):
        raise ValueError(
            f"delta file {path} was made for base {meta.get('base_model_id')!r}, not {base_model_id!r}; "
            "use its base model (or pass base_model_id='' / --allow_other_base if it is the same model)"
        )
    with warnings.catch_warnings():  # its only warning is the id one, decided above
        warnings.simplefilter("ignore")
        check_selection_fits(model, selection)
    for name in selection.blocks:
        module = model.get_submodule(name)
        if is_quantized(module) or not _flat_addressable(logical_weight(module)):
            raise ValueError(f"delta file {path}: {name} has a quantized or non-contiguous weight; use a float base")


def _flat_addressable(weight: torch.Tensor) -> bool:
    """A logical ``[out, in]`` view (or its transpose) of contiguous storage: positions are ``r·s0 + c·s1``."""
    return weight.is_contiguous() or weight.t().is_contiguous()


def module_deltas(model: nn.Module, selection: Selection, deltas: dict[str, torch.Tensor]) -> dict[str, ModuleDelta]:
    """Flatten a validated delta into storage positions and fp32 values, module by module."""
    flat = {}
    for name, index in selection.blocks.items():
        if not len(index):
            continue
        grid, weight = selection.grids[name], logical_weight(model.get_submodule(name))
        rows, row_valid = grid.tile_rows(index[:, 0])
        cols, col_valid = grid.tile_cols(index[:, 1])
        mask = row_valid[:, :, None] & col_valid[:, None, :]
        positions = rows[:, :, None] * weight.stride(0) + cols[:, None, :] * weight.stride(1)
        flat[name] = ModuleDelta(positions[mask].to(weight.device), deltas[name].float()[mask].to(weight.device))
    return flat


def weighted_sum(parts: list[tuple[ModuleDelta, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``Σ_d w_d · Δ_d`` of one module over the union of the parts' positions, in fp32.

    Returns:
        ``(positions P, the sum at P, inverse)``; ``inverse`` maps the concatenated parts' entries into ``P``
        (None for a single part, whose positions are ``P`` as they are).
    """
    if len(parts) == 1:
        delta, weight = parts[0]
        return delta.positions, delta.values if weight == 1.0 else weight * delta.values, None
    positions, inverse = torch.unique(torch.cat([d.positions for d, _ in parts]), return_inverse=True)
    total = torch.zeros(len(positions), device=positions.device)
    total.index_add_(0, inverse, torch.cat([w * d.values for d, w in parts]))
    return positions, total, inverse


def flat_storage(model: nn.Module, module: str) -> torch.Tensor:
    """The flat view of ``module``'s weight storage, which ``ModuleDelta.positions`` index."""
    weight = logical_weight(model.get_submodule(module))
    return weight.view(-1) if weight.is_contiguous() else weight.t().view(-1)


def _plus(originals: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``round(W0 + Σ)``: the sum in fp32, rounded once to the weight's dtype."""
    return (originals.float() + total).to(originals.dtype)


class DeltaSet:
    """Delta files loaded onto one plain base model; one of them (or a weighted sum) active at a time.

    Args:
        model: a plain transformers (or torch) model with float weights; no smt bank needed.
        base_model_id: the base's id for the check on ``add``; default ``model.config._name_or_path``,
            ``""`` accepts deltas made for any id (shapes are still checked).
    """

    def __init__(self, model: nn.Module, base_model_id: str | None = None) -> None:
        self.model = model
        self.base_model_id = base_model_id
        self.deltas: dict[str, dict[str, ModuleDelta]] = {}
        self.active: dict[str, float] = {}
        self._written: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module → (positions, W0 there)
        self._storages: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module → (weight, flat view)

    def add(self, name: str, path: str | Path) -> None:
        """Validate and load a delta file under ``name`` (the model's weights end as they were).

        Raises:
            ValueError: the name is taken, or the file is invalid or made for another base.
        """
        if name in self.deltas:
            raise ValueError(f"DeltaSet already holds a delta named {name!r}; pick another name")
        selection, deltas = read_delta_for(self.model, path, self.base_model_id)
        flat = module_deltas(self.model, selection, deltas)
        active = self.active
        self.deactivate()  # W0 is read where the active deltas may have written
        with torch.no_grad():
            for module, delta in flat.items():
                flat[module] = replace(delta, originals=self._storage(module)[delta.positions].clone())
        self.deltas[name] = flat
        if active:
            self.activate(active)

    def _storage(self, module: str) -> torch.Tensor:
        """The flat view of ``module``'s weight storage (cached: looking modules up costs more than a switch)."""
        cached = self._storages.get(module)
        if cached is not None and cached[1].data_ptr() == cached[0].data_ptr():  # `.to()` re-points .data
            return cached[1]
        flat = flat_storage(self.model, module)
        self._storages[module] = (self.model.get_submodule(module).weight, flat)
        return flat

    @torch.no_grad()
    def activate(self, which: str | dict[str, float]) -> None:
        """Make ``which`` the model's delta: one name, or ``{name: weight}`` for a weighted sum (fusion).

        Raises:
            ValueError: an unknown name or a non-finite weight; nothing is changed then.
        """
        weights = {which: 1.0} if isinstance(which, str) else {n: float(w) for n, w in which.items()}
        unknown = [n for n in weights if n not in self.deltas]
        if unknown:
            raise ValueError(f"DeltaSet has no delta named {unknown[0]!r}; loaded: {sorted(self.deltas)}")
        if not all(math.isfinite(w) for w in weights.values()):
            raise ValueError(f"DeltaSet.activate weights {weights} must be finite numbers")
        self.deactivate()
        for module in {m for n in weights for m in self.deltas[n]}:
            positions, originals, values = self._combine(module, weights)
            self._storage(module).index_copy_(0, positions, values)
            self._written[module] = (positions, originals)
        self.active = weights

    def _combine(self, module: str, weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions, W0 there, round(W0 + Σ_d w_d · Δ_d) there)`` of one module."""
        names = [n for n in weights if module in self.deltas[n]]
        parts = [(self.deltas[n][module], weights[n]) for n in names]
        if len(parts) == 1 and parts[0][1] == 1.0:  # the switch path: merged values made once, then reused
            delta = parts[0][0]
            if delta.merged is None:
                delta = self.deltas[names[0]][module] = replace(delta, merged=_plus(delta.originals, delta.values))
            return delta.positions, delta.originals, delta.merged
        positions, total, inverse = weighted_sum(parts)
        originals = parts[0][0].originals
        if inverse is not None:
            originals = torch.empty(len(positions), dtype=originals.dtype, device=positions.device)
            originals[inverse] = torch.cat([d.originals for d, _ in parts])  # every delta saw the same W0
        return positions, originals, _plus(originals, total)

    @torch.no_grad()
    def deactivate(self) -> None:
        """Put the original base values back where the active deltas wrote (bit for bit)."""
        for module, (positions, originals) in self._written.items():
            self._storage(module).index_copy_(0, positions, originals)
        self._written, self.active = {}, {}


__all__ = [
    "DeltaSet",
    "ModuleDelta",
    "check_delta_fits",
    "flat_storage",
    "module_deltas",
    "read_delta_for",
    "same_base",
    "weighted_sum",
]
