"""Per-task accuracy: counting, a markdown table and a JSON results file.

Accuracy of a task is ``correct / total``; the reported average is the **macro** average over tasks
(each task weighs the same, as the LLM-Adapters, SMT and DoRA papers report it), and the micro
average (over all examples) is written next to it.

API:
    ``TaskResult(task, correct, total)`` with ``.accuracy``
    ``AccuracyTracker()``: ``update(task, correct)``, ``update_many(tasks, corrects)``, ``results()``
    ``macro_average(results)``, ``micro_average(results)``
    ``format_markdown_table(results, title=None) -> str``
    ``write_results_json(path, results, metadata=None) -> Path``
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TaskResult:
    """Counts for one task.

    Args:
        task: task name.
        correct: number of correct predictions.
        total: number of examples scored.
    """

    task: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        """``correct / total`` (0.0 for an empty task)."""
        return self.correct / self.total if self.total else 0.0


@dataclass
class AccuracyTracker:
    """Accumulates correct/total counts per task, in first-seen task order.

    Example:
        >>> tracker = AccuracyTracker()
        >>> tracker.update_many(["boolq", "boolq", "piqa"], [True, False, True])
        >>> [(r.task, r.accuracy) for r in tracker.results()]
        [('boolq', 0.5), ('piqa', 1.0)]
    """

    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    def update(self, task: str, correct: bool | int) -> None:
        """Count one scored example.

        Args:
            task: its task name.
            correct: whether it was answered correctly.
        """
        self.total[task] = self.total.get(task, 0) + 1
        self.correct[task] = self.correct.get(task, 0) + int(bool(correct))

    def update_many(self, tasks: Iterable[str], corrects: Iterable[bool | int]) -> None:
        """Count several scored examples.

        Args:
            tasks: task name of each example.
            corrects: whether each was correct (same length as ``tasks``).
        """
        for task, correct in zip(tasks, corrects, strict=True):
            self.update(task, correct)

    def results(self) -> list[TaskResult]:
        """Counts per task.

        Returns:
            One :class:`TaskResult` per task seen, in first-seen order.
        """
        return [TaskResult(task, self.correct[task], total) for task, total in self.total.items()]


def macro_average(results: Sequence[TaskResult]) -> float:
    """Mean of the per-task accuracies (0.0 when there are none).

    Args:
        results: per-task counts.

    Returns:
        The macro-averaged accuracy in ``[0, 1]``.
    """
    return sum(r.accuracy for r in results) / len(results) if results else 0.0


def micro_average(results: Sequence[TaskResult]) -> float:
    """Accuracy over all examples pooled (0.0 when there are none).

    Args:
        results: per-task counts.

    Returns:
        ``Σ correct / Σ total``.
    """
    total = sum(r.total for r in results)
    return sum(r.correct for r in results) / total if total else 0.0


def format_markdown_table(results: Sequence[TaskResult], title: str | None = None) -> str:
    """A markdown table with one row per task and a macro-average row.

    Args:
        results: per-task counts.
        title: optional line printed above the table (e.g. the model and method).

    Returns:
        The table as text, accuracy in percent with one decimal.

    Example:
        >>> print(format_markdown_table([TaskResult("boolq", 3, 4)]))
        | task | accuracy (%) | correct | total |
        |---|---:|---:|---:|
        | boolq | 75.0 | 3 | 4 |
        | **average** | **75.0** | 3 | 4 |
    """
    lines = [title, ""] if title else []
    lines += ["| task | accuracy (%) | correct | total |", "|---|---:|---:|---:|"]
    lines += [f"| {r.task} | {100 * r.accuracy:.1f} | {r.correct} | {r.total} |" for r in results]
    correct, total = sum(r.correct for r in results), sum(r.total for r in results)
    lines.append(f"| **average** | **{100 * macro_average(results):.1f}** | {correct} | {total} |")
    return "\n".join(lines)


def results_to_dict(results: Sequence[TaskResult], metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-ready form of a set of results.

    Args:
        results: per-task counts.
        metadata: extra fields stored under ``"metadata"`` (model, method, checkpoint, protocol, …).

    Returns:
        ``{"tasks": {task: {"accuracy", "correct", "total"}}, "macro_average", "micro_average", "metadata"}``.
    """
    return {
        "tasks": {r.task: {"accuracy": r.accuracy, "correct": r.correct, "total": r.total} for r in results},
        "macro_average": macro_average(results),
        "micro_average": micro_average(results),
        "metadata": dict(metadata or {}),
    }


def write_results_json(
    path: str | Path, results: Sequence[TaskResult], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write :func:`results_to_dict` as indented JSON, creating parent folders.

    Args:
        path: the file to write.
        results: per-task counts.
        metadata: extra fields stored under ``"metadata"``; must be JSON-serializable.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results_to_dict(results, metadata), indent=2, sort_keys=False) + "\n")
    return path
