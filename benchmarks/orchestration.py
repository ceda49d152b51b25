"""Orchestration cost per call as the DAG grows (10^2 .. 10^5 calls), on CPU.

    python -m benchmarks.orchestration [--sizes 100 1000 10000 100000] [--json out.json]

Times what the runtime does around the model, with the runtime's own parts,
the way ``LocalRuntime.submit_calls``, ``get_variable``, ``_set`` and
``_schedule_pass`` drive them (parrot/dataflow/runtime.py):

* insert: ``DataflowGraph.add_call`` + ``PrefixIndex.add`` +
  ``ObjectiveAnalyzer.on_call_added`` per call, then the program's reads
  (``annotate_get`` + ``ObjectiveAnalyzer.on_get``);
* schedule: a pass: ``PrefixIndex.hint_for`` on every ready call, then
  ``AppScheduler.schedule``, then marking the placed calls running;
* complete: each placed call finishes: its outputs are set
  (``DataflowGraph.set_value``, which readies the calls downstream) and
  ``PrefixIndex.forget``.

The program mix arrives in bursts (one cycle: a chain of 8 calls, a map-reduce
of 8 maps and a reduce, and 8 one-call apps sharing one of 4 long system
prompts); after each burst one scheduling pass runs, the placed calls
complete, and one more pass places what they readied. No model runs: the
engines are a stand-in reporting a fixed capacity, which is all a scheduler
reads of them (see :class:`FixedCapacityEngine`).

Reported: microseconds per call for each part and in total, at each size, the
part of it spent in Python's cyclic garbage collector (the graph keeps every
call, so full collections grow with it), and the growth factor of the total
from one size to the next (1.0 = flat).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from parrot.backends.engine import Engine, EngineCapacity, GenerationRequest, RequestStream
from parrot.dataflow import AppScheduler, DataflowGraph, ObjectiveAnalyzer, PrefixIndex
from parrot.dataflow.graph import CallNode
from parrot.semantic_vars import Call, SamplingConfig, SemanticFunction

from benchmarks.harness import _cpu_name, _git, progress, write_json

PHASES = ("insert", "schedule", "complete")


class FixedCapacityEngine(Engine):
    """A stand-in engine that only reports a fixed :class:`EngineCapacity`.

    This is acceptable here (and only here) because this benchmark measures
    orchestration alone: no request is ever submitted to it, so no engine
    work is measured or imitated. The scheduler reads nothing else of an engine.
    """

    tokenizer = None  # type: ignore[assignment]

    def __init__(self, name: str, slots: int) -> None:
        self.name = name
        self._capacity = EngineCapacity(max_running=slots, running=0, waiting=0)

    def capacity(self) -> EngineCapacity:
        return self._capacity

    def submit(self, request: GenerationRequest) -> RequestStream:
        raise NotImplementedError("the orchestration benchmark runs no model")

    def cancel(self, request_id: str) -> None:
        pass


_SAMPLING = SamplingConfig(max_tokens=32)
_SUMMARIZE = SemanticFunction(
    "Summarize this section of a long report in two sentences.\nSection: {{input:chunk}}\nSummary: {{output:summary}}",
    name="summarize", defaults=_SAMPLING,
).spec
_REFINE = SemanticFunction(
    "Here is a running summary of a long report and its next section.\nSummary so far: {{input:previous}}\n"
    "Next section: {{input:chunk}}\nRevised summary: {{output:summary}}",
    name="refine", defaults=_SAMPLING,
).spec
_ANSWER = SemanticFunction("{{input:system}}\nQuestion: {{input:question}}\nAnswer: {{output:answer}}",
                           name="answer", defaults=_SAMPLING).spec
CHAIN, MAPS, SHARED = 8, 8, 8
_REDUCE = SemanticFunction(
    "Merge these partial summaries into one.\n"
    + "\n".join(f"- {{{{input:part{i}}}}}" for i in range(MAPS))
    + "\nMerged summary: {{output:summary}}",
    name=f"reduce_{MAPS}", defaults=_SAMPLING,
).spec
_SYSTEMS = [
    (f"You are assistant number {k} of a help desk. " + "Answer briefly, cite the procedure, and ask when unsure. " * 40)
    for k in range(4)
]
CYCLE_CALLS = CHAIN + MAPS + 1 + SHARED


@dataclass
class Burst:
    """The calls of one cycle of apps, and the reads their programs make."""

    calls: list[tuple[str, Call]] = field(default_factory=list)  # (session id, spec)
    reads: list[tuple[str, str]] = field(default_factory=list)  # (variable id, perf)


def make_burst(cycle: int, ids: itertools.count) -> Burst:
    burst = Burst()
    nid = lambda kind: f"{kind}-{next(ids)}"  # noqa: E731
    chunk = lambda i: f"Section {i} of report {cycle}: the pump at station {i} ran {cycle % 97} hours."  # noqa: E731

    # A chain: each step refines the previous summary.
    session = f"s-{cycle}-chain"
    prev = nid("var")
    burst.calls.append((session, Call(nid("call"), _SUMMARIZE, constants={"chunk": chunk(0)}, outputs={"summary": prev})))
    for i in range(1, CHAIN):
        out = nid("var")
        burst.calls.append((session, Call(nid("call"), _REFINE, inputs={"previous": prev},
                                              constants={"chunk": chunk(i)}, outputs={"summary": out})))
        prev = out
    burst.reads.append((prev, "latency"))

    # A map-reduce: the maps form a task group feeding the reduce.
    session = f"s-{cycle}-mr"
    parts = [nid("var") for _ in range(MAPS)]
    for i, part in enumerate(parts):
        burst.calls.append((session, Call(nid("call"), _SUMMARIZE, constants={"chunk": chunk(i)},
                                              outputs={"summary": part})))
    merged = nid("var")
    burst.calls.append((session, Call(nid("call"), _REDUCE, inputs={f"part{i}": p for i, p in enumerate(parts)},
                                          outputs={"summary": merged})))
    burst.reads += [(p, "throughput") for p in parts] + [(merged, "latency")]

    # One-call apps of many users sharing a long system prompt.
    for k in range(SHARED):
        out = nid("var")
        burst.calls.append((f"s-{cycle}-user{k}", Call(
            nid("call"), _ANSWER,
            constants={"system": _SYSTEMS[(cycle + k) % len(_SYSTEMS)], "question": f"question {k} of cycle {cycle}?"},
            outputs={"answer": out})))
        burst.reads.append((out, "latency"))
    return burst


class Orchestrator:
    """The runtime's orchestration steps on its own parts, without an event loop or engines' work."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = list(engines)
        self.graph = DataflowGraph()
        self.analyzer = ObjectiveAnalyzer(self.graph)
        self.prefixes = PrefixIndex(min_chars=32)
        self.scheduler = AppScheduler()
        self.ready: dict[str, CallNode] = {}
        self.running: list[CallNode] = []
        self.times = dict.fromkeys(PHASES, 0.0)
        self.passes = 0

    def insert(self, burst: Burst) -> None:  # LocalRuntime.submit_calls + get_variable's bookkeeping
        t = time.perf_counter()
        graph, prefixes, analyzer = self.graph, self.prefixes, self.analyzer
        for session, spec in burst.calls:
            node = graph.add_call(session, spec)
            prefixes.add(node, graph, "local")
            analyzer.on_call_added(node)
            if node.state == "ready":
                self.ready[node.id] = node
        for var_id, perf in burst.reads:
            graph.annotate_get(var_id, perf)  # type: ignore[arg-type]
            analyzer.on_get(var_id, perf)  # type: ignore[arg-type]
        self.times["insert"] += time.perf_counter() - t

    def schedule(self) -> None:  # LocalRuntime._schedule_pass
        t = time.perf_counter()
        if self.ready:
            self.passes += 1
            for call in self.ready.values():
                hint = self.prefixes.hint_for(call)
                call.prefix_key = hint.key if hint else None
            for call, engine in self.scheduler.schedule(list(self.ready.values()), self.graph, self.engines):
                del self.ready[call.id]
                call.state = "running"
                call.engine = engine.name
                call.started_at = time.monotonic()
                self.running.append(call)
        self.times["schedule"] += time.perf_counter() - t

    def complete(self) -> None:  # LocalRuntime._run's end: outputs set, dependents readied
        t = time.perf_counter()
        for call in self.running:
            for out_id in call.outputs.values():
                for ready in self.graph.set_value(out_id, "generated text"):
                    self.ready[ready.id] = ready
            call.state = "done"
            call.finished_at = time.monotonic()
            self.prefixes.forget(call)
        self.running = []
        self.times["complete"] += time.perf_counter() - t


class GcClock:
    """Time spent in Python's cyclic garbage collector (via ``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.collections += 1

    def __enter__(self) -> "GcClock":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def run_size(n_calls: int, *, engines: int, slots: int) -> dict[str, Any]:
    """Push about ``n_calls`` calls through; returns times and counts."""
    cycles = max(1, round(n_calls / CYCLE_CALLS))
    ids = itertools.count()
    bursts = [make_burst(c, ids) for c in range(cycles)]  # built outside the timed parts
    orch = Orchestrator([FixedCapacityEngine(f"e{i}", slots) for i in range(engines)])
    gc.collect()
    with GcClock() as gc_clock:
        started = time.perf_counter()
        for burst in bursts:
            orch.insert(burst)
            orch.schedule()
            orch.complete()
            orch.schedule()
        while orch.ready or orch.running:  # drain what is left
            orch.complete()
            orch.schedule()
        total = time.perf_counter() - started
    calls = len(orch.graph.calls)
    done = sum(c.state == "done" for c in orch.graph.calls.values())
    if done != calls:
        raise RuntimeError(f"{calls - done} of {calls} calls never ran")
    return {
        "calls": calls,
        "passes": orch.passes,
        "groups": len(orch.graph.groups),
        "prefix_keys": len(orch.prefixes.counts),
        "total_s": total,
        **{f"{p}_s": orch.times[p] for p in PHASES},
        "gc_s": gc_clock.seconds,  # part of the phases' times, spent in Python's garbage collector
        "gc_collections": gc_clock.collections,
    }


def _us(seconds: float, calls: int) -> float:
    return 1e6 * seconds / calls


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.orchestration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000, 100000], metavar="N",
                        help="graph sizes in calls (default 100 1000 10000 100000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size; medians are reported (default 3)")
    parser.add_argument("--engines", type=int, default=4, help="stand-in engines the scheduler places on (default 4)")
    parser.add_argument("--slots", type=int, default=64, help="free slots each stand-in engine reports (default 64)")
    parser.add_argument("--json", metavar="PATH", help="write the figures and their context to PATH")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.engines < 1 or args.slots < 1 or min(args.sizes) < 1:
        parser.error("--sizes, --repeats, --engines and --slots must be >= 1")

    rows = []
    for size in args.sizes:
        runs = []
        for r in range(args.repeats):
            res = run_size(size, engines=args.engines, slots=args.slots)
            runs.append(res)
            progress(f"{res['calls']:>7} calls  run {r + 1}/{args.repeats}  {res['total_s']:.3f} s  "
                     f"{_us(res['total_s'], res['calls']):.1f} us/call (GC {_us(res['gc_s'], res['calls']):.1f})  "
                     f"{res['passes']} passes")
        calls = runs[0]["calls"]
        med = {k: statistics.median(run[k] for run in runs) for k in ("total_s", "gc_s", *(f"{p}_s" for p in PHASES))}
        rows.append({
            "size": size,
            "calls": calls,
            "passes": runs[0]["passes"],
            "groups": runs[0]["groups"],
            "us_per_call": {"total": _us(med["total_s"], calls), **{p: _us(med[f"{p}_s"], calls) for p in PHASES},
                            "gc": _us(med["gc_s"], calls)},
            "runs": runs,
        })
    for prev, row in zip([None, *rows], rows):
        row["growth_vs_previous"] = None if prev is None else row["us_per_call"]["total"] / prev["us_per_call"]["total"]
        row["growth_vs_smallest"] = row["us_per_call"]["total"] / rows[0]["us_per_call"]["total"]

    header = ["calls", "insert us/call", "schedule us/call", "complete us/call", "total us/call", "of it GC",
              "growth (vs prev)", "passes"]
    table = [[
        str(r["calls"]),
        f"{r['us_per_call']['insert']:.1f}",
        f"{r['us_per_call']['schedule']:.1f}",
        f"{r['us_per_call']['complete']:.1f}",
        f"{r['us_per_call']['total']:.1f}",
        f"{r['us_per_call']['gc']:.1f}",
        "-" if r["growth_vs_previous"] is None else f"{r['growth_vs_previous']:.2f}x",
        str(r["passes"]),
    ] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print(f"Orchestration per call (medians of {args.repeats}; {args.engines} stand-in engines x {args.slots} slots; "
          f"mix per cycle: chain of {CHAIN}, map-reduce {MAPS}+1, {SHARED} shared-prompt calls) on {_cpu_name()}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.rjust(w) for c, w in zip(t, widths)))

    import networkx

    payload = {
        "benchmark": "orchestration",
        "context": {
            "device_name": _cpu_name(), "python": platform.python_version(), "networkx": networkx.__version__,
            "git_commit": _git("rev-parse", "HEAD"), "engines": args.engines, "slots": args.slots,
            "repeats": args.repeats, "mix": {"chain": CHAIN, "maps": MAPS, "reduce": 1, "shared_prompt_calls": SHARED,
                                             "system_prompts": len(_SYSTEMS)},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "results": rows,
    }
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
