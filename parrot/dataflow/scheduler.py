"""Placing ready calls on engines.

This first cut is deliberately small: a :class:`Scheduler` is asked, for one
ready call at a time, which engine should run it. The app-centric policy
(objectives, task groups, prefix affinity) plugs in behind the same method.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from parrot.backends.engine import Engine

from .graph import CallNode, DataflowGraph


class Scheduler(Protocol):
    """Chooses an engine for a ready call."""

    def place(self, call: CallNode, graph: DataflowGraph, engines: Sequence[Engine]) -> Engine: ...


class LeastLoadedScheduler:
    """Send each call to the engine with the fewest running and waiting requests."""

    def place(self, call: CallNode, graph: DataflowGraph, engines: Sequence[Engine]) -> Engine:
        def load(engine: Engine) -> tuple[int, int]:
            cap = engine.capacity()
            return (cap.running + cap.waiting, -cap.max_running)

        return min(engines, key=load)
