"""A block delta as a PEFT SHiRA adapter: the same Δ, entry for entry (no approximation).

SHiRA (``peft.tuners.shira``; PEFT 0.21 tested) adds a sparse matrix to each targeted ``nn.Linear``:
``W = W0 + sparse_coo(shira_indices [2, n], shira_weight [n])``, one value per ``(row, col)`` index, so the
entries of our blocks fit it exactly. Its one constraint is the count: every module holds exactly
``n = r·(out + in)`` entries for the config's single ``r`` (PEFT builds the parameter that size before loading).
So ``r = max over modules of ⌈entries / (out + in)⌉``, and each module is padded up to ``r·(out + in)`` with
zero-valued entries at positions outside its blocks (``W0 + 0`` is ``W0``). A module whose ``r·(out + in)``
would exceed ``out·in`` cannot be written (PEFT refuses such an ``r``); a delta that tunes most of some
module is better merged.

Files (PEFT 0.21 layout, loaded by ``peft.PeftModel.from_pretrained(base, folder)``): ``adapter_config.json``
(``peft_type SHIRA``, ``r``, ``target_modules`` = the tuned modules' full names) and
``adapter_model.safetensors`` with ``base_model.model.<module>.shira_weight`` / ``.shira_indices`` (int32).
SHiRA covers ``torch.nn.Linear`` only: GPT-2 ``Conv1D`` deltas are refused (use ``--lora`` or the delta file).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smt.adapters.delta import dense_deltas_of, read_delta
from smt.adapters.warm_base import model_warm_tag, refuse_warm, warm_tag_of
from smt.core.model import sparse_layers


@dataclass(frozen=True)
class ShiraReport:
    """What the adapter holds: its rank, the tuned weights, and the zero entries added to reach ``r·(out + in)``."""

    rank: int
    tuned: int
    padding: int

    def __str__(self) -> str:
        share = self.padding / max(1, self.tuned + self.padding)
        return (
            f"SHiRA r={self.rank}: {self.tuned:,} tuned weights exactly, plus {self.padding:,} zero entries of padding "
            f"({100 * share:.1f} % of the file's entries)"
        )


def export_shira(model: nn.Module, folder: str | Path, base_model_id: str | None = None, dtype=torch.float32):
    """Write a tuning model's Δ as a PEFT SHiRA adapter (exact in ``dtype``; fp32 reproduces the tuned model).

    Raises:
        ValueError: a tuned module is not an ``nn.Linear`` (GPT-2 ``Conv1D``), or one ``r`` cannot fit every module.
    """
    refuse_warm(model_warm_tag(model), "a PEFT SHiRA adapter")
    supports = {}
    for name, layer in sparse_layers(model).items():
        if layer.slot_ids():
            if layer.transposed:
                raise ValueError(
                    f"smt export --peft: {name} is a GPT-2 Conv1D; SHiRA adapts nn.Linear only (use --lora)"
                )
            supports[name] = (layer.delta_weight().cpu(), _support(layer.grid, layer.plan().index.cpu()))
    base_model_id = base_model_id or getattr(getattr(model, "config", None), "_name_or_path", None)
    return write_shira(supports, folder, base_model_id, dtype)


def export_shira_from_file(delta_path: str | Path, folder: str | Path, dtype=torch.float32) -> ShiraReport:
    """``export_shira`` for a delta file (validated by ``read_delta``); no model needed."""
    selection, deltas, meta = read_delta(delta_path)
    refuse_warm(warm_tag_of(meta.get("provenance")), "a PEFT SHiRA adapter")
    dense = dense_deltas_of(selection, deltas)
    supports = {name: (delta, _support(selection.grids[name], selection.blocks[name])) for name, delta in dense.items()}
    return write_shira(supports, folder, meta.get("base_model_id") or None, dtype)


def _support(grid, index: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` bool: the entries inside the selected blocks."""
    ones = torch.ones(len(index), *grid.tile_shape)
    return grid.scatter_add_(torch.zeros(grid.out_features, grid.in_features), index, ones) > 0


def shira_rank(shapes: dict[str, tuple[int, int, int]]) -> int:
    """The smallest ``r`` with ``r·(out + in) ≥ entries`` for every ``module → (entries, out, in)``.

    Raises:
        ValueError: that ``r`` would give some module more than ``out·in`` entries (PEFT refuses it).
    """
    rank = max([1, *(math.ceil(n / (rows + cols)) for n, rows, cols in shapes.values())])
    for name, (_, rows, cols) in shapes.items():
        if rank * (rows + cols) > rows * cols:
            raise ValueError(
                f"smt export --peft: SHiRA gives every module r·(out+in) entries for one r; the delta needs r={rank}, "
                f"more than {name}'s {rows}×{cols} entries; write the delta file or a merged model instead"
            )
    return rank


def write_shira(
    supports: dict[str, tuple[torch.Tensor, torch.Tensor]],
    folder: str | Path,
    base_model_id: str | None,
    dtype: torch.dtype = torch.float32,
) -> ShiraReport:
    """Write ``module → (dense Δ [out, in], support mask [out, in])`` as a SHiRA adapter folder.

    Raises:
        ValueError: no module has blocks, or one ``r`` cannot fit every module (see :func:`shira_rank`).
    """
    from safetensors.torch import save_file

    if not supports:
        raise ValueError("smt export --peft: the delta tunes no block; there is nothing to write")
    rank = shira_rank({name: (int(mask.sum()), *mask.shape) for name, (_, mask) in supports.items()})
    tensors, tuned, padding = {}, 0, 0
    for name, (delta, mask) in supports.items():
        count = rank * sum(mask.shape)
        padded = mask | _first_outside(mask, count - int(mask.sum()))
        rows, cols = padded.nonzero(as_tuple=True)  # row-major; padding entries carry Δ = 0
        tensors[f"base_model.model.{name}.shira_indices"] = torch.stack([rows, cols]).to(torch.int32).contiguous()
        tensors[f"base_model.model.{name}.shira_weight"] = delta[rows, cols].to(dtype).contiguous()
        tuned, padding = tuned + int(mask.sum()), padding + count - int(mask.sum())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(_config(rank, sorted(supports), base_model_id), indent=2))
    return ShiraReport(rank, tuned, padding)


def _first_outside(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` positions (row-major) outside ``mask``, as a mask."""
    flat = torch.zeros(mask.numel(), dtype=torch.bool)
    flat[(~mask).flatten().nonzero().squeeze(1)[:count]] = True
    return flat.view_as(mask)


def _config(rank: int, modules: list[str], base_model_id: str | None) -> dict:
    return {
        "peft_type": "SHIRA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "mask_type": "random",  # only builds the placeholder PEFT fills from shira_indices on load
        "target_modules": modules,  # full names: PEFT matches a name or a ".name" suffix
        "base_model_name_or_path": base_model_id or None,
        "fan_in_fan_out": False,
        "init_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


__all__ = ["ShiraReport", "export_shira", "export_shira_from_file", "shira_rank", "write_shira"]
