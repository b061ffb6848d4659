"""Held-out metrics of a causal LM on instruction records (``instruction``, ``input``, ``output`` and, by task,
``choices``/``label`` or ``answer``), in the prompt template the data module trains with (``alpaca`` unless told):

* ``response_nll``: mean next-token NLL over the response tokens (EOS included), weighted by token:
  ``Σ_t −log p(y_t | y_<t) / #response tokens`` — the held-out loss.
* ``text_nll``: the same over plain token windows (no template): a forgetting probe (e.g. WikiText-2).
* ``choice_accuracy``: lm-eval style multiple choice, the choice whose text has the largest summed log-probability
  per byte of its text (so longer choices are not penalised).
* ``exact_match``: GSM8K greedy generation judged by the last number against the reference.

Run them in eval mode under ``torch.no_grad`` (they take it themselves) on a plain or merged model.
"""

from __future__ import annotations

import torch

from smt.data.loss import IGNORE_INDEX, labelled_positions_loss
from smt.data.prompts import render_prompt
from smt.data.tokens import InstructionCollator, encode_examples
from smt.eval.extract import judge
from smt.eval.likelihood import score_candidates_batch
from smt.eval.tasks import get_task


def response_nll(model, tokenizer, records: list[dict], max_length: int, batch_size: int = 8,
                 template: str = "alpaca") -> float:  # fmt: skip
    """Mean next-token NLL over response tokens (EOS included), weighted by token: the held-out loss."""
    columns = {"instruction": [r["instruction"] for r in records], "input": [r["input"] for r in records],
               "response": [r["output"] for r in records]}  # fmt: skip
    encoded = encode_examples(tokenizer, template, columns, max_length)
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(encoded["input_ids"], encoded["labels"])]
    collate, total, count = InstructionCollator(tokenizer.pad_token_id), 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(labelled_positions_loss(model, batch)) * n
            count += n
    return total / max(count, 1)


def text_nll(model, windows: list[list[int]]) -> float:
    """Mean next-token NLL of plain token windows (no template): the forgetting probe."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            batch = torch.tensor([ids])
            total += float(model(input_ids=batch, labels=batch).loss) * (len(ids) - 1)
            count += len(ids) - 1
    return total / max(count, 1)


def choice_accuracy(model, tokenizer, records: list[dict]) -> float:
    """lm-eval style: the choice with the largest summed log-probability per byte of its text."""
    prompts = [render_prompt("alpaca", r["instruction"], r["input"]) for r in records]
    scores = score_candidates_batch(model, tokenizer, prompts, [r["choices"] for r in records], batch_size=16)
    correct = 0
    for record, score in zip(records, scores):
        per_byte = score.sum_logprob / _byte_lengths(record["choices"])
        correct += int(int(per_byte.argmax()) == record["label"])
    return correct / max(len(records), 1)


def _byte_lengths(texts: list[str]) -> torch.Tensor:
    return torch.tensor([max(1, len(t.encode())) for t in texts], dtype=torch.float32)


def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int = 200) -> float:
    """GSM8K greedy exact match (the last number of the output against the record's ``answer``)."""
    spec, correct = get_task("gsm8k"), 0
    tokenizer.padding_side = "left"
    for start in range(0, len(records), 16):
        chunk = records[start : start + 16]
        prompts = [render_prompt("alpaca", r["instruction"]) for r in chunk]
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        outputs = tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(judge(spec, out, r["answer"]).correct for out, r in zip(outputs, chunk))
    tokenizer.padding_side = "right"
    return correct / max(len(records), 1)
