"""Tiny models built in code for tests (nothing is downloaded), and the scripts under test as modules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn


def tiny_llama(layers: int = 2, hidden: int = 64, vocab: int = 128, attn: str = "eager", **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        **overrides,
    )
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config)


def tiny_gpt2(layers: int = 2, hidden: int = 32, vocab: int = 128):
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=64)
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config)


class TwoLayer(nn.Module):
    """A plain model: Linear(in→hidden, bias) → tanh → Linear(hidden→out, no bias)."""

    def __init__(self, d_in: int = 10, hidden: int = 14, d_out: int = 6) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, hidden)
        self.down = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def write_hub_snapshot(cache: Path, repo_id: str, folder: Path, repo_type: str = "model") -> Path:
    """Put the files of ``folder`` into huggingface_hub's cache layout under ``cache``, as a download would.

    ``<type>s--owner--name/snapshots/<revision>/<files>`` plus ``refs/main`` naming the revision: what
    ``from_pretrained(repo_id)`` reads when offline (``HF_HUB_OFFLINE=1``) with ``HF_HUB_CACHE=cache``.
    """
    revision = "0" * 40
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return repo


def write_hub_dataset(cache: Path, repo_id: str, splits: dict[str, list[dict]], config: str = "default") -> Path:
    """Put a data set into ``datasets``' cache layout under ``cache``, as ``load_dataset(repo_id)`` online would.

    ``owner___name/<config>/<version>/<hash>/`` with ``dataset_info.json`` and one Arrow file per split: what
    ``load_dataset(repo_id, split=...)`` reads when offline (``HF_HUB_OFFLINE=1``) with ``HF_DATASETS_CACHE=cache``.
    """
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    sources = cache / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        files[split] = str(sources / f"{name}-{split}.jsonl")
        Path(files[split]).write_text("\n".join(json.dumps(row) for row in rows))
    builder = Json(cache_dir=str(cache / "build"), dataset_name=name, config_name=config, data_files=files)
    builder.download_and_prepare()
    target = cache / f"{owner}___{name}" / config / "0.0.0" / ("0" * 16)
    shutil.copytree(builder.cache_dir, target)
    return target


def import_script(name: str):
    """``scripts/<name>.py`` as a module: the scripts folder is not a package, so it joins ``sys.path`` only
    for the import."""
    import importlib
    import sys

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(scripts)
