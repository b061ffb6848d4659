"""Evaluation of fine-tuned LMs on the LLM-Adapters commonsense and math suites and GSM8K (no Lightning).

Two ways to score a test example whose prompt comes from ``smt.data.prompts`` (the data module's
``test_dataloader`` yields ``prompt``, ``reference`` and ``task`` per example):

* **Generation** (the papers' protocol): generate a response, then
  ``judge(get_task(task), response, reference)`` extracts the answer (first label / last number /
  first letter) and compares it with the reference.
* **Log-likelihood** (fast, no generation; only tasks with a label set, ``spec.supports_likelihood``):
  ``predict_labels(model, tokenizer, spec, prompts)`` returns the most likely label per prompt (the
  label scored after ``prompt + "the correct answer is "``); it is correct when it equals the reference.
  ``score_candidates`` scores arbitrary candidate strings.

Collect outcomes in an ``AccuracyTracker`` and report with ``format_markdown_table`` and
``write_results_json``.

Example:
    >>> from smt.eval import AccuracyTracker, get_task, judge
    >>> tracker = AccuracyTracker()
    >>> outcome = judge(get_task("boolq"), "the correct answer is true", "true")
    >>> tracker.update("boolq", outcome.correct)
    >>> tracker.results()[0].accuracy
    1.0
"""

from smt.eval.extract import (
    NUMBER_TOLERANCE,
    Judgement,
    extract_choice,
    extract_last_number,
    extract_letter,
    judge,
)
from smt.eval.likelihood import CandidateScores, predict_labels, score_candidates, score_candidates_batch
from smt.eval.metrics import (
    AccuracyTracker,
    TaskResult,
    format_markdown_table,
    macro_average,
    micro_average,
    results_to_dict,
    write_results_json,
)
from smt.eval.tasks import TaskSpec, detect_task, get_task, task_names

__all__ = [
    "NUMBER_TOLERANCE",
    "AccuracyTracker",
    "CandidateScores",
    "Judgement",
    "TaskResult",
    "TaskSpec",
    "detect_task",
    "extract_choice",
    "extract_last_number",
    "extract_letter",
    "format_markdown_table",
    "get_task",
    "judge",
    "macro_average",
    "micro_average",
    "predict_labels",
    "results_to_dict",
    "score_candidates",
    "score_candidates_batch",
    "task_names",
    "write_results_json",
]
