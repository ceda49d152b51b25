"""The in-process runtime: sessions, the dataflow graph and engines in one process.

Everything runs on the runtime's event loop (the SDK portal's), so the graph
needs no locks. When a call finishes an output, the variable is set here and
every call it makes ready is dispatched at once: dependent calls never wait
for the client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from parrot.backends.engine import Engine, GenResult, RequestFinished
from parrot.semantic_vars import (
    CallFailedError,
    CallSpec,
    Perf,
    Portal,
    Runtime,
    SessionClosedError,
    UnknownSessionError,
    VariableAlreadySetError,
    check_perf,
    new_id,
)

from .analysis import ObjectiveAnalyzer
from .graph import FINAL_STATES, CallNode, DataflowGraph
from .prefix import PrefixIndex
from .program import build_request
from .scheduler import AppScheduler, FifoScheduler, Scheduler

log = logging.getLogger(__name__)


@dataclass
class SessionState:
    id: str
    namespace: str = "local"  # whose prefixes these calls may share (the tenant)
    open: bool = True
    opened_at: float = field(default_factory=time.monotonic)


class LocalRuntime(Runtime):
    """Runs the dataflow of every session on in-process engines.

    ``request_level=True`` turns it into the request-level baseline: the SDK
    resolves every input on the client before submitting a call (a round
    trip per dependency), calls are placed first come first served, and no
    prefix hints reach the engines. It exists for the benchmarks and so a
    user can see the difference on their own program.
    """

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        scheduler: Scheduler | None = None,
        request_level: bool = False,
        min_prefix_chars: int = 32,
        portal: Portal | None = None,
    ) -> None:
        super().__init__(portal)
        if not engines:
            raise ValueError("a runtime needs at least one engine")
        self.engines = list(engines)
        self.request_level = request_level
        self.scheduler: Scheduler = scheduler or (FifoScheduler() if request_level else AppScheduler())
        self.graph = DataflowGraph()
        self.analyzer = ObjectiveAnalyzer(self.graph)
        self.prefixes = PrefixIndex(min_chars=min_prefix_chars)
        self.sessions: dict[str, SessionState] = {}
        #: What clients asked of the runtime, by kind ("get", "set", "submit", ...).
        self.client_requests: Counter[str] = Counter()
        self._waiters: dict[str, list[asyncio.Future[str]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ready: dict[str, CallNode] = {}  # ready, not yet placed on an engine
        self._pass_scheduled = False

    # -- sessions -------------------------------------------------------
    def _session(self, session_id: str, *, must_be_open: bool = True) -> SessionState:
        state = self.sessions.get(session_id)
        if state is None:
            raise UnknownSessionError(f"unknown session {session_id!r}")
        if must_be_open and not state.open:
            raise SessionClosedError(f"session {session_id} is closed")
        return state

    async def open_session(self) -> str:
        session_id = new_id("session")
        self.sessions[session_id] = SessionState(session_id)
        return session_id

    async def close_session(self, session_id: str, *, cancel: bool = False) -> None:
        state = self._session(session_id, must_be_open=False)
        state.open = False
        if not cancel:
            # Run everything that can still run; what waits on a free variable
            # nobody set can never run once the session is closed.
            while True:
                running = [t for cid, t in self._tasks.items() if self.graph.calls[cid].session_id == session_id]
                queued = [c for c in self._ready.values() if c.session_id == session_id]
                if not running and not queued:
                    break
                # Queued calls wait for engine slots, which any finishing call frees.
                others = running or list(self._tasks.values())
                if others:
                    await asyncio.wait(others, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(0)  # yield to the scheduling pass already requested
        for call in self.graph.session_calls(session_id):
            if call.state not in FINAL_STATES:
                self._cancel_call(call, "the session was closed before the call could run")

    def _cancel_call(self, call: CallNode, reason: str) -> None:
        self._ready.pop(call.id, None)
        task = self._tasks.pop(call.id, None)
        if task is not None:
            task.cancel()
        lost = self.graph.fail_call(call.id, reason)
        call.state = "cancelled"
        self._reject_waiters(lost)

    # -- variables ------------------------------------------------------
    async def create_variable(self, session_id: str, var_id: str, name: str, value: str | None = None) -> None:
        self.client_requests["create_variable"] += 1
        self._session(session_id)
        self.graph.add_variable(var_id, name, session_id, value)

    async def set_variable(self, session_id: str, var_id: str, value: str) -> None:
        self.client_requests["set"] += 1
        self._session(session_id)
        var = self.graph.variable(var_id)
        if var.producer is not None:
            raise VariableAlreadySetError(f"variable {var.name!r} is the output of call {var.producer}; it cannot be set")
        self._set(var_id, value)

    def _set(self, var_id: str, value: str) -> None:
        ready = self.graph.set_value(var_id, value)
        for future in self._waiters.pop(var_id, []):
            if not future.done():
                future.set_result(value)
        for call in ready:
            self._dispatch(call)

    def _reject_waiters(self, variables: Sequence) -> None:
        for var in variables:
            for future in self._waiters.pop(var.id, []):
                if not future.done():
                    future.set_exception(CallFailedError(f"variable {var.name!r} will never be set: {var.error}"))

    async def get_variable(self, session_id: str, var_id: str, perf: Perf = "latency") -> str:
        self.client_requests["get"] += 1
        check_perf(perf)
        self._session(session_id, must_be_open=False)
        var = self.graph.variable(var_id)
        self.graph.annotate_get(var_id, perf)
        self.analyzer.on_get(var_id, perf)
        if self._ready:
            self._request_pass()  # a new objective may change the order
        if var.value is not None:
            return var.value
        if var.error is not None:
            raise CallFailedError(f"variable {var.name!r} will never be set: {var.error}")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(var_id, []).append(future)
        return await future

    # -- calls ----------------------------------------------------------
    async def submit_calls(self, session_id: str, calls: Sequence[CallSpec]) -> None:
        self.client_requests["submit"] += 1
        state = self._session(session_id)
        for spec in calls:
            node = self.graph.add_call(session_id, spec)
            if not self.request_level:
                self.prefixes.add(node, self.graph, state.namespace)
            self.analyzer.on_call_added(node)
            if node.state == "ready":
                self._dispatch(node)
            elif node.state == "failed":
                self._reject_waiters([self.graph.variables[v] for v in node.outputs.values()])

    def _dispatch(self, call: CallNode) -> None:
        """Queue a ready call; a scheduling pass places it on an engine."""
        self._ready[call.id] = call
        self._request_pass()

    def _request_pass(self) -> None:
        # One pass after the current burst of events, not one per event.
        if not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._schedule_pass)

    def _schedule_pass(self) -> None:
        self._pass_scheduled = False
        if not self._ready:
            return
        for call in self._ready.values():
            # Now, not at readiness: the calls submitted with it count too.
            hint = self.prefixes.hint_for(call)
            call.prefix_key = hint.key if hint else None
        for call, engine in self.scheduler.schedule(list(self._ready.values()), self.graph, self.engines):
            del self._ready[call.id]
            call.state = "running"
            call.engine = engine.name
            call.started_at = time.monotonic()
            self._tasks[call.id] = asyncio.get_running_loop().create_task(self._run(call, engine), name=call.id)

    async def _run(self, call: CallNode, engine: Engine) -> None:
        stream = None
        try:
            hint = self.prefixes.hint_for(call)
            request = build_request(
                call.function,
                call.template,
                self.graph.input_values(call),
                engine.tokenizer,
                request_id=call.id,
                prefix=(hint.key, hint.end) if hint else None,
            )
            stream = engine.submit(request)
            async for event in stream:
                if isinstance(event, GenResult):
                    # Each output is released as soon as it exists, so its
                    # consumers start while this call is still generating.
                    self._set(call.outputs[event.name], event.text)
                elif isinstance(event, RequestFinished):
                    call.prefill_tokens = event.stats.prefill_tokens
                    call.generated_tokens = event.stats.generated_tokens
                    call.cached_tokens = event.stats.cached_tokens
            call.state = "done"
            call.finished_at = time.monotonic()
        except asyncio.CancelledError:
            if stream is not None:
                stream.cancel()
            raise
        except Exception as exc:
            log.warning("call %s (%s) failed: %s", call.id, call.function.name, exc)
            self._reject_waiters(self.graph.fail_call(call.id, f"{type(exc).__name__}: {exc}"))
        finally:
            self._tasks.pop(call.id, None)
            self.prefixes.forget(call)
            self._request_pass()  # its engine slot is free again

    async def shutdown(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for engine in self.engines:
            await asyncio.to_thread(engine.close)

    def describe(self, session_id: str) -> str:
        """The session's DAG as text (calls in submission order)."""
        return self.graph.describe(session_id)


def default_model_dir(progress=None) -> Path:
    """``$PARROT_MODEL`` if set, else the embedded test model (built on first use)."""
    chosen = os.environ.get("PARROT_MODEL")
    if chosen:
        return Path(chosen).expanduser()
    from parrot.backends.default_model import default_model_path

    return default_model_path(progress=progress)


def default_local_runtime() -> LocalRuntime:
    """One torch engine on ``$PARROT_MODEL`` or the embedded default model;
    ``PARROT_REQUEST_LEVEL=1`` selects the request-level baseline."""
    from parrot.backends.torch_engine import TorchEngine

    request_level = os.environ.get("PARROT_REQUEST_LEVEL", "") not in ("", "0", "false")
    engine = TorchEngine.from_pretrained(default_model_dir(), name="engine-0")
    return LocalRuntime([engine], request_level=request_level)
