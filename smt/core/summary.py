"""How much of a model trains: trainable and total parameters, and the real weights under the selected blocks.

``trainable`` counts what the optimizer sees (the bank's slots, plus anything trained densely beside them);
``total`` is the model's own parameters (the bank's slots left out, so it equals the base model's count);
``tuned_weights`` counts the weights the selected blocks cover (ragged edge blocks counted exactly).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from smt.core.model import get_bank, sparse_layers


@dataclass(frozen=True)
class TrainableSummary:
    """Trainable parameters of a model: totals and a breakdown by the owning module's type."""

    trainable: int
    total: int
    tuned_weights: int
    by_type: dict[str, int]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        parts = ", ".join(f"{kind}: {count:,}" for kind, count in sorted(self.by_type.items()))
        return (
            f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.4f} %); "
            f"tuned weights in blocks {self.tuned_weights:,}; by type: {parts}"
        )


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable parameters, total parameters and the real number of weights under selected blocks."""
    by_type: Counter = Counter()
    owners = {id(p): type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False)}
    trainable = total = 0
    for param in {id(p): p for p in model.parameters()}.values():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            by_type["smt slots" if owners.get(id(param)) == "ParameterList" else owners.get(id(param), "?")] += (
                param.numel()
            )
    bank = get_bank(model)
    tuned = 0
    if bank is not None and bank.tuning:
        tuned = sum(layer.grid.numel_of(bank.index_of(i)) for i, layer in enumerate(sparse_layers(model).values()))
    bank_params = 0 if bank is None else sum(p.numel() for p in bank.parameters())
    return TrainableSummary(trainable, total - bank_params, tuned, dict(by_type))
