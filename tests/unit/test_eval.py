"""Answer extraction, task registry, likelihood scoring and result tables of ``smt.eval``.

Rows are written in the exact schema of the LLM-Adapters test sets (instruction/input/output/answer) and
GSM8K (question/answer); the likelihood scorer is checked against log-probabilities computed by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from smt.data.records import gsm8k_reference
from smt.eval import (
    AccuracyTracker,
    TaskResult,
    TaskSpec,
    detect_task,
    extract_choice,
    extract_last_number,
    extract_letter,
    format_markdown_table,
    get_task,
    judge,
    predict_labels,
    score_candidates,
    score_candidates_batch,
    write_results_json,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

# (task, model output, gold answer, expected prediction, expected correct)
COMMONSENSE_CASES = [
    ("boolq", "the correct answer is false", "false", "false", True),
    ("boolq", "The correct answer is True.", "true", "true", True),
    ("boolq", "False! Well, the correct answer is true", "true", "false", False),  # first match wins
    ("boolq", "I cannot say.", "true", None, False),
    ("piqa", "the correct answer is solution2", "solution1", "solution2", False),
    ("social_i_qa", "the correct answer is answer3", "answer3", "answer3", True),
    ("ARC-Easy", "the correct answer is answer5", "answer5", "answer5", True),
    ("ARC-Challenge", "Answer4 is right: the correct answer is answer4", "answer4", "answer4", True),
    ("openbookqa", "the correct answer is answer2", "answer1", "answer2", False),
    ("winogrande", "the correct answer is option2", "option2", "option2", True),
    ("hellaswag", "the correct answer is ending4", "ending4", "ending4", True),
]
MATH_CASES = [
    ("gsm8k", "\nA: He needs 24 * 24 = 576 tiles. The answer is 576.", "576.0", "576", True),
    ("SVAMP", "\nA: Each person ate 128 / 4 = 32 crackers. The answer is 32.", "8.0", "32", False),
    ("MultiArith", "She earned 3 * $1,250 = $3,750 in total.", "3750.0", "3750", True),
    ("mawps", "The green one was 3 - 1.1667 = 1.833 inches longer.", "1.8333333333333335", "1.833", True),
    ("mawps", "The green one was about 1.83 inches longer.", "1.8333333333333335", "1.83", False),
    ("mawps", "The number is -15.", "-15.0", "-15", True),
    ("AddSub", "No idea.", "4", None, False),
    ("SingleEq", "x = 0.6 so 2x = 1.2, and the answer is 0.6", "0.6", "0.6", True),
    ("gsm8k", "so the answer is 18", "18", "18", True),  # GSM8K JSONL reference after gsm8k_reference
]
AQUA_OUTPUT = (
    "\nRationale: The shopkeeper must increase the price by 25% to get back to the original price.The answer is (C)."
)


@pytest.mark.parametrize(("task", "output", "answer", "prediction", "correct"), COMMONSENSE_CASES + MATH_CASES)
def test_judge_follows_the_llm_adapters_protocols(task, output, answer, prediction, correct):
    outcome = judge(get_task(task), output, answer)
    assert (outcome.prediction, outcome.correct) == (prediction, correct)


def test_choice_extraction_is_case_insensitive_and_takes_the_first_label():
    assert extract_choice("SOLUTION1 or solution2?", ("solution1", "solution2")) == "solution1"
    assert extract_choice("see answer10", ("answer1", "answer10")) == "answer10"  # longest label first
    assert extract_choice("anything", ()) is None


def test_last_number_handles_thousands_separators_and_decimals():
    assert extract_last_number("1,000,000 people, then 2.5 more") == 2.5
    assert extract_last_number("costs $1,234.50") == 1234.5
    assert extract_last_number("no digits") is None


def test_aqua_letter_protocol_and_the_standalone_option():
    assert judge(get_task("AQuA"), AQUA_OUTPUT, "C").correct
    assert extract_letter("Answer: (C)") == "A"  # the protocol takes the first capital A–E, even inside a word
    assert extract_letter("Answer: (C)", standalone=True) == "C"
    assert extract_letter("no capitals here") is None
    assert judge(get_task("AQuA"), "Answer: (C)", "C").prediction == "A"


def test_gsm8k_reference_is_the_number_after_the_marker():
    answer = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert gsm8k_reference(answer) == "18"
    assert gsm8k_reference("...\n#### 1,018") == "1018"
    assert gsm8k_reference("#### -3.5") == "-3.5"
    with pytest.raises(ValueError, match="no '####'"):
        gsm8k_reference("The answer is 4.")
    with pytest.raises(ValueError, match="no number"):
        gsm8k_reference("#### four")


def test_a_non_numeric_math_reference_is_an_error():
    with pytest.raises(ValueError, match="not a number"):
        judge(get_task("gsm8k"), "42", "forty-two")


# ------------------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("data/llm_adapters/ARC-Easy/test.json", "ARC-Easy"),
        ("data/llm_adapters/ARC-Challenge/train.json", "ARC-Challenge"),
        ("gsm8k/test.jsonl", "gsm8k"),
        ("llm_adapters/gsm8k/test.json", "gsm8k"),
        ("eval/AQuA/test.json", "AQuA"),
        ("boolq_test.json", "boolq"),
        ("social_i_qa", "social_i_qa"),
        ("arc_easy", "ARC-Easy"),
        ("runs/piqa/data/test.json", "piqa"),
    ],
)
def test_tasks_are_detected_from_folder_and_file_names(path, name):
    assert detect_task(path).name == name


def test_task_registry_label_sets_and_unknown_names():
    assert detect_task("data/mystery/test.json") is None
    assert get_task("boolq").labels == ("true", "false") and get_task("social_i_qa").labels[-1] == "answer3"
    assert get_task("ARC-Easy").labels[-1] == "answer5" and get_task("hellaswag").labels[-1] == "ending4"
    assert get_task("gsm8k").kind == "number" and not get_task("gsm8k").supports_likelihood
    assert get_task("winogrande").supports_likelihood and not get_task("AQuA").supports_likelihood
    with pytest.raises(ValueError, match="unknown; use one of"):
        get_task("mmlu")


# -------------------------------------------------------------------------------------------- likelihood
class CharTokenizer:
    """'<s>' = 0 then one id per character of 'abc'; BOS is added when special tokens are asked for."""

    pad_token_id = None
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [" abc".index(ch) for ch in text]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


# Next-token probabilities given the current token (the fake model looks only at the current token).
NEXT = torch.tensor(
    [
        [0.10, 0.50, 0.20, 0.20],  # after <s>
        [0.25, 0.25, 0.25, 0.25],  # after a
        [0.10, 0.10, 0.10, 0.70],  # after b
        [0.40, 0.20, 0.20, 0.20],  # after c
    ]
)


class TableModel:
    """A causal 'LM' whose logits at position t are log NEXT[token_t], so log-probs are known by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(input_ids.shape))
        return NEXT.log()[input_ids] + 3.0  # a constant shift changes no log-softmax


def test_likelihood_scores_match_hand_computed_log_probabilities():
    model = TableModel()
    scores = score_candidates(model, CharTokenizer(), "a", ["b", "bc", "c", "ca"], batch_size=3)
    expected = [
        math.log(0.25),  # p(b | a)
        math.log(0.25) + math.log(0.70),  # p(b | a) · p(c | b)
        math.log(0.25),  # p(c | a)
        math.log(0.25) + math.log(0.20),  # p(c | a) · p(a | c)
    ]
    torch.testing.assert_close(scores.sum_logprob, torch.tensor(expected))
    assert scores.num_tokens.tolist() == [1, 2, 1, 2]
    torch.testing.assert_close(scores.mean_logprob, torch.tensor(expected) / torch.tensor([1.0, 2.0, 1.0, 2.0]))
    assert scores.prediction == "b"  # ties with "c": the first one wins
    assert scores.best(normalize=True) == 1  # "bc" has the best per-token mean
    assert model.calls == [(3, 4), (1, 3)]  # 4 rows in batches of 3, longest first


def test_batched_scoring_over_prompts_equals_one_prompt_at_a_time():
    tokenizer, model = CharTokenizer(), TableModel()
    prompts, labels = ["a", "ab", "cab"], ["a", "b", "c"]
    together = score_candidates_batch(model, tokenizer, prompts, labels, batch_size=4)
    for prompt, scores in zip(prompts, together, strict=True):
        alone = score_candidates(model, tokenizer, prompt, labels, batch_size=1)
        torch.testing.assert_close(scores.sum_logprob, alone.sum_logprob)
    assert [s.prediction for s in together] == ["a", "c", "c"]  # after <s>, a: p(a)=.25 tie → a; after b: c; after b: c


def test_predict_labels_scores_space_prefixed_labels_after_the_task_prefix():
    # ' ' encodes to id 0 here, so " a" after "…b" scores log p(0 | b) + log p(a | 0) = log .1 + log .5.
    toy = TaskSpec("toy", "choice", ("c", "a", "b"), likelihood_prefix="b ")  # the space moves to the label
    assert predict_labels(TableModel(), CharTokenizer(), toy, ["a", "c"]) == ["a", "a"]
    with pytest.raises(ValueError, match="by generation"):
        predict_labels(TableModel(), CharTokenizer(), get_task("gsm8k"), ["a"])


def test_likelihood_on_a_real_causal_lm_is_independent_of_padding():
    from helpers import tiny_llama

    model = tiny_llama(layers=1, hidden=16, vocab=8).eval()
    tokenizer, candidates = CharTokenizer(), ["b", "cab", "ac"]
    batched = score_candidates(model, tokenizer, "ab", candidates, batch_size=8)
    for index, candidate in enumerate(candidates):
        ids = torch.tensor([tokenizer("ab" + candidate)["input_ids"]])
        with torch.no_grad():
            log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
        positions = range(3, ids.shape[1])  # <s> a b | candidate
        by_hand = sum(log_probs[p - 1, ids[0, p]].item() for p in positions)
        assert batched.sum_logprob[index].item() == pytest.approx(by_hand, abs=1e-5)


def test_trailing_spaces_of_the_context_move_to_the_candidate_but_newlines_stay():
    class Recorder(CharTokenizer):
        def __init__(self) -> None:
            self.texts: list[str] = []

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            self.texts.append(text)
            return super().__call__(text.replace("\n", "a"), add_special_tokens)

    tokenizer = Recorder()
    score_candidates(TableModel(), tokenizer, "ab  ", ["c"])
    score_candidates(TableModel(), tokenizer, "ab\n", ["c"])
    assert tokenizer.texts == ["ab", "  c", "ab\n", "c"]


def test_likelihood_input_errors():
    with pytest.raises(ValueError, match="at least one candidate"):
        score_candidates(TableModel(), CharTokenizer(), "a", [])
    with pytest.raises(ValueError, match="no tokens"):
        score_candidates(TableModel(), CharTokenizer(), "a", [""])
    with pytest.raises(ValueError, match="raise max_length"):
        score_candidates(TableModel(), CharTokenizer(), "a", ["abc"], max_length=3)
    kept = score_candidates(TableModel(), CharTokenizer(), "cccb", ["c"], max_length=2)  # context cut to "b"
    assert kept.sum_logprob.item() == pytest.approx(math.log(0.7))


# ----------------------------------------------------------------------------------------------- metrics
def test_accuracy_table_and_json(tmp_path):
    tracker = AccuracyTracker()
    tracker.update_many(["boolq"] * 4 + ["piqa"] * 2, [True, True, False, True, False, True])
    results = tracker.results()
    assert results == [TaskResult("boolq", 3, 4), TaskResult("piqa", 1, 2)]
    assert format_markdown_table(results, title="SMT, tiny") == "\n".join(
        [
            "SMT, tiny",
            "",
            "| task | accuracy (%) | correct | total |",
            "|---|---:|---:|---:|",
            "| boolq | 75.0 | 3 | 4 |",
            "| piqa | 50.0 | 1 | 2 |",
            "| **average** | **62.5** | 4 | 6 |",
        ]
    )
    path = write_results_json(tmp_path / "out" / "results.json", results, {"method": "smt"})
    written = json.loads(path.read_text())
    assert written["tasks"]["boolq"] == {"accuracy": 0.75, "correct": 3, "total": 4}
    assert written["macro_average"] == 0.625 and written["micro_average"] == pytest.approx(4 / 6)
    assert written["metadata"] == {"method": "smt"}


# ---------------------------------------------------------------------------------- real rows (optional)
@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_real_rows_are_judged_correct_against_their_own_outputs():
    adapters = SHARED_DATA / "llm_adapters"
    for folder in sorted(p for p in adapters.iterdir() if (p / "test.json").exists()):
        spec = detect_task(folder / "test.json")
        assert spec is not None, folder.name
        rows = json.loads((folder / "test.json").read_text())[:25]
        for row in rows:
            if spec.kind == "choice":  # outputs are "the correct answer is <label>"
                assert judge(spec, row["output"], row["answer"]).correct, row
            elif spec.kind == "number":
                judge(spec, row["output"], row["answer"])  # every reference parses as a number
            else:
                assert row["answer"] in spec.labels
    with open(SHARED_DATA / "gsm8k" / "test.jsonl") as lines:
        rows = [json.loads(line) for _, line in zip(range(50), lines, strict=False)]
    assert all(float(gsm8k_reference(row["answer"])) == float(gsm8k_reference(row["answer"])) for row in rows)
    assert gsm8k_reference(rows[0]["answer"]) == "18"
