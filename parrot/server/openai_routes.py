"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (streaming or not).

Every request is one Parrot call in a session of its own, submitted through
:meth:`ParrotService.submit_calls`, so API keys, quotas, prompt-size limits,
the scheduler and prefix sharing are the same as on the native API. User
text never becomes template text (it may contain ``{{``, or control tokens
such as ``<|system|>`` or ``</s>``): it travels in constant inputs, which are
tokenized as plain text. A completion's function is
``{{input:prompt}}{{output:completion}}``. A chat request that ends with a
user turn is a chat call: the served model's own chat template frames the
earlier messages and the last user message (see ``Tokenizer.chat_frame``).
Any other conversation gets the chat template applied to all its messages:
its markup (with its control tokens) becomes the template's text and each
message's content a constant.

``n`` choices are ``n`` calls of the same prompt (they share its prefix
boundary, so the engine prefills it once for all of them); structured outputs
(``response_format``, ``tools``), ``logprobs`` and
``usage.prompt_tokens_details.cached_tokens`` are described in
:mod:`parrot.server.openai_structured`.

Errors keep Parrot's body, ``{"error": {"type", "message", "field",
"position"}}``, which OpenAI's clients read (``error.message``) unchanged.
Options that Parrot cannot honour (``suffix``, ``best_of``, audio, ...)
are answered 422 naming the field; harmless bookkeeping fields (``user``,
``metadata``, ``store``, ...) are accepted and ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from parrot.dataflow.graph import FINAL_STATES
from parrot.dataflow.program import prompt_token_count
from parrot.semantic_vars import (
    CallFailedError,
    ContextLengthError,
    FunctionSpec,
    InvalidArgumentError,
    ParrotError,
    SamplingConfig,
    UnknownVariableError,
    new_id,
)
from parrot.semantic_vars.sampling import LOGIT_BIAS_MAX, MAX_LOGPROBS, MAX_TOKENS_LIMIT, PENALTY_MAX
from parrot.backends import constraints as grammar
from parrot.semantic_vars import Constraint

from . import openai_structured as structured
from .deps import ERRORS, service_of, tenant_of
from .disconnect import unless_disconnected
from .errors import error_body
from .models import CallBody, FunctionBody, SamplingBody, UserText
from .service import ParrotService
from .tenancy import Tenant

log = logging.getLogger(__name__)
#: The function names of the calls these routes make (their metrics label).
COMPLETION_FUNCTION = "openai.completion"
CHAT_FUNCTION = "openai.chat"

OUTPUT = "{{output:completion}}"
MAX_CHOICES = 16  # most choices (``n``) one request may ask for
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on completions' ``logprobs``
#: When the models were "created", as OpenAI's model objects say: this process's start.
STARTED = int(time.time())

TenantDep = Annotated[Tenant, Depends(tenant_of)]
ServiceDep = Annotated[ParrotService, Depends(service_of)]

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERRORS)


class ModelNotFoundError(UnknownVariableError):
    """The request names a model this server does not serve (404)."""


# -- request bodies -------------------------------------------------------------
class _Body(BaseModel):
    # Unknown fields are a 422 naming them: an option we do not know is an
    # option we cannot honour. Known ones we cannot honour are checked below.
    # Strict types: "10" is not an integer. Sampling ranges are checked by
    # SamplingConfig, the one place they are defined.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class _Sampling(_Body):
    model: UserText = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, description="default 1 (OpenAI's default); 0 is greedy")
    top_p: float | None = None
    stop: UserText | list[UserText] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, description=f"1 to {MAX_CHOICES} choices")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, description=f"{-PENALTY_MAX:g} to {PENALTY_MAX:g}")
    presence_penalty: float | None = Field(default=None, description=f"{-PENALTY_MAX:g} to {PENALTY_MAX:g}")
    logit_bias: dict[str, float] | None = Field(
        default=None, description=f"token id -> bias in [{-LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}]"
    )
    user: UserText | None = Field(default=None, description="accepted, ignored")
    ignore_eos: bool | None = Field(default=None, description="vLLM's extension: generate past end-of-sequence "
                                    "(exactly max_tokens unless a stop string ends it)")


class CompletionRequest(_Sampling):
    prompt: UserText | list[UserText] | list[int] | list[list[int]] = Field(description="one string (or a list of one)")
    echo: bool | None = False
    suffix: str | None = Field(default=None, description="not supported")
    best_of: int | None = Field(default=None, description="only 1")
    logprobs: int | None = Field(default=None, description=f"0 to {MAX_COMPLETION_LOGPROBS} alternatives per token")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: UserText
    text: UserText | None = None


class ChatMessage(_Body):
    role: UserText
    content: UserText | list[ContentPart] | None = None
    name: UserText | None = Field(default=None, description="accepted, ignored")
    # What a client echoes back when it appends a response message to its history.
    refusal: Any = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None
    tool_calls: Any = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, description="wins over max_tokens")
    logprobs: bool | None = Field(default=None, description="per-token logprobs of the output")
    top_logprobs: int | None = Field(default=None, description=f"0 to {MAX_LOGPROBS} alternatives per token (needs logprobs)")
    response_format: dict[str, Any] | None = Field(default=None, description="text, json_object or json_schema")
    tools: list[Any] | None = Field(default=None, description="function tools")
    tool_choice: Any = Field(default=None, description='"none", "auto", "required" or a named function')
    functions: list[Any] | None = Field(default=None, description="not supported")
    function_call: Any = Field(default=None, description='only "none"')
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = Field(default=None, description='only ["text"]')
    audio: Any = Field(default=None, description="not supported")
    prediction: Any = Field(default=None, description="not supported")
    web_search_options: Any = Field(default=None, description="not supported")
    # Bookkeeping and hints with no effect on the text: accepted, ignored.
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None


def _unsupported(name: str, value: Any, ok: Callable[[Any], bool], why: str) -> None:
    if value is not None and not ok(value):
        raise InvalidArgumentError(name, f"{why} (got {value!r})")


def _check_common(body: _Sampling) -> None:
    _unsupported("n", body.n, lambda v: 1 <= v <= MAX_CHOICES, f"n must be between 1 and {MAX_CHOICES}")
    # Penalties and logit_bias are checked by SamplingConfig (field named).


@dataclass(frozen=True)
class Prompt:
    """What a request asks the model to continue: ``template`` (a Parrot
    template up to the output; its text is read with control tokens) and the
    user text it splices in, by input name (read as plain text)."""

    template: str
    constants: dict[str, str]
    # A chat call's earlier turns ((role, content) pairs), framed with the
    # user's turn by the model's chat template; None: a plain prompt.
    history: tuple[tuple[str, str], ...] | None = None

    @classmethod
    def of_text(cls, text: str, history: tuple[tuple[str, str], ...] | None = None) -> "Prompt":
        """A prompt that is all user text (a completion's, or a chat call's last user turn)."""
        return cls("{{input:prompt}}", {"prompt": text}, history)

    def function(self, name: str) -> FunctionSpec:
        """The call's function (default sampling)."""
        return FunctionSpec(name, self.template + OUTPUT, {"completion": SamplingConfig()},
                            chat=self.history is not None, history=self.history or ())


# -- the served model ---------------------------------------------------------
def served_models(service: ParrotService) -> list[str]:
    """Ids of the models the engines serve: each model folder's name."""
    ids: list[str] = []
    for engine in service.runtime.engines:
        name = engine.model_id
        if name not in ids:
            ids.append(name)
    return ids


def _check_model(service: ParrotService, model: str) -> None:
    served = served_models(service)
    if model not in served:
        raise ModelNotFoundError(f"model {model!r} is not served here; available: {', '.join(served)}", field="model")


def _context_limit(service: ParrotService) -> int | None:
    known = [e.max_model_len for e in service.runtime.engines if e.max_model_len is not None]
    return min(known) if known else None


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """``messages`` as plain ``{"role", "content"}`` dicts, checked (422 naming the field)."""
    plain: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        where = f"messages.{i}"
        for name in ("tool_calls", "function_call", "audio"):
            if getattr(msg, name):
                raise InvalidArgumentError(f"{where}.{name}", "tool calls and audio are not supported")
        if msg.tool_call_id is not None or msg.role in ("tool", "function"):
            raise InvalidArgumentError(f"{where}.role", f"role {msg.role!r} is not supported (no tool calls)")
        if isinstance(msg.content, list):
            texts = []
            for j, part in enumerate(msg.content):
                if part.type != "text" or part.text is None:
                    raise InvalidArgumentError(f"{where}.content.{j}.type", f"only text parts are supported, got {part.type!r}")
                texts.append(part.text)
            content = "".join(texts)
        elif msg.content is None:
            raise InvalidArgumentError(f"{where}.content", "a message needs text content")
        else:
            content = msg.content
        role = "system" if msg.role == "developer" else msg.role  # OpenAI's newer name for system
        plain.append({"role": role, "content": content})
    return plain


def chat_prompt(service: ParrotService, plain: list[dict[str, str]]) -> Prompt:
    """The model's chat template applied to ``plain`` messages, ready to
    prompt with (for a conversation that does not end with a user turn): the
    template's markup is the prompt's text, each message's content a constant
    (user text: its ``<|system|>`` or ``</s>`` are plain characters)."""
    marker = f"\x00{new_id('content')}:"  # a string no message holds; a template passes it through
    contents = [msg["content"] for msg in plain]
    marked = [{"role": msg["role"], "content": f"{marker}{i}\x00"} for i, msg in enumerate(plain)]
    try:
        text = service.runtime.tokenizer.chat_prompt(marked)
    except ValueError as exc:
        raise InvalidArgumentError("messages", str(exc)) from exc
    return _split_markers(text, marker, contents)


def _split_markers(text: str, marker: str, contents: list[str]) -> Prompt:
    """``text`` with each ``marker + i + NUL`` replaced by an input bound to
    ``contents[i]``; markup holding braces is passed as a constant too (a
    template cannot spell ``{{``)."""
    pieces = text.split(marker)
    template: list[str] = []
    constants: dict[str, str] = {}

    def markup(piece: str) -> None:
        if "{" in piece or "}" in piece:
            name = f"markup{len(constants)}"
            constants[name] = piece
            template.append(f"{{{{input:{name}}}}}")
        elif piece:
            template.append(piece)

    markup(pieces[0])
    for piece in pieces[1:]:
        index, nul, rest = piece.partition("\x00")
        if not nul or not index.isdigit() or int(index) >= len(contents):
            raise InvalidArgumentError("messages", "the model's chat template changed the message content")
        name = f"message{index}"
        if name in constants:
            raise InvalidArgumentError("messages", "the model's chat template repeats a message")
        constants[name] = contents[int(index)]
        template.append(f"{{{{input:{name}}}}}")
        markup(rest)
    return Prompt("".join(template), constants)


def _sampling(service: ParrotService, tenant: Tenant, body: _Sampling, prompt: Prompt, prompt_field: str,
              max_tokens: int | None, default_max_tokens: int | None, constraint: Constraint | None = None,
              logprobs: int | None = None) -> SamplingBody:
    """Validated sampling options for ``prompt`` (422 naming the field otherwise).

    Without ``max_tokens`` (and no ``default_max_tokens``) a request may use
    the rest of the model's context, but no more than its tenant's
    ``tokens_per_minute`` leaves after the prompt: the quota reserves this
    worst case."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    # Counted as the engine will get it (chat frame, BOS and all).
    n_prompt = prompt_token_count(prompt.function("count"), prompt.constants, service.runtime.tokenizer)
    limit = _context_limit(service)
    if limit is not None:
        if n_prompt >= limit:
            raise ContextLengthError(prompt_field, f"the prompt has {n_prompt} tokens; the model has {limit} positions")
        if max_tokens is None and default_max_tokens is None:
            default_max_tokens = min(limit - n_prompt, MAX_TOKENS_LIMIT)
            per_minute = tenant.quotas.tokens_per_minute
            if per_minute is not None:
                default_max_tokens = max(1, min(default_max_tokens, per_minute - n_prompt))
        if max_tokens is not None and n_prompt + max_tokens > limit:
            raise ContextLengthError(
                "max_tokens",
                f"the prompt has {n_prompt} tokens and max_tokens is {max_tokens}; the model has {limit} positions",
            )
    options = {
        "max_tokens": max_tokens if max_tokens is not None else default_max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "stop": stop,
        "seed": body.seed,
        "constraint": constraint,
        "logprobs": logprobs,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
        "logit_bias": _logit_bias(service, body.logit_bias),
        "ignore_eos": body.ignore_eos,
    }
    options = {k: v for k, v in options.items() if v is not None}
    config = SamplingConfig().merged(**options)  # SamplingConfigError names the field
    try:
        return SamplingBody(**{k: v for k, v in config.to_dict().items() if k in SamplingBody.model_fields})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidArgumentError(".".join(str(p) for p in first["loc"]) or "sampling", first["msg"]) from exc


def _logit_bias(service: ParrotService, bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token id strings) as ids of the served vocabulary."""
    if not bias:
        return None
    size = service.runtime.tokenizer.vocab_size or 1 << 31
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= size:
            raise InvalidArgumentError(f"logit_bias.{key}", f"not a token id of the served model (0 to {size - 1})")
        out[int(key)] = value
    return out


# -- one call -------------------------------------------------------------------
@dataclass
class CallRun:
    """One OpenAI request running as one Parrot call in its own session."""

    service: ParrotService
    tenant: Tenant
    session_id: str
    call_id: str
    var_id: str
    max_tokens: int
    queue: asyncio.Queue[dict[str, Any]]
    unsubscribe: Callable[[], None]
    finished: bool = False
    value: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    streamed: list[str] = field(default_factory=list)
    cached_tokens: int = 0
    closed: bool = False
    logprobs: tuple[Any, ...] | None = None  # the engine's TokenLogprob entries, when asked

    async def deltas(self) -> AsyncIterator[str]:
        """Text pieces of the output as they are generated; at the end the
        whole output has been yielded and the usage figures are set. Raises
        :class:`CallFailedError` if the call failed."""
        sent = 0
        while True:
            event = await self.queue.get()
            if event["type"] == "token":
                sent += len(event["text"])
                yield event["text"]
                continue
            call = self.service.runtime.call(self.call_id)
            assert call is not None  # its session stays open (and the call known) until close()
            if call.state != "done":
                raise CallFailedError(f"the call {call.state}: {call.error}")
            var = self.service.runtime.variable(self.var_id)
            assert var is not None
            self.value = var.value or ""
            if len(self.value) > sent:  # whatever the token events did not carry
                yield self.value[sent:]
            self.prompt_tokens = call.prefill_tokens + call.cached_tokens
            self.completion_tokens = call.generated_tokens
            self.cached_tokens = call.cached_tokens
            self.logprobs = call.logprobs.get("completion")
            # The engine says why the output ended; "length" (max_tokens or the
            # context limit) stays "length", an end-of-sequence token or a stop
            # string is "stop". An output released before a restart has no
            # recorded reason; it is judged by the budget.
            name = next((n for n, v in call.outputs.items() if v == self.var_id), None)
            reason = call.finish_reasons.get(name or "")
            if reason is None:
                reason = "length" if call.generated_tokens >= self.max_tokens else "stop"
            self.finish_reason = "length" if reason == "length" else "stop"
            self.finished = True
            return

    async def close(self) -> None:
        """Close the session (once); cancels the call if it did not finish."""
        if self.closed:
            return
        self.closed = True
        self.unsubscribe()
        try:
            await self.service.close_session(self.tenant, self.session_id, cancel=not self.finished)
        except ParrotError:
            log.exception("could not close session %s", self.session_id)

    def usage(self) -> dict[str, Any]:
        return usage([self])


def usage(runs: list[CallRun]) -> dict[str, Any]:
    """The usage of a request's choices: the prompt counted once (as OpenAI
    does for ``n``), its cached part as the first choice's engine found it."""
    first = runs[0]
    completion = sum(r.completion_tokens for r in runs)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}


async def start_call(service: ParrotService, tenant: Tenant, prompt: Prompt, sampling: SamplingBody, name: str) -> CallRun:
    """Open a session for ``tenant`` and submit one call generating after ``prompt``."""
    public_call, public_var = new_id("call"), new_id("var")
    # The graph and its events name them in the tenant's id namespace.
    call_id, var_id = service.internal_id(tenant, public_call), service.internal_id(tenant, public_var)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def listener(event: dict[str, Any]) -> None:
        if event["type"] == "token" and event.get("var_id") == var_id:
            queue.put_nowait(event)
        elif event["type"] == "call_state" and event.get("call_id") == call_id and event["state"] in FINAL_STATES:
            queue.put_nowait(event)

    session_id = await service.open_session(tenant, ephemeral=True)  # no one waits for it after a restart
    run = CallRun(service, tenant, session_id, call_id, var_id, sampling.max_tokens or SamplingConfig().max_tokens,
                  queue, service.runtime.subscribe(listener))
    try:
        body = CallBody(
            call_id=public_call,
            function=FunctionBody(name=name, template=prompt.template + OUTPUT, sampling=sampling,
                                  chat=prompt.history is not None, history=list(prompt.history or ())),
            constants=prompt.constants,
            outputs={"completion": public_var},
        )
        # No objective: one request says nothing about the application it
        # belongs to, so the engine admits it after latency-critical calls
        # and before throughput work, first come first served.
        await service.submit_calls(tenant, session_id, [body])
    except BaseException:
        await run.close()
        raise
    return run


async def start_calls(service: ParrotService, tenant: Tenant, prompt: Prompt, sampling: SamplingBody, name: str,
                      n: int) -> list[CallRun]:
    """``n`` calls of the same prompt (choice ``i`` samples with ``seed + i``
    when a seed is given, so choices differ yet reproduce)."""
    runs: list[CallRun] = []
    try:
        for i in range(n):
            one = sampling if i == 0 or sampling.seed is None else sampling.model_copy(update={"seed": sampling.seed + i})
            runs.append(await start_call(service, tenant, prompt, one, name))
    except BaseException:
        for run in runs:
            await run.close()
        raise
    return runs


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _merged(runs: list[CallRun]) -> AsyncIterator[tuple[int, str | None]]:
    """``(choice index, text)`` from every run as it comes; ``(i, None)`` once run ``i`` is done."""
    queue: asyncio.Queue[tuple[int, str | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, run: CallRun) -> None:
        try:
            async for text in run.deltas():
                queue.put_nowait((i, text, None))
            queue.put_nowait((i, None, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((i, None, exc))

    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    try:
        left = len(runs)
        while left:
            i, text, exc = await queue.get()
            if exc is not None:
                raise exc
            left -= text is None
            yield i, text
    finally:
        for task in tasks:
            task.cancel()


def _stream(runs: list[CallRun], chunk: Callable[..., dict[str, Any]], include_usage: bool, head: str | None,
            final: Callable[[int, CallRun, str], dict[str, Any]] | None = None, buffer: bool = False) -> StreamingResponse:
    """SSE of OpenAI chunks: ``chunk(index, text, finish_reason)`` builds each.
    ``final(index, run, text)``, when given, builds each choice's last chunk
    (its logprobs, tool calls); ``buffer`` holds a choice's text back until
    then (a tool call is only known once the whole text is)."""

    async def events() -> AsyncIterator[str]:
        try:
            if head is not None:
                for i in range(len(runs)):
                    yield _sse(chunk(i, head, None))
            texts = [""] * len(runs)
            try:
                async for i, text in _merged(runs):
                    if text is not None:
                        texts[i] += text
                        if not buffer:
                            yield _sse(chunk(i, text, None))
                        continue
                    last = final(i, runs[i], texts[i]) if final is not None else chunk(i, None, runs[i].finish_reason)
                    if include_usage:
                        last["usage"] = None
                    yield _sse(last)
            except ParrotError as exc:
                yield _sse(error_body(type(exc).__name__, str(exc)))
                return
            if include_usage:
                tail = chunk(0, None, None)
                tail["choices"] = []
                tail["usage"] = usage(runs)
                yield _sse(tail)
            yield "data: [DONE]\n\n"
        finally:
            for run in runs:
                await run.close()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _wait(run: CallRun) -> str:
    try:
        async for _ in run.deltas():
            pass
    finally:
        await run.close()
    return run.value


async def _wait_all(runs: list[CallRun]) -> list[str]:
    try:
        return list(await asyncio.gather(*(_wait(run) for run in runs)))
    finally:
        for run in runs:  # closing twice is harmless; a failed gather leaves others open
            await run.close()


# -- routes -------------------------------------------------------------------
def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": STARTED, "owned_by": "parrot"}


@router.get("/models")
async def list_models(tenant: TenantDep, service: ServiceDep) -> dict:
    """The served models (OpenAI format)."""
    return {"object": "list", "data": [_model_object(m) for m in served_models(service)]}


@router.get("/models/{model_id}")
async def get_model(model_id: str, tenant: TenantDep, service: ServiceDep) -> dict:
    """One served model (OpenAI format); 404 for others."""
    _check_model(service, model_id)
    return _model_object(model_id)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, tenant: TenantDep, service: ServiceDep, request: Request) -> dict | StreamingResponse:
    """OpenAI text completion: one prompt, ``n`` choices, streamed (SSE) or not."""
    _check_model(service, body.model)
    _check_common(body)
    _unsupported("suffix", body.suffix, lambda v: not v, "suffix is not supported")
    _unsupported("best_of", body.best_of, lambda v: v == 1, "only best_of=1 is supported")
    _unsupported("logprobs", body.logprobs, lambda v: 0 <= v <= MAX_COMPLETION_LOGPROBS,
                 f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}")
    if body.logprobs is not None and body.echo:
        raise InvalidArgumentError("echo", "echo with logprobs (the prompt's logprobs) is not supported")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidArgumentError("prompt", "give one prompt string (batches and token ids are not supported)")
        prompt = prompt[0]
    if not prompt:
        raise InvalidArgumentError("prompt", "the prompt is empty")
    sampling = _sampling(service, tenant, body, Prompt.of_text(prompt), "prompt", body.max_tokens, 16,  # 16: OpenAI's default
                         logprobs=body.logprobs)
    runs = await start_calls(service, tenant, Prompt.of_text(prompt), sampling, COMPLETION_FUNCTION, body.n or 1)
    rid, created = f"cmpl-{service.public_id(tenant, runs[0].call_id)}", int(time.time())
    echo = prompt if body.echo else ""
    tokenizer = service.runtime.tokenizer

    def chunk(index: int, text: str | None, finish_reason: str | None, logprobs: Any = None) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}]}

    def final(index: int, run: CallRun, text: str) -> dict[str, Any]:
        return chunk(index, "", run.finish_reason, structured.completion_logprobs(run.logprobs, tokenizer, len(echo)))

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(runs, chunk, include_usage, echo or None, final)
    texts = await unless_disconnected(request, _wait_all(runs))  # a client gone cancels its calls
    choices = [chunk(i, echo + text, run.finish_reason, structured.completion_logprobs(run.logprobs, tokenizer, len(echo)))["choices"][0]
               for i, (run, text) in enumerate(zip(runs, texts))]
    out = chunk(0, None, None)
    out["choices"] = choices
    out["usage"] = usage(runs)
    return out


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, tenant: TenantDep, service: ServiceDep,
                           request: Request) -> dict | StreamingResponse:
    """OpenAI chat completion over the model's chat template, streamed (SSE) or
    not: ``n`` choices, structured outputs, tool calls, logprobs."""
    _check_model(service, body.model)
    _check_common(body)
    _unsupported("top_logprobs", body.top_logprobs, lambda v: 0 <= v <= MAX_LOGPROBS,
                 f"top_logprobs must be between 0 and {MAX_LOGPROBS}")
    if body.top_logprobs and not body.logprobs:
        raise InvalidArgumentError("top_logprobs", "top_logprobs needs logprobs: true")
    _unsupported("functions", body.functions, lambda v: not v, "functions are not supported (use tools)")
    _unsupported("function_call", body.function_call, lambda v: v in ("none", "auto"), 'only "none" is supported (use tool_choice)')
    _unsupported("modalities", body.modalities, lambda v: list(v) == ["text"], "only text is supported")
    for name in ("audio", "prediction", "web_search_options"):
        _unsupported(name, getattr(body, name), lambda v: False, f"{name} is not supported")
    plan = structured.tool_plan(body.tools, body.tool_choice)
    constraint = structured.response_format_constraint(body.response_format)
    if plan is not None and plan.mode != "auto":
        if constraint is not None:
            raise InvalidArgumentError("response_format", "a forced tool call and a response_format cannot be combined")
        constraint = plan.constraint()
    # Tool turns become text turns first, then get the same checks as any message.
    try:
        messages = [ChatMessage(**m) for m in structured.tool_messages(body.messages, plan)]
    except ValidationError as exc:  # e.g. tool-call arguments holding a lone surrogate
        raise InvalidArgumentError("messages", exc.errors()[0]["msg"]) from exc
    plain = chat_messages(messages)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    tokenizer = service.runtime.tokenizer
    if plain and plain[-1]["role"] == "user" and tokenizer.renders_chat:
        # A chat call: the model's template frames the turns, and no message's
        # text is ever read as special tokens or template text.
        prompt = Prompt.of_text(plain[-1]["content"], history=tuple((m["role"], m["content"]) for m in plain[:-1]))
    else:
        prompt = chat_prompt(service, plain)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    try:
        sampling = _sampling(service, tenant, body, prompt, "messages", max_tokens, None,  # default: the rest of the context
                             constraint, logprobs)
    except ValueError as exc:  # the chat template refused the turns
        if isinstance(exc, ParrotError):
            raise
        raise InvalidArgumentError("messages", str(exc)) from exc
    if constraint is not None:
        # Compiled now (off the event loop) against the served tokenizer: a bad
        # schema or regex is this request's 4xx naming the field.
        await asyncio.to_thread(grammar.check, constraint, tokenizer)
    runs = await start_calls(service, tenant, prompt, sampling, CHAT_FUNCTION, body.n or 1)
    rid, created = f"chatcmpl-{service.public_id(tenant, runs[0].call_id)}", int(time.time())

    def message(run: CallRun, text: str) -> tuple[dict[str, Any], str]:
        """The choice's message and finish reason (tool calls when the text is one)."""
        calls = plan.calls(text) if plan is not None and run.finish_reason != "length" else None
        if calls is None:
            return {"role": "assistant", "content": text}, run.finish_reason
        # OpenAI ends a call it forced by name with "stop", one the model chose with "tool_calls".
        return {"role": "assistant", "content": None, "tool_calls": calls}, "stop" if plan.mode == "named" else "tool_calls"  # type: ignore[union-attr]

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, text: str | None, finish_reason: str | None, delta: dict[str, Any] | None = None,
                  logprobs: Any = None) -> dict[str, Any]:
            if delta is None:
                delta = {}
                if text is not None:
                    delta = {"role": "assistant", "content": text} if text == "" else {"content": text}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

        def final(index: int, run: CallRun, text: str) -> dict[str, Any]:
            msg, reason = message(run, text)
            delta: dict[str, Any] = {}
            if "tool_calls" in msg:
                delta = {"tool_calls": [{"index": j, **c} for j, c in enumerate(msg["tool_calls"])]}
            elif plan is not None:  # buffered: the text goes out now
                delta = {"content": text}
            return chunk(index, None, reason, delta, structured.chat_logprobs(run.logprobs, tokenizer))

        return _stream(runs, chunk, include_usage, "", final, buffer=plan is not None)  # the first chunk carries the role
    texts = await unless_disconnected(request, _wait_all(runs))  # a client gone cancels its calls
    choices = []
    for i, (run, text) in enumerate(zip(runs, texts)):
        msg, reason = message(run, text)
        choices.append({"index": i, "message": msg, "logprobs": structured.chat_logprobs(run.logprobs, tokenizer),
                        "finish_reason": reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": choices, "usage": usage(runs)}
