"""The bank: a fixed set of ``K`` trainable block slots and the map saying where each one sits.

Slot ``s`` is one ``nn.Parameter`` of shape ``(bo, bi)`` holding ``Δ`` relative to the pretrained weight
(a ragged block uses its top-left corner); ``map[s] = (module, row_block, col_block)``. ``K`` is fixed
by the budget before training, so the parameter set and every shape stay the same through warm-up,
selection, regrowth and resume: DDP, FSDP, DeepSpeed and the optimizer never see a change, and a
state dict saved at any point loads strictly into a freshly injected model.

Phases (kept in the module's extra state, so they travel with the weights):
- scoring (warm-up): Δ = 0 and slots sit on a *provisional* map so every slot takes part in the graph
  (DDP needs a gradient for each); their gradients are dropped, nothing is updated.
- tuning: the map holds the selection and Δ is applied and trained.
"""

from __future__ import annotations

import torch
from torch import nn

FORMAT_VERSION = 1


class BlockBank(nn.Module):
    """``K`` slots of Δ for the blocks of ``module_names``.

    Args:
        module_names: targeted modules, in a fixed order (map entries refer to positions in it).
        grid_shapes: ``(n_rb, n_cb)`` of each module's grid (drives the provisional map).
        block_shapes: ``(bo, bi)`` of each module's blocks (recorded so a checkpoint alone can rebuild the bank).
        tile_shape: ``(bo, bi)`` slot shape (the largest tile of any module).
        capacity: ``K``.
        dtype: slot dtype (fp32 master weights by default).
        device: where slots live.
    """

    def __init__(
        self,
        module_names: list[str],
        grid_shapes: list[tuple[int, int]],
        block_shapes: list[tuple[int, int]],
        tile_shape: tuple[int, int],
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        available = sum(rows * cols for rows, cols in grid_shapes)
        if not 1 <= capacity <= available:
            raise ValueError(f"smt: a bank of {capacity} slots does not fit the {available} blocks of its modules")
        self.module_names = list(module_names)
        self.grid_shapes = [tuple(shape) for shape in grid_shapes]
        self.block_shapes = [tuple(shape) for shape in block_shapes]
        self.tile_shape = tuple(tile_shape)
        self.slots = nn.ParameterList(
            nn.Parameter(torch.zeros(*self.tile_shape, dtype=dtype, device=device)) for _ in range(capacity)
        )
        self.register_buffer("map", torch.full((capacity, 3), -1, dtype=torch.int64, device=device))
        self.tuning = False
        self.provenance: dict = {}
        self.version = 0
        self._slot_cache: dict[int, list[int]] | None = None
        self._provisional_map()

    def forward(self, x):
        """Identity: containers such as ``nn.Sequential`` call every child, and the bank computes nothing."""
        return x

    @property
    def capacity(self) -> int:
        return len(self.slots)

    # --- the map -------------------------------------------------------------------------------------

    def _provisional_map(self) -> None:
        """Spread slots round-robin over modules (row-major blocks), so each slot sits in the graph."""
        rows, next_block, module = [], [0] * len(self.module_names), 0
        while len(rows) < self.capacity:
            n_rb, n_cb = self.grid_shapes[module]
            if next_block[module] < n_rb * n_cb:
                rows.append((module, next_block[module] // n_cb, next_block[module] % n_cb))
                next_block[module] += 1
            module = (module + 1) % len(self.module_names)
        with torch.no_grad():
            self.map.copy_(torch.tensor(rows, dtype=torch.int64))
        self._changed()

    def assign(self, blocks: dict[str, torch.Tensor]) -> None:
        """Point the slots at ``blocks`` (module name → ``[k, 2]``) in module order, zero every slot's Δ.

        Raises:
            ValueError: the block count differs from the capacity, or a module is unknown.
        """
        unknown = set(blocks) - set(self.module_names)
        if unknown:
            raise ValueError(f"selection names modules the model does not target: {sorted(unknown)[:3]}")
        total = sum(int(index.shape[0]) for index in blocks.values())
        if total != self.capacity:
            raise ValueError(
                f"selection has {total} blocks but the bank holds {self.capacity}; re-inject with this budget"
            )
        rows = [
            torch.cat([torch.full((index.shape[0], 1), m), index.long().cpu()], dim=1)
            for m, name in enumerate(self.module_names)
            if (index := blocks.get(name)) is not None and index.shape[0]
        ]
        with torch.no_grad():
            self.map.copy_(torch.cat(rows).to(self.map.device))
            for slot in self.slots:
                slot.zero_()
        self._changed()

    def move_slots(self, slot_ids: list[int], module: int, index: torch.Tensor) -> None:
        """Re-point ``slot_ids`` of one module at blocks ``index`` ``[n, 2]`` and zero their Δ (regrowth).

        Layers must not be merged meanwhile (``unmerge`` restores the blocks it merged, not the new ones).
        """
        with torch.no_grad():
            ids = torch.tensor(slot_ids, device=self.map.device)
            self.map[ids, 0] = module
            self.map[ids, 1:] = index.to(self.map.device, torch.int64)
            for s in slot_ids:
                self.slots[s].zero_()
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._slot_cache = None

    def slot_ids(self, module: int) -> list[int]:
        """Slots of module position ``module``, in map order (cached until the map changes)."""
        if self._slot_cache is None:
            cache: dict[int, list[int]] = {}
            for slot, owner in enumerate(self.map[:, 0].tolist()):
                cache.setdefault(owner, []).append(slot)
            self._slot_cache = cache
        return self._slot_cache.get(module, [])

    def index_of(self, module: int) -> torch.Tensor:
        """``[k, 2]`` blocks of module position ``module`` (on the map's device)."""
        return self.map[self.slot_ids(module), 1:]

    def stacked(self, slot_ids: list[int], tile_shape: tuple[int, int]) -> torch.Tensor:
        """The Δ of ``slot_ids`` as one ``[k, bo, bi]`` tensor (autograd flows back to each slot)."""
        delta = torch.stack([self.slots[s] for s in slot_ids])
        if tuple(tile_shape) != self.tile_shape:
            delta = delta[:, : tile_shape[0], : tile_shape[1]]
        return delta

    def detached(self, slot_ids: list[int], tile_shape: tuple[int, int]) -> torch.Tensor:
        """A ``[k, bo, bi]`` copy of the Δ of ``slot_ids`` without autograd, whole even when FSDP2 shards the slots
        (outside a forward each slot is a ``DTensor`` shard; gathering it is a collective, so every rank must call)."""
        delta = torch.stack([_unsharded(self.slots[s].detach()) for s in slot_ids])
        return delta[:, : tile_shape[0], : tile_shape[1]]

    def blocks(self) -> dict[str, torch.Tensor]:
        """Module name → ``[k, 2]`` blocks currently mapped (the live selection)."""
        return {name: self.index_of(m).cpu() for m, name in enumerate(self.module_names) if self.slot_ids(m)}

    # --- state that travels with the weights ------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "modules": list(self.module_names),
            "tile_shape": list(self.tile_shape),
            "block_shapes": [list(shape) for shape in self.block_shapes],
            "tuning": self.tuning,
            "provenance": dict(self.provenance),
        }

    def set_extra_state(self, state: dict) -> None:
        if state.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError("smt bank state comes from a newer smt version; upgrade smt")
        shapes = [tuple(shape) for shape in state.get("block_shapes", self.block_shapes)]
        if (
            list(state["modules"]) != self.module_names
            or tuple(state["tile_shape"]) != self.tile_shape
            or (shapes != self.block_shapes)
        ):
            raise ValueError(
                "smt bank state was saved for other target modules or block size; "
                "use the same smt.target_modules and smt.block_size as the run that saved it"
            )
        self.tuning = bool(state["tuning"])
        self.provenance = dict(state.get("provenance", {}))
        self._changed()  # the map buffer was loaded just before this

    def extra_repr(self) -> str:
        return (
            f"capacity={self.capacity}, tile={self.tile_shape}, modules={len(self.module_names)}, tuning={self.tuning}"
        )


def _unsharded(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
