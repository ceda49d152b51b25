"""The service core: tenancy, ownership and quotas around one LocalRuntime.

Routes call this; it calls the runtime. It knows tenants and API keys but
nothing of HTTP, so the same checks hold for the native API and the
OpenAI-compatible endpoints.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from contextlib import contextmanager
from typing import Any, AsyncIterator, Iterator

from parrot.dataflow import LocalRuntime
from parrot.dataflow.graph import FINAL_STATES
from parrot.dataflow.prefix import PUBLIC_NAMESPACE
from parrot.dataflow.program import prompt_token_count
from parrot.semantic_vars.template import parse_template
from parrot.semantic_vars import (
    CallFailedError,
    Call,
    ConstraintError,
    FunctionSpec,
    InvalidArgumentError,
    ParrotError,
    Perf,
    SamplingConfig,
    SemanticFunction,
    TemplateError,
    UnknownSessionError,
    UnknownVariableError,
    new_id,
)

from .dag_view import call_detail, session_dag
from .id_scope import internal_id, public_text, public_view
from .models import CallBody, FunctionBody, SamplingBody, VariableState
from .tenancy import (
    AuthenticationError,
    PromptTooLongError,
    QuotaMeter,
    Quotas,
    Tenant,
    hash_key,
    new_api_key,
)

log = logging.getLogger(__name__)



def sampling_options(body: SamplingBody) -> dict[str, Any]:
    return body.model_dump(exclude_none=True)


#: Function bodies parsed lately, by their JSON: a batch of 10,000 calls of
#: one function parses it once (specs are immutable, so calls share one).
_SPECS: collections.OrderedDict[str, FunctionSpec] = collections.OrderedDict()
_SPECS_KEPT = 256
_SPEC_KEY_CHARS = 65_536  # larger bodies are parsed each time, not kept
#: Templates longer than this are parsed in a worker thread, so the event
#: loop (every tenant's requests) never waits for one.
OFF_LOOP_CHARS = 20_000


def function_spec(body: FunctionBody) -> FunctionSpec:
    """Validate a function body (template, options) into a spec; raises typed errors."""
    key = body.model_dump_json()
    spec = _SPECS.get(key)
    if spec is None:
        spec = _parse_function(body)
        if len(key) <= _SPEC_KEY_CHARS:
            _SPECS[key] = spec
            while len(_SPECS) > _SPECS_KEPT:
                _SPECS.popitem(last=False)
    return spec


async def function_spec_async(body: FunctionBody) -> FunctionSpec:
    """:func:`function_spec`, in a worker thread when the template is long."""
    if len(body.template) > OFF_LOOP_CHARS or len(body.system or "") > OFF_LOOP_CHARS:
        return await asyncio.to_thread(function_spec, body)
    return function_spec(body)


def _parse_function(body: FunctionBody) -> FunctionSpec:
    defaults = SamplingConfig().merged(**sampling_options(body.sampling))
    unknown = set(body.output_sampling) - set(SemanticFunction(body.template).output_names)
    if unknown:
        raise InvalidArgumentError(f"output_sampling.{sorted(unknown)[0]}", "the template has no such output")
    fn = SemanticFunction(
        body.template,
        name=body.name,
        defaults=defaults,
        output_options={k: sampling_options(v) for k, v in body.output_sampling.items()},
        compress=body.compress,
        chat=body.chat,
        system=body.system,
        history=body.history,
    )
    return fn.spec


class ParrotService:
    """Tenants, keys, functions and quota meters over a :class:`LocalRuntime`."""

    def __init__(self, runtime: LocalRuntime, *, admin_key: str | None = None, default_quotas: Quotas | None = None) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.admin_key_hash = hash_key(admin_key) if admin_key else None
        self.default_quotas = default_quotas or Quotas()
        self.tenants: dict[str, Tenant] = {}
        self.key_owner: dict[str, str] = {}  # key hash -> tenant id
        self.functions: dict[str, tuple[str, FunctionSpec]] = {}  # id -> (owner tenant id, spec)
        self.meters: dict[str, QuotaMeter] = {}
        self.call_owner: dict[str, str] = {}
        self.ready = False
        runtime.subscribe(self._on_event)

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        """Load tenants, keys and functions, and restore the runtime."""
        # A record that cannot be read back is logged and skipped: one bad
        # record must not keep the service from starting.
        for r in await self.store.load("tenant"):
            try:
                self._add_tenant(Tenant.from_record(r))
            except Exception:
                log.exception("restore: skipped the unreadable tenant record %r", r.get("id"))
        for r in await self.store.load("key"):
            if r.get("tenant_id") in self.tenants and isinstance(r.get("id"), str):
                self.key_owner[r["id"]] = r["tenant_id"]
            else:
                log.error("restore: skipped a key record of unknown tenant %r", r.get("tenant_id"))
        for r in await self.store.load("function"):
            try:
                self.functions[r["id"]] = (r["tenant_id"], FunctionSpec.from_dict(r["spec"]))
            except Exception:
                log.exception("restore: skipped the unreadable function record %r", r.get("id"))
        requeued = await self.runtime.restore()
        for call in self.runtime.calls():
            owner = self.runtime.session_owner(call.session_id) or ""
            self.call_owner[call.id] = owner
            if call.state not in FINAL_STATES:
                worst = 0
                tenant = self.tenants.get(owner)
                if tenant is not None and tenant.quotas.tokens_per_minute is not None:
                    worst = self._worst_case(call.function, self.runtime.input_values(call.id), {})
                self.meter(owner).admit({call.id: worst})
        if requeued:
            log.info("restored %d unfinished calls", requeued)
        self.ready = True

    async def stop(self) -> None:
        await self.runtime.shutdown()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"] == "session_forgotten":
            for call_id in event["call_ids"]:
                self.call_owner.pop(call_id, None)
            return
        if event["type"] != "call_state" or event["state"] not in FINAL_STATES:
            return
        owner = self.call_owner.get(event["call_id"])
        if owner is None:
            return
        meter = self.meter(owner)
        if event["call_id"] in meter.in_flight:
            call = self.runtime.call(event["call_id"])
            if call is not None:
                meter.finish(call.id, call.prefill_tokens + call.cached_tokens + call.generated_tokens)

    def meter(self, tenant_id: str) -> QuotaMeter:
        return self.meters.setdefault(tenant_id, QuotaMeter())

    # -- tenants and keys ---------------------------------------------------
    def authenticate(self, api_key: str | None) -> Tenant:
        if not api_key:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        tenant_id = self.key_owner.get(hash_key(api_key))
        if tenant_id is None:
            raise AuthenticationError("invalid API key")
        return self.tenants[tenant_id]

    def check_admin(self, api_key: str | None) -> None:
        if self.admin_key_hash is None or not api_key or hash_key(api_key) != self.admin_key_hash:
            raise AuthenticationError("this endpoint needs the admin key")

    async def create_tenant(self, name: str, quotas: Quotas | None = None) -> tuple[Tenant, str]:
        tenant = Tenant(new_id("tenant"), name, quotas or Quotas(**vars(self.default_quotas)))
        api_key = new_api_key()
        await self.store.write([
            ("tenant", tenant.id, tenant.record()),
            ("key", hash_key(api_key), {"id": hash_key(api_key), "tenant_id": tenant.id}),
        ])
        self._add_tenant(tenant)
        self.key_owner[hash_key(api_key)] = tenant.id
        return tenant, api_key

    def _add_tenant(self, tenant: Tenant) -> None:
        self.tenants[tenant.id] = tenant
        if tenant.quotas.max_prompt_tokens is not None:
            # Checked again on the whole prompt when it is built (text from variables counts).
            self.runtime.prompt_limits[tenant.id] = tenant.quotas.max_prompt_tokens

    async def add_key(self, tenant_id: str) -> str:
        if tenant_id not in self.tenants:
            raise UnknownSessionError(f"unknown tenant {tenant_id!r}")
        api_key = new_api_key()
        await self.store.write([("key", hash_key(api_key), {"id": hash_key(api_key), "tenant_id": tenant_id})])
        self.key_owner[hash_key(api_key)] = tenant_id
        return api_key

    # -- ownership ----------------------------------------------------------
    def owned_session(self, tenant: Tenant, session_id: str) -> str:
        if self.runtime.session_owner(session_id) != tenant.id:
            raise UnknownSessionError(f"unknown session {session_id!r}")
        return session_id

    def owned_variable(self, tenant: Tenant, var_id: str, *, field: str = "var_id") -> str:
        """The internal id of the tenant's variable ``var_id`` (a public id);
        an id of another tenant reads as one nobody uses."""
        key = internal_id(tenant.id, var_id)
        if self.runtime.variable_owner(key) != tenant.id:
            raise UnknownVariableError(f"{field}: unknown variable {var_id!r}", field=field)
        return key

    # -- ids: each tenant names its variables and calls in its own namespace --
    @staticmethod
    def internal_id(tenant: Tenant, public_id: str) -> str:
        """Where the tenant's ``public_id`` (a variable or call id) lives in
        the graph and the store (see :mod:`parrot.server.id_scope`)."""
        return internal_id(tenant.id, public_id)

    @staticmethod
    def public_id(tenant: Tenant, internal: str) -> str:
        """The id the tenant wrote (or was given) for ``internal``."""
        return public_text(tenant.id, internal)

    @staticmethod
    @contextmanager
    def _public_errors(tenant: Tenant) -> Iterator[None]:
        """Errors of the runtime quote internal ids: show the tenant its own."""
        try:
            yield
        except ParrotError as exc:
            exc.args = tuple(public_text(tenant.id, a) if isinstance(a, str) else a for a in exc.args)
            raise

    # -- sessions -----------------------------------------------------------
    async def open_session(self, tenant: Tenant, *, ephemeral: bool = False) -> str:
        """Open a session of ``tenant``; ``ephemeral`` for one request's own
        session (it is closed, its calls cancelled, after a restart)."""
        return await self.runtime.open_session(namespace=tenant.id, ephemeral=ephemeral)

    async def open_session_with_calls(self, tenant: Tenant, bodies: list[CallBody]) -> tuple[str, list[Call]]:
        """Open a session of ``tenant`` and submit ``bodies`` to it in one
        step, all or none: if the calls are refused (invalid, over a quota)
        the session is closed again, cancelled, with nothing run, and the
        error is raised. Returns the session id and the calls (internal ids)."""
        session_id = await self.open_session(tenant)
        try:
            return session_id, await self.submit_calls(tenant, session_id, bodies)
        except BaseException:
            await self.close_session(tenant, session_id, cancel=True)
            raise

    def list_sessions(self, tenant: Tenant) -> list[tuple[str, bool, int]]:
        return self.runtime.session_summaries(tenant.id)

    async def close_session(self, tenant: Tenant, session_id: str, *, cancel: bool) -> None:
        await self.runtime.close_session(self.owned_session(tenant, session_id), cancel=cancel)

    # -- functions ------------------------------------------------------------
    async def register_function(self, tenant: Tenant | None, body: FunctionBody) -> tuple[str, FunctionSpec]:
        """Register a function for ``tenant``; with ``tenant=None`` (the admin)
        it is public: every tenant may call it and its template's constant
        head shares one prefix cache entry across tenants."""
        spec = await function_spec_async(body)
        owner = PUBLIC_NAMESPACE
        if tenant is None:
            spec = dataclasses.replace(spec, public_prefix=True)
        else:
            owner = tenant.id
        function_id = new_id("fn")
        await self.store.write([("function", function_id, {"id": function_id, "tenant_id": owner, "spec": spec.to_dict()})])
        self.functions[function_id] = (owner, spec)
        return function_id, spec

    def function(self, tenant: Tenant, function_id: str, *, field: str) -> FunctionSpec:
        owner, spec = self.functions.get(function_id, (None, None))
        if spec is None or owner not in (tenant.id, PUBLIC_NAMESPACE):
            raise UnknownVariableError(f"{field}: unknown function {function_id!r}", field=field)
        return spec

    # -- variables ------------------------------------------------------------
    async def create_variable(self, tenant: Tenant, session_id: str, var_id: str | None, name: str, value: str | None) -> str:
        """Declare a free variable; returns its (public) id."""
        self.owned_session(tenant, session_id)
        var_id = var_id or new_id("var")
        with self._public_errors(tenant):
            await self.runtime.create_variable(session_id, internal_id(tenant.id, var_id), name, value)
        return var_id

    async def set_variable(self, tenant: Tenant, session_id: str, var_id: str, value: str) -> None:
        self.owned_session(tenant, session_id)
        key = self.owned_variable(tenant, var_id)
        with self._public_errors(tenant):
            await self.runtime.set_variable(session_id, key, value)

    async def get_variable(self, tenant: Tenant, session_id: str, var_id: str, perf: Perf, timeout: float) -> VariableState:
        """Long-poll: wait up to ``timeout`` seconds for the value."""
        self.owned_session(tenant, session_id)
        key = self.owned_variable(tenant, var_id)
        var = self.runtime.variable(key)
        assert var is not None  # owned_variable found it
        try:
            if timeout > 0:
                await asyncio.wait_for(self.runtime.get_variable(session_id, key, perf), timeout=timeout)
            else:
                self.runtime.poll_variable(session_id, key, perf)
        except (asyncio.TimeoutError, CallFailedError):
            pass
        error = public_text(tenant.id, var.error) if var.error is not None else None
        return VariableState(var_id=var_id, name=var.name, ready=var.is_set, value=var.value, error=error)

    def stream_variable(self, tenant: Tenant, session_id: str, var_id: str) -> AsyncIterator[dict[str, Any]]:
        """Token deltas of an output as they are generated, then its value.
        Ownership is checked now (raising), before any event is awaited."""
        self.owned_session(tenant, session_id)
        return self._variable_events(tenant, self.owned_variable(tenant, var_id))

    async def _variable_events(self, tenant: Tenant, var_id: str) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def listener(event: dict[str, Any]) -> None:
            if event.get("var_id") == var_id and event["type"] in ("token", "variable_set"):
                queue.put_nowait(event)
            elif event["type"] == "call_state" and event["state"] in ("failed", "cancelled"):
                queue.put_nowait(event)

        unsubscribe = self.runtime.subscribe(listener)
        try:
            while True:
                var = self.runtime.variable(var_id)
                if var is None:
                    yield {"event": "error", "data": "the variable was forgotten with its closed session"}
                    return
                if var.is_set:
                    yield {"event": "value", "data": var.value}
                    return
                if var.error is not None:
                    yield {"event": "error", "data": public_text(tenant.id, var.error)}
                    return
                event = await queue.get()
                if event["type"] == "token":
                    yield {"event": "token", "data": event["text"]}
        finally:
            unsubscribe()

    async def session_events(self, tenant: Tenant, session_id: str) -> AsyncIterator[dict[str, Any]]:
        """The session's DAG events, live, until it is closed."""
        self.owned_session(tenant, session_id)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        unsubscribe = self.runtime.subscribe(
            lambda e: queue.put_nowait(e) if e.get("session_id") == session_id else None
        )
        try:
            while True:
                event = await queue.get()
                yield public_view(tenant.id, event)
                if event["type"] == "session_closed":
                    return
        finally:
            unsubscribe()

    # -- calls ------------------------------------------------------------------
    async def _check_constraints(self, spec: FunctionSpec, where: str) -> None:
        """Compile each output's constraint for the served tokenizer now (in a
        worker thread: a large schema must not stall other tenants), so a
        regex or schema the grammar library rejects is this request's 422
        naming the output, never a failed call later."""
        from parrot.backends.constraints import check
        from parrot.backends.tokenizer import Tokenizer

        tokenizer = self.runtime.tokenizer
        if not isinstance(tokenizer, Tokenizer):
            return  # no Hugging Face vocabulary here (a remote engine's): the engine refuses constraints itself

        for name, config in spec.output_sampling.items():
            if config.constraint is not None:
                try:
                    await asyncio.to_thread(check, config.constraint, tokenizer)
                except ConstraintError as exc:
                    exc.field = f"{where}.function.output_sampling.{name}.{exc.field}"
                    raise

    async def submit_calls(self, tenant: Tenant, session_id: str, bodies: list[CallBody]) -> list[Call]:
        """Validate, check ownership and quotas, then submit all or nothing.
        The bodies name ids as the tenant does; the calls returned are in
        internal ids (:meth:`public_id` gives them back)."""
        self.owned_session(tenant, session_id)
        specs: list[Call] = []
        batch_outputs: set[str] = set()
        for i, body in enumerate(bodies):
            if i % 512 == 511:
                await asyncio.sleep(0)  # a large batch lets other requests in while it is checked
            where = f"calls.{i}"
            if (body.function is None) == (body.function_id is None):
                raise InvalidArgumentError(f"{where}.function", "give exactly one of function and function_id")
            if body.function is not None:
                try:
                    spec = await function_spec_async(body.function)
                except (TemplateError, InvalidArgumentError) as exc:
                    exc.field = f"{where}.function." + (getattr(exc, "field", None) or "template")
                    raise
            else:
                spec = self.function(tenant, body.function_id or "", field=f"{where}.function_id")
            await self._check_constraints(spec, where)
            outputs = body.outputs
            if outputs is None:
                outputs = {name: new_id("var") for name in spec.output_sampling}
            inputs = {name: internal_id(tenant.id, v) for name, v in body.inputs.items()}
            outputs = {name: internal_id(tenant.id, v) for name, v in outputs.items()}
            for name, var_id in body.inputs.items():
                if inputs[name] not in batch_outputs:
                    self.owned_variable(tenant, var_id, field=f"{where}.inputs.{name}")
            batch_outputs.update(outputs.values())
            call_id = internal_id(tenant.id, body.call_id or new_id("call"))
            specs.append(Call(call_id, spec, inputs, body.constants, outputs))
        self._check_prompt_sizes(tenant, specs)
        meter = self.meter(tenant.id)
        reservations = self._reservations(tenant, specs)
        meter.check(tenant.quotas, len(specs), sum(reservations.values()))
        # Reserve the slots and tokens before awaiting the store, so
        # concurrent submits of one tenant cannot both pass the check.
        meter.admit(reservations)
        try:
            with self._public_errors(tenant):
                await self.runtime.submit_calls(session_id, specs)
        except BaseException:
            meter.release(reservations)
            raise
        for spec in specs:
            self.call_owner[spec.call_id] = tenant.id
            call = self.runtime.call(spec.call_id)
            if call is None or call.state in FINAL_STATES:
                meter.release([spec.call_id])
        return specs

    def _reservations(self, tenant: Tenant, specs: list[Call]) -> dict[str, int]:
        """Each call's worst-case tokens (0 when the tenant has no token quota)."""
        if tenant.quotas.tokens_per_minute is None:
            return {spec.call_id: 0 for spec in specs}
        # An input that is another call's output is at most that output's max_tokens.
        bound: dict[str, int] = {}
        for spec in specs:
            bound.update({v: spec.function.output_sampling[name].max_tokens for name, v in spec.outputs.items()
                          if name in spec.function.output_sampling})
        out: dict[str, int] = {}
        for spec in specs:
            values = dict(spec.constants)
            unknown: dict[str, int] = {}
            for name, var_id in spec.inputs.items():
                var = self.runtime.variable(var_id)
                producer = self.runtime.call(var.producer) if var is not None and var.producer else None
                if var is not None and var.value is not None:
                    values[name] = var.value
                elif var_id in bound:
                    unknown[name] = bound[var_id]
                elif producer is not None:
                    out_name = next((n for n, v in producer.outputs.items() if v == var_id), None)
                    unknown[name] = producer.function.output_sampling[out_name].max_tokens if out_name else 0
            out[spec.call_id] = self._worst_case(spec.function, values, unknown)
        return out

    def _worst_case(self, function: FunctionSpec, values: dict[str, str], unknown: dict[str, int]) -> int:
        """Tokens a call may use at most: its prompt from what is known now
        (plus a bound per input still unknown) and every output's max_tokens.
        A free variable set later counts when the call ends."""
        prompt = prompt_token_count(function, values, self.runtime.tokenizer)
        return prompt + sum(unknown.values()) + sum(c.max_tokens for c in function.output_sampling.values())

    def _check_prompt_sizes(self, tenant: Tenant, specs: list[Call]) -> None:
        limit = tenant.quotas.max_prompt_tokens
        if limit is None:
            return
        tokenizer = self.runtime.tokenizer
        for i, spec in enumerate(specs):
            # What is known now: the template's text and the constant inputs.
            n = prompt_token_count(spec.function, spec.constants, tokenizer)
            if n > limit:
                raise PromptTooLongError(
                    f"the prompt has at least {n} tokens; this tenant's limit is {limit}", field=f"calls.{i}"
                )

    def dag(self, tenant: Tenant, session_id: str) -> dict[str, Any]:
        """The session's DAG as JSON (see :func:`parrot.server.dag_view.session_dag`)."""
        self.owned_session(tenant, session_id)
        return public_view(tenant.id, session_dag(self.runtime.session_view(session_id)))

    def call_detail(self, tenant: Tenant, session_id: str, call_id: str) -> dict[str, Any]:
        """One call of the tenant's session in full: prompt, values, timings."""
        self.owned_session(tenant, session_id)
        call = self.runtime.call(internal_id(tenant.id, call_id))
        if call is None or call.session_id != session_id:
            raise UnknownVariableError(f"call_id: unknown call {call_id!r} in session {session_id!r}", field="call_id")
        return public_view(tenant.id, call_detail(self.runtime.session_view(session_id), call))
