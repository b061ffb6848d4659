"""Prompt/response tokens with masked labels, packing, and batch collation.

Each example becomes ``prompt_ids + response_ids + [eos]`` (prompt and response tokenized separately,
so training sees exactly the prompt tokens that evaluation feeds to ``generate``). With
``mask_prompt`` the labels are ``-100`` over the prompt, so the loss is on the response and its EOS
only. An example longer than ``max_length`` loses prompt tokens from the left (BOS kept); only a
response longer than ``max_length - 1`` is itself cut (from the right, losing its EOS). The prompt text
comes from a named template (``smt.data.prompts``). The ``text`` template (continued pretraining) loses
nothing: a text longer than ``max_length`` becomes consecutive windows, each after the prompt's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from smt.data.hub import from_pretrained
from smt.data.loss import IGNORE_INDEX
from smt.data.prompts import adds_special_tokens, render_prompt, render_response


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
        template: prompt template name (see :mod:`smt.data.prompts`).
        records: columns ``instruction``, ``input``, ``response``.
        max_length: longest sequence; see :func:`fit_to_length`.
        mask_prompt: labels ``-100`` on prompt tokens (loss on the response only).

    Returns:
        Columns ``input_ids`` and ``labels`` (same lengths per example).
    """
    if template != "text" and any(
        not (i.strip() or x.strip()) for i, x in zip(records["instruction"], records["input"])
    ):
        raise ValueError(f"template={template!r} got a record with no instruction (plain text?); records with a "
                         "'text' field train with template='text'")  # fmt: skip
    _, prompt_ids = _encode_prompts(tokenizer, template, records)
    responses = [render_response(template, text) for text in records["response"]]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        if template == "text":
            _append_windows(out, prompt, list(response) + [tokenizer.eos_token_id], max_length, mask_prompt)
            continue
        keep_bos = _starts_with_bos(prompt, tokenizer)
        prompt, response = fit_to_length(prompt, list(response) + [tokenizer.eos_token_id], max_length, keep_bos)
        out["input_ids"].append(prompt + response)
        out["labels"].append(([IGNORE_INDEX] * len(prompt) if mask_prompt else prompt) + response)
    return out


def _append_windows(out: dict, prompt: list[int], text: list[int], max_length: int, mask_prompt: bool) -> None:
    """Continued pretraining: ``text`` cut into consecutive windows, each after ``prompt`` (usually just BOS), so
    no token is lost to truncation; a last window with nothing left to predict (one token) is dropped."""
    room = max_length - len(prompt)
    if room < 2:
        raise ValueError(f"max_length={max_length} leaves no room for text after a {len(prompt)}-token prompt")
    for start in range(0, len(text), room):
        window = text[start : start + room]
        if len(window) < 2 and start:
            break
        out["input_ids"].append(prompt + window)
        out["labels"].append(([IGNORE_INDEX] * len(prompt) if mask_prompt else prompt) + window)


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
    """Load a tokenizer from a folder or a hub id, as transformers does (see :mod:`smt.data.hub`).

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
