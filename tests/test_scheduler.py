"""Objective deduction, task groups, prefix analysis and placement.

The analysis tests drive the graph and analyser directly; the placement
tests use real (idle) torch engines, whose capacity the scheduler reads.
"""

from __future__ import annotations

import pytest

from parrot.dataflow import AppScheduler, DataflowGraph, FifoScheduler, ObjectiveAnalyzer, PrefixIndex
from parrot.semantic_vars import Call, FunctionSpec, SamplingConfig

S = "session-1"
SYSTEM = "You are a meticulous assistant on a software team. " * 3
UNARY = FunctionSpec("f", "{{input:x}} -> {{output:y}}", {"y": SamplingConfig()})
PAIR = FunctionSpec("pair", "{{input:a}} + {{input:b}} -> {{output:y}}", {"y": SamplingConfig()})
TRIPLE = FunctionSpec("triple", "{{input:a}} {{input:b}} {{input:c}} -> {{output:y}}", {"y": SamplingConfig()})
ASK = FunctionSpec("ask", "{{input:system}}\nUser: {{input:q}}\nAssistant: {{output:y}}", {"y": SamplingConfig()})


class Program:
    """A graph with its analyser and prefix index, driven like the runtime does."""

    def __init__(self) -> None:
        self.graph = DataflowGraph()
        self.analyzer = ObjectiveAnalyzer(self.graph)
        self.prefixes = PrefixIndex(min_chars=32)

    def call(self, call_id, fn=UNARY, inputs=None, constants=None, tenant="tenant-a"):
        spec = Call(call_id, fn, inputs or {}, constants or {}, {"y": f"{call_id}.y"})
        node = self.graph.add_call(S, spec, namespace=tenant)
        self.prefixes.add(node, self.graph, tenant)
        self.analyzer.on_call_added(node)
        return node

    def get(self, call_id, perf):
        self.graph.annotate_get(f"{call_id}.y", perf)
        self.analyzer.on_get(f"{call_id}.y", perf)

    def ready(self):
        out = [c for c in self.graph.calls.values() if c.state == "ready"]
        for c in out:
            hint = self.prefixes.hint_for(c)
            c.prefix_key = hint.key if hint else None
        return out


def test_latency_read_marks_the_whole_chain():
    p = Program()
    p.call("a", constants={"x": "doc"})
    p.call("b", inputs={"x": "a.y"})
    p.call("c", inputs={"x": "b.y"})
    side = p.call("side", constants={"x": "other"})
    assert all(c.objective is None for c in p.graph.calls.values())
    p.get("c", "latency")
    assert [p.graph.calls[i].objective for i in "abc"] == ["latency"] * 3
    assert side.objective is None


def test_fan_in_forms_a_task_group_that_wants_throughput():
    p = Program()
    maps = [p.call(f"m{i}", constants={"x": f"chunk {i}"}) for i in range(3)]
    reduce_ = p.call("r", TRIPLE, inputs={"a": "m0.y", "b": "m1.y", "c": "m2.y"})
    p.get("r", "latency")
    group = p.graph.groups[maps[0].group]
    assert group.consumer == "r" and group.members == ["m0", "m1", "m2"]
    assert all(m.objective == "throughput" and m.latency_critical for m in maps)
    assert reduce_.objective == "latency" and reduce_.group is None


def test_a_producer_read_elsewhere_too_is_not_in_the_group():
    p = Program()
    p.call("m0", constants={"x": "0"})
    p.call("m1", constants={"x": "1"})
    p.call("m2", constants={"x": "2"})
    p.call("other", inputs={"x": "m2.y"})  # m2 feeds a second consumer
    p.call("r", TRIPLE, inputs={"a": "m0.y", "b": "m1.y", "c": "m2.y"})
    assert p.graph.calls["m0"].group == p.graph.calls["m1"].group is not None
    assert p.graph.calls["m2"].group is None


def test_throughput_reads_do_not_override_latency():
    p = Program()
    p.call("a", constants={"x": "doc"})
    p.call("b", inputs={"x": "a.y"})
    p.get("a", "throughput")
    assert p.graph.calls["a"].objective == "throughput"
    p.get("b", "latency")
    assert p.graph.calls["a"].objective == "latency"
    p.get("b", "throughput")
    assert p.graph.calls["b"].objective == "latency"


def test_shared_system_prompt_is_found_per_tenant_before_running():
    p = Program()
    a = p.call("u1", ASK, constants={"system": SYSTEM, "q": "How do I add a test?"})
    assert p.prefixes.hint_for(a) is None  # nobody shares it yet
    b = p.call("u2", ASK, constants={"system": SYSTEM, "q": "Why is CI red?"})
    hint_a, hint_b = p.prefixes.hint_for(a), p.prefixes.hint_for(b)
    assert hint_a == hint_b and hint_a is not None
    assert a.prefix_text[: hint_a.end] == SYSTEM + "\nUser: "
    # The same prompt under another tenant is another key.
    other = PrefixIndex(min_chars=32)
    p.graph.add_variable("sys2", "system", S, SYSTEM)
    c = p.graph.add_call(S, Call("u3", ASK, {"system": "sys2"}, {"q": "hi"}, {"y": "u3.y"}))
    other.add(c, p.graph, "tenant-b")
    other.add(p.graph.calls["u1"], p.graph, "tenant-b")
    assert other.hint_for(c).key != hint_a.key


def test_a_public_function_shares_only_its_constant_head_across_tenants():
    public = FunctionSpec("app", SYSTEM + "{{input:doc}}\nQ: {{input:q}}\nA: {{output:y}}",
                          {"y": SamplingConfig()}, public_prefix=True)
    private = FunctionSpec("app", public.template, {"y": SamplingConfig()})
    graph = DataflowGraph()
    index = PrefixIndex(min_chars=32)

    def boundaries(call_id, fn, tenant, doc="a shared document " * 3):
        node = graph.add_call(S, Call(call_id, fn, {}, {"doc": doc, "q": call_id}, {"y": f"{call_id}.y"}))
        index.add(node, graph, tenant)
        return [b.key for b in index.boundaries[call_id]]

    a, b = boundaries("a", public, "tenant-a"), boundaries("b", public, "tenant-b")
    assert a[0] == b[0]  # the system prompt: one key for everyone
    assert not set(a[1:]) & set(b[1:])  # the same document stays per tenant
    assert index.hint_for(graph.calls["b"]).end == len(SYSTEM)
    # The same template, not published, shares nothing across tenants.
    c, d = boundaries("c", private, "tenant-a"), boundaries("d", private, "tenant-b")
    assert not set(c) & set(d) and not set(c) & set(a)


def test_prefix_counts_keep_the_most_recently_reached_keys():
    graph = DataflowGraph()
    index = PrefixIndex(min_chars=32, max_keys=2)
    for i, system in enumerate([SYSTEM, SYSTEM.upper(), SYSTEM.lower(), SYSTEM]):
        node = graph.add_call(S, Call(f"c{i}", ASK, {}, {"system": system, "q": "hi"}, {"y": f"c{i}.y"}))
        index.add(node, graph, "tenant-a")
    # Each call reaches two boundaries (after the system prompt, after "User: ");
    # only the last call's two are kept, seen once since the first call's were evicted.
    assert len(index.counts) == 2 and set(index.counts.values()) == {1}
    assert index.hint_for(graph.calls["c3"]) is None


def test_prefix_stops_at_the_first_unset_input():
    p = Program()
    p.graph.add_variable("late", "late", S)
    node = p.call("x", ASK, inputs={"q": "late"}, constants={"system": SYSTEM})
    assert node.prefix_text == SYSTEM + "\nUser: "


@pytest.fixture(scope="module")
def two_engines(default_model_dir):
    from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig

    engines = [
        TorchEngine.from_pretrained(default_model_dir, device="cpu", name=f"e{i}", config=TorchEngineConfig(max_running=4))
        for i in range(2)
    ]
    yield engines
    for e in engines:
        e.close()


def test_latency_calls_are_spread_by_load(two_engines):
    p = Program()
    for i in range(4):
        p.call(f"q{i}", constants={"x": f"unrelated question number {i}"})
    placed = AppScheduler().schedule(p.ready(), p.graph, two_engines)
    assert [e.name for _, e in placed] == ["e0", "e1", "e0", "e1"]


def test_a_task_group_goes_to_one_engine_and_partial_groups_go_last(two_engines):
    p = Program()
    p.graph.add_variable("late", "late", S)
    p.call("m0", constants={"x": "chunk 0"})
    p.call("m1", constants={"x": "chunk 1"})
    p.call("m2", inputs={"x": "late"})
    p.call("r", TRIPLE, inputs={"a": "m0.y", "b": "m1.y", "c": "m2.y"})
    p.call("chat", constants={"x": "a latency call of another app"})
    sched = AppScheduler()
    first = sched.schedule(p.ready(), p.graph, two_engines)
    # Work-conserving: the engines have room, so the ready members of a group
    # still waiting for a sibling run too, but after everything else.
    assert [c.id for c, _ in first] == ["chat", "m0", "m1"]
    assert first[1][1] is first[2][1]
    for c, _ in first:
        c.state = "running"
    p.graph.set_value("late", "chunk 2")
    second = sched.schedule([c for c in p.ready()], p.graph, two_engines)
    assert [c.id for c, _ in second] == ["m2"]


def test_ready_work_waits_only_when_every_engine_is_full(two_engines):
    # Idle engines of max_running=4 with no queue beyond the batch: room for
    # 4 each. Latency calls take their places first, then whole task groups.
    p = Program()
    for i in range(6):
        p.call(f"q{i}", constants={"x": f"unrelated question number {i}"})
    for i in range(3):
        p.call(f"m{i}", constants={"x": f"chunk {i}"})
    p.call("r", TRIPLE, inputs={"a": "m0.y", "b": "m1.y", "c": "m2.y"})
    placed = AppScheduler(queue_depth=0).schedule(p.ready(), p.graph, two_engines)
    ids = [c.id for c, _ in placed]
    assert ids == [f"q{i}" for i in range(6)] + ["m0", "m1", "m2"]  # the group goes whole, past the room
    assert len({e.name for c, e in placed if c.id.startswith("m")}) == 1
    # With every place taken, nothing more goes this pass.
    p2 = Program()
    for i in range(9):
        p2.call(f"q{i}", constants={"x": f"unrelated question number {i}"})
    assert len(AppScheduler(queue_depth=0).schedule(p2.ready(), p2.graph, two_engines)) == 8


def test_engine_room_counts_the_queue_and_its_memory():
    from parrot.backends.engine import EngineCapacity

    idle = EngineCapacity(max_running=4, running=0, waiting=0)
    assert idle.room() == 8 and idle.room(queue_depth=0) == 4
    busy = EngineCapacity(max_running=4, running=4, waiting=3)
    assert busy.room() == 1 and busy.room(queue_depth=0) == 0
    # An empty queue always takes one more: the batch is refilled at the next step.
    assert EngineCapacity(max_running=4, running=4, waiting=0).room(queue_depth=0) == 1
    # Queued prompts that already need all free KV: more would only wait there.
    full = EngineCapacity(max_running=4, running=2, waiting=1, free_kv_tokens=512, waiting_tokens=600)
    assert full.room() == 0
    assert EngineCapacity(max_running=4, running=2, waiting=1, free_kv_tokens=4096, waiting_tokens=600).room() == 5


def test_held_group_is_released_when_engines_would_idle(two_engines):
    p = Program()
    p.graph.add_variable("late", "late", S)
    p.call("m0", constants={"x": "chunk 0"})
    p.call("m1", inputs={"x": "late"})
    p.call("r", PAIR, inputs={"a": "m0.y", "b": "m1.y"})
    placed = AppScheduler().schedule(p.ready(), p.graph, two_engines)
    assert [c.id for c, _ in placed] == ["m0"]


def test_prefix_affinity_follows_the_engine_that_has_it(two_engines):
    p = Program()
    sched = AppScheduler()
    p.call("filler", constants={"x": "something else entirely, long enough"})
    p.call("u1", ASK, constants={"system": SYSTEM, "q": "first"})
    p.call("u2", ASK, constants={"system": SYSTEM, "q": "second"})
    placed = dict((c.id, e.name) for c, e in sched.schedule(p.ready(), p.graph, two_engines))
    assert placed["u1"] == placed["u2"]
    for c in p.ready():
        c.state = "running"
    p.call("u3", ASK, constants={"system": SYSTEM, "q": "third, later"})
    [(call, engine)] = sched.schedule(p.ready(), p.graph, two_engines)
    assert call.id == "u3" and engine.name == placed["u1"]


def test_fifo_baseline_ignores_objectives_and_groups(two_engines):
    p = Program()
    p.graph.add_variable("late", "late", S)
    p.call("m0", constants={"x": "chunk 0"})
    p.call("m1", inputs={"x": "late"})
    p.call("r", PAIR, inputs={"a": "m0.y", "b": "m1.y"})
    p.call("chat", constants={"x": "another"})
    placed = FifoScheduler().schedule(p.ready(), p.graph, two_engines)
    assert [c.id for c, _ in placed] == ["m0", "chat"]


def test_tenants_take_turns_for_the_engines(two_engines):
    """Another tenant's call that became ready after a flood is placed in the
    same pass, not after the flood: tenants take turns within a class."""
    p = Program()
    for i in range(12):
        p.call(f"a{i}", constants={"x": f"flood question number {i}"}, tenant="tenant-a")
    p.call("b0", constants={"x": "the quiet tenant's one question"}, tenant="tenant-b")
    sched = AppScheduler(queue_depth=0)  # room for 8 on the two idle engines
    placed = [c.id for c, _ in sched.schedule(p.ready(), p.graph, two_engines)]
    assert len(placed) == 8 and placed[:2] == ["a0", "b0"]
    assert [c for c in placed if c.startswith("a")] == [f"a{i}" for i in range(7)]  # A's own order kept


def test_the_tenant_served_least_recently_goes_first(two_engines):
    p = Program()
    sched = AppScheduler(queue_depth=0)
    for i in range(8):
        p.call(f"a{i}", constants={"x": f"flood question number {i}"}, tenant="tenant-a")
    first = sched.schedule(p.ready(), p.graph, two_engines)
    for c, _ in first:
        c.state = "running"
    for i in range(8, 16):
        p.call(f"a{i}", constants={"x": f"flood question number {i}"}, tenant="tenant-a")
    for i in range(2):
        p.call(f"b{i}", constants={"x": f"quiet question number {i}"}, tenant="tenant-b")
    second = [c.id for c, _ in sched.schedule(p.ready(), p.graph, two_engines)]
    assert second[:4] == ["b0", "a8", "b1", "a9"]


def test_a_group_larger_than_a_batch_goes_over_in_parts(two_engines):
    """A huge fan-out does not fill an engine's queue at once (where other
    tenants' calls could not pass it): at most an idle engine's room past
    the engine's room per pass."""
    p = Program()
    n = 40
    for i in range(n):
        p.call(f"m{i}", constants={"x": f"chunk {i}"})
    fn = FunctionSpec("reduce", " ".join(f"{{{{input:i{i}}}}}" for i in range(n)) + " {{output:y}}", {"y": SamplingConfig()})
    p.call("r", fn, inputs={f"i{i}": f"m{i}.y" for i in range(n)})
    p.call("b0", constants={"x": "the quiet tenant's one question"}, tenant="tenant-b")
    assert p.graph.calls["m0"].group is not None
    sched = AppScheduler()  # room 8 per idle engine (a batch of 4 and a queue of 4)
    placed = sched.schedule(p.ready(), p.graph, two_engines)
    members = [c.id for c, _ in placed if c.id.startswith("m")]
    assert "b0" in [c.id for c, _ in placed]
    assert members == [f"m{i}" for i in range(len(members))] and len(members) < n
    for c, _ in placed:
        c.state = "running"
    rest = [c.id for c, _ in sched.schedule(p.ready(), p.graph, two_engines)]
    assert rest and rest[0] == f"m{len(members)}"  # the rest of the group, in order, next pass
