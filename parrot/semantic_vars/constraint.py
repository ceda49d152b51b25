"""What shape an output must have: one of some strings, a regex, a JSON schema, a grammar.

A :class:`Constraint` is part of an output's :class:`~parrot.semantic_vars.sampling.SamplingConfig`
(its ``constraint`` field), so it travels wherever sampling options travel:
templates, the HTTP API, other processes and Ray actors (it pickles, and
``to_dict`` / ``from_dict`` round-trip it). Engines turn it into a token mask
per decoding step (:mod:`parrot.backends.constraints`); this module only
checks what can be checked without a tokenizer, so a bad constraint is a
:class:`ConstraintError` naming the field before anything is submitted.

Kinds and their ``spec``:

``choices``      a tuple of strings; the output is exactly one of them
``regex``        a regular expression the whole output matches
``json_schema``  a JSON schema (kept as compact JSON text, so it is hashable)
``json_object``  any JSON object (no spec)
``grammar``      an EBNF (GBNF-style) grammar whose ``root`` rule is the output
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from .errors import ConstraintError

ConstraintKind = Literal["choices", "regex", "json_schema", "json_object", "grammar"]
CONSTRAINT_KINDS: tuple[ConstraintKind, ...] = ("choices", "regex", "json_schema", "json_object", "grammar")

#: Bounds on what a tenant may ask an engine to compile.
MAX_CHOICES = 1024
MAX_SPEC_CHARS = 100_000


@dataclass(frozen=True)
class Constraint:
    """The shape one output must have (see the module docstring for the kinds).

    ``strict`` (JSON schemas only): objects may carry no properties the
    schema does not name (OpenAI's ``strict: true``); otherwise the schema's
    own ``additionalProperties`` decides.
    """

    kind: ConstraintKind
    spec: str | tuple[str, ...] | None = None
    strict: bool = True
    # Where a bad value came from, for the error. Not part of equality: two
    # equal constraints from different places share one compiled grammar.
    field: str = dataclasses.field(default="constraint", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ConstraintError(self.field, f"unknown constraint kind {self.kind!r}: expected one of {', '.join(CONSTRAINT_KINDS)}")
        where = f"{self.field}.{self.kind}"
        if self.kind == "choices":
            spec = self.spec
            if isinstance(spec, str) or not isinstance(spec, (list, tuple)):
                raise ConstraintError(where, f"must be a list of strings, got {type(spec).__name__}")
            if not spec or len(spec) > MAX_CHOICES:
                raise ConstraintError(where, f"give between 1 and {MAX_CHOICES} choices, got {len(spec)}")
            for i, choice in enumerate(spec):
                if not isinstance(choice, str) or not choice:
                    raise ConstraintError(f"{where}.{i}", f"a choice must be a non-empty string, got {choice!r}")
            if len(set(spec)) != len(spec):
                raise ConstraintError(where, "the choices must be distinct")
            object.__setattr__(self, "spec", tuple(spec))
        elif self.kind in ("regex", "grammar"):
            if not isinstance(self.spec, str) or not self.spec:
                raise ConstraintError(where, f"must be a non-empty string, got {self.spec!r}")
            if self.kind == "regex":
                try:
                    re.compile(self.spec)
                except re.error as exc:
                    raise ConstraintError(where, f"not a valid regular expression: {exc}") from None
            elif not re.search(r"^\s*root\s*::=", self.spec, re.MULTILINE):
                raise ConstraintError(where, "an EBNF grammar needs a rule 'root ::= ...'")
        elif self.kind == "json_schema":
            object.__setattr__(self, "spec", _schema_text(self.spec, where))
        elif self.spec is not None:
            raise ConstraintError(where, "takes no value")
        if isinstance(self.spec, str) and len(self.spec) > MAX_SPEC_CHARS:
            raise ConstraintError(where, f"is {len(self.spec)} characters; at most {MAX_SPEC_CHARS}")
        if not isinstance(self.strict, bool):
            raise ConstraintError(f"{self.field}.strict", f"must be true or false, got {self.strict!r}")

    # -- constructors -------------------------------------------------------
    @classmethod
    def choices(cls, options: Any, *, field: str = "constraint") -> "Constraint":
        return cls("choices", options, field=field)

    @classmethod
    def regex(cls, pattern: str, *, field: str = "constraint") -> "Constraint":
        return cls("regex", pattern, field=field)

    @classmethod
    def json_schema(cls, schema: Any, *, strict: bool = True, field: str = "constraint") -> "Constraint":
        """``schema``: a dict, its JSON text, or a pydantic model class."""
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        return cls("json_schema", schema, strict=strict, field=field)

    @classmethod
    def json_object(cls, *, field: str = "constraint") -> "Constraint":
        return cls("json_object", field=field)

    @classmethod
    def grammar(cls, ebnf: str, *, field: str = "constraint") -> "Constraint":
        return cls("grammar", ebnf, field=field)

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema as a dict (``json_schema`` constraints only)."""
        return json.loads(self.spec) if self.kind == "json_schema" else None  # type: ignore[arg-type]

    # -- wire form ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"choices": [...]}``, ``{"regex": "..."}``, ``{"json_schema": {...}, "strict": true}``,
        ``{"json_object": true}`` or ``{"grammar": "..."}``: the HTTP API's form."""
        if self.kind == "choices":
            return {"choices": list(self.spec)}  # type: ignore[arg-type]
        if self.kind == "json_schema":
            return {"json_schema": self.schema, "strict": self.strict}
        if self.kind == "json_object":
            return {"json_object": True}
        return {self.kind: self.spec}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, field: str = "constraint") -> "Constraint":
        """The inverse of :meth:`to_dict`; exactly one kind must be given."""
        if isinstance(d, Constraint):
            return d
        if not isinstance(d, Mapping):
            raise ConstraintError(field, f"must be an object with one of {', '.join(CONSTRAINT_KINDS)}, got {type(d).__name__}")
        given = [k for k in CONSTRAINT_KINDS if d.get(k) not in (None, False)]
        unknown = set(d) - set(CONSTRAINT_KINDS) - {"strict"}
        if unknown:
            raise ConstraintError(f"{field}.{sorted(unknown)[0]}", f"is not a constraint option (use one of {', '.join(CONSTRAINT_KINDS)})")
        if len(given) != 1:
            raise ConstraintError(field, f"give exactly one of {', '.join(CONSTRAINT_KINDS)}, got {given or 'none'}")
        kind = given[0]
        strict = d.get("strict", True)
        if kind == "json_object":
            return cls("json_object", field=field)
        return cls(kind, d[kind], strict=True if strict is None else strict, field=field)  # type: ignore[arg-type]


def _schema_text(schema: Any, where: str) -> str:
    """A JSON schema as compact JSON text, checked to be an object."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ConstraintError(where, f"not valid JSON: {exc}") from None
    if not isinstance(schema, Mapping):
        raise ConstraintError(where, f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        text = json.dumps(schema, separators=(",", ":"), allow_nan=False)  # key order kept: it is the output order
    except (TypeError, ValueError) as exc:
        raise ConstraintError(where, f"not JSON-serialisable: {exc}") from None
    try:  # a metaschema check where the (optional) jsonschema package is installed
        import jsonschema
    except ImportError:
        return text
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = ".".join(str(p) for p in exc.path)
        raise ConstraintError(f"{where}.{path}" if path else where, f"not a valid JSON schema: {exc.message}") from None
    return text
