"""Name patterns: one convention for every pattern a user writes (``target_modules``, ``trainable_modules``, pools).

A pattern is either

- a **list** of names or name suffixes: ``["q_proj", "v_proj"]`` matches ``model.layers.0.self_attn.q_proj``
  (a suffix counts at a dot boundary: ``proj`` does not match ``q_proj``), or
- **one regular expression matched against the whole name** (``re.fullmatch``, PEFT's convention for
  ``target_modules``): ``.*self_attn\\.(q|v)_proj`` matches ``model.layers.0.self_attn.q_proj``, while ``q_proj``
  alone matches only a module named exactly ``q_proj``.

A pattern that matches nothing is refused with one line showing a real name and how to match it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Pattern = str | Sequence[str]


def name_matcher(pattern: Pattern, field: str) -> Callable[[str], bool]:
    """A predicate: does a dotted name match ``pattern`` (full-match regex, or list of names/suffixes)?

    Args:
        pattern: one regex (matched in full) or a list of names/suffixes.
        field: the setting's name for the error message, e.g. ``smt.target_modules``.

    Raises:
        ValueError: the regex does not compile.
    """
    if isinstance(pattern, str):
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{field}={pattern!r} is not a valid regular expression ({err})") from None
        return lambda name: compiled.fullmatch(name) is not None
    suffixes = tuple(pattern)
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def no_match_error(field: str, pattern: Pattern, names: Sequence[str], what: str) -> ValueError:
    """The one-line error for a pattern that matches none of ``names``, with a real name as an example.

    Args:
        field: the setting, e.g. ``smt.target_modules``.
        pattern: what the user wrote.
        names: the candidate names (e.g. the model's Linear layers), in model order.
        what: what the names are, e.g. ``Linear layer of LlamaForCausalLM``.
    """
    if not names:
        return ValueError(f"{field}={pattern!r}: there is no {what} to match")
    if isinstance(pattern, str):
        for name in names:
            found = _search(pattern, name)
            if found is not None:  # written for re.search: say so, with the name it was meant for
                widened = ("" if found.start() == 0 else ".*") + pattern + ("" if found.end() == len(name) else ".*")
                return ValueError(
                    f"{field}={pattern!r} matches no {what}: a regex must match the whole name, and this one only "
                    f"occurs inside {name!r}; write {widened!r}"
                )
    example = names[0]
    last = example.rsplit(".", 1)[-1]
    return ValueError(
        f"{field}={pattern!r} matches no {what} (a regex must match the whole name, a list names suffixes); "
        f"names look like {example!r}: e.g. [{last!r}] or {'.*' + last!r}"
    )


def _search(pattern: str, name: str) -> re.Match | None:
    try:
        return re.search(pattern, name)
    except re.error:
        return None
