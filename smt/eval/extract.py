"""Answer extraction and judging, following the LLM-Adapters evaluation protocols.

* Commonsense (``choice``): the prediction is the **first** match of the task's label set in the
  lower-cased output (``re.findall(r"true|false", text.lower())[0]``-style); correct when it equals the
  lower-cased reference label. No match → no prediction → wrong.
* Math (``number``): thousands separators are removed, the prediction is the **last** number in the
  output, correct when ``|pred − label| ≤ 1e-3``. No number → wrong.
* AQuA (``letter``): the prediction is the **first** capital letter A–E in the stripped output (the
  protocol's rule, which can pick up a capital "A" article; ``standalone=True`` is a stricter option
  that only accepts a letter standing alone, e.g. ``(C)`` or ``C.``).

API:
    ``extract_choice(text, labels) -> str | None``
    ``extract_last_number(text) -> float | None``
    ``extract_letter(text, letters="ABCDE", standalone=False) -> str | None``
    ``judge(spec, output, reference) -> Judgement(prediction, correct)``
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from smt.eval.tasks import TaskSpec

NUMBER_TOLERANCE = 1e-3
"""Largest ``|pred − label|`` that still counts as correct for math tasks."""

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")


@dataclass(frozen=True)
class Judgement:
    """The outcome of scoring one model output.

    Args:
        prediction: the extracted answer as text (``"true"``, ``"18.0"``, ``"C"``), or None when the
            output contains no answer of the task's type.
        correct: whether the prediction matches the reference under the task's protocol.
    """

    prediction: str | None
    correct: bool


def extract_choice(text: str, labels: tuple[str, ...] | list[str]) -> str | None:
    """First occurrence of any label in the lower-cased text.

    Args:
        text: the model's output.
        labels: the task's label set, e.g. ``("solution1", "solution2")``.

    Returns:
        The matched label (lower-case), or None when none occurs.

    Example:
        >>> extract_choice("The correct answer is Answer2, not answer1", ("answer1", "answer2"))
        'answer2'
    """
    if not labels:
        return None
    # Longest first, so a label that is a prefix of another (answer1 / answer10) cannot shadow it.
    alternatives = sorted((re.escape(label.lower()) for label in labels), key=len, reverse=True)
    match = re.search("|".join(alternatives), text.lower())
    return match.group(0) if match else None


def extract_last_number(text: str) -> float | None:
    """Last number in the text, with thousands separators (``1,000``) removed.

    Args:
        text: the model's output.

    Returns:
        The number as a float, or None when the text has no digits.

    Example:
        >>> extract_last_number("She pays 3 * $1,250 = $3,750. The answer is 3,750.")
        3750.0
    """
    numbers = _NUMBER.findall(_THOUSANDS_COMMA.sub("", text))
    return float(numbers[-1]) if numbers else None


def extract_letter(text: str, letters: str | tuple[str, ...] = "ABCDE", standalone: bool = False) -> str | None:
    """First answer letter in the text (AQuA protocol).

    Args:
        text: the model's output.
        letters: allowed letters (capitals).
        standalone: False (the protocol): the first capital letter of the set anywhere in the text.
            True: only a letter that stands alone as a word, such as ``(C)``, ``C)`` or ``C.``.

    Returns:
        The letter, or None when none is found.
    """
    letter_class = "[" + "".join(re.escape(letter) for letter in letters) + "]"
    pattern = rf"(?<![A-Za-z]){letter_class}(?![A-Za-z])" if standalone else letter_class
    match = re.search(pattern, text.strip())
    return match.group(0) if match else None


def judge(spec: TaskSpec, output: str, reference: str) -> Judgement:
    """Extract the answer from one output and compare it with the reference under the task's protocol.

    Args:
        spec: the task (see :func:`smt.eval.tasks.get_task`).
        output: the generated response text (without the prompt).
        reference: the gold answer as stored in the data: a label (``"true"``, ``"answer3"``), a number
            (``"576.0"``, ``"18"``) or a letter (``"C"``).

    Returns:
        The prediction and whether it is correct.

    Raises:
        ValueError: a ``number`` task whose reference is not a number.
    """
    if spec.kind == "choice":
        prediction = extract_choice(output, spec.labels)
        return Judgement(prediction, prediction is not None and prediction == reference.strip().lower())
    if spec.kind == "letter":
        prediction = extract_letter(output, spec.labels)
        return Judgement(prediction, prediction is not None and prediction == reference.strip().upper())
    label = _parse_number(reference, spec.name)
    value = extract_last_number(output)
    if value is None:
        return Judgement(None, False)
    return Judgement(_format_number(value), abs(value - label) <= NUMBER_TOLERANCE)


def _parse_number(reference: str, task: str) -> float:
    try:
        value = float(str(reference).replace(",", "").strip())
    except ValueError:
        raise ValueError(f"task {task}: reference answer {reference!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"task {task}: reference answer {reference!r} is not a finite number")
    return value


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
