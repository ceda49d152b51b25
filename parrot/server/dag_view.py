"""Read-only JSON views of a session's DAG, for the API, the visualizer and
``parrot dag export``.

Times in the graph are ``time.monotonic()`` readings; the views give them as
seconds since the session's first call was submitted (``t0``), with ``now``
on the same scale, so a client can draw a live timeline without clock sync.
Nothing here checks ownership: :class:`ParrotService` does that first.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from parrot.dataflow.graph import CallNode, SessionView
from parrot.semantic_vars.template import Placeholder

# CallNode's monotonic timestamps, in the order a call passes them.
TIMESTAMPS = ("submitted_at", "ready_at", "started_at", "engine_started_at", "first_token_at", "finished_at")


def _since(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 6)


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(max(0.0, end - start), 6)


def call_timings(call: CallNode, t0: float) -> dict[str, float | None]:
    """The call's timestamps relative to ``t0``, and its phases in seconds:
    queued (ready until an engine admitted it), split into placement (ready
    until the scheduler handed it to an engine) and engine queue (handed over
    until the engine admitted it to its batch); prefill (admission to first
    token) and decode (first token to finish)."""
    out: dict[str, float | None] = {name: _since(getattr(call, name), t0) for name in TIMESTAMPS}
    admitted = call.engine_started_at or call.started_at
    out["queued_s"] = _span(call.ready_at, admitted)
    out["placement_s"] = _span(call.ready_at, call.started_at)
    out["engine_queue_s"] = _span(call.started_at, call.engine_started_at)
    out["prefill_s"] = _span(call.engine_started_at, call.first_token_at)
    out["decode_s"] = _span(call.first_token_at, call.finished_at)
    return out


def compression_fields(call: CallNode) -> dict[str, Any]:
    """Whatever compression statistics the call node carries (fields whose
    name starts with ``compress``); empty when compression did not run."""
    out = {}
    for f in dataclasses.fields(call):
        if f.name.startswith("compress"):
            value = getattr(call, f.name)
            if value not in (None, {}, []):
                out[f.name] = value
    return out


def session_t0(calls: list[CallNode]) -> float:
    return min((c.submitted_at for c in calls), default=time.monotonic())


def session_dag(view: SessionView) -> dict[str, Any]:
    """The session's DAG as JSON: calls (state, objective, group, shared
    prefix, engine, tokens, timings, compression), variables, task groups."""
    calls = view.calls
    t0 = session_t0(calls)
    return {
        "session_id": view.session_id,
        "open": view.open,
        "now": _since(time.monotonic(), t0),
        "calls": [
            {
                "call_id": c.id, "function": c.function.name, "state": c.state, "objective": c.objective,
                "group": c.group, "engine": c.engine, "inputs": c.inputs, "outputs": c.outputs,
                "prefix_key": c.prefix_key, "prefill_tokens": c.prefill_tokens,
                "cached_tokens": c.cached_tokens, "generated_tokens": c.generated_tokens, "error": c.error,
                "timings": call_timings(c, t0), **compression_fields(c),
            }
            for c in calls
        ],
        "variables": [
            {
                "var_id": v.id, "name": v.name, "ready": v.is_set, "constant": v.constant,
                "producer": v.producer, "perf": v.perf, "error": v.error,
            }
            for v in view.variables.values()
        ],
        "groups": [
            {"group_id": g, "consumer": view.groups[g].consumer, "members": view.groups[g].members}
            for g in sorted(view.groups)
        ],
    }


def call_detail(view: SessionView, call: CallNode) -> dict[str, Any]:
    """One call of the session ``view`` shows in full: its prompt as segments
    (text, and each variable with its value where known), its inputs and
    outputs with values, timings."""
    t0 = session_t0(view.calls)

    def var_view(name: str, var_id: str) -> dict[str, Any]:
        v = view.variables[var_id]
        return {"name": name, "var_id": var_id, "value": v.value, "ready": v.is_set,
                "constant": v.constant, "error": v.error}

    prompt: list[dict[str, Any]] = []
    for seg in call.template.segments:
        if isinstance(seg, Placeholder):
            ids = call.inputs if seg.kind == "input" else call.outputs
            prompt.append({"kind": seg.kind, **var_view(seg.name, ids[seg.name])})
        else:
            prompt.append({"kind": "text", "text": seg.text})
    return {
        "call_id": call.id, "session_id": call.session_id, "function": call.function.name,
        "template": call.function.template, "state": call.state, "objective": call.objective,
        "group": call.group, "engine": call.engine, "error": call.error, "prefix_key": call.prefix_key,
        "prefix_chars": len(call.prefix_text), "requeues": call.requeues,
        "prefill_tokens": call.prefill_tokens, "cached_tokens": call.cached_tokens,
        "generated_tokens": call.generated_tokens,
        "prompt": prompt,
        "inputs": [var_view(n, v) for n, v in call.inputs.items()],
        "outputs": [var_view(n, v) for n, v in call.outputs.items()],
        "timings": call_timings(call, t0), **compression_fields(call),
    }
