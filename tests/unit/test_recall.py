"""Recall over a closed value set: the cached-context scores equal a plain forward over context + candidate."""

from __future__ import annotations

import pytest
import torch

from smt.eval.recall import continuation_scores, recall
from tests.helpers import tiny_llama


def _full_sequence_score(model, context: list[int], candidate: list[int]) -> float:
    ids = torch.tensor([context + candidate])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logp[len(context) + j - 1, token]) for j, token in enumerate(candidate))


def test_cached_context_scores_equal_full_forwards():
    model = tiny_llama(vocab=64).eval()
    context = [1, 5, 9, 13, 2]
    candidates = [[7], [8, 3], [8, 4, 11], [30, 31]]  # ragged lengths share one padded batch
    with torch.no_grad():
        scores = continuation_scores(model, context, candidates)
        expected = [_full_sequence_score(model, context, c) for c in candidates]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5)


def test_recall_counts_the_labelled_choice_ranked_first():
    from transformers import ByT5Tokenizer

    model, tokenizer = tiny_llama(vocab=384).eval(), ByT5Tokenizer()
    with torch.no_grad():
        ids = tokenizer("Q: x\nA: it is", add_special_tokens=False)["input_ids"]
        options = [tokenizer(" " + v, add_special_tokens=False)["input_ids"] for v in ("red", "blue", "green")]
        best = int(torch.argmax(continuation_scores(model, ids, options)))
    prompts, prefixes, choices = ["Q: x\nA:"] * 2, [" it is "] * 2, [["red", "blue", "green"]] * 2
    assert recall(model, tokenizer, prompts, prefixes, choices, [best, (best + 1) % 3]) == 0.5
    assert recall(model, tokenizer, [], [], [], []) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        continuation_scores(model, [], [[1]])


def test_batched_single_token_recall_agrees_with_the_cached_path(monkeypatch):
    from transformers import ByT5Tokenizer

    import smt.eval.recall as recall_module

    model, tokenizer = tiny_llama(vocab=384).eval(), ByT5Tokenizer()
    prompts = ["Q: which?\nA:", "Q: a much longer question than the first one?\nA:", "Q: third\nA:"]
    letters = ["x", "y", "z", "w"]  # ByT5: one token per character
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    with torch.no_grad():
        cached = [int(torch.argmax(continuation_scores(model, encode(p + " it is"), [encode(c) for c in letters])))
                  for p in prompts]  # fmt: skip
    monkeypatch.setattr(recall_module, "continuation_scores", None)  # the batched path must not need it
    for labels in (cached, [(c + 1) % 4 for c in cached]):
        expected = sum(a == b for a, b in zip(labels, cached)) / 3
        assert recall(model, tokenizer, prompts, [" it is"] * 3, [letters] * 3, labels, batch_size=2) == expected
