"""Semantic functions: prompt templates that are called like Python functions.

Calling one does not run it. It submits a call to the current session's
runtime and returns the output :class:`SemanticVariable` handles at once;
passing those handles to other functions builds the dataflow graph.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import fields
from typing import Any, Callable, Mapping, Sequence, overload

from .constraint import Constraint
from .errors import ConstraintError, InvalidArgumentError, TemplateError
from .runtime import Call, FunctionSpec, new_id
from .sampling import SamplingConfig
from .template import Placeholder, Template, compress_rate
from .variable import SemanticVariable

_SAMPLING_FIELDS = {f.name for f in fields(SamplingConfig)}
_OPTION_PARSERS: dict[str, Callable[[str], Any]] = {
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "seed": int,
    "stop": lambda s: (s,),
    "logprobs": int,
    "frequency_penalty": float,
    "presence_penalty": float,
}
#: Template options that constrain an output: ``choices=a,b,c`` and ``regex=...``.
_CONSTRAINT_PARSERS: dict[str, Callable[[str], Constraint]] = {
    "choices": lambda s: Constraint.choices([c.strip() for c in s.split(",")], field="choices"),
    "regex": lambda s: Constraint.regex(s, field="regex"),
}


class Input:
    """Marks a parameter of a semantic function as an input placeholder."""


class Output:
    """Marks a parameter as an output placeholder; may carry sampling options.

    ``summary: P.Output`` uses the function's defaults;
    ``summary: P.Output(max_tokens=16, stop=["\\n"])`` overrides them.
    At most one constraint shapes the output: ``choices=[...]`` (exactly one
    of these strings), ``regex=...`` (the whole output matches it),
    ``schema=`` (a pydantic model class or a JSON schema dict: the output is
    JSON valid under it, read parsed with ``var.get_parsed()``) or
    ``grammar=`` (an EBNF grammar with a ``root`` rule).
    """

    def __init__(
        self,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        choices: Sequence[str] | None = None,
        regex: str | None = None,
        schema: Any = None,
        grammar: str | None = None,
    ) -> None:
        self.options: dict[str, Any] = {
            "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stop": stop, "seed": seed,
        }
        given = {k: v for k, v in (("choices", choices), ("regex", regex), ("schema", schema), ("grammar", grammar))
                 if v is not None}
        if len(given) > 1:
            raise ConstraintError("Output", f"give at most one of choices, regex, schema, grammar (got {', '.join(given)})")
        #: The pydantic model that ``get_parsed()`` validates into, if ``schema`` is one.
        self.model: type | None = schema if isinstance(schema, type) and hasattr(schema, "model_json_schema") else None
        if choices is not None:
            self.options["constraint"] = Constraint.choices(choices, field="Output")
        elif regex is not None:
            self.options["constraint"] = Constraint.regex(regex, field="Output")
        elif schema is not None:
            self.options["constraint"] = Constraint.json_schema(schema, field="Output")
        elif grammar is not None:
            self.options["constraint"] = Constraint.grammar(grammar, field="Output")


def _placeholder_sampling(p: Placeholder, source: str) -> dict[str, Any]:
    """Sampling options written in a template placeholder, typed."""
    out: dict[str, Any] = {}
    for key, raw in p.options.items():
        if key in _CONSTRAINT_PARSERS:
            if "constraint" in out:
                raise TemplateError(f"output {p.name!r} has two constraints; give one of choices, regex",
                                    position=p.position, template=source)
            try:
                out["constraint"] = _CONSTRAINT_PARSERS[key](raw)
            except ConstraintError as exc:
                raise TemplateError(f"option {key} of output {p.name!r}: {exc}", position=p.position, template=source) from None
            continue
        if key not in _OPTION_PARSERS:
            raise TemplateError(f"unknown option {key!r} for output {p.name!r}", position=p.position, template=source)
        try:
            out[key] = _OPTION_PARSERS[key](raw)
        except ValueError:
            raise TemplateError(
                f"option {key}={raw!r} of output {p.name!r} is not a valid {key}", position=p.position, template=source
            ) from None
    return out


def _function_compression(template: Template, compress: Mapping[str, Any] | None) -> dict[str, float]:
    """The ``compress=`` option of a function, checked against its inputs,
    merged under the template's own options (the template is more specific)."""
    if compress is None:
        compress = {}
    if not isinstance(compress, Mapping):
        raise InvalidArgumentError("compress", f"must map input names to rates, got {type(compress).__name__}")
    rates: dict[str, float] = {}
    for name, value in compress.items():
        if name not in template.inputs:
            known = ", ".join(template.inputs) or "none"
            raise InvalidArgumentError(f"compress.{name}", f"the template has no input {name!r} (inputs: {known})")
        try:
            rates[name] = compress_rate(value)
        except ValueError as exc:
            raise InvalidArgumentError(f"compress.{name}", str(exc)) from None
    return {**rates, **template.input_compression}


CHAT_ROLES = ("system", "user", "assistant")


def _chat_history(history: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Earlier chat turns as ``(role, content)`` pairs, checked."""
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(history):
        try:
            role, content = turn
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"history.{i}", "a turn is a (role, content) pair") from None
        if role not in CHAT_ROLES:
            raise InvalidArgumentError(f"history.{i}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidArgumentError(f"history.{i}.content", f"must be a string, got {type(content).__name__}")
        turns.append((role, content))
    return tuple(turns)


class SemanticFunction:
    """A prompt template with typed inputs and outputs.

    Construct it with :func:`semantic_function` on a Python stub whose
    docstring is the template, or directly from a template string.
    ``compress`` maps input names to the fraction of their tokens to keep
    (see :func:`~parrot.semantic_vars.template.compress_rate`), like a
    ``{{input:x|compress=0.3}}`` option in the template, which wins.

    ``chat=True`` (implied by ``system`` or ``history``) makes a call a chat
    exchange, rendered with the model's own chat template: ``system`` is the
    system message, ``history`` earlier ``(role, content)`` turns, the
    template up to its first output is the user's turn and the outputs (with
    any text between them) are the assistant's answer.
    """

    def __init__(
        self,
        template: str,
        *,
        name: str = "semantic_function",
        input_order: Sequence[str] | None = None,
        defaults: SamplingConfig | None = None,
        output_options: Mapping[str, Mapping[str, Any]] | None = None,
        compress: Mapping[str, float | str] | None = None,
        output_models: Mapping[str, type] | None = None,
        chat: bool = False,
        system: str | None = None,
        history: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.name = name
        #: Output name -> the pydantic model ``get_parsed()`` validates into.
        self.output_models: Mapping[str, type] = dict(output_models or {})
        chat_turns = _chat_history(history)
        if system is not None and not isinstance(system, str):
            raise InvalidArgumentError("system", f"must be a string, got {type(system).__name__}")
        self.template = Template(template)  # input options are checked by the parser
        self.input_compression: Mapping[str, float] = _function_compression(self.template, compress)
        self.input_names: tuple[str, ...] = tuple(input_order) if input_order is not None else self.template.inputs
        defaults = defaults or SamplingConfig()
        output_options = output_options or {}
        sampling: dict[str, SamplingConfig] = {}
        for out_name in self.template.outputs:
            # Most specific wins: function defaults < Output(...) annotation < template options.
            placeholder = self.template.placeholder("output", out_name)
            options = {**dict(output_options.get(out_name, {})), **_placeholder_sampling(placeholder, template)}
            sampling[out_name] = defaults.merged(**options)
        self.output_sampling: Mapping[str, SamplingConfig] = sampling
        self.spec = FunctionSpec(
            name=name, template=template, output_sampling=sampling, input_compression=self.input_compression,
            chat=bool(chat or system or chat_turns), system=system or None, history=chat_turns,
        )

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.template.outputs

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if len(args) > len(self.input_names):
            raise TypeError(f"{self.name}() takes {len(self.input_names)} inputs but {len(args)} were given")
        bound = dict(zip(self.input_names, args))
        for key, value in kwargs.items():
            if key in self.output_names:
                raise TypeError(f"{self.name}(): {key!r} is an output; it is returned, not passed")
            if key not in self.input_names:
                raise TypeError(f"{self.name}() got an unexpected input {key!r}")
            if key in bound:
                raise TypeError(f"{self.name}() got input {key!r} twice")
            bound[key] = value
        missing = [n for n in self.input_names if n not in bound]
        if missing:
            raise TypeError(f"{self.name}() is missing input(s): {', '.join(missing)}")
        return bound

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Submit a call in the current session; returns the output variable
        (or a tuple of them, in template order, when there are several)."""
        from .session import current_session

        session = current_session()
        bound = self._bind(args, kwargs)
        inputs: dict[str, str] = {}
        constants: dict[str, str] = {}
        for key, value in bound.items():
            if isinstance(value, SemanticVariable):
                if value.session.runtime is not session.runtime:
                    raise ValueError(f"{self.name}(): input {key!r} belongs to a session of another runtime")
                if session.runtime.request_level:
                    # The request-level baseline: the client waits for each
                    # input and sends its text, one round trip per dependency.
                    constants[key] = value.get()
                else:
                    inputs[key] = value.id
            elif isinstance(value, str):
                constants[key] = value
            else:
                raise TypeError(
                    f"{self.name}(): input {key!r} must be a str or a SemanticVariable, got {type(value).__name__}"
                )
        call_id = new_id("call")
        outputs = {name: new_id("var") for name in self.output_names}
        session.submit(Call(call_id=call_id, function=self.spec, inputs=inputs, constants=constants, outputs=outputs))
        handles = tuple(
            SemanticVariable(session, outputs[n], n, producer=call_id, parse=self._parser(n)) for n in self.output_names
        )
        return handles[0] if len(handles) == 1 else handles

    def _parser(self, name: str) -> Callable[[str], Any] | None:
        """How ``get_parsed()`` reads output ``name``: into its pydantic model,
        as JSON for a JSON constraint, else not at all (None)."""
        model = self.output_models.get(name)
        if model is not None:
            return model.model_validate_json  # type: ignore[attr-defined]
        constraint = self.output_sampling[name].constraint
        if constraint is not None and constraint.kind in ("json_schema", "json_object"):
            return json.loads
        return None

    def __repr__(self) -> str:
        return f"SemanticFunction({self.name!r}, inputs={self.input_names}, outputs={self.output_names})"


def _from_stub(
    fn: Callable[..., Any], defaults: SamplingConfig, compress: Mapping[str, float | str] | None = None,
    **chat: Any,
) -> SemanticFunction:
    doc = inspect.getdoc(fn)
    if not doc:
        raise TemplateError(f"semantic function {fn.__name__!r} has no docstring: the docstring is its prompt template")
    template = Template(doc)
    inputs: list[str] = []
    output_options: dict[str, Mapping[str, Any]] = {}
    output_models: dict[str, type] = {}
    # eval_str: modules with `from __future__ import annotations` keep them as strings.
    for param in inspect.signature(fn, eval_str=True).parameters.values():
        ann = param.annotation
        if ann is Input or isinstance(ann, Input):
            kind = "input"
            inputs.append(param.name)
        elif ann is Output or isinstance(ann, Output):
            kind = "output"
            output_options[param.name] = ann.options if isinstance(ann, Output) else {}
            if isinstance(ann, Output) and ann.model is not None:
                output_models[param.name] = ann.model
        else:
            raise TypeError(f"{fn.__name__}(): parameter {param.name!r} must be annotated with P.Input or P.Output")
        names = template.inputs if kind == "input" else template.outputs
        if param.name not in names:
            raise TemplateError(
                f"{fn.__name__}(): {kind} parameter {param.name!r} does not appear as {{{{{kind}:{param.name}}}}} in the template"
            )
    for kind, names, declared in (("input", template.inputs, inputs), ("output", template.outputs, output_options)):
        for name in names:
            if name not in declared:
                p = template.placeholder(kind, name)  # type: ignore[arg-type]
                raise TemplateError(
                    f"the template uses {kind} {name!r} but {fn.__name__}() has no such {kind} parameter",
                    position=p.position,
                    template=doc,
                )
    return SemanticFunction(
        doc, name=fn.__name__, input_order=inputs, defaults=defaults, output_options=output_options, compress=compress,
        output_models=output_models, **chat,
    )


@overload
def semantic_function(fn: Callable[..., Any], /) -> SemanticFunction: ...
@overload
def semantic_function(
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: Sequence[str] | str | None = None,
    seed: int | None = None,
    compress: Mapping[str, float | str] | None = None,
    chat: bool = False,
    system: str | None = None,
) -> Callable[[Callable[..., Any]], SemanticFunction]: ...


def semantic_function(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: Sequence[str] | str | None = None,
    seed: int | None = None,
    compress: Mapping[str, float | str] | None = None,
    chat: bool = False,
    system: str | None = None,
) -> Any:
    """Declare a semantic function from a stub whose docstring is its template.

    The sampling keywords are the defaults for every output; an
    ``P.Output(...)`` annotation or options in the placeholder override them.
    ``compress={"notes": 0.3}`` compresses input ``notes`` to about 30% of
    its tokens before it reaches the prompt (as ``{{input:notes|compress=0.3}}``).
    ``chat=True`` or ``system="..."`` declares a chat exchange (see
    :class:`SemanticFunction`): the docstring is the user's turn up to the
    first output, rendered with the model's chat template.
    """
    defaults = SamplingConfig().merged(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
    if fn is not None:
        return _from_stub(fn, defaults, compress, chat=chat, system=system)
    return lambda f: _from_stub(f, defaults, compress, chat=chat, system=system)
