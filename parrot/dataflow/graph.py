"""The dataflow graph of calls and Semantic Variables.

Nodes are variables and calls; edges run variable -> call (an input) and
call -> variable (an output), so the graph is bipartite and a path between
two calls is a real data dependency. One graph holds every session of a
runtime, kept incrementally as calls arrive. It is plain data: no asyncio,
no engines; the runtime drives it and the scheduler reads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import networkx as nx

from parrot.semantic_vars.template import parse_template
from parrot.semantic_vars import (
    Call,
    DataflowCycleError,
    FunctionSpec,
    InvalidArgumentError,
    Perf,
    Template,
    UnknownVariableError,
    VariableAlreadySetError,
)

CallState = Literal["waiting", "ready", "running", "done", "failed", "cancelled"]
FINAL_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})


@dataclass
class VariableNode:
    """A Semantic Variable as the runtime knows it."""

    id: str
    name: str
    session_id: str
    value: str | None = None
    producer: str | None = None  # id of the call that outputs it
    constant: bool = False
    error: str | None = None  # set when its producer failed
    perf: Perf | None = None  # strongest get() annotation seen
    set_at: float | None = None

    @property
    def is_set(self) -> bool:
        return self.value is not None


@dataclass
class CallNode:
    """One call of a semantic function and what happened to it."""

    id: str
    session_id: str
    function: FunctionSpec
    template: Template
    inputs: dict[str, str]  # input name -> variable id (constants included)
    outputs: dict[str, str]  # output name -> variable id
    # Whose call it is (its session's namespace: the tenant); the scheduler
    # shares the engines fairly between namespaces.
    namespace: str = ""
    state: CallState = "waiting"
    engine: str | None = None
    error: str | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    started_at: float | None = None  # placed on an engine
    finished_at: float | None = None
    # From the engine's RequestStats (same monotonic clock): admitted to a
    # batch, first generated token. Prefill is first_token_at - engine_started_at.
    engine_started_at: float | None = None
    first_token_at: float | None = None
    prefill_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    # Why each output's generation ended: "eos", "stop" (a stop string) or
    # "length" (max_tokens, or the engine's context limit).
    finish_reasons: dict[str, str] = field(default_factory=dict)
    # Per-token logprobs of each output whose sampling asked for them (the
    # engine's TokenLogprob entries); not persisted.
    logprobs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # Deduced by the analyser (see analysis.py); None until a read says.
    objective: Perf | None = None  # what the reads downstream ask for
    latency_critical: bool = False
    wants_throughput: bool = False
    group: str | None = None
    # Shared-prefix analysis (see prefix.py).
    prefix_key: str | None = None
    prefix_text: str = ""
    requeues: int = 0  # times an engine died under it and it was placed again
    # Inputs to compress before the prompt is built (name -> fraction of
    # tokens to keep), their compressed text once done, and what it gave:
    # {"original_tokens", "compressed_tokens", "ratio", "seconds", "model",
    # "inputs": {name: {...same, "rate"}}} (see parrot.dataflow.compress).
    compress: dict[str, float] = field(default_factory=dict)
    compressed_inputs: dict[str, str] = field(default_factory=dict)
    compression: dict[str, Any] | None = None
    # Variables this call created (constants, new outputs): removed with it.
    owned_variables: list[str] = field(default_factory=list)


@dataclass
class TaskGroup:
    """Calls whose outputs all feed ``consumer``; scheduled and batched together
    (found by :class:`parrot.dataflow.analysis.ObjectiveAnalyzer`)."""

    id: str
    consumer: str
    members: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SessionView:
    """One session's part of the graph, for display (the nodes are the
    graph's own: read them, do not change them)."""

    session_id: str
    open: bool
    calls: list[CallNode]  # in submission order
    variables: dict[str, VariableNode]  # the session's own and every one its calls read or write
    groups: dict[str, TaskGroup]  # the task groups its calls belong to


class DataflowGraph:
    """Calls and variables of every session, with readiness tracking."""

    def __init__(self) -> None:
        self.graph = nx.DiGraph()
        self.variables: dict[str, VariableNode] = {}
        self.calls: dict[str, CallNode] = {}
        self.groups: dict[str, TaskGroup] = {}
        self._unset_inputs: dict[str, int] = {}  # call id -> inputs still without a value
        self._session_calls: dict[str, dict[str, None]] = {}  # session id -> its call ids, in order
        self._session_vars: dict[str, dict[str, None]] = {}  # session id -> its variable ids

    # -- building -------------------------------------------------------
    def add_variable(
        self, var_id: str, name: str, session_id: str, value: str | None = None, *, constant: bool = False
    ) -> VariableNode:
        if var_id in self.variables or var_id in self.calls:
            raise VariableAlreadySetError(f"variable id {var_id!r} is already in use")
        var = VariableNode(var_id, name, session_id, value=value, constant=constant)
        if value is not None:
            var.set_at = time.monotonic()
        self.variables[var_id] = var
        self._session_vars.setdefault(session_id, {})[var_id] = None
        self.graph.add_node(var_id, kind="variable")
        return var

    def _validate_call(self, session_id: str, spec: Call, template: Template) -> None:
        """Every check of :meth:`add_call`, before anything is changed."""
        if spec.call_id in self.calls or spec.call_id in self.variables:
            raise InvalidArgumentError("call_id", f"{spec.call_id!r} is already in use")
        bound = [*spec.inputs, *spec.constants]
        for name in bound:
            if name not in template.inputs:
                raise InvalidArgumentError(f"inputs.{name}", f"{spec.function.name}() has no input {name!r}")
        if len(set(bound)) != len(bound):
            twice = next(n for n in bound if bound.count(n) > 1)
            raise InvalidArgumentError(f"inputs.{twice}", "bound both to a variable and to a constant")
        for name in template.inputs:
            if name not in bound:
                raise InvalidArgumentError(f"inputs.{name}", f"{spec.function.name}() needs input {name!r}")
        if set(spec.outputs) != set(template.outputs):
            missing = sorted(set(template.outputs) ^ set(spec.outputs))[0]
            raise InvalidArgumentError(f"outputs.{missing}", "outputs must name exactly the template's outputs")
        for name, var_id in spec.inputs.items():
            if var_id not in self.variables:
                raise UnknownVariableError(f"input {name!r} refers to unknown variable {var_id!r}")
        out_ids = list(spec.outputs.values())
        if len(set(out_ids)) != len(out_ids):
            raise InvalidArgumentError("outputs", "two outputs share one variable id")
        # The ids this call would create must be new and distinct: its own id,
        # one per constant input, and its outputs.
        const_ids = {f"{spec.call_id}.{name}": name for name in spec.constants}
        for name, var_id in spec.outputs.items():
            if var_id == spec.call_id or var_id in const_ids:
                raise InvalidArgumentError(f"outputs.{name}", f"{var_id!r} is an id this call uses itself")
        for const_id, name in const_ids.items():
            if const_id in self.variables or const_id in self.calls:
                raise InvalidArgumentError(f"constants.{name}", f"the constant's id {const_id!r} is already in use")
        for name, var_id in spec.outputs.items():
            if var_id in self.calls:
                raise InvalidArgumentError(f"outputs.{name}", f"{var_id!r} is a call id")
            existing = self.variables.get(var_id)
            if existing is None:
                continue
            if existing.producer is not None or existing.is_set:
                raise VariableAlreadySetError(f"output {name!r}: variable {var_id!r} already has a value or producer")
            if existing.session_id != session_id:
                raise UnknownVariableError(f"output {name!r} refers to unknown variable {var_id!r}")
            for in_id in spec.inputs.values():
                if in_id == var_id or nx.has_path(self.graph, var_id, in_id):
                    raise DataflowCycleError(
                        f"{spec.function.name}(): output {name!r} would feed its own input through the graph"
                    )

    def add_call(self, session_id: str, spec: Call, *, namespace: str = "") -> CallNode:
        """Add a call, its constant inputs and its outputs. Raises before
        changing anything if the call is invalid or would close a cycle.
        ``namespace`` is whose call it is (the session's tenant)."""
        template = parse_template(spec.function.template)
        self._validate_call(session_id, spec, template)
        inputs = dict(spec.inputs)
        owned: list[str] = []
        for name, value in spec.constants.items():
            const_id = f"{spec.call_id}.{name}"
            self.add_variable(const_id, name, session_id, value, constant=True)
            inputs[name] = const_id
            owned.append(const_id)
        call = CallNode(spec.call_id, session_id, spec.function, template, inputs, dict(spec.outputs),
                        namespace=namespace)
        # The template's own options win over the function's (most specific).
        call.compress = {**spec.function.input_compression, **template.input_compression}
        call.owned_variables = owned + [v for v in spec.outputs.values() if v not in self.variables]
        self.calls[call.id] = call
        self._session_calls.setdefault(session_id, {})[call.id] = None
        self.graph.add_node(call.id, kind="call")
        for in_id in inputs.values():
            self.graph.add_edge(in_id, call.id)
        for name, out_id in spec.outputs.items():
            var = self.variables.get(out_id) or self.add_variable(out_id, name, session_id)
            var.producer = call.id
            self.graph.add_edge(call.id, out_id)
        self._unset_inputs[call.id] = sum(not self.variables[v].is_set for v in set(inputs.values()))
        failed = [self.variables[v] for v in inputs.values() if self.variables[v].error is not None]
        if failed:
            self.fail_call(call.id, f"input {failed[0].name!r} failed: {failed[0].error}")
        elif self._unset_inputs[call.id] == 0:
            self._mark_ready(call)
        return call

    def remove_call(self, call_id: str) -> None:
        """Undo :meth:`add_call` for a call nothing depends on yet (used to
        roll back a batch that failed part-way)."""
        call = self.calls.pop(call_id)
        self._session_calls.get(call.session_id, {}).pop(call_id, None)
        for out_id in call.outputs.values():
            if out_id in call.owned_variables:
                continue
            var = self.variables[out_id]  # pre-declared: free again
            var.producer, var.error = None, None
        for var_id in call.owned_variables:
            self.remove_variable(var_id)
        self.graph.remove_node(call_id)
        self._unset_inputs.pop(call_id, None)

    def remove_variable(self, var_id: str) -> None:
        """Forget a variable (only for rollbacks: nothing may refer to it)."""
        var = self.variables.pop(var_id)
        self._session_vars.get(var.session_id, {}).pop(var_id, None)
        self.graph.remove_node(var_id)

    # -- running --------------------------------------------------------
    def _mark_ready(self, call: CallNode) -> None:
        call.state = "ready"
        call.ready_at = time.monotonic()

    def set_value(self, var_id: str, value: str) -> list[CallNode]:
        """Set a variable; returns the calls that became ready."""
        var = self.variable(var_id)
        if var.is_set:
            raise VariableAlreadySetError(f"variable {var.name!r} ({var_id}) already has a value")
        var.value = value
        var.set_at = time.monotonic()
        ready: list[CallNode] = []
        for call_id in self.graph.successors(var_id):
            self._unset_inputs[call_id] -= 1
            call = self.calls[call_id]
            if self._unset_inputs[call_id] == 0 and call.state == "waiting":
                self._mark_ready(call)
                ready.append(call)
        return ready

    def fail_call(self, call_id: str, error: str) -> list[VariableNode]:
        """Fail a call and, transitively, every call downstream of it.
        Returns the variables that will now never get a value."""
        lost: list[VariableNode] = []
        stack = [call_id]
        while stack:
            call = self.calls[stack.pop()]
            if call.state in FINAL_STATES:
                continue
            call.state, call.error = "failed", error
            call.finished_at = time.monotonic()
            for out_id in call.outputs.values():
                var = self.variables[out_id]
                if var.is_set:
                    continue
                var.error = error if call.id == call_id else f"upstream call {call_id} failed: {error}"
                lost.append(var)
                stack.extend(self.graph.successors(out_id))
        return lost

    def annotate_get(self, var_id: str, perf: Perf) -> None:
        """Record a ``get(perf=...)``; latency outranks throughput."""
        var = self.variable(var_id)
        if var.perf != "latency":
            var.perf = perf

    # -- queries --------------------------------------------------------
    def variable(self, var_id: str) -> VariableNode:
        try:
            return self.variables[var_id]
        except KeyError:
            raise UnknownVariableError(f"unknown variable {var_id!r}") from None

    def input_values(self, call: CallNode) -> dict[str, str]:
        """The values of ``call``'s inputs, as the variables hold them."""
        values = {name: self.variables[v].value for name, v in call.inputs.items()}
        return values  # type: ignore[return-value]

    def prompt_values(self, call: CallNode) -> dict[str, str]:
        """What the prompt splices in: the input values, compressed ones
        replaced by their compressed text (the variables keep the original)."""
        return {**self.input_values(call), **call.compressed_inputs}

    def session_calls(self, session_id: str) -> list[CallNode]:
        return [self.calls[cid] for cid in self._session_calls.get(session_id, ())]

    def session_view(self, session_id: str, *, open: bool) -> SessionView:
        """The session's calls, variables and task groups (see :class:`SessionView`)."""
        calls = self.session_calls(session_id)
        var_ids = {v for c in calls for v in [*c.inputs.values(), *c.outputs.values()]}
        var_ids |= set(self._session_vars.get(session_id, ()))
        groups = {c.group: self.groups[c.group] for c in calls if c.group and c.group in self.groups}
        return SessionView(session_id, open, calls, {v: self.variables[v] for v in sorted(var_ids)}, groups)

    def removable_session(self, session_id: str) -> tuple[list[str], list[str]] | None:
        """The ``(call ids, variable ids)`` :meth:`remove_session` would
        remove, or None while a call of the session has not finished or a
        call of another session reads one of its variables."""
        calls = self.session_calls(session_id)
        if any(c.state not in FINAL_STATES for c in calls):
            return None
        var_ids = list(self._session_vars.get(session_id, ()))
        for var_id in var_ids:
            for reader in self.graph.successors(var_id):
                if self.calls[reader].session_id != session_id:
                    return None
        return [c.id for c in calls], var_ids

    def remove_session(self, session_id: str) -> tuple[list[str], list[str]] | None:
        """Forget a finished session's calls and variables (its task groups
        too); returns what was removed, or None (and changes nothing) when
        :meth:`removable_session` says it cannot go yet."""
        removable = self.removable_session(session_id)
        if removable is None:
            return None
        call_ids, var_ids = removable
        # A group's members feed its consumer, so a removable session holds
        # whole groups; the members name them.
        for group_id in {self.calls[c].group for c in call_ids} - {None}:
            self.groups.pop(group_id, None)
        for call_id in call_ids:
            del self.calls[call_id]
            self._unset_inputs.pop(call_id, None)
        for var_id in var_ids:
            del self.variables[var_id]
        self.graph.remove_nodes_from([*call_ids, *var_ids])
        self._session_calls.pop(session_id, None)
        self._session_vars.pop(session_id, None)
        return call_ids, var_ids

    def upstream_calls(self, call: CallNode) -> Iterable[CallNode]:
        """Calls whose outputs feed ``call`` directly."""
        for var_id in self.graph.predecessors(call.id):
            producer = self.variables[var_id].producer
            if producer is not None:
                yield self.calls[producer]

    def describe(self, session_id: str) -> str:
        """A text picture of a session's DAG in submission order."""
        lines = []
        for call in self.session_calls(session_id):
            ins = []
            for name, var_id in call.inputs.items():
                var = self.variables[var_id]
                ins.append(f"{name}=<const>" if var.constant else f"{name}<-{var.name}[{var_id[-6:]}]")
            outs = [f"{name}[{var_id[-6:]}]" for name, var_id in call.outputs.items()]
            took = ""
            if call.started_at is not None and call.finished_at is not None:
                took = f" {1000 * (call.finished_at - call.started_at):.0f} ms"
            engine = f" on {call.engine}" if call.engine else ""
            tags = [t for t in (call.objective, call.group and f"group {call.group[-6:]}") if t]
            if call.cached_tokens:
                tags.append(f"{call.cached_tokens} prefix tokens cached")
            if call.compression:
                c = call.compression
                tags.append(f"compressed {c['original_tokens']}->{c['compressed_tokens']} tokens ({c['ratio']:.1f}x)")
            extra = f" ({', '.join(tags)})" if tags else ""
            lines.append(
                f"{call.function.name}({', '.join(ins)}) -> {', '.join(outs)}  [{call.state}{engine}{took}]{extra}"
            )
        return "\n".join(lines)
