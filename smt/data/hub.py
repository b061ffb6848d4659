"""Models, tokenizers and data sets by name, loaded the way transformers and datasets load them.

A name is a folder (``save_pretrained`` layout) or a Hugging Face hub id (``meta-llama/Meta-Llama-3-8B``). An id
is downloaded once into the usual cache (``HF_HOME``/``HF_HUB_CACHE``; data sets: ``HF_DATASETS_CACHE``) and read
from there afterwards; ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True`` for models and tokenizers) reads the
cache only. Data sets are named ``hub:owner/name[:config][@split]`` wherever a data file is accepted, so a file
path can never be mistaken for an id (a local file literally named ``hub:…`` is written ``./hub:…``).

Every failure becomes one line that names the setting, the id, and the offline setting in force.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUB_PREFIX = "hub:"
_REPO_ID = re.compile(r"[\w.-]+(?:/[\w.-]+)?")
_HUB_DATASET = re.compile(r"hub:(?P<repo>[^:@]+)(?::(?P<config>[^:@]+))?(?:@(?P<split>[^@]+))?")


def offline_setting(local_files_only: bool = False) -> str | None:
    """What keeps the hub out of reach, as a user would write it (``HF_HUB_OFFLINE=1``), or None when online."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    return "local_files_only=True" if local_files_only else None


def from_pretrained(load: Callable[..., Any], name: str, field: str, local_files_only: bool = False, **kwargs) -> Any:
    """``load(name, local_files_only=..., **kwargs)`` (an ``AutoX.from_pretrained``), failures in one line.

    Args:
        load: e.g. ``AutoModelForCausalLM.from_pretrained``.
        name: a folder or a hub id.
        field: the setting shown in errors, e.g. ``model.model``.
        local_files_only: read only folders and the cache (``HF_HUB_OFFLINE=1`` does the same for every load).
        **kwargs: passed to ``load``.

    Raises:
        ValueError: one line naming ``field``, ``name`` and why (no such folder, not cached while offline, …).
    """
    try:
        return load(name, local_files_only=local_files_only, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(explain_load_failure(field, name, err, local_files_only)) from err


def explain_load_failure(field: str, name: str, error: BaseException, local_files_only: bool = False) -> str:
    """The one-line reason ``name`` did not load: a broken folder, a path that is no folder, or an id out of reach."""
    from huggingface_hub import constants

    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    if Path(name).expanduser().is_dir():
        return f"{field}={name!r} is a folder but does not load ({detail}); give a folder written by save_pretrained"
    if not is_repo_id(name):
        return f"{field}={name!r} is neither a folder nor a hub id (owner/name); give a save_pretrained folder or an id"
    offline = offline_setting(local_files_only)
    if offline is not None:
        return (
            f"{field}={name!r} is not a folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and "
            f"{offline} forbids downloading it; run once online (or `hf download {name}`), or give a folder"
        )
    return (
        f"{field}={name!r} is not a folder and could not be loaded from the hub ({detail}); check the id and your "
        "access (`hf auth login` for gated models), or set HF_HUB_OFFLINE=1 to use the cache only"
    )


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub id (``name`` or ``owner/name``)."""
    return _REPO_ID.fullmatch(name) is not None and not name.startswith(".") and ".." not in name


@dataclass(frozen=True)
class HubDataset:
    """A data set on the hub: ``hub:owner/name[:config][@split]`` (split ``train[:1000]`` slices work too)."""

    repo_id: str
    config: str | None
    split: str

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}{':' + self.config if self.config else ''}@{self.split}"


def parse_hub_dataset(text: str, default_split: str, field: str) -> HubDataset | None:
    """``hub:owner/name[:config][@split]`` → :class:`HubDataset`; None for anything else (a file path).

    Raises:
        ValueError: the text starts with ``hub:`` but is not of that form.
    """
    if not text.startswith(HUB_PREFIX):
        return None
    found = _HUB_DATASET.fullmatch(text)
    if found is None or not is_repo_id(found["repo"]):
        raise ValueError(
            f"{field}={text!r} is not hub:owner/name[:config][@split] (e.g. hub:openai/gsm8k:main@test); "
            "a local file named like this is written ./hub:…"
        )
    return HubDataset(found["repo"], found["config"], found["split"] or default_split)


def load_hub_dataset(source: HubDataset, field: str, cache_dir: str | None = None):
    """``datasets.load_dataset(repo, config, split=split)``, failures in one line.

    Args:
        source: the parsed name.
        field: the setting shown in errors, e.g. ``data.train_path``.
        cache_dir: where ``datasets`` keeps the data set; None = its usual cache (``HF_DATASETS_CACHE``).

    Raises:
        ValueError: not cached while offline, unknown on the hub, unknown config or split.
    """
    import datasets

    try:
        return datasets.load_dataset(source.repo_id, source.config, split=source.split, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise ValueError(_explain_dataset_failure(field, source, err, cache_dir)) from None


def _explain_dataset_failure(field: str, source: HubDataset, error: BaseException, cache_dir: str | None) -> str:
    import datasets

    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    if datasets.config.HF_HUB_OFFLINE and isinstance(error, ConnectionError):
        cache = cache_dir or datasets.config.HF_DATASETS_CACHE
        return (
            f"{field}={str(source)!r}: {source.repo_id} is not in the datasets cache ({cache}) and HF_HUB_OFFLINE=1 "
            "forbids downloading it; run once online, or give a JSON/JSONL file"
        )
    return f"{field}={str(source)!r} does not load ({detail}); check the id, config and split on the hub"
