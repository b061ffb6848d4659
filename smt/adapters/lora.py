"""A sparse delta as a PEFT LoRA adapter: the best rank-r approximation of each module's Δ.

By Eckart–Young the truncated SVD ``Δ ≈ U_r S_r V_rᵀ`` is the best rank-r approximation in Frobenius
norm; it is written as ``lora_B = U_r S_r`` (``[out, r]``) and ``lora_A = V_rᵀ`` (``[r, in]``) with
``lora_alpha = r``, so PEFT's scaling ``alpha / r`` is 1 and ``W0 + B·A`` is the approximation. Δ is
non-zero only on the rows and columns its blocks cover, so the SVD runs on that sub-matrix (same factors,
a fraction of the cost). The relative error ``‖Δ − B·A‖_F / ‖Δ‖_F`` of each module is reported, and
the output error on a batch against the exact delta.

Files (PEFT 0.21 layout, loaded by ``peft.PeftModel.from_pretrained(base, folder)``):
``adapter_config.json``, ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, and ``smt_lora_report.json`` (errors).
GPT-2 ``Conv1D`` weights are ``[in, out]``: PEFT's ``fan_in_fan_out=True`` covers them with the same
``A``/``B`` shapes.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from smt.adapters.delta import dense_deltas_of, read_delta
from smt.adapters.deltaset import check_delta_fits
from smt.adapters.warm_base import model_warm_tag, refuse_warm, warm_tag_of
from smt.core.merge import remove_smt
from smt.core.model import logical_weight, sparse_layers

REPORT_NAME = "smt_lora_report.json"


@dataclass
class LoraReport:
    """What the conversion lost: per-module relative Frobenius error, and the output error on a batch.

    Attributes:
        rank: the LoRA rank r.
        modules: module → ``‖Δ − B·A‖_F / ‖Δ‖_F`` (0 for an exact factorisation).
        output_error: ``‖y_lora − y_exact‖ / ‖y_exact − y_base‖`` on the batch (share of the delta's effect lost).
        output_max_abs: ``max |y_lora − y_exact|`` on the batch (logits).
    """

    rank: int
    modules: dict[str, float] = field(default_factory=dict)
    output_error: float | None = None
    output_max_abs: float | None = None

    def table(self) -> str:
        """A markdown table of the per-module errors and the output error."""
        lines = ["| module | relative Frobenius error of Δ |", "|---|---|"]
        lines += [f"| {name} | {error:.3e} |" for name, error in self.modules.items()]
        if self.output_error is not None:
            lines.append(
                f"| **output** (logits, vs exact Δ) | {self.output_error:.3e} (max abs {self.output_max_abs:.3e}) |"
            )
        return "\n".join(lines)


def dense_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module → dense fp32 Δ ``[out, in]`` of a tuning model (modules without blocks left out)."""
    return {name: layer.delta_weight() for name, layer in sparse_layers(model).items() if layer.slot_ids()}


def dense_deltas_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Module → dense fp32 Δ ``[out, in]`` of a delta file (validated by ``read_delta``)."""
    selection, deltas, _ = read_delta(path)
    return dense_deltas_of(selection, deltas)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B [out, r], A [r, in], relative error)`` with ``B·A`` the best rank-r approximation of ``delta``.

    Ranks beyond the rank of Δ get zero columns in ``B`` and zero rows in ``A`` (exact, and every
    module keeps the one ``r`` the PEFT config names).
    """
    rows = delta.abs().sum(dim=1).nonzero().squeeze(1)
    cols = delta.abs().sum(dim=0).nonzero().squeeze(1)
    lora_b = torch.zeros(delta.shape[0], rank, dtype=torch.float32, device=delta.device)
    lora_a = torch.zeros(rank, delta.shape[1], dtype=torch.float32, device=delta.device)
    if len(rows):
        sub = delta[rows][:, cols].double()  # fp64: a full-rank export reproduces Δ to fp32 rounding
        u, s, vh = torch.linalg.svd(sub, full_matrices=False)
        k = min(rank, len(s))
        lora_b[rows, :k] = (u[:, :k] * s[:k]).float()
        lora_a[:k, cols] = vh[:k].float()
    norm = float(torch.linalg.matrix_norm(delta.double()))
    error = float(torch.linalg.matrix_norm(delta.double() - lora_b.double() @ lora_a.double()))
    return lora_b, lora_a, 0.0 if norm == 0.0 else error / norm


def save_lora_adapter(
    folder: str | Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    base_model_id: str | None,
    fan_in_fan_out: bool,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``module → (B, A)`` as a PEFT LoRA adapter folder (``adapter_config.json`` + weights)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (lora_b, lora_a) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.to(dtype).contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.to(dtype).contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,  # scaling alpha / r = 1: B·A is Δ's approximation as is
        "lora_dropout": 0.0,
        "target_modules": sorted(factors),  # full names: PEFT matches a name or a ".name" suffix
        "base_model_name_or_path": base_model_id or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def export_lora(
    model: nn.Module,
    folder: str | Path,
    rank: int,
    base_model_id: str | None = None,
    dtype: torch.dtype = torch.float32,
    sample_ids: torch.Tensor | None = None,
) -> LoraReport:
    """Write a tuning model's Δ as a rank-``rank`` PEFT LoRA adapter and report what it loses.

    Args:
        model: a tuning model (its bank has a selection).
        folder: adapter folder to write.
        rank: LoRA rank r ≥ 1.
        base_model_id: stored as ``base_model_name_or_path``; default ``model.config._name_or_path``.
        dtype: storage dtype of ``lora_A``/``lora_B``.
        sample_ids: token ids ``[batch, seq]`` for the output error (skipped when None, and on a quantized base:
            measuring it writes ``W + Δ`` into the weights, which packed 4-/8-bit storage cannot hold).

    Returns:
        The report, also written to ``folder/smt_lora_report.json``.

    Raises:
        ValueError: ``rank`` < 1, or the model mixes ``[in, out]`` (Conv1D) and ``[out, in]`` weights.
    """
    _check_rank(rank)
    refuse_warm(model_warm_tag(model), "a LoRA adapter")
    if sample_ids is not None and any(layer.quantized for layer in sparse_layers(model).values()):
        sample_ids = None
    base_model_id = base_model_id or getattr(getattr(model, "config", None), "_name_or_path", None)
    base = base_copy(model) if sample_ids is not None else None
    source = model if base is None else base
    return write_lora(dense_deltas(model), source, folder, rank, base_model_id, dtype, sample_ids)


def export_lora_from_file(
    base: nn.Module,
    delta_path: str | Path,
    folder: str | Path,
    rank: int,
    dtype: torch.dtype = torch.float32,
    sample_ids: torch.Tensor | None = None,
) -> LoraReport:
    """``export_lora`` for a delta file on its plain base model (validated against it; ``base`` is unchanged).

    The file is read once: validated on its own, then against ``base`` (another base, NaN, a future version… are
    refused before anything is written).
    """
    _check_rank(rank)
    selection, deltas, meta = read_delta(delta_path)
    refuse_warm(warm_tag_of(meta.get("provenance")), "a LoRA adapter")
    check_delta_fits(base, selection, meta, delta_path)
    base_model_id = meta.get("base_model_id") or None
    return write_lora(dense_deltas_of(selection, deltas), base, folder, rank, base_model_id, dtype, sample_ids)


def _check_rank(rank: int) -> None:
    if rank < 1:
        raise ValueError(f"--lora rank={rank} must be at least 1")


def write_lora(
    dense: dict[str, torch.Tensor],
    base: nn.Module,
    folder: str | Path,
    rank: int,
    base_model_id: str | None,
    dtype: torch.dtype,
    sample_ids: torch.Tensor | None,
) -> LoraReport:
    """Factor each dense Δ, write the adapter and the report (output error on ``base`` when ``sample_ids``)."""
    transposed = {_is_transposed(base.get_submodule(name)) for name in dense}
    if len(transposed) > 1:
        raise ValueError("the delta mixes Conv1D and Linear weights; PEFT's fan_in_fan_out is one flag per adapter")
    report = LoraReport(rank)
    factors = {}
    for name, delta in dense.items():
        lora_b, lora_a, report.modules[name] = low_rank(delta, rank)
        factors[name] = (lora_b.to(dtype).float(), lora_a.to(dtype).float())  # output error after storage rounding
    if sample_ids is not None:
        approx = {name: lora_b @ lora_a for name, (lora_b, lora_a) in factors.items()}
        report.output_error, report.output_max_abs = output_error(base, dense, approx, sample_ids)
    save_lora_adapter(folder, factors, rank, base_model_id, transposed == {True}, dtype)
    (Path(folder) / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _is_transposed(module: nn.Module) -> bool:
    """GPT-2 ``Conv1D`` (wrapped or not) stores ``[in, out]``."""
    return bool(getattr(module, "transposed", False)) or type(module).__name__ == "Conv1D"


def base_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a tuning model's base (``W0``, wrapped layers and bank removed); ``model`` is untouched."""
    return remove_smt(copy.deepcopy(model))


@torch.no_grad()
def output_error(
    base: nn.Module, exact: dict[str, torch.Tensor], approx: dict[str, torch.Tensor], ids: torch.Tensor
) -> tuple[float, float]:
    """``(‖y_approx − y_exact‖ / ‖y_exact − y_base‖, max |y_approx − y_exact|)`` of the logits on ``ids``."""
    was_training = base.training
    base.eval()
    y_base = base(input_ids=ids).logits.double()
    with added(base, exact):
        y_exact = base(input_ids=ids).logits.double()
    with added(base, approx):
        y_approx = base(input_ids=ids).logits.double()
    base.train(was_training)
    effect = float(torch.linalg.vector_norm(y_exact - y_base))
    lost = float(torch.linalg.vector_norm(y_approx - y_exact))
    return (0.0 if effect == 0.0 else lost / effect), float((y_approx - y_exact).abs().max())


@contextmanager
def added(model: nn.Module, dense: dict[str, torch.Tensor]):
    """Inside: each named module's logical weight is ``W + Δ`` (added in fp32); after: the original bits."""
    saved = {name: logical_weight(model.get_submodule(name)).detach().clone() for name in dense}
    try:
        with torch.no_grad():
            for name, delta in dense.items():
                weight = logical_weight(model.get_submodule(name))
                weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                logical_weight(model.get_submodule(name)).copy_(original)


__all__ = [
    "LoraReport",
    "added",
    "base_copy",
    "dense_deltas",
    "dense_deltas_from_file",
    "dense_deltas_of",
    "export_lora",
    "export_lora_from_file",
    "low_rank",
    "output_error",
    "save_lora_adapter",
    "write_lora",
]
