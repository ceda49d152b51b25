"""Placing ready calls on engines.

A scheduler is given, in one pass, every call that is ready and not yet
dispatched, and returns which of them go to which engine now; the rest wait
for the next pass (the runtime runs one whenever a call becomes ready or
finishes). Two policies ship:

:class:`AppScheduler` (the default) uses what the DAG analysis found:

1. latency-critical calls (and calls nobody annotated yet) go first, each to
   the engine that holds its prefix, else the least loaded engine with a free
   slot;
2. a task group is released only when none of its members is still waiting
   for inputs, and then all its ready members go together to one engine
   (the one holding their shared prefix if any), so they batch;
3. other throughput calls fill the remaining slots;
4. work-conserving: if every engine would otherwise sit idle, held groups'
   ready members are released anyway.

:class:`FifoScheduler` is the request-level baseline: every ready call, in
the order it became ready, to the least loaded engine, no holding.
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
class _Slots:
    """One pass's view of an engine's load, updated as calls are placed."""

    engine: Engine
    free: int
    load: int
    prefixes: frozenset[str]


def _snapshot(engines: Sequence[Engine]) -> list[_Slots]:
    out = []
    for engine in engines:
        cap = engine.capacity()
        out.append(_Slots(engine, cap.free_slots, cap.running + cap.waiting, cap.cached_prefixes))
    return out


class FifoScheduler:
    """Request-level baseline: first ready, first placed, least loaded engine."""

    def schedule(self, ready: Sequence[CallNode], graph: DataflowGraph, engines: Sequence[Engine]) -> list[Assignment]:
        slots = _snapshot(engines)
        out: list[Assignment] = []
        for call in sorted(ready, key=lambda c: c.ready_at or 0.0):
            best = min(slots, key=lambda s: s.load)
            best.load += 1
            out.append((call, best.engine))
        return out


class AppScheduler:
    """The app-centric default policy (see the module docstring)."""

    def __init__(self) -> None:
        #: Where each prefix key was last sent: the engine most likely to hold it.
        self.affinity: dict[str, Engine] = {}

    def _pick(self, slots: list[_Slots], key: str | None, need: int) -> _Slots | None:
        """Affinity first (if it has room), else the least loaded engine with room."""
        with_room = [s for s in slots if s.free >= 1]
        if not with_room:
            return None
        if key is not None:
            holders = [s for s in with_room if key in s.prefixes or self.affinity.get(key) is s.engine]
            if holders:
                return min(holders, key=lambda s: s.load)
        roomy = [s for s in with_room if s.free >= need] or with_room
        return min(roomy, key=lambda s: (s.load, -s.free))

    def _place(self, slots: list[_Slots], calls: list[CallNode], out: list[Assignment]) -> bool:
        key = calls[0].prefix_key
        target = self._pick(slots, key, len(calls))
        if target is None:
            return False
        for call in calls:
            out.append((call, target.engine))
            if call.prefix_key is not None:
                self.affinity[call.prefix_key] = target.engine
        # A group may overfill one engine: batching it together is the point.
        target.free -= len(calls)
        target.load += len(calls)
        return True

    def schedule(self, ready: Sequence[CallNode], graph: DataflowGraph, engines: Sequence[Engine]) -> list[Assignment]:
        slots = _snapshot(engines)
        out: list[Assignment] = []
        by_time = sorted(ready, key=lambda c: c.ready_at or 0.0)
        groups: dict[str, list[CallNode]] = {}
        latency: list[CallNode] = []
        throughput: list[CallNode] = []
        for call in by_time:
            if call.group is not None:
                groups.setdefault(call.group, []).append(call)
            elif call.objective == "throughput":
                throughput.append(call)
            else:
                latency.append(call)

        for call in latency:
            if not self._place(slots, [call], out):
                return out  # no room anywhere; latency work keeps its place in line
        held: list[list[CallNode]] = []
        for group_id, members in groups.items():
            if any(graph.calls[m].state == "waiting" for m in graph.groups[group_id].members):
                held.append(members)
                continue
            # Members sharing a prefix go together; different prefixes may split.
            by_key: dict[str | None, list[CallNode]] = {}
            for m in members:
                by_key.setdefault(m.prefix_key, []).append(m)
            for part in by_key.values():
                self._place(slots, part, out)
        for call in throughput:
            self._place(slots, [call], out)
        if not out and all(s.load == 0 for s in slots):
            for members in held:
                self._place(slots, members, out)
        return out
