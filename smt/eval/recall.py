"""Recall of a closed set of values: which of C short continuations a causal LM finds most likely after a context.

For a context ``x`` and candidates ``y_c = (y_c1 … y_cn)``,

    score(c) = log p(y_c | x) = Σ_j log softmax(logits[|x| + j − 1])[y_cj]

and the prediction is the candidate with the largest score (the first on ties). The context is run once and its
key/value cache is repeated for the C candidates, so C candidates after a 40-token context cost one 40-token
forward plus one C × (n − 1)-token forward, not C forwards of 40 + n tokens: what makes recall over twenty values
of hundreds of facts cheap enough for a CPU study. Context and candidates are encoded separately (candidates
without special tokens), as ``smt.eval.likelihood`` does.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch


def continuation_scores(model: Any, context_ids: Sequence[int], candidate_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[C]`` float32: the summed log-probability of each candidate's tokens after the context.

    Raises:
        ValueError: the context or a candidate is empty.
    """
    if not context_ids or any(len(c) == 0 for c in candidate_ids):
        raise ValueError("continuation_scores needs a non-empty context and non-empty candidates")
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(context_ids)], device=device), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores = torch.stack([first[c[0]] for c in candidate_ids])
    longest = max(len(c) for c in candidate_ids)
    if longest == 1:
        return scores.cpu()
    name = _cache_argument(model)
    cache = out[name] if name in out else out["past_key_values"]
    cache.batch_repeat_interleave(len(candidate_ids))
    rows = torch.tensor([list(c[:-1]) + [0] * (longest - len(c)) for c in candidate_ids], device=device)
    mask = torch.ones(len(candidate_ids), len(context_ids) + longest - 1, dtype=torch.long, device=device)
    logits = model(input_ids=rows, attention_mask=mask, use_cache=True, **{name: cache}).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    for c, ids in enumerate(candidate_ids):
        for j in range(1, len(ids)):
            scores[c] = scores[c] + logp[c, j - 1, ids[j]]  # right padding sits after every real token: causal
    return scores.cpu()


def _cache_argument(model: Any) -> str:
    """The forward's name for the key/value cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def recall(model: Any, tokenizer: Any, prompts: Sequence[str], prefixes: Sequence[str],
           choices: Sequence[Sequence[str]], labels: Sequence[int], special_tokens: bool = False,
           batch_size: int = 16) -> float:  # fmt: skip
    """Share of questions whose labelled choice scores highest after ``prompt + prefix``.

    Encoded the way training encodes a record: the prompt with the template's special tokens
    (``special_tokens``), the rest without. Trailing spaces of a prefix move to the front of its choices
    (``"… in " + "Oslo"`` is scored as ``"… in" + " Oslo"``), the way a BPE tokenizer cuts the trained text.
    When every choice is one token, ``batch_size`` contexts share one forward (the choice scores are then
    read off the last position's log-softmax); otherwise each context runs once with its cache repeated.
    """
    if not prompts:
        return 0.0
    contexts, options = [], []
    for prompt, prefix, texts in zip(prompts, prefixes, choices):
        stripped = prefix.rstrip(" ")
        moved = prefix[len(stripped) :]
        ids = tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"]
        contexts.append(ids + tokenizer(stripped, add_special_tokens=False)["input_ids"])
        options.append([tokenizer(moved + text, add_special_tokens=False)["input_ids"] for text in texts])
    with torch.no_grad():
        if all(len(ids) == 1 for row in options for ids in row):
            scores = _single_token_scores(model, contexts, options, batch_size)
        else:
            scores = [continuation_scores(model, c, o) for c, o in zip(contexts, options)]
    correct = sum(int(int(torch.argmax(row)) == label) for row, label in zip(scores, labels))
    return correct / len(prompts)


def _single_token_scores(model: Any, contexts: list[list[int]], options: list[list[list[int]]],
                         batch_size: int) -> list[torch.Tensor]:  # fmt: skip
    """Each context's one-token choices scored from its last position; contexts right-padded into batches."""
    device, scores = next(model.parameters()).device, []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start : start + batch_size]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([c + [0] * (width - len(c)) for c in chunk], device=device)
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunk], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        for row, (context, choice_ids) in enumerate(zip(chunk, options[start : start + batch_size])):
            logp = torch.log_softmax(logits[row, len(context) - 1], dim=-1)
            scores.append(logp[[ids[0] for ids in choice_ids]].cpu())
    return scores
