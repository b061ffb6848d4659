"""Task registry: what a correct answer looks like for each evaluation data set.

Every task of the LLM-Adapters suites has one answer type:

* ``choice`` — commonsense tasks: the model writes ``"the correct answer is <label>"``; the prediction
  is the first label of the task's set found in the lower-cased output (boolq ``true|false``, piqa
  ``solution1|solution2``, social_i_qa ``answer1..3``, ARC / openbookqa ``answer1..5``, winogrande
  ``option1|option2``, hellaswag ``ending1..4``). These also support likelihood scoring: the context is
  ``prompt + likelihood_prefix`` and the candidates are the labels.
* ``number`` — math word problems (gsm8k, SVAMP, mawps, AddSub, MultiArith, SingleEq): the last number
  in the output, correct when ``|pred − label| ≤ 1e-3``.
* ``letter`` — AQuA: the first letter A–E in the output.

A task is found from a name or a path (``.../ARC-Easy/test.json``, ``gsm8k/test.jsonl``,
``boolq_test.json``) by comparing names without case or punctuation.

API:
    ``TaskSpec(name, kind, labels=(), likelihood_prefix=None)``
    ``get_task(name) -> TaskSpec`` (raises on unknown names), ``detect_task(path_or_name) -> TaskSpec | None``
    ``task_names() -> tuple[str, ...]``
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

AnswerKind = Literal["choice", "number", "letter"]
COMMONSENSE_PREFIX = "the correct answer is "
"""What LLM-Adapters commonsense responses say before the label."""


@dataclass(frozen=True)
class TaskSpec:
    """How one task's answers are extracted and judged.

    Args:
        name: canonical name as LLM-Adapters spells its folder (``ARC-Easy``, ``social_i_qa``).
        kind: ``choice`` (label set), ``number`` (last number, tolerance 1e-3) or ``letter`` (A–E).
        labels: the label set for ``choice`` and ``letter`` tasks, in canonical (lower-case for
            ``choice``) spelling; empty for ``number`` tasks.
        likelihood_prefix: text after the prompt and before the label when scoring labels by
            log-likelihood; None when the task has no closed label set to score.
    """

    name: str
    kind: AnswerKind
    labels: tuple[str, ...] = ()
    likelihood_prefix: str | None = None

    @property
    def supports_likelihood(self) -> bool:
        """Whether the task can be scored by log-likelihood over its labels (no generation)."""
        return self.likelihood_prefix is not None and bool(self.labels)


def _choice(name: str, stem: str, count: int) -> TaskSpec:
    labels = tuple(f"{stem}{i}" for i in range(1, count + 1))
    return TaskSpec(name, "choice", labels, COMMONSENSE_PREFIX)


_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("boolq", "choice", ("true", "false"), COMMONSENSE_PREFIX),
    _choice("piqa", "solution", 2),
    _choice("social_i_qa", "answer", 3),
    _choice("ARC-Easy", "answer", 5),
    _choice("ARC-Challenge", "answer", 5),
    _choice("openbookqa", "answer", 5),
    _choice("winogrande", "option", 2),
    _choice("hellaswag", "ending", 4),
    TaskSpec("gsm8k", "number"),
    TaskSpec("SVAMP", "number"),
    TaskSpec("mawps", "number"),
    TaskSpec("AddSub", "number"),
    TaskSpec("MultiArith", "number"),
    TaskSpec("SingleEq", "number"),
    TaskSpec("AQuA", "letter", ("A", "B", "C", "D", "E")),
)
_SPLIT_SUFFIXES = ("train", "test", "val", "valid", "validation", "dev", "eval")


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def task_names() -> tuple[str, ...]:
    """Canonical names of every registered task.

    Returns:
        Names in registry order (commonsense first, then math).
    """
    return tuple(spec.name for spec in _TASKS)


def _lookup(name: str) -> TaskSpec | None:
    key = _key(name)
    return next((spec for spec in _TASKS if _key(spec.name) == key), None)


def get_task(name: str) -> TaskSpec:
    """The task registered under ``name`` (case and punctuation ignored: ``arc_easy`` finds ``ARC-Easy``).

    Args:
        name: a task name.

    Returns:
        Its :class:`TaskSpec`.

    Raises:
        ValueError: no task has that name.
    """
    spec = _lookup(name)
    if spec is None:
        raise ValueError(f"task {name!r} is unknown; use one of {', '.join(task_names())}")
    return spec


def detect_task(path_or_name: str | Path) -> TaskSpec | None:
    """Find the task a data file belongs to from its name or the folders around it.

    Tries the file stem (also without a split suffix such as ``_test``), then each parent folder from
    the nearest outwards, e.g. ``llm_adapters/ARC-Easy/test.json`` → ``ARC-Easy``.

    Args:
        path_or_name: a task name, a file path or a folder path.

    Returns:
        The task, or None when no part of the path names one.
    """
    path = Path(path_or_name)
    candidates = [path.stem, _strip_split_suffix(path.stem), path.name]
    candidates += [parent.name for parent in path.parents if parent.name]
    for candidate in candidates:
        spec = _lookup(candidate) if candidate else None
        if spec is not None:
            return spec
    return None


def _strip_split_suffix(stem: str) -> str:
    for suffix in _SPLIT_SUFFIXES:
        match = re.fullmatch(rf"(.+?)[-_.]{suffix}", stem, flags=re.IGNORECASE)
        if match:
            return match.group(1)
    return stem
