"""Log-likelihood scoring of a closed label set: a fast, generation-free evaluation for small CPU runs.

For a context ``x`` (prompt, plus the task's answer prefix) and a candidate ``y = (y_1 … y_n)``, tokenized
separately and concatenated, a causal LM gives

    log p(y | x) = Σ_j log softmax(logits[|x| + j − 1])[y_j]

(summed log-probability) and its per-token mean ``log p(y | x) / n``. The prediction is the candidate
with the largest sum (``normalize=True``: the largest mean; the first one on ties). Every
(context, candidate) pair is one row of a right-padded batch, rows are sorted by length to waste little
padding, and the soft-max is taken only at the candidate positions.

The context and candidate are encoded separately (the candidate without special tokens), so every
candidate is scored after exactly the same context tokens. Trailing spaces of the context move to the
front of each candidate (as lm-evaluation-harness does): ``"… is " + "true"`` is scored as
``"… is" + " true"``, the way a BPE tokenizer cuts the training text ``"… is true"``. Trailing newlines
stay in the context, where the data module's prompts have them.

API:
    ``predict_labels(model, tokenizer, spec, prompts, batch_size=16, normalize=False, ...) -> list[str]``
        (a task's label for each prompt: context ``prompt + spec.likelihood_prefix``, candidates the labels)
    ``score_candidates(model, tokenizer, prompt, candidates, batch_size=16, ...) -> CandidateScores``
    ``score_candidates_batch(model, tokenizer, prompts, candidates, batch_size=16, ...) -> list[CandidateScores]``
    ``CandidateScores``: ``sum_logprob``, ``num_tokens``, ``mean_logprob``, ``best(normalize)``, ``prediction``
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from smt.eval.tasks import TaskSpec


@dataclass(frozen=True)
class CandidateScores:
    """Log-likelihood of each candidate continuation of one context.

    Args:
        candidates: the candidate strings, in the order given.
        sum_logprob: ``[C]`` float32, summed log-probability of each candidate's tokens.
        num_tokens: ``[C]`` int64, number of tokens of each candidate.
    """

    candidates: tuple[str, ...]
    sum_logprob: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def mean_logprob(self) -> torch.Tensor:
        """``[C]`` per-token mean log-probability (length-normalized score)."""
        return self.sum_logprob / self.num_tokens.to(self.sum_logprob.dtype)

    def best(self, normalize: bool = False) -> int:
        """Index of the highest-scoring candidate (the first one on ties).

        Args:
            normalize: rank by the per-token mean instead of the sum.

        Returns:
            The index into :attr:`candidates`.
        """
        scores = self.mean_logprob if normalize else self.sum_logprob
        return int(torch.argmax(scores).item())

    @property
    def prediction(self) -> str:
        """The candidate with the largest summed log-probability."""
        return self.candidates[self.best()]


def predict_labels(
    model: Callable[..., Any],
    tokenizer: Any,
    spec: TaskSpec,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    normalize: bool = False,
    max_length: int | None = None,
    add_special_tokens: bool = True,
    device: torch.device | str | None = None,
) -> list[str]:
    """The most likely label of a task for each prompt, by log-likelihood (no generation).

    Args:
        model: see :func:`score_candidates`.
        tokenizer: see :func:`score_candidates`.
        spec: a task with a label set (``spec.supports_likelihood``), e.g. ``get_task("boolq")``.
        prompts: rendered prompts (``smt.data.prompts.render_prompt``), ending where the response begins.
        batch_size: rows (prompt + label) per forward pass.
        normalize: rank labels by per-token mean instead of summed log-probability.
        max_length: longest row; longer prompts are cut from the left.
        add_special_tokens: let the tokenizer add BOS (False for chat-rendered prompts).
        device: where to run; None uses the model's device.

    Returns:
        One label of ``spec.labels`` per prompt, comparable with the gold ``answer``.

    Raises:
        ValueError: the task has no label set to score (math tasks: use generation).
    """
    if not spec.supports_likelihood:
        raise ValueError(f"task {spec.name} has no label set to score by likelihood; evaluate it by generation")
    contexts = [prompt + spec.likelihood_prefix for prompt in prompts]
    scores = score_candidates_batch(
        model,
        tokenizer,
        contexts,
        list(spec.labels),
        batch_size=batch_size,
        max_length=max_length,
        add_special_tokens=add_special_tokens,
        device=device,
    )
    return [spec.labels[result.best(normalize)] for result in scores]


def score_candidates(
    model: Callable[..., Any],
    tokenizer: Any,
    prompt: str,
    candidates: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    add_special_tokens: bool = True,
    device: torch.device | str | None = None,
) -> CandidateScores:
    """Score every candidate continuation of one prompt.

    Args:
        model: a causal LM callable as ``model(input_ids=…, attention_mask=…)`` returning logits
            ``[B, T, V]`` or an object with ``.logits`` (any transformers causal LM).
        tokenizer: a tokenizer callable as ``tokenizer(text, add_special_tokens=…)["input_ids"]``.
        prompt: the context the candidates continue.
        candidates: candidate strings (at least one, none empty after tokenization).
        batch_size: rows (context + candidate) per forward pass.
        max_length: longest row; longer contexts are cut from the left. None: no limit.
        add_special_tokens: let the tokenizer add BOS to the context (False for chat-rendered prompts).
        device: where to run; None uses the model's parameters' device (CPU for plain callables).

    Returns:
        The per-candidate scores.

    Raises:
        ValueError: no candidates, an empty candidate, or a candidate longer than ``max_length``.
    """
    return score_candidates_batch(
        model,
        tokenizer,
        [prompt],
        [list(candidates)],
        batch_size=batch_size,
        max_length=max_length,
        add_special_tokens=add_special_tokens,
        device=device,
    )[0]


def score_candidates_batch(
    model: Callable[..., Any],
    tokenizer: Any,
    prompts: Sequence[str],
    candidates: Sequence[str] | Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    add_special_tokens: bool = True,
    device: torch.device | str | None = None,
) -> list[CandidateScores]:
    """Score candidate continuations of many prompts, all (prompt, candidate) rows batched together.

    Args:
        model: see :func:`score_candidates`.
        tokenizer: see :func:`score_candidates`.
        prompts: the contexts.
        candidates: one shared list of candidates (a label set) or one list per prompt.
        batch_size: rows per forward pass.
        max_length: longest row; longer contexts are cut from the left. None: no limit.
        add_special_tokens: let the tokenizer add BOS to each context.
        device: where to run; None uses the model's device.

    Returns:
        One :class:`CandidateScores` per prompt, in order.

    Raises:
        ValueError: empty candidate lists or candidates, a per-prompt list of the wrong length, or a
            candidate that does not fit ``max_length``.
    """
    per_prompt = _per_prompt_candidates(prompts, candidates)
    rows = _build_rows(tokenizer, prompts, per_prompt, max_length, add_special_tokens)
    sums = torch.zeros(len(rows), dtype=torch.float32)
    device = torch.device(device) if device is not None else _model_device(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    pad_id = _pad_id(tokenizer)
    with torch.no_grad():
        for start in range(0, len(order), max(1, batch_size)):
            chunk = order[start : start + max(1, batch_size)]
            sums[chunk] = _score_rows(model, [rows[i] for i in chunk], pad_id, device)
    return _assemble(per_prompt, sums, [len(row[0]) - row[1] for row in rows])


def _per_prompt_candidates(
    prompts: Sequence[str], candidates: Sequence[str] | Sequence[Sequence[str]]
) -> list[tuple[str, ...]]:
    if len(candidates) == 0:
        raise ValueError("score_candidates needs at least one candidate")
    if isinstance(candidates[0], str):
        per_prompt = [tuple(candidates)] * len(prompts)
    else:
        per_prompt = [tuple(group) for group in candidates]
    if len(per_prompt) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(per_prompt)} candidate lists; give one list per prompt")
    if any(len(group) == 0 for group in per_prompt):
        raise ValueError("every prompt needs at least one candidate")
    return per_prompt


def _build_rows(
    tokenizer: Any,
    prompts: Sequence[str],
    per_prompt: list[tuple[str, ...]],
    max_length: int | None,
    add_special_tokens: bool,
) -> list[tuple[list[int], int]]:
    """Token rows ``context + candidate`` and the context length of each, prompt-major order."""
    rows = []
    for prompt, group in zip(prompts, per_prompt, strict=True):
        stripped = prompt.rstrip(" ")
        moved = prompt[len(stripped) :]  # trailing spaces belong to the candidate's first token
        context = list(tokenizer(stripped, add_special_tokens=add_special_tokens)["input_ids"])
        for candidate in group:
            target = list(tokenizer(moved + candidate, add_special_tokens=False)["input_ids"])
            if not target:
                raise ValueError(f"candidate {candidate!r} encodes to no tokens; drop it or add text")
            rows.append(_fit(context, target, max_length, candidate))
    return rows


def _fit(context: list[int], target: list[int], max_length: int | None, candidate: str) -> tuple[list[int], int]:
    if not context:
        raise ValueError("the context encodes to no tokens; a causal LM needs ≥ 1 token before the candidate")
    if max_length is not None and len(context) + len(target) > max_length:
        keep = max_length - len(target)
        if keep < 1:
            raise ValueError(f"candidate {candidate!r} has {len(target)} tokens; raise max_length above that")
        context = context[-keep:]
    return context + target, len(context)


def _score_rows(
    model: Callable[..., Any], rows: list[tuple[list[int], int]], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Summed candidate log-probability of each row of one right-padded batch."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    row_index, positions, targets = [], [], []
    for r, (ids, context_len) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
        for position in range(context_len, len(ids)):
            row_index.append(r)
            positions.append(position - 1)  # logits at t predict the token at t + 1
            targets.append(ids[position])
    logits = _logits(model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)))
    picked = logits[torch.tensor(row_index, device=logits.device), torch.tensor(positions, device=logits.device)]
    log_probs = torch.log_softmax(picked.float(), dim=-1)
    token_scores = log_probs.gather(1, torch.tensor(targets, device=logits.device)[:, None]).squeeze(1).cpu()
    return torch.zeros(len(rows)).index_add_(0, torch.tensor(row_index), token_scores)


def _assemble(per_prompt: list[tuple[str, ...]], sums: torch.Tensor, lengths: list[int]) -> list[CandidateScores]:
    results, start = [], 0
    for group in per_prompt:
        stop = start + len(group)
        counts = torch.tensor(lengths[start:stop], dtype=torch.long)
        results.append(CandidateScores(group, sums[start:stop].clone(), counts))
        start = stop
    return results


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _model_device(model: Any) -> torch.device:
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0
