"""Checks on text that enters Parrot from users.

Python strings may hold lone surrogates (JSON's ``"\\ud800"`` decodes to one)
that no UTF-8 encoder, tokenizer or store accepts. Such text is refused where
it enters, naming the field, so it is never stored or half-applied.
"""

from __future__ import annotations

from typing import Mapping

from .errors import InvalidArgumentError


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode, or ``None`` when it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode: a lone surrogate {text[exc.start]!a} at character {exc.start}"
    return None


def check_unicode(field: str, text: str) -> str:
    """``text`` itself; raises :class:`InvalidArgumentError` naming ``field`` if
    it is not valid Unicode."""
    problem = unicode_problem(text)
    if problem is not None:
        raise InvalidArgumentError(field, problem)
    return text


def check_unicode_mapping(field: str, mapping: Mapping[str, str]) -> None:
    """Check every key and value of ``mapping``; a value's field is ``field.key``."""
    for name, text in mapping.items():
        check_unicode(field, name)
        check_unicode(f"{field}.{name}", text)
