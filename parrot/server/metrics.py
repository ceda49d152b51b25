"""Prometheus metrics: calls, tokens, prefix cache, queue depth, call latency.

Label values are bounded whatever tenants do: the latency histogram names a
function only when the admin published it or the service itself names it
(the OpenAI routes); every tenant's own functions count as ``"other"``, so
a tenant registering many functions neither grows the page nor shows their
names to anyone reading it.
"""

from __future__ import annotations

import time
from typing import Any, Collection, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from parrot.dataflow import LocalRuntime
from parrot.semantic_vars import FunctionSpec

#: The ``function`` label of every call of a tenant's own function.
OTHER_FUNCTION = "other"


class RuntimeCollector:
    """Reads engine counters and queue depth at scrape time."""

    def __init__(self, runtime: LocalRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterable[Metric]:
        tokens = CounterMetricFamily("parrot_engine_tokens", "Tokens processed by engines", labels=["engine", "kind"])
        cache = CounterMetricFamily("parrot_prefix_cache", "Prefix cache lookups", labels=["engine", "result"])
        running = GaugeMetricFamily("parrot_engine_running", "Requests running on an engine", labels=["engine"])
        blocks = GaugeMetricFamily("parrot_kv_blocks", "KV cache blocks of an engine's pool", labels=["engine", "state"])
        for engine in self.runtime.engines:
            s = engine.stats()
            if s:
                tokens.add_metric([engine.name, "prefill"], s.get("prefill_tokens", 0))
                tokens.add_metric([engine.name, "decode"], s.get("decode_tokens", 0))
                tokens.add_metric([engine.name, "cached"], s.get("prefix_tokens_saved", 0))
                cache.add_metric([engine.name, "hit"], s.get("prefix_hits", 0))
                cache.add_metric([engine.name, "miss"], s.get("prefix_misses", 0))
            cap = engine.capacity()
            running.add_metric([engine.name], cap.running)
            for state, value in (("total", cap.total_blocks), ("free", cap.free_blocks), ("cached", cap.cached_blocks)):
                if value is not None:
                    blocks.add_metric([engine.name, state], value)
        queue = GaugeMetricFamily("parrot_queue_depth", "Ready calls waiting for an engine slot")
        queue.add_metric([], self.runtime.queued_calls)
        yield from (tokens, cache, running, blocks, queue)


class ServiceMetrics:
    """The service's registry; call outcomes and latencies come from runtime events."""

    def __init__(self, runtime: LocalRuntime, service_functions: Collection[str] = ()) -> None:
        """``service_functions``: names the service gives its own calls, kept as labels."""
        self.service_functions = frozenset(service_functions)
        self.registry = CollectorRegistry()
        self.calls = Counter("parrot_calls", "Calls by final state", ["state"], registry=self.registry)
        self.latency = Histogram(
            "parrot_call_seconds", "Call time from submit to finish", ["function"], registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.registry.register(RuntimeCollector(runtime))
        self.runtime = runtime
        runtime.subscribe(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"] != "call_state" or event["state"] not in ("done", "failed", "cancelled"):
            return
        self.calls.labels(event["state"]).inc()
        call = self.runtime.call(event["call_id"])
        if call is not None and event["state"] == "done":
            self.latency.labels(self.function_label(call.function)).observe((call.finished_at or time.monotonic()) - call.submitted_at)

    def function_label(self, function: FunctionSpec) -> str:
        """The function's name if the admin published it or the service names
        it, else :data:`OTHER_FUNCTION` (tenants cannot add label values)."""
        if function.public_prefix or function.name in self.service_functions:
            return function.name
        return OTHER_FUNCTION
