"""Deducing what each call is for: its objective and its task group.

The program says what it wants only where it reads values: ``get(perf=...)``.
The analyser carries that annotation backwards through the DAG, so a call
deep in a chain learns that somebody is waiting on its result:

* every call upstream of a ``latency`` read is *latency-critical* (it lies on
  the chain the reader waits for);
* calls whose outputs all feed one consumer form a *task group*: the consumer
  can start only when the whole group is done, so the group wants throughput
  (finish all members soon, batched) rather than any one member early;
* calls upstream of only ``throughput`` reads want throughput.

Both steps are incremental: a call is visited again only when its objective
gets stronger, so the total work over a program is linear in its size.
"""

from __future__ import annotations

from parrot.semantic_vars import Perf

from .graph import CallNode, DataflowGraph, TaskGroup


class ObjectiveAnalyzer:
    """Keeps ``call.objective``, ``call.latency_critical`` and ``call.group`` up to date."""

    def __init__(self, graph: DataflowGraph) -> None:
        self.graph = graph

    # -- events ----------------------------------------------------------
    def on_call_added(self, call: CallNode) -> None:
        """Form a task group if ``call`` is the one consumer of several producers."""
        producers: dict[str, CallNode] = {}
        for upstream in self.graph.upstream_calls(call):
            producers.setdefault(upstream.id, upstream)
        members = (
            [p for p in producers.values() if p.group is None and self._feeds_only(p, call)]
            if len(producers) >= 2
            else []
        )
        if len(members) >= 2:
            group = TaskGroup(f"group-{call.id}", call.id, [m.id for m in members])
            self.graph.groups[group.id] = group
            for m in members:
                m.group = group.id
                self._refresh(m)
        # Annotations on pre-declared outputs were made before the call existed.
        for out_id in call.outputs.values():
            perf = self.graph.variables[out_id].perf
            if perf is not None:
                self.on_get(out_id, perf)

    def on_get(self, var_id: str, perf: Perf) -> None:
        """Propagate a read's annotation to every call upstream of ``var_id``."""
        producer = self.graph.variables[var_id].producer
        stack = [producer] if producer is not None else []
        while stack:
            call = self.graph.calls[stack.pop()]
            if perf == "latency":
                if call.latency_critical:
                    continue  # its whole upstream is marked already
                call.latency_critical = True
            else:
                if call.wants_throughput or call.latency_critical:
                    continue
                call.wants_throughput = True
            self._refresh(call)
            stack.extend(u.id for u in self.graph.upstream_calls(call))

    # -- helpers ----------------------------------------------------------
    def _feeds_only(self, producer: CallNode, consumer: CallNode) -> bool:
        return all(
            succ == consumer.id
            for out_id in producer.outputs.values()
            for succ in self.graph.graph.successors(out_id)
        )

    @staticmethod
    def _refresh(call: CallNode) -> None:
        if call.group is not None or (call.wants_throughput and not call.latency_critical):
            call.objective = "throughput"
        elif call.latency_critical:
            call.objective = "latency"
        else:
            call.objective = None
