"""Instruction-tuning data for causal LMs: JSON/JSONL records → prompt/response tokens with masked labels.

Records come from JSON/JSONL files or from hub data sets named ``hub:owner/name[:config][@split]``
(``smt.hub``: downloaded once into the datasets cache, cache only under ``HF_HUB_OFFLINE=1``), in two
schemas, detected from their fields:

* LLM-Adapters (``commonsense_170k``, ``math_10k``, the per-task ``test.json``): ``instruction``,
  ``output``, optional ``input`` and ``answer`` (the gold label / number / letter used by evaluation).
* GSM8K JSONL: ``question`` and ``answer`` (a worked solution ending in ``#### N``); the response is the
  solution with the ``<<…>>`` calculator notes removed, the reference the number after ``####``.

Each example becomes ``prompt_ids + response_ids + [eos]`` (prompt and response tokenized separately,
so training sees exactly the prompt tokens that evaluation feeds to ``generate``). With
``mask_prompt`` the labels are ``-100`` over the prompt, so the loss is on the response and its EOS
only. An example longer than ``max_length`` loses prompt tokens from the left (BOS kept); only a
response longer than ``max_length - 1`` is itself cut (from the right, losing its EOS).

API (what ``smt.module`` / ``smt.cli`` rely on):
    ``InstructionDataModule(train_path, val_path=None, test_paths=None, ..., tokenizer=None, template="alpaca")``
    ``dm.set_tokenizer(tokenizer)``: hand over the model's tokenizer (sets ``pad = eos`` when missing).
    ``dm.tokenizer``: the tokenizer in use (loaded from ``tokenizer``, a folder or hub id).
    Train/val batches: ``input_ids``, ``attention_mask``, ``labels`` (``[B, T]``, right-padded, pads -100).
    Packed train batches (``packing=True``): ``input_ids``, ``labels``, ``position_ids`` and no
    ``attention_mask``: call ``model(**batch, use_cache=False)`` and transformers (≥ 4.53) builds a
    block-diagonal causal mask from the restarting ``position_ids``, so packed examples never attend to
    each other (with a KV cache, or with an ``attention_mask``, it would not).
    Test/predict batches: ``input_ids`` and ``attention_mask`` **left**-padded (ready for ``generate``),
    plus lists ``prompt`` (text), ``reference`` (gold answer text) and ``task`` (``smt.eval`` task name).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from smt.eval.extract import gsm8k_reference
from smt.eval.tasks import detect_task, get_task, task_names
from smt.lightning.data.prompts import TemplateName, adds_special_tokens, check_template, render_prompt, render_response
from smt.lightning.data.resume_loader import ResumableLoader
from smt.lightning.hub import HUB_PREFIX, from_pretrained, load_hub_dataset, parse_hub_dataset
from smt.lightning.loss import IGNORE_INDEX

"""Label value the loss ignores (prompt and padding positions)."""

_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_FIELDS = ("instruction", "input", "response", "reference")


# ----------------------------------------------------------------------------------------------- records
def load_records(
    path: str | Path, cache_dir: str | Path | None, role: str = "train_path", default_split: str = "train"
) -> datasets.Dataset:
    """Read a JSON array / JSONL file or a hub data set and normalize it to ``instruction/input/response/reference``.

    Args:
        path: the data file, or a hub data set ``hub:owner/name[:config][@split]`` (see :mod:`smt.hub`).
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
    return _map(raw, _normalizer(schema, path), raw.column_names, key, with_indices=True)


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
    """``"llm_adapters"`` (instruction + output) or ``"gsm8k"`` (question + answer); else a one-line error."""
    fields = set(columns)
    if {"instruction", "output"} <= fields:
        return "llm_adapters"
    if {"question", "answer"} <= fields:
        return "gsm8k"
    missing = "output" if "instruction" in fields else "answer" if "question" in fields else "instruction"
    raise ValueError(
        f"{path}: records have fields {sorted(fields)} but no {missing!r}; "
        "use LLM-Adapters fields instruction/output (+input, answer) or GSM8K fields question/answer"
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
def _seeded_permutation(n: int, seed: int) -> list[int]:
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
    val = sorted(_seeded_permutation(n, seed)[:count])
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
    order = _seeded_permutation(len(indices), seed)[:limit]
    return sorted(indices[i] for i in order)


# ------------------------------------------------------------------------------------------ tokenization
def fit_to_length(
    prompt_ids: list[int], response_ids: list[int], max_length: int, keep_first: bool = False
) -> tuple[list[int], list[int]]:
    """Make ``prompt + response`` fit ``max_length`` by cutting the prompt from the left.

    Args:
        prompt_ids: prompt tokens.
        response_ids: response tokens (EOS included).
        max_length: the longest allowed sequence (≥ 2).
        keep_first: keep the prompt's first token (its BOS) while cutting.

    Returns:
        ``(prompt_ids, response_ids)`` with total length ≤ ``max_length``; the response is cut (from the
        right) only when it alone exceeds ``max_length - 1``, so at least one prompt token remains.
    """
    response_ids = response_ids[: max_length - 1]
    room = max_length - len(response_ids)
    if len(prompt_ids) > room:
        head = prompt_ids[:1] if keep_first and room >= 2 else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (room - len(head)) :]
    return prompt_ids, response_ids


def encode_examples(
    tokenizer: Any, template: str, records: dict[str, list[str]], max_length: int, mask_prompt: bool = True
) -> dict[str, list[list[int]]]:
    """Tokenize a batch of normalized records into ``input_ids`` and ``labels``.

    Args:
        tokenizer: a transformers tokenizer with ``eos_token_id``.
        template: prompt template name (see :mod:`smt.prompts`).
        records: columns ``instruction``, ``input``, ``response``.
        max_length: longest sequence; see :func:`fit_to_length`.
        mask_prompt: labels ``-100`` on prompt tokens (loss on the response only).

    Returns:
        Columns ``input_ids`` and ``labels`` (same lengths per example).
    """
    _, prompt_ids = _encode_prompts(tokenizer, template, records)
    responses = [render_response(template, text) for text in records["response"]]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        keep_bos = _starts_with_bos(prompt, tokenizer)
        prompt, response = fit_to_length(prompt, list(response) + [tokenizer.eos_token_id], max_length, keep_bos)
        out["input_ids"].append(prompt + response)
        out["labels"].append(([IGNORE_INDEX] * len(prompt) if mask_prompt else prompt) + response)
    return out


def encode_prompts(tokenizer: Any, template: str, records: dict[str, list[str]], max_length: int) -> dict[str, list]:
    """Tokenize a batch of records as generation prompts (no response), cut from the left to ``max_length``.

    Args:
        tokenizer: a transformers tokenizer.
        template: prompt template name.
        records: columns ``instruction``, ``input`` (others are passed through).
        max_length: longest prompt.

    Returns:
        Columns ``input_ids`` and ``prompt`` (the rendered text).
    """
    prompts, ids = _encode_prompts(tokenizer, template, records)
    cut = [fit_to_length(p, [], max_length, _starts_with_bos(p, tokenizer))[0] for p in ids]
    return {"input_ids": cut, "prompt": prompts}


def _encode_prompts(tokenizer: Any, template: str, records: dict[str, list[str]]) -> tuple[list[str], list[list[int]]]:
    pairs = zip(records["instruction"], records["input"], strict=True)
    prompts = [render_prompt(template, instruction, input_text, tokenizer) for instruction, input_text in pairs]
    ids = tokenizer(prompts, add_special_tokens=adds_special_tokens(template))["input_ids"]
    return prompts, [list(row) for row in ids]


def _starts_with_bos(ids: list[int], tokenizer: Any) -> bool:
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def pack_examples(examples: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate whole examples, in order, into blocks of at most ``max_length`` tokens.

    An example that does not fit the current block starts a new one (examples are never split).
    ``position_ids`` restart at 0 for each example, and each example's first label is set to -100 so no
    token is predicted across an example boundary: the summed loss equals that of the unpacked examples.

    Args:
        examples: items with ``input_ids`` and ``labels`` (each at most ``max_length`` long).
        max_length: block length.

    Returns:
        Blocks with ``input_ids``, ``labels`` and ``position_ids``.
    """
    blocks: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        size = len(example["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + size > max_length:
            blocks.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += example["input_ids"]
        current["labels"] += [IGNORE_INDEX] + list(example["labels"][1:])
        current["position_ids"] += list(range(size))
    if current["input_ids"]:
        blocks.append(current)
    return blocks


# --------------------------------------------------------------------------------------------- collation
class InstructionCollator:
    """Right-pads ``input_ids`` (with ``pad_id``), ``labels`` (with -100) and, if present, ``position_ids``.

    Unpacked batches get an ``attention_mask``; packed ones (with ``position_ids``) do not, see the
    module docstring. Padding ``position_ids`` restart at 0, so padding forms its own segment.

    Args:
        pad_id: the tokenizer's pad token id.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        batch = {
            "input_ids": _pad([item["input_ids"] for item in items], width, self.pad_id),
            "labels": _pad([item["labels"] for item in items], width, IGNORE_INDEX),
        }
        if "position_ids" in items[0]:
            batch["position_ids"] = torch.stack([_restarting_positions(item["position_ids"], width) for item in items])
        else:
            batch["attention_mask"] = _pad([[1] * len(item["input_ids"]) for item in items], width, 0)
        return batch


class PromptCollator:
    """Left-pads prompt ``input_ids`` for generation and passes ``prompt``/``reference``/``task`` through.

    Args:
        pad_id: the tokenizer's pad token id.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(item["input_ids"]) for item in items)
        return {
            "input_ids": _pad([item["input_ids"] for item in items], width, self.pad_id, left=True),
            "attention_mask": _pad([[1] * len(item["input_ids"]) for item in items], width, 0, left=True),
            "prompt": [item["prompt"] for item in items],
            "reference": [item["reference"] for item in items],
            "task": [item["task"] for item in items],
        }


def _pad(rows: Sequence[Sequence[int]], width: int, value: int, left: bool = False) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for r, row in enumerate(rows):
        start = width - len(row) if left else 0
        out[r, start : start + len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def _restarting_positions(positions: Sequence[int], width: int) -> torch.Tensor:
    return torch.tensor(list(positions) + list(range(width - len(positions))), dtype=torch.long)


# -------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(name_or_path: str, local_files_only: bool = False) -> Any:
    """Load a tokenizer from a folder or a hub id, as transformers does (see :mod:`smt.hub`).

    Args:
        name_or_path: a folder or a hub id (downloaded once into the Hugging Face cache).
        local_files_only: read only folders and the cache (``HF_HUB_OFFLINE=1`` does the same).

    Returns:
        The tokenizer, prepared by :func:`prepare_tokenizer`.

    Raises:
        ValueError: nothing loadable under that name (offline: nothing cached).
    """
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name_or_path, "data.tokenizer", local_files_only)
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (its EOS) when it has none; padding is masked out everywhere.

    Args:
        tokenizer: a transformers tokenizer.

    Returns:
        The same tokenizer.

    Raises:
        ValueError: it has neither a pad nor an EOS token.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token before training on it")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------- module
class InstructionDataModule(LightningDataModule):
    """Instruction-tuning data from LLM-Adapters JSON or GSM8K JSONL files, with prompt templates and masking.

    Records are read with ``datasets`` (JSON arrays and JSONL alike), rendered by a named prompt template
    (:mod:`smt.prompts`), tokenized as ``prompt + response + EOS`` and batched with right padding. A
    validation set comes from ``val_path`` or is carved from the training file (``val_split``);
    ``test_paths`` feed generation- or likelihood-based evaluation (``smt.eval``) with prompts only.

    Example:
        >>> dm = InstructionDataModule("commonsense_170k.json", val_split=120, tokenizer="models/smollm2")
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> next(iter(dm.train_dataloader()))["labels"]  # doctest: +SKIP

    Args:
        train_path: training file (JSON array or JSONL): LLM-Adapters records (instruction, input, output,
            answer) or GSM8K records (question, answer); or a hub data set with those fields,
            ``hub:owner/name[:config][@split]`` (split default ``train``; downloaded once into the datasets cache,
            cache only under ``HF_HUB_OFFLINE=1``). Needed for fit and validate.
        val_path: validation file or ``hub:`` data set (default split ``validation``) in the same formats; when
            unset, ``val_split`` carves one from train.
        test_paths: files or ``hub:`` data sets (default split ``test``) for ``test``/``predict``, one per task
            (e.g. ``llm_adapters/boolq/test.json``); the task is taken from the folder/file name (hub: the config or
            data set name). Unset: the validation records are used.
        test_tasks: task names for ``test_paths`` (same order) when the paths do not name them.
        val_split: records held out of ``train_path`` for validation when there is no ``val_path``: a
            fraction in (0, 1) or a count ≥ 1; chosen by a seeded shuffle, so the same on every run.
        tokenizer: tokenizer folder or hub id (loaded as transformers does). Leave unset when the LightningModule
            hands its own over with ``set_tokenizer``.
        template: prompt template: ``alpaca`` (LLM-Adapters), ``smt`` (SMT/S²FT single-section form),
            ``gsm8k`` (``Question:/Answer:``) or ``chat`` (the tokenizer's chat template).
        max_length: longest sequence in tokens; longer examples lose prompt tokens from the left, the
            response is kept. Larger = more context, more memory.
        mask_prompt: put label -100 on prompt tokens so the loss is on the response (and EOS) only.
        packing: concatenate whole training examples into blocks of ``max_length`` tokens (fewer pad
            tokens, faster epochs; examples stay separated by position ids). Validation is not packed.
        batch_size: training batch size (examples, or blocks when packing).
        eval_batch_size: validation/test batch size; unset: ``batch_size``.
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: seed of the validation split, the ``limit_*`` subsets, packing order and epoch shuffling.
        limit_train: keep only this many training records (first N after a seeded shuffle), for quick runs.
        limit_val: keep only this many validation records (first N after a seeded shuffle).
        limit_test: keep only this many records per test file (first N after a seeded shuffle).
        cache_dir: folder for the ``datasets`` Arrow cache; unset: a temporary folder removed at exit for files,
            the usual datasets cache (``HF_DATASETS_CACHE``) for hub data sets.
        local_files_only: load ``tokenizer`` from folders and the Hugging Face cache only (hub data sets follow
            ``HF_HUB_OFFLINE=1``: ``datasets`` has no per-call switch).
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_paths: list[str] | None = None,
        test_tasks: list[str] | None = None,
        val_split: float = 0.0,
        tokenizer: str | None = None,
        template: TemplateName = "alpaca",
        max_length: int = 512,
        mask_prompt: bool = True,
        packing: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__()
        _check_args(template, max_length, batch_size, test_paths, test_tasks, val_path, val_split)
        # The tokenizer is the LightningModule's (set_tokenizer); logging it here too would clash with the
        # model's `tokenizer` hyper-parameter in Lightning's merged hparams.
        self.save_hyperparameters(ignore=["tokenizer"])
        self.train_path, self.val_path, self.val_split = train_path, val_path, val_split
        self.test_paths, self.test_tasks = list(test_paths or []), list(test_tasks or [])
        self.tokenizer_name_or_path, self.template, self.max_length = tokenizer, template, max_length
        self.mask_prompt, self.packing, self.seed = mask_prompt, packing, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.cache_dir, self.local_files_only = num_workers, cache_dir, local_files_only
        self.limit_train, self.limit_val, self.limit_test = limit_train, limit_val, limit_test
        self._tokenizer: Any | None = None
        self._temporary_cache: str | None = None
        self._fit_ready = False
        self.train_dataset: Any | None = None
        self.val_dataset: Any | None = None
        self.test_dataset: Any | None = None

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use this tokenizer (e.g. the LightningModule's) instead of loading ``tokenizer`` by name.

        Args:
            tokenizer: a transformers tokenizer; it gets ``pad = eos`` when it has no pad token.
        """
        self._tokenizer = prepare_tokenizer(tokenizer)
        self.train_dataset = self.val_dataset = self.test_dataset = None  # re-tokenize with the new one
        self._fit_ready = False

    @property
    def tokenizer(self) -> Any:
        """The tokenizer in use, loaded from ``tokenizer`` on first access unless one was set."""
        if self._tokenizer is None:
            if self.tokenizer_name_or_path is None:
                raise ValueError(
                    "InstructionDataModule has no tokenizer; pass tokenizer=<folder> or call set_tokenizer"
                )
            self._tokenizer = load_tokenizer(self.tokenizer_name_or_path, self.local_files_only)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize what ``stage`` needs: ``fit``/``validate`` train and val, ``test``/``predict`` prompts.

        Without a tokenizer yet (no ``tokenizer`` name, none set), the work waits for the first dataloader:
        Lightning runs this hook before the LightningModule's ``setup``, where the module may call
        :meth:`set_tokenizer`.

        Args:
            stage: the Lightning stage; None prepares train/val and, when ``test_paths`` are set, test.
        """
        if self._tokenizer is None and self.tokenizer_name_or_path is None:
            return
        if stage in (None, "fit", "validate"):
            self._ensure_fit()
        if stage in ("test", "predict") or (stage is None and self.test_paths):
            self._ensure_test()

    def _ensure_fit(self) -> None:
        if not self._fit_ready:
            self._setup_fit()
            self._fit_ready = True

    def _ensure_test(self) -> None:
        if self.test_dataset is None:
            self.test_dataset = datasets.concatenate_datasets([self._prompts(*src) for src in self._test_sources()])

    def _setup_fit(self) -> None:
        if self.train_path is None:
            raise ValueError("InstructionDataModule.train_path is unset; pass --data.train_path <file.json>")
        train = self._records(self.train_path, "train_path", "train")
        val, val_indices, held_out = self._validation(train)
        kept = [i for i in range(len(train)) if i not in held_out]
        self.train_dataset = self._tokenize(train.select(take_limit(kept, self.limit_train, self.seed)))
        if self.packing:
            ids, labels = list(self.train_dataset["input_ids"]), list(self.train_dataset["labels"])
            order = _seeded_permutation(len(ids), self.seed)
            rows = [{"input_ids": ids[i], "labels": labels[i]} for i in order]
            self.train_dataset = pack_examples(rows, self.max_length)
        self.val_dataset = self._tokenize(val.select(val_indices)) if val_indices else None

    def _validation(self, train: datasets.Dataset | None) -> tuple[datasets.Dataset | None, list[int], set[int]]:
        """The validation records, the indices used, and the training indices held out for them."""
        if self.val_path is not None:
            val = self._records(self.val_path, "val_path", "validation")
            return val, take_limit(range(len(val)), self.limit_val, self.seed), set()
        if not self.val_split or train is None:
            return None, [], set()
        _, val_indices = split_indices(len(train), self.val_split, self.seed)
        return train, take_limit(val_indices, self.limit_val, self.seed), set(val_indices)

    def _test_sources(self) -> list[tuple[datasets.Dataset, str]]:
        if not self.test_paths:  # fall back on the validation records
            train = self._records(self.train_path, "train_path", "train") if self.train_path else None
            val, indices, _ = self._validation(train)
            if not indices:
                raise ValueError("InstructionDataModule has no test data; pass --data.test_paths [<task>/test.json]")
            return [(val.select(indices), _task_of(self.val_path or self.train_path, "val_path/train_path"))]
        sources = []
        for position, path in enumerate(self.test_paths):
            task = get_task(self.test_tasks[position]).name if self.test_tasks else _task_of(path, "test_paths")
            records = self._records(path, "test_paths", "test")
            sources.append((records.select(take_limit(range(len(records)), self.limit_test, self.seed)), task))
        return sources

    def _tokenize(self, records: datasets.Dataset) -> datasets.Dataset:
        tokenizer, template, max_length, mask = self.tokenizer, self.template, self.max_length, self.mask_prompt

        def encode(batch: dict[str, list]) -> dict[str, list]:
            return encode_examples(tokenizer, template, batch, max_length, mask)

        return _map(records, encode, records.column_names, ("encode", template, max_length, mask, id(tokenizer)))

    def _prompts(self, records: datasets.Dataset, task: str) -> datasets.Dataset:
        _check_references(records, task)
        tokenizer, template, max_length = self.tokenizer, self.template, self.max_length

        def encode(batch: dict[str, list]) -> dict[str, list]:
            return {**encode_prompts(tokenizer, template, batch, max_length), "task": [task] * len(batch["input"])}

        dropped = ["instruction", "input", "response"]
        return _map(records, encode, dropped, ("prompts", template, max_length, task, id(tokenizer)))

    def _records(self, path: str, role: str, default_split: str) -> datasets.Dataset:
        """A file's records (Arrow files in ``cache_dir`` or a temporary folder), or a hub data set's (usual cache)."""
        cache = self.cache_dir if str(path).startswith(HUB_PREFIX) else self._cache()
        return load_records(path, cache, role, default_split)

    def _cache(self) -> str:
        if self.cache_dir is not None:
            return self.cache_dir
        if self._temporary_cache is None:
            self._temporary_cache = tempfile.mkdtemp(prefix="smt-data-")
            weakref.finalize(self, shutil.rmtree, self._temporary_cache, ignore_errors=True)
        return self._temporary_cache

    def train_dataloader(self) -> DataLoader:
        """Training batches, reshuffled each epoch from ``seed``; see the module docstring for the keys."""
        self._ensure_fit()
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self.train_dataset, self.batch_size, generator=generator)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order, or an empty list (Lightning then skips validation)."""
        self._ensure_fit()
        return [] if self.val_dataset is None else self._loader(self.val_dataset, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Left-padded prompts with ``prompt``, ``reference`` and ``task`` lists, in file order."""
        self._ensure_test()
        return self._loader(self.test_dataset, self.eval_batch_size, prompts=True)

    def predict_dataloader(self) -> DataLoader:
        """The same batches as :meth:`test_dataloader`."""
        return self.test_dataloader()

    def _trained_batches(self) -> int:
        """Batches of the current epoch trained so far (what a mid-epoch checkpoint must resume after)."""
        trainer = self.trainer
        return 0 if trainer is None else int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def _loader(self, dataset: Any, batch_size: int, generator: Any = None, prompts: bool = False) -> DataLoader:
        pad_id = int(self.tokenizer.pad_token_id)
        # shuffled = training: resumable mid-epoch (smt.resume_loader); evaluation loaders stay plain
        resumable = partial(ResumableLoader, trained_batches=self._trained_batches)
        loader = resumable if generator is not None else DataLoader
        return loader(
            dataset,
            batch_size=batch_size,
            shuffle=generator is not None,
            generator=generator,
            collate_fn=PromptCollator(pad_id) if prompts else InstructionCollator(pad_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


def _map(
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


def _check_args(
    template: str,
    max_length: int,
    batch_size: int,
    test_paths: list[str] | None,
    test_tasks: list[str] | None,
    val_path: str | None,
    val_split: float,
) -> None:
    check_template(template)
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be ≥ 2 (one prompt token and one response token)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be ≥ 1")
    if test_tasks and len(test_tasks) != len(test_paths or []):
        raise ValueError(
            f"test_tasks has {len(test_tasks)} names for {len(test_paths or [])} test_paths; give one each"
        )
    for task in test_tasks or []:
        get_task(task)
    if val_path is not None and val_split:
        raise ValueError(f"both val_path and val_split={val_split} are set; use one of them")


def _task_of(path: str, role: str) -> str:
    hub = parse_hub_dataset(path, "test", role)
    names = [path] if hub is None else [name for name in (hub.config, hub.repo_id) if name]
    spec = next((found for found in map(detect_task, names) if found is not None), None)
    if spec is None:
        raise ValueError(
            f"{role}: cannot tell the task of {path!r} from its name; name its folder after the task "
            f"({', '.join(task_names()[:4])}, …) or pass test_tasks"
        )
    return spec.name


def _check_references(records: datasets.Dataset, task: str) -> None:
    missing = next((i for i, reference in enumerate(records["reference"]) if not reference), None)
    if missing is not None:
        raise ValueError(f"{task}: test row {missing} has no 'answer' (the gold label); evaluation needs one per row")
