"""Prompt templates.

Convention (why): every built-in template ends with a newline and responses are the bare
answer (no leading space). Prompt and response are tokenised separately (loss masking and
candidate scoring both need the boundary), so the answer must not depend on a space glued to
it; after a newline, BPE tokenisers and the byte tokenizer alike encode ``"World"`` the same
way whether it follows the prompt or stands alone. Candidate words therefore equal responses.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from .examples import DataError


def _field_names(fmt: str, where: str) -> tuple[str, ...]:
    """Named replacement fields of a ``str.format`` template, in order, without repeats."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:
        raise DataError(
            f"template {where} is not a valid format string ({exc}); write fields as "
            "{name} and literal braces as {{ and }}"
        ) from exc
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise DataError(
                f"template {where} has field {{{name}}}; fields must be plain names such as "
                "{text} (no positional {} or attribute access); write literal braces as {{ }}"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt format with a variant for examples that have a context and one without."""

    name: str
    with_context: str
    without_context: str
    fields: tuple[str, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        names = list(_field_names(self.with_context, f"{self.name!r} (with_context)"))
        for n in _field_names(self.without_context, f"{self.name!r} (without_context)"):
            if n not in names:
                names.append(n)
        object.__setattr__(self, "fields", tuple(names))

    def required_fields(self, with_context: bool) -> tuple[str, ...]:
        """Fields the chosen variant needs."""
        fmt = self.with_context if with_context else self.without_context
        return _field_names(fmt, repr(self.name))

    def render(self, **fields: object) -> str:
        """Fill the template; a non-empty ``context`` field picks the with-context variant.

        Extra fields are ignored (loaders pass e.g. ``choices`` to every template); values
        of ``None`` render as empty strings.
        """
        has_context = bool(str(fields.get("context") or "").strip())
        fmt = self.with_context if has_context else self.without_context
        values = {k: "" if v is None else str(v) for k, v in fields.items()}
        for name in _field_names(fmt, repr(self.name)):
            if name not in values:
                given = ", ".join(sorted(values)) or "none"
                raise DataError(
                    f"template {self.name!r} needs field {name!r} but it was not given "
                    f"(given: {given}); map a column to {name!r}"
                )
        return fmt.format(**values)


ALPACA = PromptTemplate(
    name="alpaca",
    with_context=(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    ),
    without_context=(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
)

_SNLI = 'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'
SNLI = PromptTemplate(name="snli", with_context=_SNLI, without_context=_SNLI)

_CLASSIFY = "{text}\nQuestion: Which category fits best: {choices}?\nAnswer:\n"
CLASSIFY = PromptTemplate(name="classify", with_context=_CLASSIFY, without_context=_CLASSIFY)

TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (ALPACA, SNLI, CLASSIFY)}


def get_template(name_or_format: str) -> PromptTemplate:
    """A built-in template by name, or a custom one from a format string with {fields}.

    A custom format string serves both variants (with and without context).
    """
    key = name_or_format.strip().lower()
    if key in TEMPLATES:
        return TEMPLATES[key]
    if "{" in name_or_format:
        template = PromptTemplate("custom", name_or_format, name_or_format)
        if template.fields:
            return template
    known = ", ".join(sorted(TEMPLATES))
    raise DataError(
        f"unknown template {name_or_format!r}; use one of {known}, or a format string with "
        "named fields such as '{text}\\nAnswer:\\n'"
    )
