"""Instruction-tuning data for causal LMs: the ``InstructionDataModule``.

Records (``records``) → prompt/response tokens with masked labels (``tokens``) → batches; a validation set from a
file or carved from the training records; test/predict prompts for ``smt.eval``.

API (what ``smt.lightning.module`` / ``smt.lightning.cli`` rely on):
    ``InstructionDataModule(train_path, val_path=None, test_paths=None, ..., tokenizer=None, template="alpaca")``
        (``train_path``: one file or hub data set, or a list of them mixed into one training set)
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

import shutil
import tempfile
import weakref
from functools import partial
from typing import Any

import datasets
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from smt.data.hub import HUB_PREFIX, parse_hub_dataset
from smt.data.prompts import TemplateName, check_template
from smt.data.records import load_records, map_records, seeded_permutation, split_indices, take_limit
from smt.data.resume_loader import ResumableLoader
from smt.data.tokens import (
    InstructionCollator,
    PromptCollator,
    encode_examples,
    encode_prompts,
    load_tokenizer,
    pack_examples,
    prepare_tokenizer,
)
from smt.eval.tasks import detect_task, get_task, task_names


class InstructionDataModule(LightningDataModule):
    """Instruction-tuning data from LLM-Adapters JSON or GSM8K JSONL files, with prompt templates and masking.

    Records are read with ``datasets`` (JSON arrays and JSONL alike), rendered by a named prompt template
    (:mod:`smt.data.prompts`), tokenized as ``prompt + response + EOS`` and batched with right padding. A
    validation set comes from ``val_path`` or is carved from the training file (``val_split``);
    ``test_paths`` feed generation- or likelihood-based evaluation (``smt.eval``) with prompts only.

    Example:
        >>> dm = InstructionDataModule("commonsense_170k.json", val_split=120, tokenizer="models/smollm2")
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> next(iter(dm.train_dataloader()))["labels"]  # doctest: +SKIP

    Args:
        train_path: training file (JSON array or JSONL): LLM-Adapters records (instruction, input, output,
            answer), GSM8K records (question, answer) or plain ``text`` records (continued pretraining, with
            ``template: text``); or a hub data set with those fields,
            ``hub:owner/name[:config][@split]`` (split default ``train``; downloaded once into the datasets cache,
            cache only under ``HF_HUB_OFFLINE=1``). A list of files / hub data sets trains on their records
            together (concatenated, then shuffled each epoch and split by ``val_split`` like one file), e.g. the
            train splits of several tasks. Needed for fit and validate.
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
            ``gsm8k`` (``Question:/Answer:``), ``chat`` (the tokenizer's chat template) or ``text`` (plain ``text``
            records, loss on every token, a long text split into consecutive ``max_length`` windows).
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
        train_path: str | list[str] | None = None,
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
        _check_args(template, max_length, batch_size, train_path, test_paths, test_tasks, val_path, val_split)
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
        train = self._train_records()
        val, val_indices, held_out = self._validation(train)
        kept = [i for i in range(len(train)) if i not in held_out]
        self.train_dataset = self._tokenize(train.select(take_limit(kept, self.limit_train, self.seed)))
        if self.packing:
            ids, labels = list(self.train_dataset["input_ids"]), list(self.train_dataset["labels"])
            order = seeded_permutation(len(ids), self.seed)
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
            train = self._train_records() if self.train_path else None
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

        return map_records(records, encode, records.column_names, ("encode", template, max_length, mask, id(tokenizer)))

    def _prompts(self, records: datasets.Dataset, task: str) -> datasets.Dataset:
        _check_references(records, task)
        tokenizer, template, max_length = self.tokenizer, self.template, self.max_length

        def encode(batch: dict[str, list]) -> dict[str, list]:
            return {**encode_prompts(tokenizer, template, batch, max_length), "task": [task] * len(batch["input"])}

        dropped = ["instruction", "input", "response"]
        return map_records(records, encode, dropped, ("prompts", template, max_length, task, id(tokenizer)))

    def _train_records(self) -> datasets.Dataset:
        """The records of ``train_path``: one source's, or several sources' in the order listed."""
        if isinstance(self.train_path, str):
            return self._records(self.train_path, "train_path", "train")
        parts = [self._records(path, f"train_path[{i}]", "train") for i, path in enumerate(self.train_path)]
        return datasets.concatenate_datasets(parts)

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
        # shuffled = training: resumable mid-epoch (resume_loader); evaluation loaders stay plain
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


def _check_args(
    template: str,
    max_length: int,
    batch_size: int,
    train_path: str | list[str] | None,
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
    if train_path is not None and not isinstance(train_path, str) and not train_path:
        raise ValueError("train_path is an empty list; give a file (or several: [a.json, b.json]) or leave it unset")
    if test_tasks and len(test_tasks) != len(test_paths or []):
        raise ValueError(
            f"test_tasks has {len(test_tasks)} names for {len(test_paths or [])} test_paths; give one each"
        )
    for task in test_tasks or []:
        get_task(task)
    if val_path is not None and val_split:
        raise ValueError(f"both val_path and val_split={val_split} are set; use one of them")


def _task_of(path: str | list[str], role: str) -> str:
    if not isinstance(path, str):  # validation carved from several files: one task only if every file names it
        tasks = {_task_of(one, role) for one in path}
        if len(tasks) > 1:
            raise ValueError(
                f"{role}: the training files are of several tasks ({', '.join(sorted(tasks))}), so the validation "
                "records carved from them have none; pass --data.test_paths [<task>/test.json, …]"
            )
        return tasks.pop()
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
