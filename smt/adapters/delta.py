"""The delta file: the tuned blocks of a model, apart from its base weights.

Format (safetensors, format ``smt.delta`` version 1):

- ``<module>.smt_index``: int32 ``[k, 2]`` (row block, column block) of each tuned block;
- ``<module>.smt_delta``: ``[k, bo, bi]`` Δ of each block in the file's dtype (bf16 by default: about
  2 bytes per tuned weight; the part of a ragged block outside the weight is 0);
- metadata: ``format``, ``format_version``, ``grids`` (JSON ``{module: [out, in, bo, bi]}``, every
  targeted module), ``base_model_id``, ``dtype``, ``provenance`` (JSON: criterion, budget, warm-up steps).

``load_delta`` validates the whole file against the model before it changes anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from smt.adapters.warm_base import check_warm_base, model_warm_tag, save_warm_base, warm_tag_of
from smt.core.io import atomic_save_safetensors, parse_count, parse_grids, parse_json, read_safetensors
from smt.core.model import DTYPES, apply_selection, bank_holder, current_selection, get_bank, sparse_layers
from smt.core.selection import Selection
from smt.kernels.blocks import BlockGrid

FORMAT = "smt.delta"
FORMAT_VERSION = 1


def save_delta(
    model: nn.Module,
    path: str | Path,
    base_model_id: str | None = None,
    dtype: str | torch.dtype = "bfloat16",
    tokenizer=None,
) -> Path:
    """Write the model's tuned blocks to ``path`` (atomic write), and after a full warm-up its warmed base beside it
    (``smt.adapters.warm_base``: without it Δ would rebuild a model that was never trained).

    Args:
        model: a tuning model (``apply_selection`` was applied, or the warm-up selected).
        path: target ``.safetensors`` file.
        base_model_id: name or path of the base model (default: ``model.config._name_or_path`` when present).
        dtype: storage dtype of Δ (``bfloat16``, ``float16`` or ``float32``).
        tokenizer: saved with the warmed base (so ``smt merge`` can use that folder as its base).

    Returns:
        The path written.
    """
    tensors, metadata = delta_state(model, base_model_id, dtype)
    written = atomic_save_safetensors(tensors, Path(path), metadata)
    tag = model_warm_tag(model)
    if tag is not None:
        save_warm_base(bank_holder(model), written, tag, tokenizer)
    return written


def delta_state(
    model: nn.Module, base_model_id: str | None = None, dtype: torch.dtype | str = torch.bfloat16
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a delta file, not yet written.

    Under FSDP2 the slots are shards and gathering them is a collective: every rank calls this, one writes.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"save_delta dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    selection = current_selection(model)
    bank = get_bank(model)
    tensors = {}
    for name, layer in sparse_layers(model).items():
        ids = layer.slot_ids()
        if not ids:
            continue
        delta = bank.detached(ids, layer.grid.tile_shape) * layer.grid.tile_mask(layer.plan().index)
        tensors[f"{name}.smt_index"] = layer.plan().index.to(torch.int32)
        tensors[f"{name}.smt_delta"] = delta.to(dtype)
    base_model_id = base_model_id or getattr(getattr(bank_holder(model), "config", None), "_name_or_path", "") or ""
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "grids": json.dumps(
            {n: [g.out_features, g.in_features, g.block_rows, g.block_cols] for n, g in selection.grids.items()}
        ),
        "base_model_id": base_model_id,
        "dtype": str(dtype).removeprefix("torch."),
        "provenance": json.dumps(bank.provenance, default=str),
    }
    return tensors, metadata


def read_delta(path: str | Path) -> tuple[Selection, dict[str, torch.Tensor], dict[str, str]]:
    """Read and validate a delta file on its own: ``(selection, module → Δ [k, bo, bi], metadata)``.

    Each module's Δ is in the row-major block order of ``selection.blocks``.

    Raises:
        ValueError: missing/corrupted/truncated file, newer version, inconsistent shapes, non-finite Δ.
    """
    path = Path(path)
    where = f"delta file {path}"
    tensors, meta = read_safetensors(path, FORMAT, FORMAT_VERSION, "delta")
    grids = parse_grids(meta.get("grids"), where)
    provenance = parse_json(meta.get("provenance", "{}"), where, "provenance", dict)
    warmup_steps = parse_count(provenance.get("warmup_steps"), where, "provenance.warmup_steps")
    budget = provenance.get("budget", {})
    if not isinstance(budget, dict):
        raise ValueError(f"{where}: metadata provenance.budget is not an object; re-export the delta")
    blocks, deltas = {}, {}
    for key, value in tensors.items():
        name, _, kind = key.rpartition(".")
        if name not in grids or kind not in ("smt_index", "smt_delta"):
            raise ValueError(f"delta file {path}: unexpected entry {key!r}; it was not written by smt")
        (blocks if kind == "smt_index" else deltas)[name] = value
    for name in set(blocks) | set(deltas):
        _check_module(path, name, blocks.get(name), deltas.get(name), grids[name])
        order = torch.argsort(blocks[name][:, 0].long() * grids[name].n_col_blocks + blocks[name][:, 1].long())
        deltas[name] = deltas[name][order]  # the row-major order Selection keeps
    selection = Selection(
        {n: b.long() for n, b in blocks.items()},
        grids,
        str(provenance.get("criterion", "manual")),
        budget,
        warmup_steps,
        meta.get("base_model_id") or None,
    )
    return selection, deltas, meta


def dense_deltas_of(selection: Selection, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module → dense fp32 Δ ``[out, in]`` of a delta as ``read_delta`` gives it (modules without blocks left out)."""
    dense = {}
    for name, index in selection.blocks.items():
        if len(index):
            grid = selection.grids[name]
            dense[name] = grid.scatter_add_(
                torch.zeros(grid.out_features, grid.in_features), index, deltas[name].float()
            )
    return dense


def _check_module(path, name, index, delta, grid: BlockGrid) -> None:
    if index is None or delta is None:
        raise ValueError(
            f"delta file {path}: {name} has {'no index' if index is None else 'no delta'}; the file is incomplete"
        )
    grid.check_index(index, f"delta file {path}: {name}")
    if tuple(delta.shape) != (index.shape[0], grid.block_rows, grid.block_cols):
        raise ValueError(
            f"delta file {path}: {name} delta has shape {tuple(delta.shape)}, expected "
            f"{(index.shape[0], grid.block_rows, grid.block_cols)}"
        )
    if delta.dtype not in DTYPES.values() or not bool(torch.isfinite(delta).all()):
        raise ValueError(f"delta file {path}: {name} holds non-finite or non-float values; refusing to apply it")


def read_selection(path: str | Path) -> Selection:
    """The selection in ``path``: a selection file, or the blocks a delta file tunes (``smt.selection_path``).

    Raises:
        ValueError: neither kind of file, or an invalid one.
    """
    if str(path).endswith(".safetensors"):
        try:
            return Selection.load(path)
        except ValueError as err:
            if "not an smt selection file" not in str(err):
                raise
        return read_delta(path)[0]
    return Selection.load(path)


def load_delta(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply a delta file to ``model`` (a fresh base model, or one whose bank has the same capacity).

    Raises:
        ValueError: the file is invalid or does not fit the model (a full warm-up's delta on anything but its warmed
            base); the model is left unchanged.
    """
    selection, deltas, meta = read_delta(path)
    check_warm_base(model, warm_tag_of(meta.get("provenance")), path)
    apply_selection(model, selection)
    bank = get_bank(model)
    with torch.no_grad():
        for name, layer in sparse_layers(model).items():
            ids = layer.slot_ids()
            if not ids:
                continue
            tiles = deltas[name] * layer.grid.tile_mask(selection.blocks[name])
            for slot, tile in zip(ids, tiles):  # bank.assign kept the selection's row-major order
                bank.slots[slot][: tile.shape[0], : tile.shape[1]].copy_(tile)
    return model
