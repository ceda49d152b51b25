"""The FastAPI application: native API, admin, health, metrics.

``create_app(build_service)`` takes a coroutine factory for the
:class:`ParrotService`, run in the app's lifespan, so loading a model and
restoring state happen on the server's own event loop.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Annotated, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse

from parrot.dataflow.store import StoreUnavailableError
from parrot.semantic_vars import Call, FunctionSpec
from parrot.semantic_vars.template import parse_template

from . import models as m
from .deps import ERRORS, ServiceDep, TenantDep, admin_of
from .disconnect import unless_disconnected
from .errors import install_error_handlers
from .metrics import ServiceMetrics
from .openai_routes import CHAT_FUNCTION, COMPLETION_FUNCTION, router as openai_router
from .service import ParrotService
from .ui import mount_ui
from .tenancy import Quotas, Tenant

ServiceFactory = Callable[[], Awaitable[ParrotService]]
#: How long /readyz waits for the state store to answer.
READY_STORE_TIMEOUT_S = 2.0

api = APIRouter(prefix="/api/v1", responses=ERRORS)
admin = APIRouter(prefix="/admin/v1", responses=ERRORS, dependencies=[Depends(admin_of)])


@api.post("/sessions", status_code=201, response_model=m.SessionCreated, tags=["sessions"])
async def open_session(tenant: TenantDep, service: ServiceDep, body: m.SessionOpen | None = None) -> m.SessionCreated:
    """Open a session; with ``calls``, submit them in the same request (one
    round trip for both; all or none: calls refused close the session again)."""
    if body is None or not body.calls:
        return m.SessionCreated(session_id=await service.open_session(tenant))
    session_id, specs = await service.open_session_with_calls(tenant, body.calls)
    return m.SessionCreated(session_id=session_id, calls=_submitted(tenant, service, specs))


@api.get("/sessions", response_model=m.SessionList, tags=["sessions"])
async def list_sessions(tenant: TenantDep, service: ServiceDep) -> m.SessionList:
    """The tenant's sessions."""
    rows = service.list_sessions(tenant)
    return m.SessionList(sessions=[m.SessionInfo(session_id=s, open=o, calls=n) for s, o, n in rows])


@api.delete("/sessions/{session_id}", response_model=m.SessionClosed, tags=["sessions"])
async def close_session(session_id: str, tenant: TenantDep, service: ServiceDep, cancel: bool = False) -> m.SessionClosed:
    """Close a session: wait for its calls to finish, or cancel them (``cancel=true``)."""
    await service.close_session(tenant, session_id, cancel=cancel)
    return m.SessionClosed(session_id=session_id)


@api.post("/functions", status_code=201, response_model=m.FunctionCreated, tags=["functions"])
async def register_function(body: m.FunctionBody, tenant: TenantDep, service: ServiceDep) -> m.FunctionCreated:
    """Register a semantic function from a template; calls may then name it by id."""
    function_id, spec = await service.register_function(tenant, body)
    return _function_created(function_id, spec)


def _function_created(function_id: str, spec: FunctionSpec) -> m.FunctionCreated:
    t = parse_template(spec.template)
    return m.FunctionCreated(function_id=function_id, name=spec.name, inputs=list(t.inputs), outputs=list(t.outputs))


@api.post("/sessions/{session_id}/variables", status_code=201, response_model=m.VariableRef, tags=["variables"])
async def create_variable(session_id: str, body: m.VariableCreate, tenant: TenantDep, service: ServiceDep) -> m.VariableRef:
    """Declare a free variable (optionally with its value)."""
    var_id = await service.create_variable(tenant, session_id, body.var_id, body.name, body.value)
    return m.VariableRef(var_id=var_id)


@api.put("/sessions/{session_id}/variables/{var_id}", response_model=m.VariableRef, tags=["variables"])
async def set_variable(session_id: str, var_id: str, body: m.VariableSet, tenant: TenantDep, service: ServiceDep) -> m.VariableRef:
    """Set a free variable's value (once)."""
    await service.set_variable(tenant, session_id, var_id, body.value)
    return m.VariableRef(var_id=var_id)


@api.get("/sessions/{session_id}/variables/{var_id}", response_model=m.VariableState, tags=["variables"])
async def get_variable(
    session_id: str,
    var_id: str,
    tenant: TenantDep,
    service: ServiceDep,
    request: Request,
    perf: m.Perf = "latency",
    timeout: Annotated[float, Query(ge=0, le=300, description="seconds to wait for the value (long-poll)")] = 0,
) -> m.VariableState:
    """Read a variable, waiting up to ``timeout`` seconds; records the ``perf`` annotation."""
    # A client that leaves ends the wait: nothing is left for a shutdown to wait on.
    return await unless_disconnected(request, service.get_variable(tenant, session_id, var_id, perf, timeout))


@api.get("/sessions/{session_id}/variables/{var_id}/stream", tags=["variables"])
async def stream_variable(session_id: str, var_id: str, tenant: TenantDep, service: ServiceDep) -> EventSourceResponse:
    """Server-sent events: ``token`` pieces while the output is generated, then ``value`` (or ``error``)."""
    # Ownership errors are 404s here; the waiting happens inside the response,
    # which ends when the client disconnects or the server shuts down.
    return EventSourceResponse(service.stream_variable(tenant, session_id, var_id))


@api.post("/sessions/{session_id}/calls", status_code=201, response_model=m.CallsSubmitted, tags=["calls"])
async def submit_calls(session_id: str, body: m.CallsSubmit, tenant: TenantDep, service: ServiceDep) -> m.CallsSubmitted:
    """Submit calls (all or none); the DAG is resolved server-side."""
    specs = await service.submit_calls(tenant, session_id, body.calls)
    return m.CallsSubmitted(calls=_submitted(tenant, service, specs))


def _submitted(tenant: Tenant, service: ParrotService, specs: list[Call]) -> list[m.CallSubmitted]:
    """Submitted calls as the tenant names them."""
    public = lambda i: service.public_id(tenant, i)  # noqa: E731
    return [m.CallSubmitted(call_id=public(s.call_id), outputs={k: public(v) for k, v in s.outputs.items()})
            for s in specs]


@api.get("/sessions/{session_id}/dag", tags=["dag"])
async def session_dag(session_id: str, tenant: TenantDep, service: ServiceDep) -> dict:
    """The session's DAG: calls (state, objective, group, engine, tokens), variables, task groups."""
    return service.dag(tenant, session_id)


@api.get("/sessions/{session_id}/calls/{call_id}", tags=["dag"])
async def call_detail(session_id: str, call_id: str, tenant: TenantDep, service: ServiceDep) -> dict:
    """One call in full: its prompt with the variables filled in, input and output values, timings, tokens."""
    return service.call_detail(tenant, session_id, call_id)


@api.get("/sessions/{session_id}/events", tags=["dag"])
async def session_events(session_id: str, tenant: TenantDep, service: ServiceDep) -> EventSourceResponse:
    """Server-sent DAG events (call_added, call_state, variable_set, token, session_closed)."""
    service.owned_session(tenant, session_id)
    events = service.session_events(tenant, session_id)
    return EventSourceResponse({"event": e["type"], "data": json.dumps(e)} async for e in events)


@admin.post("/tenants", status_code=201, response_model=m.TenantCreated, tags=["admin"])
async def create_tenant(body: m.TenantCreate, service: ServiceDep) -> m.TenantCreated:
    """Create a tenant and its first API key (shown once)."""
    quotas = Quotas(body.max_concurrent_calls, body.tokens_per_minute, body.max_prompt_tokens)
    tenant, key = await service.create_tenant(body.name, quotas)
    return m.TenantCreated(tenant_id=tenant.id, name=tenant.name, api_key=key)


@admin.post("/functions", status_code=201, response_model=m.FunctionCreated, tags=["admin"])
async def register_public_function(body: m.FunctionBody, service: ServiceDep) -> m.FunctionCreated:
    """Publish a semantic function to every tenant (a public app). The constant
    text its template starts with, such as a system prompt, is prefilled once
    and its KV cache shared by all tenants' calls; the rest of each prompt
    stays private to the calling tenant."""
    function_id, spec = await service.register_function(None, body)
    return _function_created(function_id, spec)


@admin.post("/tenants/{tenant_id}/keys", status_code=201, response_model=m.KeyCreated, tags=["admin"])
async def add_key(tenant_id: str, service: ServiceDep) -> m.KeyCreated:
    """Issue another API key for a tenant."""
    return m.KeyCreated(tenant_id=tenant_id, api_key=await service.add_key(tenant_id))


def create_app(build_service: ServiceFactory) -> FastAPI:
    """The Parrot service; ``build_service`` runs at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await build_service()
        await service.start()
        app.state.service = service
        app.state.metrics = ServiceMetrics(service.runtime, service_functions=(COMPLETION_FUNCTION, CHAT_FUNCTION))
        yield
        await service.stop()

    app = FastAPI(title="Parrot", version="0.1.0", lifespan=lifespan,
                  description="Application-level LLM serving with Semantic Variables.")
    install_error_handlers(app)
    app.include_router(api)
    app.include_router(admin)
    app.include_router(openai_router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request, response: Response) -> dict:
        """Engines loaded, state restored, the state store answering, and at
        least one engine healthy (a dead engine actor or an unreachable
        remote server is not)."""
        service = getattr(request.app.state, "service", None)
        engines = {e.name: e.healthy() for e in service.runtime.engines} if service else {}
        store = False
        if service is not None:
            try:
                await asyncio.wait_for(service.store.ping(), READY_STORE_TIMEOUT_S)
                store = True
            except (StoreUnavailableError, asyncio.TimeoutError):
                pass
        ready = bool(service and service.ready and store and any(engines.values()))
        response.status_code = 200 if ready else 503
        return {"ready": ready, "engines": engines, "store": store}

    @app.get("/metrics", tags=["health"], dependencies=[Depends(admin_of)], responses={401: ERRORS[401]})
    async def metrics(request: Request) -> Response:
        """Prometheus metrics, for the admin key only (they cover every tenant)."""
        # Off the loop: an engine in another process answers its stats by a round trip.
        body = await asyncio.to_thread(generate_latest, request.app.state.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    mount_ui(app)
    return app
