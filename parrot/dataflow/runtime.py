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

from .graph import FINAL_STATES, CallNode, DataflowGraph
from .program import build_request
from .scheduler import LeastLoadedScheduler, Scheduler

log = logging.getLogger(__name__)


@dataclass
class SessionState:
    id: str
    open: bool = True
    opened_at: float = field(default_factory=time.monotonic)


class LocalRuntime(Runtime):
    """Runs the dataflow of every session on in-process engines."""

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        scheduler: Scheduler | None = None,
        portal: Portal | None = None,
    ) -> None:
        super().__init__(portal)
        if not engines:
            raise ValueError("a runtime needs at least one engine")
        self.engines = list(engines)
        self.scheduler = scheduler or LeastLoadedScheduler()
        self.graph = DataflowGraph()
        self.sessions: dict[str, SessionState] = {}
        #: What clients asked of the runtime, by kind ("get", "set", "submit", ...).
        self.client_requests: Counter[str] = Counter()
        self._waiters: dict[str, list[asyncio.Future[str]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

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
            while running := [t for cid, t in self._tasks.items() if self.graph.calls[cid].session_id == session_id]:
                await asyncio.wait(running)
        for call in self.graph.session_calls(session_id):
            if call.state not in FINAL_STATES:
                self._cancel_call(call, "the session was closed before the call could run")

    def _cancel_call(self, call: CallNode, reason: str) -> None:
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
        if var.value is not None:
            return var.value
        if var.error is not None:
            raise CallFailedError(f"variable {var.name!r} will never be set: {var.error}")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(var_id, []).append(future)
        return await future

    # -- calls ----------------------------------------------------------
    async def submit_call(self, session_id: str, call: CallSpec) -> None:
        self.client_requests["submit"] += 1
        self._session(session_id)
        node = self.graph.add_call(session_id, call)
        if node.state == "ready":
            self._dispatch(node)
        elif node.state == "failed":
            self._reject_waiters([self.graph.variables[v] for v in node.outputs.values()])

    def _dispatch(self, call: CallNode) -> None:
        engine = self.scheduler.place(call, self.graph, self.engines)
        call.state = "running"
        call.engine = engine.name
        call.started_at = time.monotonic()
        self._tasks[call.id] = asyncio.get_running_loop().create_task(self._run(call, engine), name=call.id)

    async def _run(self, call: CallNode, engine: Engine) -> None:
        stream = None
        try:
            request = build_request(
                call.function, call.template, self.graph.input_values(call), engine.tokenizer, request_id=call.id
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
    """One torch engine on ``$PARROT_MODEL`` or the embedded default model."""
    from parrot.backends.torch_engine import TorchEngine

    return LocalRuntime([TorchEngine.from_pretrained(default_model_dir(), name="engine-0")])
