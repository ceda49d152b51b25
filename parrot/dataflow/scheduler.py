"""Placing ready calls on engines.

A scheduler is given, in one pass, every call that is ready and not yet
dispatched, and returns which of them go to which engine now; the rest wait
for the next pass (the runtime runs one whenever a call becomes ready or
finishes).

Both policies are *work-conserving*: ready work is handed to an engine as
long as the engine can use it (:meth:`EngineCapacity.room`: its batch plus a
queue of one more batch, bounded by free KV memory), so an engine never
idles, nor waits for this process to refill its batch, while work is ready.
What the DAG knows decides the *order* and the *batch shape*, never whether
ready work runs.

:class:`AppScheduler` (the default) uses what the DAG analysis found:

1. latency-critical calls (and calls nobody annotated yet) go first, each to
   the engine that holds its prefix, else the engine with the most room;
2. the ready members of a complete task group (none still waiting for its
   inputs) go together to one engine, the one holding their shared prefix if
   any, so they batch;
3. other throughput calls next;
4. last, the ready members of groups that still wait for a sibling's input.

Within each of these classes, tenants (call namespaces) take turns: the
tenant served least recently goes first, so one tenant's 10,000 ready calls
delay another tenant's call by one placement, not by the whole backlog. A
group goes past an engine's room by at most an idle engine's room (a
batch and its queue) per pass, so the rest of a huge fan-out waits in line
here, where other tenants' calls can pass it, rather than in an engine's
queue.

A call that finds no room is skipped, not the rest of the pass. Engines see
each request's objective too and admit latency-critical work first
(:mod:`parrot.backends.admission`), so handing work over early does not let
throughput work overtake a chain.

:class:`FifoScheduler` is the request-level baseline: every ready call, in
the order it became ready, to the least loaded engine, at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from parrot.backends.engine import Engine

from .graph import CallNode, DataflowGraph

Assignment = tuple[CallNode, Engine]


class Scheduler(Protocol):
    """Chooses which ready calls run now, and where."""

    def schedule(self, ready: Sequence[CallNode], graph: DataflowGraph, engines: Sequence[Engine]) -> list[Assignment]: ...


@dataclass
class _Room:
    """One pass's view of an engine, updated as calls are placed."""

    engine: Engine
    room: int  # requests it can usefully take now
    load: int  # requests it runs or queues
    prefixes: frozenset[str]
    window: int = 1  # an idle engine's room: its batch and its queue


def _snapshot(engines: Sequence[Engine], queue_depth: int | None = None) -> list[_Room]:
    out = []
    for engine in engines:
        cap = engine.capacity()
        depth = cap.max_running if queue_depth is None else queue_depth
        out.append(_Room(engine, cap.room(queue_depth), cap.running + cap.waiting, cap.cached_prefixes,
                         max(1, cap.max_running + depth)))
    return out


class FifoScheduler:
    """Request-level baseline: first ready, first placed, least loaded engine."""

    def schedule(self, ready: Sequence[CallNode], graph: DataflowGraph, engines: Sequence[Engine]) -> list[Assignment]:
        rooms = _snapshot(engines)
        out: list[Assignment] = []
        for call in sorted(ready, key=lambda c: c.ready_at or 0.0):
            best = min(rooms, key=lambda s: s.load)
            best.load += 1
            out.append((call, best.engine))
        return out


class AppScheduler:
    """The app-centric default policy (see the module docstring).

    ``queue_depth`` is how many requests beyond its batch an engine may be
    given to queue (None: one batch, ``max_running``).
    """

    def __init__(self, queue_depth: int | None = None) -> None:
        if queue_depth is not None and queue_depth < 0:
            raise ValueError(f"queue_depth must be >= 0 or None, got {queue_depth}")
        self.queue_depth = queue_depth
        #: Where each prefix key was last sent: the engine most likely to hold it.
        self.affinity: dict[str, Engine] = {}
        #: When each namespace (tenant) was last given a placement: the one
        #: served least recently goes first among equals.
        self.last_served: dict[str, int] = {}
        self._placements = 0

    def _pick(self, rooms: list[_Room], key: str | None) -> _Room | None:
        """The prefix's holder if it has room, else the engine with the most room."""
        with_room = [s for s in rooms if s.room >= 1]
        if not with_room:
            return None
        if key is not None:
            holders = [s for s in with_room if key in s.prefixes or self.affinity.get(key) is s.engine]
            if holders:
                return min(holders, key=lambda s: s.load)
        return min(with_room, key=lambda s: (s.load, -s.room))

    def place_prefix(self, key: str, engines: Sequence[Engine]) -> Engine | None:
        """The engine a call hinted with ``key`` would be placed on now (the
        prefix's holder if it has room, else the engine with the most room);
        None when no engine has room (an early prefill would only queue)."""
        target = self._pick(_snapshot(engines, self.queue_depth), key)
        return target.engine if target is not None else None

    def note_prefix(self, key: str, engine: Engine) -> None:
        """``engine`` computes the prefix ``key`` now: calls hinted with it go there."""
        self.affinity[key] = engine

    def _place(self, rooms: list[_Room], calls: list[CallNode], out: list[Assignment]) -> bool:
        target = self._pick(rooms, calls[0].prefix_key)
        if target is None:
            return False
        # A group may go past the engine's room by up to an idle engine's
        # room (a batch and its queue); the rest of a larger one stays ready
        # for the next pass.
        calls = calls[:max(0, target.room) + target.window]
        self._placements += 1
        self.last_served[calls[0].namespace] = self._placements
        for call in calls:
            out.append((call, target.engine))
            if call.prefix_key is not None:
                self.affinity[call.prefix_key] = target.engine
        # A group may go past the engine's room: batching it together is the point.
        target.room -= len(calls)
        target.load += len(calls)
        return True

    @staticmethod
    def _by_prefix(members: list[CallNode]) -> list[list[CallNode]]:
        """Members sharing a prefix go together; different prefixes may split."""
        by_key: dict[str | None, list[CallNode]] = {}
        for m in members:
            by_key.setdefault(m.prefix_key, []).append(m)
        return list(by_key.values())

    def _fair(self, units: list[list[CallNode]]) -> list[list[CallNode]]:
        """Units of one class, tenants taking turns (least recently served
        first), each tenant's own units in their order."""
        by_tenant: dict[str, list[list[CallNode]]] = {}
        for unit in units:
            by_tenant.setdefault(unit[0].namespace, []).append(unit)
        if len(by_tenant) < 2:
            return units
        turns = sorted(by_tenant.values(), key=lambda us: self.last_served.get(us[0][0].namespace, 0))
        out: list[list[CallNode]] = []
        for i in range(max(len(us) for us in turns)):
            out.extend(us[i] for us in turns if i < len(us))
        return out

    def schedule(self, ready: Sequence[CallNode], graph: DataflowGraph, engines: Sequence[Engine]) -> list[Assignment]:
        rooms = _snapshot(engines, self.queue_depth)
        out: list[Assignment] = []
        groups: dict[str, list[CallNode]] = {}
        latency: list[CallNode] = []
        throughput: list[CallNode] = []
        for call in sorted(ready, key=lambda c: c.ready_at or 0.0):
            if call.group is not None:
                groups.setdefault(call.group, []).append(call)
            elif call.objective == "throughput":
                throughput.append(call)
            else:
                latency.append(call)
        complete: list[list[CallNode]] = []
        partial: list[list[CallNode]] = []
        for group_id, members in groups.items():
            waiting = any(graph.calls[m].state == "waiting" for m in graph.groups[group_id].members)
            (partial if waiting else complete).extend(self._by_prefix(members))
        units = [*self._fair([[c] for c in latency]), *self._fair(complete),
                 *self._fair([[c] for c in throughput]), *self._fair(partial)]
        for unit in units:
            if not any(s.room >= 1 for s in rooms):
                break  # every engine is full: the rest keeps its place in line
            self._place(rooms, unit, out)
        return out
