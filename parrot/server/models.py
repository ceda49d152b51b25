"""Request and response bodies of the HTTP API (pydantic).

Every request model forbids unknown fields, so a typo is a 422 naming the
field rather than a silently ignored option, and is strict about types
(``"10"`` is not an integer, ``true`` is not a number). :class:`SamplingBody`
is derived from :class:`parrot.semantic_vars.SamplingConfig`'s fields, the one
place sampling options and their bounds are defined.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from parrot.semantic_vars.constraint import MAX_CHOICES, MAX_SPEC_CHARS
from parrot.semantic_vars.runtime import Perf  # noqa: F401  (the routes' query type: one objective type)
from parrot.semantic_vars.sampling import SamplingConfig
from parrot.semantic_vars.validation import unicode_problem


def _valid_unicode(text: str) -> str:
    problem = unicode_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


#: A string from a request body; lone surrogates are a 422 naming the field.
UserText = Annotated[str, AfterValidator(_valid_unicode)]

ID = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    type: str = Field(description="the error's class, e.g. TemplateError, QuotaExceeded")
    message: str
    field: str | None = Field(default=None, description="the request field at fault, dotted")
    position: int | None = Field(default=None, description="character offset in a template")


class ErrorBody(BaseModel):
    error: ErrorDetail


class ConstraintBody(Strict):
    """The shape an output must have: exactly one of the fields (see
    :class:`parrot.semantic_vars.Constraint`)."""

    choices: list[UserText] | None = Field(default=None, min_length=1, max_length=MAX_CHOICES, description="one of these strings")
    regex: UserText | None = Field(default=None, min_length=1, max_length=MAX_SPEC_CHARS, description="the whole output matches it")
    json_schema: dict[str, Any] | None = Field(default=None, description="JSON valid under this schema")
    json_object: bool | None = Field(default=None, description="true: any JSON object")
    grammar: UserText | None = Field(default=None, min_length=1, max_length=MAX_SPEC_CHARS, description="EBNF with a root rule")
    strict: bool | None = Field(default=None, description="json_schema: no properties beyond the schema's (default true)")


#: How a sampling option travels in JSON where that differs from its Python
#: type (the rest keep theirs: ints, floats, optional ints).
_SAMPLING_WIRE: dict[str, Any] = {
    "stop": list[UserText],
    "constraint": ConstraintBody,
    "logit_bias": dict[str, float],
}


def _sampling_body() -> type[Strict]:
    """The HTTP model of :class:`SamplingConfig`: every option optional (None:
    the default), with the bounds and descriptions its fields declare."""
    hints = get_type_hints(SamplingConfig)
    options: dict[str, Any] = {}
    for f in dataclasses.fields(SamplingConfig):
        wire = _SAMPLING_WIRE.get(f.name, hints[f.name])
        options[f.name] = (wire | None, Field(default=None, **f.metadata))
    model = create_model("SamplingBody", __base__=Strict, __module__=__name__, **options)
    model.__doc__ = "Sampling options of an output (see parrot.semantic_vars.SamplingConfig); omitted: the default."
    return model


SamplingBody = _sampling_body()


class FunctionBody(Strict):
    name: UserText = Field(default="function", min_length=1, max_length=128)
    template: UserText = Field(min_length=1, max_length=1_000_000)
    sampling: SamplingBody = Field(default_factory=SamplingBody, description="defaults for every output")
    output_sampling: dict[UserText, SamplingBody] = Field(default_factory=dict, description="per-output overrides")
    compress: dict[UserText, float | UserText] = Field(
        default_factory=dict,
        description="input name -> fraction of its tokens to keep, in (0, 1] (or '30%', '3x'); "
        "like {{input:NAME|compress=0.3}} in the template, which wins",
    )
    chat: bool = Field(default=False, description="a chat exchange rendered with the model's chat template: "
                       "the template up to its first output is the user's turn, the outputs the assistant's")
    system: str | None = Field(default=None, max_length=1_000_000, description="the system message (implies chat)")
    history: list[tuple[str, str]] = Field(default_factory=list, max_length=10_000,
                                           description="earlier chat turns as [role, content] pairs (implies chat)")


class FunctionCreated(BaseModel):
    function_id: str
    name: str
    inputs: list[str]
    outputs: list[str]


class SessionInfo(BaseModel):
    session_id: str
    open: bool
    calls: int


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class SessionClosed(BaseModel):
    session_id: str
    closed: bool = True


class VariableCreate(Strict):
    var_id: str | None = ID
    name: UserText = Field(default="var", min_length=1, max_length=128)
    value: UserText | None = None


class VariableSet(Strict):
    value: UserText


class VariableRef(BaseModel):
    var_id: str


class VariableState(BaseModel):
    var_id: str
    name: str
    ready: bool
    value: str | None = None
    error: str | None = None


class CallBody(Strict):
    call_id: str | None = ID
    function: FunctionBody | None = None
    function_id: UserText | None = None
    inputs: dict[UserText, UserText] = Field(default_factory=dict, description="input name -> variable id")
    constants: dict[UserText, UserText] = Field(default_factory=dict, description="input name -> text")
    outputs: dict[UserText, UserText] | None = Field(default=None, description="output name -> variable id (new ids if omitted)")


class CallsSubmit(Strict):
    calls: list[CallBody] = Field(min_length=1, max_length=10_000)


class CallSubmitted(BaseModel):
    call_id: str
    outputs: dict[str, str]


class CallsSubmitted(BaseModel):
    calls: list[CallSubmitted]


class SessionOpen(Strict):
    calls: list[CallBody] = Field(
        default_factory=list, max_length=10_000,
        description="calls to submit with the open, in the same request (all or none)",
    )


class SessionCreated(BaseModel):
    session_id: str
    calls: list[CallSubmitted] = Field(default_factory=list, description="the calls submitted with the open")


class TenantCreate(Strict):
    name: UserText = Field(min_length=1, max_length=128)
    max_concurrent_calls: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    max_prompt_tokens: int | None = Field(default=None, ge=1)


class TenantCreated(BaseModel):
    tenant_id: str
    name: str
    api_key: str = Field(description="shown once; only its hash is stored")


class KeyCreated(BaseModel):
    tenant_id: str
    api_key: str
