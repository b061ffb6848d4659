"""Several delta files on one plain base model, switched in place (adapter hot-swap and fusion).

For every targeted weight the set keeps the original values ``W0[U]`` at the union ``U`` of the positions
any loaded delta touches. Activating deltas ``{d: w_d}`` writes, at the positions ``P`` they touch,

    W[P] = round(W0[P] + Σ_d w_d · Δ_d[P])      (the sum in fp32, one rounding to the weight's dtype)

and deactivating writes ``W[P] = W0[P]`` back. Restoring saved values, rather than subtracting Δ again
(``W0 + Δ − Δ`` is not ``W0`` in floating point), makes A → B → A land on exactly A's bits in any dtype;
A's own values are ``W0 + Δ_A`` rounded once, so a bf16 base differs from the fp32 reference by at most
one bf16 rounding. A switch is two ``index_put_`` per module, the cost of a scatter of the delta's size.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smt.delta import read_delta
from smt.model import check_selection_fits, logical_weight
from smt.selection import Selection


@dataclass(frozen=True)
class ModuleDelta:
    """One delta on one weight: flat storage positions of its real (non-ragged) entries and their Δ in fp32."""

    positions: torch.Tensor
    values: torch.Tensor


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
        weight = logical_weight(model.get_submodule(name))
        if not weight.dtype.is_floating_point or not _flat_addressable(weight):
            raise ValueError(f"delta file {path}: {name} has a quantized or non-contiguous weight; use a float base")
    return selection, deltas


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
        self._originals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module → (positions U, W0[U])
        self._written: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module → (positions, where in U)
        self._where: dict[tuple[str, str], torch.Tensor] = {}  # (delta, module) → its positions' places in U

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
        self.deactivate()  # W0 must be read where the active deltas may have written
        with torch.no_grad():
            for module, delta in flat.items():
                self._remember_originals(module, delta.positions)
        self.deltas[name] = flat
        self._where.clear()  # positions in the saved originals moved
        if active:
            self.activate(active)

    def _remember_originals(self, module: str, positions: torch.Tensor) -> None:
        """Extend the saved ``W0[U]`` of ``module`` to cover ``positions`` (kept sorted for searchsorted)."""
        storage = self._storage(module)
        known, values = self._originals.get(module, (positions[:0], storage[:0]))
        new = torch.unique(positions[~torch.isin(positions, known)])
        merged = torch.cat([known, new])
        order = torch.argsort(merged)
        self._originals[module] = (merged[order], torch.cat([values, storage[new].clone()])[order])

    def _storage(self, module: str) -> torch.Tensor:
        weight = logical_weight(self.model.get_submodule(module))
        return weight.view(-1) if weight.is_contiguous() else weight.t().view(-1)

    @torch.no_grad()
    def activate(self, which: str | dict[str, float]) -> None:
        """Make ``which`` the model's delta: one name, or ``{name: weight}`` for a weighted sum (fusion).

        Raises:
            ValueError: an unknown name or a non-finite weight; nothing is changed then.
        """
        weights = {which: 1.0} if isinstance(which, str) else dict(which)
        unknown = [n for n in weights if n not in self.deltas]
        if unknown:
            raise ValueError(f"DeltaSet has no delta named {unknown[0]!r}; loaded: {sorted(self.deltas)}")
        if not all(math.isfinite(float(w)) for w in weights.values()):
            raise ValueError(f"DeltaSet.activate weights {weights} must be finite numbers")
        self.deactivate()
        for module in {m for n in weights for m in self.deltas[n]}:
            positions, values, where = self._combine(module, weights)
            storage = self._storage(module)
            originals = self._originals[module][1][where]
            storage.index_put_((positions,), (originals.float() + values).to(storage.dtype))
            self._written[module] = (positions, where)
        self.active = weights

    def _combine(self, module: str, weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions, Σ_d w_d · Δ_d, places in U)`` of one module over the positions the deltas touch."""
        parts = [(n, float(w)) for n, w in weights.items() if module in self.deltas[n]]
        if len(parts) == 1:  # the switch path: no allocation beyond the scaled values
            name, weight = parts[0]
            delta = self.deltas[name][module]
            return (
                delta.positions,
                delta.values if weight == 1.0 else weight * delta.values,
                self._where_of(name, module),
            )
        positions, inverse = torch.unique(
            torch.cat([self.deltas[n][module].positions for n, _ in parts]), return_inverse=True
        )
        values = torch.zeros(len(positions), device=positions.device)
        values.index_add_(0, inverse, torch.cat([w * self.deltas[n][module].values for n, w in parts]))
        return positions, values, torch.searchsorted(self._originals[module][0], positions)

    def _where_of(self, name: str, module: str) -> torch.Tensor:
        key = (name, module)
        if key not in self._where:
            self._where[key] = torch.searchsorted(self._originals[module][0], self.deltas[name][module].positions)
        return self._where[key]

    @torch.no_grad()
    def deactivate(self) -> None:
        """Put the original base values back where the active deltas wrote (bit for bit)."""
        for module, (positions, where) in self._written.items():
            self._storage(module).index_put_((positions,), self._originals[module][1][where])
        self._written, self.active = {}, {}


__all__ = ["DeltaSet", "ModuleDelta", "module_deltas", "read_delta_for", "same_base"]
