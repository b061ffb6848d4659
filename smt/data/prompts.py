"""Named prompt templates: how an instruction record becomes the text a causal LM reads and writes.

Pure functions over strings (no Lightning, no torch), shared by training (``smt.data.tokens``) and evaluation
(``smt.eval``), so a model is tested with exactly the prompt it was trained on.

A template splits one example into a *prompt* (masked from the loss) and a *response* (learned); the
end-of-sequence token is appended by the tokenizing code, not here.

Templates:
    ``alpaca``  The Stanford-Alpaca prompt that LLM-Adapters trains and evaluates with: a
                "with input" form (``### Instruction`` + ``### Input``) and a "without input" form.
                LLM-Adapters' own evaluation scripts indent the section lines with spaces (a
                formatting slip in a triple-quoted f-string); this is the clean, unindented text.
    ``smt``     The single-section form used by the SMT and S²FT training and evaluation code: always
                the "without input" header (one space after "request.", as in their evaluation
                script). Their code puts a literal ``"<s> "`` before the header and *replaces* the
                instruction by the input when one is present; here the tokenizer adds its own BOS
                (no doubled BOS) and a non-empty input is appended to the instruction instead, so no
                text is lost.
    ``gsm8k``   ``Question: …\\nAnswer:`` followed by the worked solution (few-shot style used by
                most GSM8K harnesses); the response starts with a space.
    ``chat``    The tokenizer's own chat template (one user turn, generation prompt added); needs a
                tokenizer that has one. The rendered prompt already contains the model's special
                tokens, so it is tokenized without adding more (see :func:`adds_special_tokens`).
    ``text``    Plain text for continued pretraining: no prompt, the loss on every token of the record's
                ``text`` (records with a ``text`` field, see ``smt.data.records``); a text longer than
                ``max_length`` is split into consecutive windows by ``smt.data.tokens``.

API:
    ``render_prompt(template, instruction, input_text="", tokenizer=None) -> str``
    ``render_response(template, response) -> str``
    ``adds_special_tokens(template) -> bool``
    ``TEMPLATE_NAMES`` (tuple of the names above), ``TemplateName`` (a ``Literal`` for typed configs)
"""

from __future__ import annotations

from typing import Any, Literal, get_args

TemplateName = Literal["alpaca", "smt", "gsm8k", "chat", "text"]
TEMPLATE_NAMES: tuple[str, ...] = get_args(TemplateName)

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_SMT_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_GSM8K = "Question: {instruction}\nAnswer:"


def check_template(template: str) -> str:
    """Return ``template`` if it names a known template.

    Args:
        template: a template name.

    Returns:
        The same name.

    Raises:
        ValueError: the name is not one of :data:`TEMPLATE_NAMES`.
    """
    if template not in TEMPLATE_NAMES:
        raise ValueError(f"template={template!r} is unknown; use one of {', '.join(TEMPLATE_NAMES)}")
    return template


def render_prompt(template: str, instruction: str, input_text: str = "", tokenizer: Any | None = None) -> str:
    """Render the prompt part of one example (everything the model reads before its response).

    Args:
        template: one of :data:`TEMPLATE_NAMES`.
        instruction: the task text (LLM-Adapters ``instruction`` or GSM8K ``question``).
        input_text: optional context (LLM-Adapters ``input``); empty selects the "without input" form.
        tokenizer: needed only by ``chat``: a tokenizer with a ``chat_template``.

    Returns:
        The prompt text, ending where the response begins.

    Raises:
        ValueError: unknown template, or ``chat`` without a tokenizer that has a chat template.

    Example:
        >>> render_prompt("gsm8k", "What is 2 + 3?")
        'Question: What is 2 + 3?\\nAnswer:'
    """
    check_template(template)
    input_text = input_text or ""
    if template == "text":
        return _join_input(instruction, input_text)
    if template == "alpaca":
        if input_text.strip():
            return _ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
        return _ALPACA_WITHOUT_INPUT.format(instruction=instruction)
    if template == "smt":
        return _SMT_HEADER.format(instruction=_join_input(instruction, input_text))
    if template == "gsm8k":
        return _GSM8K.format(instruction=_join_input(instruction, input_text))
    return _render_chat(_join_input(instruction, input_text), tokenizer)


def render_response(template: str, response: str) -> str:
    """Render the response part of one example (the text the loss is taken on, before EOS).

    Args:
        template: one of :data:`TEMPLATE_NAMES`.
        response: the target text (LLM-Adapters ``output`` or the GSM8K solution).

    Returns:
        The response text; ``gsm8k`` puts one space after ``Answer:``.

    Raises:
        ValueError: unknown template.
    """
    check_template(template)
    if template == "gsm8k":
        return " " + response.lstrip()
    return response


def adds_special_tokens(template: str) -> bool:
    """Whether the tokenizer should add its special tokens (BOS) when encoding a rendered prompt.

    Args:
        template: one of :data:`TEMPLATE_NAMES`.

    Returns:
        False for ``chat`` (the chat template already writes them), True otherwise.
    """
    return check_template(template) != "chat"


def _join_input(instruction: str, input_text: str) -> str:
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def _render_chat(content: str, tokenizer: Any | None) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' needs a tokenizer with a chat template; use template='alpaca' or 'smt'")
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
