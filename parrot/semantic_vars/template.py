"""Prompt templates with Semantic Variable placeholders.

A template is plain text with placeholders ``{{input:NAME}}`` (filled by the
caller) and ``{{output:NAME}}`` (filled by the model). A placeholder may carry
options after bars, ``{{output:answer|max_tokens=32|stop=\\n}}``. Output
options (sampling, and the constraints ``choices=a,b,c`` and ``regex=...``,
which must come last as a regex may contain bars) are typed by
:mod:`parrot.semantic_vars.function`; input options are checked here, because
the runtime reads them from the template:

``{{input:notes|compress=0.3}}``
    compress the input's value before it is spliced into the prompt, keeping
    about 30% of its tokens (``compress=3x`` says the same as a ratio). The
    dataflow applies it when the call becomes ready; the variable's own value
    is left unchanged. The option belongs to the input, so every placeholder
    of that input is compressed alike.

Parsing is strict: every problem raises :class:`TemplateError` with the
character position, so a user sees where their prompt is wrong.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Literal, Mapping

from .errors import TemplateError

PlaceholderKind = Literal["input", "output"]
KINDS: tuple[PlaceholderKind, ...] = ("input", "output")

#: Options an ``{{input:...}}`` placeholder accepts.
INPUT_OPTIONS: tuple[str, ...] = ("compress",)
#: The option that takes the rest of a placeholder, bars included (so it
#: comes last): a regex, ``{{output:code|max_tokens=8|regex=[A-Z]{3}|none}}``.
#: Its value is kept verbatim (``\n`` stays a regex escape).
REST_OPTION = "regex"

_OPEN, _CLOSE = "{{", "}}"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Text:
    """Literal prompt text."""

    text: str


@dataclass(frozen=True)
class Placeholder:
    """An ``{{input:...}}`` or ``{{output:...}}`` hole at ``position``."""

    kind: PlaceholderKind
    name: str
    position: int
    options: Mapping[str, str] = field(default_factory=dict)


Segment = Text | Placeholder


def _unescape(value: str) -> str:
    # Option values may spell newlines and tabs the way users type them.
    return value.replace("\\n", "\n").replace("\\t", "\t")


def compress_rate(value: object) -> float:
    """A compression option as the fraction of tokens to keep, in (0, 1].

    Accepts a number (``0.3``) or a string: ``"0.3"``, ``"30%"`` or a ratio
    ``"3x"`` (keep a third). Raises ``ValueError`` saying what is expected.
    """
    expected = "expected the fraction of tokens to keep in (0, 1] (e.g. 0.3), a percentage (30%) or a ratio (3x)"
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a compression rate: {expected}")
    if isinstance(value, (int, float)):
        rate = float(value)
    elif isinstance(value, str):
        raw = value.strip().lower()
        unit = raw[-1:] if raw[-1:] in ("x", "%") else ""
        try:
            number = float(raw[: len(raw) - len(unit)])
        except ValueError:
            raise ValueError(f"{value!r} is not a number: {expected}") from None
        if unit == "x":
            if not (math.isfinite(number) and number >= 1.0):
                raise ValueError(f"the ratio {value!r} must be at least 1x: {expected}")
            rate = 1.0 / number
        else:
            rate = number / 100.0 if unit == "%" else number
    else:
        raise ValueError(f"{value!r} is not a compression rate: {expected}")
    if not (math.isfinite(rate) and 0.0 < rate <= 1.0):
        raise ValueError(f"{value!r} is out of range: {expected}")
    return rate


def _input_compression(p: Placeholder, source: str) -> float | None:
    """The ``compress`` option of an input placeholder, checked; ``None`` when absent."""
    for key in p.options:
        if key not in INPUT_OPTIONS:
            raise TemplateError(
                f"unknown option {key!r} for input {p.name!r}: inputs accept {', '.join(INPUT_OPTIONS)}",
                position=p.position,
                template=source,
            )
    raw = p.options.get("compress")
    if raw is None:
        return None
    try:
        return compress_rate(raw)
    except ValueError as exc:
        raise TemplateError(f"option compress of input {p.name!r}: {exc}", position=p.position, template=source) from None


def _parse_placeholder(body: str, position: int, source: str) -> Placeholder:
    parts = body.split("|")
    head = parts[0].strip()
    if ":" not in head:
        raise TemplateError(
            f"malformed placeholder {{{{{body}}}}}: expected {{{{input:NAME}}}} or {{{{output:NAME}}}}",
            position=position,
            template=source,
        )
    kind, _, name = (s.strip() for s in head.partition(":"))
    if kind not in KINDS:
        raise TemplateError(
            f"unknown placeholder kind {kind!r}: expected one of {', '.join(KINDS)}", position=position, template=source
        )
    if not _NAME.match(name):
        raise TemplateError(
            f"invalid variable name {name!r}: use letters, digits and underscores, not starting with a digit",
            position=position,
            template=source,
        )
    options: dict[str, str] = {}
    rest = parts[1:]
    for i, raw in enumerate(rest):
        if raw.lstrip().startswith(f"{REST_OPTION}="):
            # A regex may contain "|": it takes the rest of the placeholder.
            raw = "|".join(rest[i:])
            rest = rest[: i + 1]
        key, eq, value = raw.partition("=")
        key = key.strip()
        if not eq or not _NAME.match(key):
            raise TemplateError(
                f"malformed option {raw.strip()!r} in placeholder {name!r}: expected KEY=VALUE",
                position=position,
                template=source,
            )
        if key in options:
            raise TemplateError(f"option {key!r} given twice in placeholder {name!r}", position=position, template=source)
        options[key] = value if key == REST_OPTION else _unescape(value)
        if key == REST_OPTION:
            break
    return Placeholder(kind=kind, name=name, position=position, options=options)  # type: ignore[arg-type]


def parse_segments(source: str) -> list[Segment]:
    """Split ``source`` into text and placeholders, raising on malformed holes."""
    if not isinstance(source, str):
        raise TemplateError(f"a template must be a string, got {type(source).__name__}")
    segments: list[Segment] = []
    cursor = 0
    while True:
        start = source.find(_OPEN, cursor)
        if start < 0:
            break
        end = source.find(_CLOSE, start + len(_OPEN))
        if end < 0:
            raise TemplateError("unclosed placeholder: '{{' without a matching '}}'", position=start, template=source)
        body = source[start + len(_OPEN) : end]
        if _OPEN in body:
            raise TemplateError("unclosed placeholder: '{{' without a matching '}}'", position=start, template=source)
        if start > cursor:
            segments.append(Text(source[cursor:start]))
        segments.append(_parse_placeholder(body, start, source))
        cursor = end + len(_CLOSE)
    if cursor < len(source):
        segments.append(Text(source[cursor:]))
    return segments


class Template:
    """A parsed prompt template.

    >>> t = Template("Q: {{input:q}}\\nA: {{output:a}}")
    >>> t.inputs, t.outputs
    (('q',), ('a',))
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.segments: tuple[Segment, ...] = tuple(parse_segments(source))
        # dicts, not lists: membership stays O(1) for templates of 10,000 outputs
        inputs: dict[str, None] = {}
        outputs: dict[str, None] = {}
        compression: dict[str, float] = {}
        #: The first placeholder of each (kind, name), for :meth:`placeholder`.
        self._first: dict[tuple[str, str], Placeholder] = {}
        for seg in self.segments:
            if not isinstance(seg, Placeholder):
                continue
            self._first.setdefault((seg.kind, seg.name), seg)
            if seg.kind == "output":
                if seg.name in outputs:
                    raise TemplateError(f"duplicate output {seg.name!r}", position=seg.position, template=source)
                if seg.name in inputs:
                    raise TemplateError(
                        f"{seg.name!r} is used both as an input and as an output", position=seg.position, template=source
                    )
                outputs[seg.name] = None
            else:
                if seg.name in outputs:
                    raise TemplateError(
                        f"{seg.name!r} is used both as an input and as an output", position=seg.position, template=source
                    )
                inputs[seg.name] = None  # an input may be quoted twice
                rate = _input_compression(seg, source)
                if rate is not None:
                    if compression.get(seg.name, rate) != rate:
                        raise TemplateError(
                            f"input {seg.name!r} is given two different compress rates", position=seg.position, template=source
                        )
                    compression[seg.name] = rate
        if not outputs:
            raise TemplateError("the template has no {{output:NAME}} placeholder, so a call would produce nothing")
        self.inputs: tuple[str, ...] = tuple(inputs)
        self.outputs: tuple[str, ...] = tuple(outputs)
        #: Input name -> fraction of its tokens to keep (``compress=`` options).
        self.input_compression: Mapping[str, float] = compression

    @property
    def placeholders(self) -> list[Placeholder]:
        return [s for s in self.segments if isinstance(s, Placeholder)]

    def placeholder(self, kind: PlaceholderKind, name: str) -> Placeholder:
        """The first placeholder of ``kind`` named ``name``."""
        try:
            return self._first[(kind, name)]
        except KeyError:
            raise KeyError(f"no {kind} placeholder named {name!r}") from None

    @property
    def constant_prefix(self) -> str:
        """The literal text before the first placeholder: known at submit time,
        so calls that share it can share its KV cache."""
        first = self.segments[0] if self.segments else None
        return first.text if isinstance(first, Text) else ""

    @property
    def fingerprint(self) -> str:
        """A short stable hash of the source, for caches and registries."""
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def render(self, values: Mapping[str, str], *, missing: str = "{{{{{kind}:{name}}}}}") -> str:
        """The prompt with known values filled in and the rest left as holes."""
        out: list[str] = []
        for seg in self.segments:
            if isinstance(seg, Text):
                out.append(seg.text)
            elif seg.name in values:
                out.append(values[seg.name])
            else:
                out.append(missing.format(kind=seg.kind, name=seg.name))
        return "".join(out)

    def __repr__(self) -> str:
        return f"Template(inputs={self.inputs}, outputs={self.outputs})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)


@functools.lru_cache(maxsize=4096)
def parse_template(source: str) -> Template:
    """A parsed :class:`Template`, shared between calls of the same function
    (parsing is the largest part of adding a call to the graph)."""
    return Template(source)
