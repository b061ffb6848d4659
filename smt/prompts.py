"""Old import path of :mod:`smt.lightning.data.prompts` (was ``smt.prompts``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

from smt.lightning.data.prompts import (
    TEMPLATE_NAMES,
    TemplateName,
    adds_special_tokens,
    check_template,
    render_prompt,
    render_response,
)

__all__ = [
    "TEMPLATE_NAMES",
    "TemplateName",
    "adds_special_tokens",
    "check_template",
    "render_prompt",
    "render_response",
]
