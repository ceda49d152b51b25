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
from collections import Counter, deque
from dataclasses import dataclass, field, replace as dc_replace
from typing import Any, Callable, Sequence

from parrot.backends.engine import (
    Engine,
    Fill,
    Gen,
    GenerationRequest,
    GenResult,
    RequestFinished,
    RequestStream,
    TokenDelta,
    TokenizerLike,
)
from parrot.semantic_vars import (
    CallFailedError,
    Call,
    EngineUnavailableError,
    FunctionSpec,
    ParrotError,
    Perf,
    Portal,
    PromptTooLongError,
    Runtime,
    SessionClosedError,
    UnknownSessionError,
    VariableAlreadySetError,
    check_perf,
    new_id,
)
from parrot.semantic_vars.env import env_flag
from parrot.semantic_vars.validation import check_unicode, check_unicode_mapping

from .analysis import ObjectiveAnalyzer
from .compress import InputCompression, questions_after
from .early_prefill import DEFAULT_MIN_TOKENS, EarlyPrefill
from .graph import FINAL_STATES, CallNode, DataflowGraph, SessionView, VariableNode
from .prefix import PrefixIndex
from .program import build_request, output_value, space_led_outputs
from .scheduler import AppScheduler, FifoScheduler, Scheduler
from .store import MemoryStore, Record, StateStore, StoreUnavailableError, Write

Listener = Callable[[dict[str, Any]], None]

log = logging.getLogger(__name__)

#: How often a pass is retried while every engine reports unhealthy.
HEALTH_RETRY_S = 0.25
#: How long ready calls wait for an engine while none is healthy before they
#: fail (at once when every engine is gone for good).
ENGINE_WAIT_S = 300.0
#: Longest pause between two probes of a state store that went away.
STORE_RETRY_MAX_S = 2.0
#: Whether early prefill of waiting calls' heads is on when nobody says
#: (``early_prefill=None`` and no $PARROT_EARLY_PREFILL); see the README.
EARLY_PREFILL_DEFAULT = True


@dataclass
class SessionState:
    id: str
    namespace: str = "local"  # whose prefixes these calls may share (the tenant)
    open: bool = True
    opened_at: float = field(default_factory=time.monotonic)
    # Lives only as long as its one client request (an OpenAI call): after a
    # restart nobody waits for it, so restore cancels its calls and closes it.
    ephemeral: bool = False


class LocalRuntime(Runtime):
    """Runs the dataflow of every session on in-process engines.

    ``request_level=True`` turns it into the request-level baseline: the SDK
    resolves every input on the client before submitting a call (a round
    trip per dependency), calls are placed first come first served, and no
    prefix hints reach the engines (nor does any request reuse another's KV
    blocks). It exists for the benchmarks and so a
    user can see the difference on their own program.

    Inputs marked for compression are compressed when their call becomes
    ready, in a worker thread, before the call is queued for an engine; by
    ``compressor`` when given, else by the model of the first engine that runs
    model jobs, else by ``scorer_model`` (a model name or folder, default
    the default model) loaded here (see :mod:`parrot.dataflow.compress`).
    """

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        scheduler: Scheduler | None = None,
        request_level: bool = False,
        min_prefix_chars: int = 32,
        store: StateStore | None = None,
        portal: Portal | None = None,
        compressor: Any = None,
        scorer_model: str | os.PathLike[str] | None = None,
        keep_closed_sessions: int | None = 1000,
        engine_wait_s: float = ENGINE_WAIT_S,
        early_prefill: bool | None = None,
        early_prefill_min_tokens: int = DEFAULT_MIN_TOKENS,
    ) -> None:
        super().__init__(portal)
        if keep_closed_sessions is not None and keep_closed_sessions < 0:
            raise ValueError(f"keep_closed_sessions must be >= 0 or None, got {keep_closed_sessions}")
        # A long-running service forgets the oldest closed sessions beyond
        # this many (graph and store), so memory stays bounded; None keeps all.
        self.keep_closed_sessions = keep_closed_sessions
        if not engine_wait_s > 0:
            raise ValueError(f"engine_wait_s must be > 0, got {engine_wait_s}")
        self.engine_wait_s = engine_wait_s
        self._no_engine_since: float | None = None  # when the last healthy engine went
        self._background: set[asyncio.Task[None]] = set()
        self._closed: deque[str] = deque()
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
        # Call records the store could not take (it was away), newest per
        # call, written when it answers again; and the calls whose outcome
        # could not be stored, to run again then.
        self._unwritten: dict[str, CallNode] = {}
        self._store_waiters: list[CallNode] = []
        self._store_watch: asyncio.Task[None] | None = None
        self._streamed: dict[str, int] = {}  # output var -> characters sent as token events
        self.store: StateStore = store or MemoryStore()
        self._listeners: set[Listener] = set()
        self.compression = InputCompression(self.engines, compressor, scorer_model)
        # Prefill the known head of waiting calls while their producers run
        # (see parrot.dataflow.early_prefill); None: $PARROT_EARLY_PREFILL,
        # default on. Never in the request-level baseline.
        if early_prefill is None:
            early_prefill = env_flag("PARROT_EARLY_PREFILL", default=EARLY_PREFILL_DEFAULT)
        self.early_prefill: EarlyPrefill | None = (
            EarlyPrefill(min_tokens=early_prefill_min_tokens) if early_prefill and not request_level else None
        )
        self._early_host = _EarlyPrefillHost(self)
        #: Most prompt tokens a call of a namespace (a tenant) may send,
        #: checked when its prompt is built, so text that arrives through
        #: variables counts; a call over it fails with PromptTooLongError.
        self.prompt_limits: dict[str, int] = {}

    @property
    def queued_calls(self) -> int:
        """Ready calls not yet handed to an engine."""
        return len(self._ready)

    # -- what the service reads -------------------------------------------
    # The graph, the analyser and the session table are the runtime's own;
    # a layer above reads them through these (the nodes they return are the
    # graph's: read them, never change them).
    @property
    def tokenizer(self) -> TokenizerLike:
        """The tokenizer prompts are counted and checked with (the first engine's)."""
        return self.engines[0].tokenizer

    def session_owner(self, session_id: str) -> str | None:
        """The namespace (tenant) of a session; None for an unknown one."""
        state = self.sessions.get(session_id)
        return state.namespace if state is not None else None

    def session_summaries(self, namespace: str) -> list[tuple[str, bool, int]]:
        """``(session id, open, number of calls)`` of each session of ``namespace``."""
        return [(sid, state.open, len(self.graph.session_calls(sid)))
                for sid, state in self.sessions.items() if state.namespace == namespace]

    def session_view(self, session_id: str) -> SessionView:
        """The session's calls, variables and task groups, for display."""
        return self.graph.session_view(session_id, open=self._session(session_id, must_be_open=False).open)

    def call(self, call_id: str) -> CallNode | None:
        """A call by id (its state, engine, token counts, timings); None if unknown."""
        return self.graph.calls.get(call_id)

    def calls(self) -> list[CallNode]:
        """Every call the runtime knows, of every session."""
        return list(self.graph.calls.values())

    def input_values(self, call_id: str) -> dict[str, str]:
        """The values the call's inputs hold now (inputs still unset left out)."""
        return {k: v for k, v in self.graph.input_values(self.graph.calls[call_id]).items() if v is not None}

    def variable(self, var_id: str) -> VariableNode | None:
        """A variable by id (value, error, producer); None if unknown."""
        return self.graph.variables.get(var_id)

    def variable_owner(self, var_id: str) -> str | None:
        """The namespace (tenant) of the variable's session; None for an unknown one."""
        var = self.graph.variables.get(var_id)
        return self.session_owner(var.session_id) if var is not None else None

    # -- events ---------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` for every DAG event; returns the unsubscriber.
        Events are dicts with ``type`` in call_added, call_state, variable_set,
        token (a streamed piece of an output), session_closed and
        session_forgotten (with the ``call_ids`` dropped)."""
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def _emit(self, event: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not break the runtime
                log.exception("event listener failed")

    def _call_event(self, call: CallNode) -> None:
        self._emit({"type": "call_state", "session_id": call.session_id, "call_id": call.id,
                    "state": call.state, "engine": call.engine, "error": call.error,
                    "compression": call.compression})

    async def _persist_call(self, call: CallNode) -> None:
        try:
            await self.store.write([("call", call.id, call_record(call))])
        except StoreUnavailableError:
            # Written when the store is back (its newest state), so what a
            # client was told is what a restart finds.
            self._unwritten[call.id] = call
            self._watch_store()
        except Exception:
            log.exception("could not record the state of call %s", call.id)

    def _watch_store(self) -> None:
        """Start (once) the task that waits for the store to answer again,
        then writes the records it missed and re-runs the calls it held."""
        if self._store_watch is None or self._store_watch.done():
            self._store_watch = asyncio.get_running_loop().create_task(self._store_came_back(), name="store-watch")

    async def _store_came_back(self) -> None:
        pause = 0.05
        while True:
            try:
                await self.store.ping()
                while self._unwritten:
                    call_id, call = next(iter(self._unwritten.items()))
                    await self.store.write([("call", call_id, call_record(call))])
                    if self._unwritten.get(call_id) is call:
                        del self._unwritten[call_id]
                break
            except StoreUnavailableError:
                await asyncio.sleep(pause)  # back off while it is away
                pause = min(2 * pause, STORE_RETRY_MAX_S)
        held, self._store_waiters = self._store_waiters, []
        log.info("the state store answers again: %d calls run again", len(held))
        for call in held:
            if call.state == "ready":
                self._dispatch(call)

    # -- sessions -------------------------------------------------------
    def _session(self, session_id: str, *, must_be_open: bool = True) -> SessionState:
        state = self.sessions.get(session_id)
        if state is None:
            raise UnknownSessionError(f"unknown session {session_id!r}")
        if must_be_open and not state.open:
            raise SessionClosedError(f"session {session_id} is closed")
        return state

    async def open_session(self, *, namespace: str = "local", ephemeral: bool = False) -> str:
        """Open a session; ``namespace`` scopes prefix sharing (the tenant).
        An ``ephemeral`` session serves one client request and does not
        outlive a restart: restore cancels its unfinished calls and closes it."""
        session_id = new_id("session")
        state = SessionState(session_id, namespace, ephemeral=ephemeral)
        await self.store.write([("session", session_id, session_record(state))])
        self.sessions[session_id] = state
        return session_id

    async def close_session(self, session_id: str, *, cancel: bool = False) -> None:
        state = self._session(session_id, must_be_open=False)
        if state.open:
            state.open = False
            await self.store.write([("session", session_id, session_record(state))])
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
                await self._cancel_call(call, "the session was closed before the call could run")
        self._emit({"type": "session_closed", "session_id": session_id})
        if session_id not in self._closed:
            self._closed.append(session_id)
        await self._forget_closed_sessions()

    async def _forget_closed_sessions(self) -> None:
        """Forget the oldest closed sessions beyond ``keep_closed_sessions``:
        their calls and variables leave the graph and the store. A session
        whose variables another session still reads stays for a later try."""
        if self.keep_closed_sessions is None:
            return
        postponed: list[str] = []
        while len(self._closed) + len(postponed) > self.keep_closed_sessions and self._closed:
            session_id = self._closed.popleft()
            removable = self.graph.removable_session(session_id)
            if removable is None:
                postponed.append(session_id)
                continue
            call_ids, var_ids = removable
            # The store first: if it fails, the graph still matches it.
            await self.store.delete([("session", session_id), *(("call", c) for c in call_ids),
                                     *(("variable", v) for v in var_ids)])
            for call_id in call_ids:
                self.prefixes.forget(self.graph.calls[call_id])
                if self.early_prefill is not None:
                    self.early_prefill.discard(call_id)
            self.graph.remove_session(session_id)
            for var_id in var_ids:
                self._streamed.pop(var_id, None)
                self._waiters.pop(var_id, None)
            self.sessions.pop(session_id, None)
            self._emit({"type": "session_forgotten", "session_id": session_id, "call_ids": call_ids})
        self._closed.extendleft(reversed(postponed))

    async def _cancel_call(self, call: CallNode, reason: str) -> None:
        self._ready.pop(call.id, None)
        task = self._tasks.pop(call.id, None)
        if task is not None:
            task.cancel()
        lost = self.graph.fail_call(call.id, reason)
        call.state = "cancelled"
        await self._failed(call, lost)

    async def _failed(self, call: CallNode, lost: Sequence[VariableNode]) -> None:
        """Tell waiters and listeners about a failed call and its lost downstream."""
        self._reject_waiters(lost)
        for var_id in [*call.outputs.values(), *(v.id for v in lost)]:
            self._streamed.pop(var_id, None)
        failed = {call.id} | {v.producer for v in lost if v.producer} | {
            c for v in lost for c in self.graph.graph.successors(v.id)
        }
        for call_id in failed:
            node = self.graph.calls[call_id]
            self._ready.pop(call_id, None)
            if self.early_prefill is not None:
                self.early_prefill.discard(call_id)
            self._call_event(node)
            await self._persist_call(node)

    # -- variables ------------------------------------------------------
    async def create_variable(self, session_id: str, var_id: str, name: str, value: str | None = None) -> None:
        self.client_requests["create_variable"] += 1
        self._session(session_id)
        check_unicode("var_id", var_id)
        check_unicode("name", name)
        if value is not None:
            check_unicode("value", value)
        var = self.graph.add_variable(var_id, name, session_id, value)
        try:
            await self.store.write([("variable", var_id, variable_record(var))])
        except BaseException:
            self.graph.remove_variable(var_id)
            raise

    async def set_variable(self, session_id: str, var_id: str, value: str) -> None:
        self.client_requests["set"] += 1
        self._session(session_id)
        check_unicode("value", value)
        var = self.graph.variable(var_id)
        if var.producer is not None:
            raise VariableAlreadySetError(f"variable {var.name!r} is the output of call {var.producer}; it cannot be set")
        if var.is_set:
            raise VariableAlreadySetError(f"variable {var.name!r} ({var_id}) already has a value")
        await self._set(var_id, value)

    async def _set(self, var_id: str, value: str) -> None:
        # The store decides who set it first, so a value is never written twice
        # (a call re-run after a restart finds its earlier outputs there).
        if not await self.store.set_value(var_id, value):
            raise VariableAlreadySetError(f"variable {var_id} already has a value")
        ready = self.graph.set_value(var_id, value)
        self._streamed.pop(var_id, None)
        var = self.graph.variables[var_id]
        for future in self._waiters.pop(var_id, []):
            if not future.done():
                future.set_result(value)
        self._emit({"type": "variable_set", "session_id": var.session_id, "var_id": var_id, "name": var.name})
        for call in ready:
            self._call_event(call)
            self._dispatch(call)

    def _reject_waiters(self, variables: Sequence[VariableNode]) -> None:
        for var in variables:
            for future in self._waiters.pop(var.id, []):
                if not future.done():
                    future.set_exception(CallFailedError(f"variable {var.name!r} will never be set: {var.error}"))

    def poll_variable(self, session_id: str, var_id: str, perf: Perf = "latency") -> VariableNode:
        """A ``get`` that does not wait: the read's objective counts (as with
        :meth:`get_variable`) and the variable is returned as it is now."""
        self.client_requests["get"] += 1
        check_perf(perf)
        self._session(session_id, must_be_open=False)
        var = self.graph.variable(var_id)
        self.graph.annotate_get(var_id, perf)
        self.analyzer.on_get(var_id, perf)
        if self._ready:
            self._request_pass()  # a new objective may change the order
        return var

    async def get_variable(self, session_id: str, var_id: str, perf: Perf = "latency") -> str:
        var = self.poll_variable(session_id, var_id, perf)
        if var.value is not None:
            return var.value
        if var.error is not None:
            raise CallFailedError(f"variable {var.name!r} will never be set: {var.error}")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(var_id, []).append(future)
        try:
            return await future
        finally:
            if future.cancelled():  # a long-poll that timed out: forget its waiter
                waiting = self._waiters.get(var_id, [])
                if future in waiting:
                    waiting.remove(future)

    # -- calls ----------------------------------------------------------
    async def submit_calls(self, session_id: str, calls: Sequence[Call]) -> None:
        """Add a batch of calls: all of them, or (on any error) none."""
        self.client_requests["submit"] += 1
        state = self._session(session_id)
        for i, spec in enumerate(calls):  # text no store or tokenizer takes: refused before any change
            check_unicode(f"calls.{i}.call_id", spec.call_id)
            check_unicode(f"calls.{i}.function.template", spec.function.template)
            check_unicode_mapping(f"calls.{i}.constants", spec.constants)
            check_unicode_mapping(f"calls.{i}.inputs", spec.inputs)
            check_unicode_mapping(f"calls.{i}.outputs", spec.outputs)
        added: list[CallNode] = []
        try:
            for i, spec in enumerate(calls):
                try:
                    added.append(self.graph.add_call(session_id, spec, namespace=state.namespace))
                except ParrotError as exc:
                    # Say which call of the batch was at fault.
                    exc.field = f"calls.{i}" + (f".{exc.field}" if getattr(exc, "field", None) else "")
                    raise
            records: list[Write] = []
            functions: dict[int, Record] = {}  # one record per function spec of the batch
            for node in added:
                records.extend(("variable", v, variable_record(self.graph.variables[v])) for v in node.inputs.values()
                               if self.graph.variables[v].constant)
                records.extend(("variable", v, variable_record(self.graph.variables[v])) for v in node.outputs.values())
                function = functions.get(id(node.function))
                if function is None:
                    function = functions[id(node.function)] = node.function.to_dict()
                records.append(("call", node.id, call_record(node, function)))
            await self.store.write(records)
        except BaseException:
            for node in reversed(added):
                self.graph.remove_call(node.id)
            raise
        for node in added:
            if not self.request_level:
                self.prefixes.add(node, self.graph, state.namespace)
            self.analyzer.on_call_added(node)
            self._emit({"type": "call_added", "session_id": session_id, "call_id": node.id,
                        "function": node.function.name, "state": node.state})
            if node.state == "ready":
                self._dispatch(node)
            elif node.state == "waiting" and self.early_prefill is not None:
                self.early_prefill.add(node, self.prefixes.head(node), state.namespace)
                self._request_pass()  # an idle engine may warm its head now
            elif node.state == "failed":
                await self._failed(node, [self.graph.variables[v] for v in node.outputs.values()])

    async def early_prefill_settled(self) -> None:
        """Until no warm-up of a waiting call's head is in flight and none
        can start now (the passes that earlier ones' ends request included)."""
        while self.early_prefill is not None:
            if self._pass_scheduled:
                self._schedule_pass()  # now, not after this coroutine's next wait
            if not self.early_prefill.inflight:
                return
            await self.early_prefill.wait()

    def _dispatch(self, call: CallNode) -> None:
        """Queue a ready call; a scheduling pass places it on an engine.
        A call with inputs to compress is compressed first."""
        if self.early_prefill is not None:
            self.early_prefill.discard(call.id)  # it waits no more
        if call.compress and call.compression is None:
            # Tracked with the running calls, so closing the session waits
            # for it and cancelling the call cancels it.
            self._tasks[call.id] = asyncio.get_running_loop().create_task(
                self._compress(call), name=f"{call.id}.compress"
            )
            return
        self._ready[call.id] = call
        self._request_pass()

    async def _compress(self, call: CallNode) -> None:
        """Compress the call's marked inputs off the event loop, then queue it."""
        try:
            rates = dict(call.compress)
            values = self.graph.input_values(call)
            # Question-aware where the template asks something after the input.
            questions = questions_after(call.template, values, list(rates))
            texts, stats = await asyncio.to_thread(self.compression.apply, rates, values, questions)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._tasks.pop(call.id, None)
            log.warning("compressing the inputs of call %s (%s) failed: %s", call.id, call.function.name, exc)
            await self._failed(call, self.graph.fail_call(call.id, f"compression failed: {type(exc).__name__}: {exc}"))
            return
        self._tasks.pop(call.id, None)
        if call.state != "ready":  # failed or cancelled meanwhile
            return
        call.compressed_inputs, call.compression = texts, stats
        self._call_event(call)
        self._dispatch(call)
        await self._persist_call(call)

    def _request_pass(self) -> None:
        # One pass after the current burst of events, not one per event.
        if not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._schedule_pass)

    def _schedule_pass(self) -> None:
        self._pass_scheduled = False
        if self._ready:
            self._place_ready()
        if self.early_prefill is not None and self.early_prefill.pending:
            # After placement: an engine given work now is not idle.
            self.early_prefill.run_pass(self.graph, self._early_host)

    def _place_ready(self) -> None:
        for call in self._ready.values():
            # Now, not at readiness: the calls submitted with it count too.
            hint = self.prefixes.hint_for(call)
            call.prefix_key = hint.key if hint else None
        engines = [e for e in self.engines if e.healthy()]
        if not engines:
            self._no_engine_ready_calls()
            return
        self._no_engine_since = None
        for call, engine in self.scheduler.schedule(list(self._ready.values()), self.graph, engines):
            del self._ready[call.id]
            call.state = "running"
            call.engine = engine.name
            call.started_at = time.monotonic()
            self._call_event(call)
            self._tasks[call.id] = asyncio.get_running_loop().create_task(self._run(call, engine), name=call.id)

    def _no_engine_ready_calls(self) -> None:
        """No engine is healthy: ready calls wait for one to come back (a
        restarted actor, a reachable server again), but not forever. When
        every engine is gone for good, or none came back within
        ``engine_wait_s``, they fail with an error that says so."""
        now = time.monotonic()
        if self._no_engine_since is None:
            self._no_engine_since = now
        if all(e.gone() for e in self.engines):
            reason = f"no engine can run it: all {len(self.engines)} engines are gone for good"
        elif now - self._no_engine_since >= self.engine_wait_s:
            reason = f"no engine can run it: none has been healthy for {self.engine_wait_s:g} s"
        else:
            # Nothing else would wake the waiting calls.
            asyncio.get_running_loop().call_later(HEALTH_RETRY_S, self._request_pass)
            return
        waiting = list(self._ready.values())
        self._ready.clear()
        log.error("failing %d ready calls: %s", len(waiting), reason)

        async def fail_all() -> None:
            for call in waiting:
                if call.state == "ready":
                    await self._failed(call, self.graph.fail_call(call.id, f"EngineUnavailableError: {reason}"))

        task = asyncio.get_running_loop().create_task(fail_all(), name="fail-ready-calls")
        self._background.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._background.discard)

    async def _run(self, call: CallNode, engine: Engine) -> None:
        stream = None
        try:
            await self._persist_call(call)
            # Outputs an earlier run released (before its engine died, or
            # before a restart) are kept and fed as text, never generated again.
            released = {name: self.graph.variables[v].value for name, v in call.outputs.items()
                        if self.graph.variables[v].is_set}
            if len(released) < len(call.outputs):
                hint = self.prefixes.hint_for(call)
                request = build_request(
                    call.function,
                    call.template,
                    self.graph.prompt_values(call),
                    engine.tokenizer,
                    request_id=f"{call.id}.{call.requeues}" if call.requeues else call.id,
                    prefix=(hint.key, hint.end) if hint else None,
                    fixed_outputs=released,
                )
                # Engines share KV blocks only within a namespace: the tenant's, or
                # the call's own in the request-level baseline (no reuse at all).
                session = self.sessions.get(call.session_id)
                request.namespace = call.id if self.request_level or session is None else session.namespace
                if session is not None and session.namespace in self.prompt_limits:
                    self._check_prompt_limit(request, self.prompt_limits[session.namespace])
                # The engine admits by it; the request-level baseline knows none.
                request.objective = None if self.request_level else call.objective
                stream = engine.submit(request)
                await self._consume(call, request, stream)
            call.state = "done"
            call.finished_at = time.monotonic()
            self._call_event(call)
            await self._persist_call(call)
        except asyncio.CancelledError:
            if stream is not None:
                stream.cancel()
            raise
        except StoreUnavailableError as exc:
            # Its outcome could not be stored, so no client has been told it:
            # the call runs again once the store answers (outputs it stored
            # stay set). Failing it would tell clients an outcome a restart
            # would not find.
            if stream is not None:
                stream.cancel()
            log.warning("call %s: the state store is away (%s); it runs again when the store is back", call.id, exc)
            call.state, call.engine, call.requeues = "ready", None, call.requeues + 1
            self._call_event(call)
            self._store_waiters.append(call)
            self._watch_store()
        except EngineUnavailableError as exc:
            # The engine died under the call: run it again elsewhere. Outputs
            # it already released stay set and are not set twice.
            log.warning("engine %s lost call %s (%s); re-queued", engine.name, call.id, exc)
            call.state, call.engine, call.requeues = "ready", None, call.requeues + 1
            self._call_event(call)
            await self._persist_call(call)
            self._dispatch(call)
        except Exception as exc:
            log.warning("call %s (%s) failed: %s", call.id, call.function.name, exc)
            await self._failed(call, self.graph.fail_call(call.id, f"{type(exc).__name__}: {exc}"))
        finally:
            self._tasks.pop(call.id, None)
            self.prefixes.forget(call)
            self._request_pass()  # its engine slot is free again

    @staticmethod
    def _check_prompt_limit(request: GenerationRequest, limit: int) -> None:
        tokens = sum(len(step.token_ids) for step in request.program if isinstance(step, Fill))
        if tokens > limit:
            raise PromptTooLongError(f"the prompt has {tokens} tokens; this tenant's limit is {limit}",
                                     field="max_prompt_tokens")

    async def _consume(self, call: CallNode, request: GenerationRequest, stream: RequestStream) -> None:
        """Release each output of ``call`` as ``stream`` yields it."""
        names = [step.name for step in request.program if isinstance(step, Gen)]
        streamed: dict[str, int] = {}  # characters of each output this run produced so far
        # Outputs whose prompt space the model writes back: listeners and the
        # value get the text without it (see program.space_led_outputs).
        lead = set(space_led_outputs(call.template))
        async for event in stream:
            if isinstance(event, TokenDelta) and names[event.gen_index] in lead and event.text:
                lead.discard(names[event.gen_index])
                if event.text.startswith(" "):
                    event = dc_replace(event, text=event.text[1:])
            if isinstance(event, TokenDelta) and self._listeners:
                out_id = call.outputs[names[event.gen_index]]
                # A re-run after its engine died repeats what the dead engine
                # already streamed: listeners get only the text past that point.
                before = streamed.get(out_id, 0)
                streamed[out_id] = before + len(event.text)
                already = self._streamed.get(out_id, 0)
                if streamed[out_id] > already:
                    self._streamed[out_id] = streamed[out_id]
                    self._emit({"type": "token", "session_id": call.session_id, "call_id": call.id,
                                "var_id": out_id, "text": event.text[max(0, already - before):]})
            elif isinstance(event, GenResult):
                call.finish_reasons[event.name] = event.finish_reason
                if event.logprobs is not None:
                    call.logprobs[event.name] = event.logprobs
                # Each output is released as soon as it exists, so its
                # consumers start while this call is still generating.
                out_id = call.outputs[event.name]
                if not self.graph.variables[out_id].is_set:  # set before a restart
                    await self._set(out_id, output_value(call.template, event.name, event.text))
            elif isinstance(event, RequestFinished):
                call.prefill_tokens = event.stats.prefill_tokens
                call.generated_tokens = event.stats.generated_tokens
                call.cached_tokens = event.stats.cached_tokens
                call.engine_started_at = event.stats.started_at
                call.first_token_at = event.stats.first_token_at

    # -- restart ----------------------------------------------------------
    async def restore(self) -> int:
        """Rebuild sessions, variables and calls from the store (after a
        restart) and re-queue every call that had not finished. Returns the
        number of calls re-queued.

        A record that cannot be read back (malformed, or from an older
        version) is logged and skipped, with whatever depends on it (a call
        whose session or input is gone); it never stops the service."""
        for record in await self.store.load("session"):
            try:
                self.sessions[record["id"]] = SessionState(record["id"], record["namespace"], record["open"],
                                                           ephemeral=bool(record.get("ephemeral", False)))
            except Exception:
                _skipped("session", record)
        variables = await self.store.load("variable")
        for record in variables:
            try:
                if record["session_id"] not in self.sessions:
                    raise UnknownSessionError(f"unknown session {record['session_id']!r}")
                if record["producer"] is None and not record["constant"]:
                    self.graph.add_variable(record["id"], record["name"], record["session_id"], record["value"])
            except Exception:
                _skipped("variable", record)
        values = {r.get("id"): r.get("value") for r in variables}
        for record in await self.store.load("call"):
            node = None
            try:
                if record["session_id"] not in self.sessions:
                    raise UnknownSessionError(f"unknown session {record['session_id']!r}")
                spec = call_spec_from_record(record, values)
                node = self.graph.add_call(record["session_id"], spec,
                                           namespace=self.sessions[record["session_id"]].namespace)
                # Outputs released before the restart stay released, even if the
                # call later failed: calls that read them may have finished.
                for out_id in node.outputs.values():
                    if values.get(out_id) is not None:
                        self.graph.set_value(out_id, values[out_id])
                if record["state"] not in FINAL_STATES:
                    self.prefixes.add(node, self.graph, self.sessions[node.session_id].namespace)
                self.analyzer.on_call_added(node)
                if record["state"] in ("failed", "cancelled"):
                    self.graph.fail_call(node.id, record.get("error") or "failed before the restart")
                    node.state = record["state"]
                if record["state"] in FINAL_STATES:
                    _restore_stats(node, record)
            except Exception:
                _skipped("call", record)
                if node is not None and node.id in self.graph.calls:
                    self.prefixes.forget(node)
                    self.graph.remove_call(node.id)
        for record in variables:
            var = self.graph.variables.get(record.get("id"))
            if var is not None and record.get("value") is not None and not var.is_set and var.error is None:
                self.graph.set_value(var.id, record["value"])
        requeued = 0
        for node in self.graph.calls.values():
            if node.state in FINAL_STATES:
                continue
            if all(self.graph.variables[v].is_set for v in node.outputs.values()):
                node.state = "done"
            elif node.state == "ready" and not self.sessions[node.session_id].ephemeral:
                self._dispatch(node)
                requeued += 1
        for session_id, state in list(self.sessions.items()):
            if state.ephemeral and state.open:  # its client went with the old process
                await self.close_session(session_id, cancel=True)
        already = set(self._closed)
        self._closed.extend(sid for sid, state in self.sessions.items() if not state.open and sid not in already)
        await self._forget_closed_sessions()
        return requeued

    async def shutdown(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self.early_prefill is not None:
            self.early_prefill.cancel_all()
        if self._store_watch is not None:
            self._store_watch.cancel()
        for engine in self.engines:
            await asyncio.to_thread(engine.close)
        await self.store.close()

    def describe(self, session_id: str) -> str:
        """The session's DAG as text (calls in submission order)."""
        return self.graph.describe(session_id)


class _EarlyPrefillHost:
    """What early prefill asks of the runtime (see :class:`~parrot.dataflow.early_prefill.EarlyPrefillHost`)."""

    def __init__(self, runtime: LocalRuntime) -> None:
        self.runtime = runtime

    def _busy(self) -> set[str]:
        """Engines the runtime has placed calls on that have not finished."""
        rt = self.runtime
        return {c.engine for c in (rt.graph.calls.get(cid) for cid in rt._tasks)
                if c is not None and c.state == "running" and c.engine is not None}

    def idle_engine_for(self, key: str) -> Engine | None:
        scheduler = self.runtime.scheduler
        if not isinstance(scheduler, AppScheduler):
            return None  # only the app scheduler says where a hinted call will go
        busy = self._busy()
        idle = []
        for engine in self.runtime.engines:
            if engine.name in busy or not engine.healthy():
                continue
            cap = engine.capacity()
            if cap.running == 0 and cap.waiting == 0:
                idle.append(engine)
        return scheduler.place_prefix(key, idle) if idle else None

    def holds_prefix(self, key: str) -> bool:
        return any(key in e.capacity().cached_prefixes for e in self.runtime.engines if e.healthy())

    def warmed(self, key: str, engine: Engine) -> None:
        self.runtime.prefixes.reach(key)  # the call is hinted with the head, so it takes the stored one
        scheduler = self.runtime.scheduler
        if isinstance(scheduler, AppScheduler):
            scheduler.note_prefix(key, engine)

    def admit_warm_up(self, request: GenerationRequest, namespace: str) -> None:
        limit = self.runtime.prompt_limits.get(namespace)
        if limit is not None:
            self.runtime._check_prompt_limit(request, limit)

    def warm_up_ended(self) -> None:
        self.runtime._request_pass()


# -- records: what the store keeps ------------------------------------------
def _restore_stats(node: CallNode, record: Record) -> None:
    """What a call record says the engine did (records from older versions may lack it)."""
    node.engine = record.get("engine")
    tokens = record.get("tokens") or {}
    node.prefill_tokens = int(tokens.get("prefill", 0))
    node.cached_tokens = int(tokens.get("cached", 0))
    node.generated_tokens = int(tokens.get("generated", 0))
    node.finish_reasons = dict(record.get("finish_reasons") or {})


def _skipped(kind: str, record: Any) -> None:
    """Log a record restore could not use (it stays in the store, untouched)."""
    record_id = record.get("id") if isinstance(record, dict) else None
    log.exception("restore: skipped the unreadable %s record %r", kind, record_id)


def session_record(state: SessionState) -> Record:
    return {"id": state.id, "namespace": state.namespace, "open": state.open, "ephemeral": state.ephemeral}


def variable_record(var: VariableNode) -> Record:
    return {"id": var.id, "name": var.name, "session_id": var.session_id, "value": var.value,
            "producer": var.producer, "constant": var.constant}


def call_record(call: CallNode, function: Record | None = None) -> Record:
    """The call's record; ``function`` is its function's record when the caller has it already."""
    return {"id": call.id, "session_id": call.session_id, "function": function or call.function.to_dict(),
            "inputs": dict(call.inputs), "outputs": dict(call.outputs), "state": call.state,
            "engine": call.engine, "error": call.error, "compression": call.compression,
            "tokens": {"prefill": call.prefill_tokens, "cached": call.cached_tokens, "generated": call.generated_tokens},
            "finish_reasons": dict(call.finish_reasons)}


def call_spec_from_record(record: Record, values: dict[str, str | None]) -> Call:
    """The spec a call record was made from (constant inputs by value)."""
    inputs, constants = {}, {}
    for name, var_id in record["inputs"].items():
        if var_id == f"{record['id']}.{name}":  # a constant the graph made for this call
            constants[name] = values[var_id] or ""
        else:
            inputs[name] = var_id
    return Call(record["id"], FunctionSpec.from_dict(record["function"]), inputs, constants, record["outputs"])


def default_local_runtime() -> LocalRuntime:
    """One torch engine on ``$PARROT_MODEL`` or the default model;
    ``PARROT_REQUEST_LEVEL=1`` selects the request-level baseline."""
    from parrot.backends.spec import EngineSpec

    request_level = env_flag("PARROT_REQUEST_LEVEL")
    # The spec resolves the model (parrot.backends.models.resolve_model) and
    # reads PARROT_KV_CACHE_BYTES / PARROT_MAX_MODEL_LEN.
    engine = EngineSpec(name="engine-0").build()
    return LocalRuntime([engine], request_level=request_level)
