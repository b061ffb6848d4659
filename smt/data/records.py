"""Instruction records: JSON/JSONL files or hub data sets, normalized to ``instruction/input/response/reference``.

Records come from JSON/JSONL files or from hub data sets named ``hub:owner/name[:config][@split]``
(``smt.data.hub``: downloaded once into the datasets cache, cache only under ``HF_HUB_OFFLINE=1``), in two
schemas, detected from their fields:

* LLM-Adapters (``commonsense_170k``, ``math_10k``, the per-task ``test.json``): ``instruction``,
  ``output``, optional ``input`` and ``answer`` (the gold label / number / letter used by evaluation).
* GSM8K JSONL: ``question`` and ``answer`` (a worked solution ending in ``#### N``); the response is the
  solution with the ``<<…>>`` calculator notes removed, the reference the number after ``####``.
* Plain text (continued pretraining, template ``text``): ``text``; it becomes the response, with no instruction.

Validation splits and ``limit_*`` subsets are seeded shuffles, the same on every machine.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from smt.data.hub import load_hub_dataset, parse_hub_dataset

_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_FIELDS = ("instruction", "input", "response", "reference")


# ----------------------------------------------------------------------------------------------- records
def load_records(
    path: str | Path, cache_dir: str | Path | None, role: str = "train_path", default_split: str = "train"
) -> datasets.Dataset:
    """Read a JSON array / JSONL file or a hub data set and normalize it to ``instruction/input/response/reference``.

    Args:
        path: the data file, or a hub data set ``hub:owner/name[:config][@split]`` (see :mod:`smt.data.hub`).
        cache_dir: where ``datasets`` keeps its Arrow files; for a hub data set None = its usual cache.
        role: the argument name shown in error messages (``train_path``, ``val_path``, …).
        default_split: the split of a hub data set named without ``@split``.

    Returns:
        A dataset with string columns ``instruction``, ``input``, ``response``, ``reference``.

    Raises:
        ValueError: the file is missing or a folder, the hub data set does not load, or its records fit neither schema.
    """
    hub = parse_hub_dataset(str(path), default_split, role)
    raw = load_hub_dataset(hub, role, None if cache_dir is None else str(cache_dir)) if hub else None
    if raw is None:
        raw = _read_json_records(Path(path), cache_dir, role)
    schema = _detect_schema(raw.column_names, path)
    key = ("normalize", raw._fingerprint, schema)
    return map_records(raw, _normalizer(schema, path), raw.column_names, key, with_indices=True)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def gsm8k_reference(answer: str) -> str:
    """The final answer of a GSM8K solution: the number after the last ``####``, commas removed.

    Args:
        answer: a GSM8K ``answer`` field (worked solution ending in ``#### N``).

    Returns:
        The final answer as text, e.g. ``"18"`` or ``"-3.5"``.

    Raises:
        ValueError: there is no ``####`` marker or nothing numeric after it.

    Example:
        >>> gsm8k_reference("She makes 9 * 2 = $<<9*2=18>>18.\\n#### 1,018")
        '1018'
    """
    _, marker, tail = answer.rpartition("####")
    if not marker:
        raise ValueError(f"GSM8K answer has no '####' final-answer marker: {answer[-60:]!r}")
    value = tail.strip().replace(",", "").rstrip(".")
    if _NUMBER.fullmatch(value) is None:
        raise ValueError(f"GSM8K answer has no number after '####': {tail.strip()[:40]!r}")
    return value


def _read_json_records(path: Path, cache_dir: str | Path | None, role: str) -> datasets.Dataset:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(
            f"{role}={str(path)!r} {what}; pass a JSON/JSONL file (LLM-Adapters or GSM8K fields) "
            "or a hub data set hub:owner/name[:config][@split]"
        )
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache_dir))
    except (datasets.exceptions.DatasetsError, ValueError, StopIteration) as error:
        detail = str(error.__cause__ or error).strip().splitlines() or ["no records"]
        raise ValueError(f"{role}={str(path)!r} is not a JSON array or JSONL of records ({detail[0][:100]})") from None


def _detect_schema(columns: Sequence[str], path: Path) -> str:
    """``"llm_adapters"`` (instruction + output), ``"gsm8k"`` (question + answer) or ``"text"``; else a one-line
    error."""
    fields = set(columns)
    if {"instruction", "output"} <= fields:
        return "llm_adapters"
    if {"question", "answer"} <= fields:
        return "gsm8k"
    if "text" in fields and not fields & {"instruction", "question"}:
        return "text"
    missing = "output" if "instruction" in fields else "answer" if "question" in fields else "instruction"
    raise ValueError(
        f"{path}: records have fields {sorted(fields)} but no {missing!r}; use LLM-Adapters fields "
        "instruction/output (+input, answer), GSM8K fields question/answer, or text (with template text)"
    )


def _normalizer(schema: str, path: Path):
    def normalize(batch: dict[str, list], indices: list[int]) -> dict[str, list[str]]:
        records = []
        for position, index in enumerate(indices):
            row = {key: values[position] for key, values in batch.items()}
            records.append(_normalize_record(row, schema, f"{path}: row {index}"))
        return {name: [record[name] for record in records] for name in _FIELDS}

    return normalize


def _normalize_record(row: dict[str, Any], schema: str, where: str) -> dict[str, str]:
    """One raw record → string fields ``instruction/input/response/reference`` (reference ``""`` if absent)."""
    if schema == "text":
        return {"instruction": "", "input": "", "response": _required(row, "text", where), "reference": ""}
    if schema == "gsm8k":
        answer = _required(row, "answer", where)
        return {
            "instruction": _required(row, "question", where),
            "input": "",
            "response": _CALCULATOR_NOTE.sub("", answer),
            "reference": gsm8k_reference(answer),
        }
    answer = row.get("answer")
    return {
        "instruction": _required(row, "instruction", where),
        "input": str(row.get("input") or ""),
        "response": _required(row, "output", where),
        "reference": "" if answer is None else str(answer),
    }


def _required(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if value is None:
        raise ValueError(f"{where} has no {name!r} value; fill it in or drop the row")
    return str(value)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- splitting
def seeded_permutation(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on ``seed`` (the same on every machine)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def split_indices(n: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Carve a validation set out of ``n`` training records, deterministically.

    Args:
        n: number of records.
        val_split: a fraction in ``(0, 1)`` or a count ``≥ 1`` of records for validation; 0 for none.
        seed: shuffling seed.

    Returns:
        ``(train, val)`` index lists; ``val`` are the first records of a seeded permutation, ``train``
        the rest in their file order.

    Raises:
        ValueError: a negative split, a non-integer count, or a split that leaves no training record.
    """
    if val_split < 0 or (val_split >= 1 and val_split != int(val_split)):
        raise ValueError(f"val_split={val_split} must be a fraction in [0, 1) or a whole count ≥ 1")
    count = round(n * val_split) if val_split < 1 else int(val_split)
    if val_split > 0 and count == 0:
        count = 1
    if count >= n and count > 0:
        raise ValueError(f"val_split={val_split} takes {count} of {n} records and leaves none to train on")
    val = sorted(seeded_permutation(n, seed)[:count])
    held_out = set(val)
    return [i for i in range(n) if i not in held_out], val


def take_limit(indices: Sequence[int], limit: int | None, seed: int) -> list[int]:
    """The first ``limit`` indices after a seeded shuffle (all of them, unshuffled, when ``limit`` is None).

    Args:
        indices: candidate record indices.
        limit: how many to keep; None keeps all.
        seed: shuffling seed.

    Returns:
        The kept indices, in file order.

    Raises:
        ValueError: ``limit < 1``.
    """
    if limit is None:
        return list(indices)
    if limit < 1:
        raise ValueError(f"limit={limit} must be ≥ 1 (or null for all records)")
    order = seeded_permutation(len(indices), seed)[:limit]
    return sorted(indices[i] for i in order)


def map_records(
    records: datasets.Dataset, function: Any, dropped: list[str], key: tuple, with_indices: bool = False
) -> datasets.Dataset:
    """``records.map`` in batches, never reusing stale cache files; ``key`` names the work (skips hashing)."""
    return records.map(
        function,
        batched=True,
        with_indices=with_indices,
        remove_columns=dropped,
        new_fingerprint=_fingerprint(records._fingerprint, *key),
        load_from_cache_file=False,
        desc=str(key[0]),
    )
