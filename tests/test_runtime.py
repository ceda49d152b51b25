"""Whole programs on the in-process runtime and the embedded default model.

These run the real engine: the DAG is resolved on the runtime's side and the
client only submits calls and reads the values it wants.
"""

from __future__ import annotations

import asyncio

import pytest

import parrot as P
from parrot import workflows
from parrot.dataflow import LocalRuntime, build_request
from parrot.semantic_vars import Call


@P.semantic_function(max_tokens=6)
def summarize(chunk: P.Input, summary: P.Output):
    """Summarize the text below in one sentence.
    Text: {{input:chunk}}
    Summary: {{output:summary}}"""


@P.semantic_function(max_tokens=5)
def title(summary: P.Input, name: P.Output, tag: P.Output(max_tokens=3)):
    """Title for: {{input:summary}}
    Title: {{output:name}}
    Tag: {{output:tag}}"""


def test_chain_and_fan_in_run_without_client_round_trips(runtime):
    chunks = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    with P.Session(runtime) as s:
        sums = [summarize(c) for c in chunks]
        merged = workflows.reducer(3, max_tokens=4)(*sums)
        name, tag = title(merged)
        final = name.get(perf="latency")  # the first and only wait
    assert isinstance(final, str)
    calls = runtime.graph.session_calls(s.id)
    assert len(calls) == 5 and all(c.state == "done" for c in calls)
    # The client sent the 5 calls in one message and read one value; it never
    # set or read an intermediate value, so every dependent call was started
    # by the runtime.
    assert runtime.client_requests == {"submit": 1, "get": 1}
    for call in calls:
        for upstream in runtime.graph.upstream_calls(call):
            produced = [runtime.graph.variables[v] for v in upstream.outputs.values()]
            assert call.started_at >= min(v.set_at for v in produced)
    assert runtime.graph.variables[name.id].perf == "latency"
    # Each output records why its generation ended.
    assert all(set(c.finish_reasons) == set(c.outputs) for c in calls)
    assert all(r in ("eos", "stop", "length") for c in calls for r in c.finish_reasons.values())


def test_runtime_outputs_equal_the_engine_run_directly(runtime, default_engine):
    with P.Session(runtime) as s:
        name, tag = title("a short note")
        got = (name.get(), tag.get(perf="throughput"))
    call = runtime.graph.session_calls(s.id)[0]
    request = build_request(call.function, call.template, {"summary": "a short note"}, default_engine.tokenizer, request_id="direct")

    async def direct():
        return await default_engine.submit(request).results()

    results, _ = asyncio.run(direct())
    assert got == (results[0].text, results[1].text)
    assert runtime.graph.variables[tag.id].perf == "throughput"


def test_first_output_is_released_before_the_call_finishes(runtime):
    """A call reading a producer's first output is placed on the engine while
    the producer still generates its second: an output does not wait for its call."""
    producer = P.SemanticFunction("Title for: {{input:s}}\nTitle: {{output:name|max_tokens=3}}\n"
                                  "Story: {{output:story|max_tokens=48}}", name="producer")
    events: list[dict] = []
    unsubscribe = runtime.subscribe(events.append)
    try:
        with P.Session(runtime) as s:
            name, story = producer("anything")
            follow = summarize(name)
            follow.get(), story.get()
    finally:
        unsubscribe()
    made, read = runtime.session_view(s.id).calls
    states = [(e["call_id"], e["state"]) for e in events if e["type"] == "call_state"]
    assert states.index((read.id, "running")) < states.index((made.id, "done"))
    assert read.started_at < made.finished_at
    assert runtime.variable(name.id).set_at <= read.started_at


def test_async_api(runtime):
    async def program():
        async with P.Session(runtime) as s:
            a, b = summarize("one"), summarize("two")
            values = await asyncio.gather(a.aget(perf="throughput"), b.aget(perf="throughput"))
            return s, values

    s, values = asyncio.run(program())
    assert len(values) == 2 and all(isinstance(v, str) for v in values)
    assert all(c.state == "done" for c in runtime.graph.session_calls(s.id))


def test_free_variable_set_later_starts_its_calls(runtime):
    with P.Session(runtime) as s:
        question = s.variable("question")
        out = summarize(question)
        s.flush()
        call = runtime.graph.session_calls(s.id)[0]
        assert call.state == "waiting"
        question.set("set after submitting")
        assert isinstance(out.get(), str)
        with pytest.raises(P.VariableAlreadySetError):
            question.set("again")
        with pytest.raises(P.VariableAlreadySetError):
            out.set("outputs are set by their call")


def test_engine_failure_fails_the_call_and_everything_downstream(runtime, default_engine):
    too_long = "word " * (default_engine.model.config.max_position_embeddings + 10)
    with P.Session(runtime) as s:
        broken = summarize(too_long)
        downstream = title(broken)[0]
        with pytest.raises(P.CallFailedError, match="exceeds"):
            broken.get()
        with pytest.raises(P.CallFailedError, match="exceeds"):
            downstream.get()
        fine = summarize("short").get()
    assert isinstance(fine, str)
    states = [c.state for c in runtime.graph.session_calls(s.id)]
    assert states == ["failed", "failed", "done"]


def test_leaving_the_session_waits_for_unread_calls(runtime):
    with P.Session(runtime) as s:
        steps = workflows.chain_summary(["a b c", "d e f", "g h"])
    assert all(c.state == "done" for c in runtime.graph.session_calls(s.id))
    assert all(runtime.graph.variables[v.id].is_set for v in steps)
    assert runtime.client_requests["get"] == 0


def test_an_exception_in_the_session_cancels_what_cannot_run(runtime):
    with pytest.raises(KeyError):
        with P.Session(runtime) as s:
            pending = s.variable("never set")
            summarize(pending)
            raise KeyError("user bug")
    [call] = runtime.graph.session_calls(s.id)
    assert call.state == "cancelled"


def test_calls_spread_over_two_engines(default_model_dir):
    from parrot.backends.torch_engine import TorchEngine

    engines = [TorchEngine.from_pretrained(default_model_dir, device="cpu", name=f"e{i}") for i in range(2)]
    runtime = LocalRuntime(engines)
    try:
        with P.Session(runtime) as s:
            # Independent latency calls with nothing in common are spread by load ...
            answer = P.SemanticFunction("{{input:q}}\nAnswer: {{output:a|max_tokens=4}}")
            answers = [answer(f"question {i}") for i in range(4)]
            for a in answers:
                a.get(perf="latency")
            # ... while a task group goes to one engine, so it batches.
            partial, merged = workflows.map_reduce_summary(["one", "two", "three", "four"])
            merged.get()
        calls = runtime.graph.session_calls(s.id)
        assert {c.engine for c in calls[:4]} == {"e0", "e1"}
        assert len({c.engine for c in calls[4:8]}) == 1
        assert len({c.group for c in calls[4:8]}) == 1 and calls[4].group is not None
    finally:
        runtime.portal.call(runtime.shutdown())


def test_a_task_group_is_handed_to_the_engine_while_it_has_room(default_model_dir):
    """Issue 21's shape in small: latency work ahead of a map-reduce group
    fills the engine's batch; the group's maps still go to the engine (into
    its queue) in the same pass, instead of waiting in the runtime's ready
    queue until a running call finishes."""
    from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig

    engine = TorchEngine.from_pretrained(default_model_dir, device="cpu", name="small",
                                         config=TorchEngineConfig(max_running=2))
    runtime = LocalRuntime([engine])
    try:
        with P.Session(runtime) as s:
            chat = P.SemanticFunction("{{input:q}}\nAnswer: {{output:a|max_tokens=16}}", name="chat")
            chats = [chat(f"chat question {i}") for i in range(3)]
            partial, merged = workflows.map_reduce_summary(["one", "two", "three", "four"])
            merged.get(perf="latency")
            for c in chats:
                c.get()
        calls = runtime.graph.session_calls(s.id)
        chat_calls = [c for c in calls if c.function.name == "chat"]
        maps = [c for c in calls if c.group is not None]
        assert len(chat_calls) == 3 and len(maps) == 4
        first_finish = min(c.finished_at for c in chat_calls)
        # Queue times from the DAG: every map left the runtime's ready queue
        # before any call had finished, i.e. while the engine had room.
        assert all(m.started_at < first_finish for m in maps)
        # The engine admitted the latency-critical reduce as soon as its
        # inputs existed, and objectives reached it with the requests.
        reduce = runtime.graph.calls[runtime.graph.variables[merged.id].producer]
        assert reduce.objective == "latency" and all(m.objective == "throughput" for m in maps)
        assert all(c.state == "done" for c in calls)
    finally:
        runtime.portal.call(runtime.shutdown())


def test_engine_admits_latency_work_before_queued_throughput_work(default_model_dir):
    """With one place in the batch, a latency request queued after throughput
    requests is admitted before them; greedy text does not depend on order."""
    from parrot.backends.engine import Fill, Gen, GenerationRequest
    from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig
    from parrot.semantic_vars import SamplingConfig

    engine = TorchEngine.from_pretrained(default_model_dir, device="cpu", name="one-seat",
                                         config=TorchEngineConfig(max_running=1))

    def request(text: str, objective) -> GenerationRequest:
        ids = tuple(engine.tokenizer.encode(text, add_bos=True))
        return GenerationRequest([Fill(ids), Gen(SamplingConfig(max_tokens=8))], objective=objective)

    async def run() -> tuple[list[str], list[str]]:
        first = engine.submit(request("the running one", "latency"))
        queued = [engine.submit(request(f"throughput job {i}", "throughput")) for i in range(3)]
        urgent = engine.submit(request("the urgent one", "latency"))
        streams = [first, *queued, urgent]
        finished = [await s.results() for s in streams]
        order = sorted(range(len(streams)), key=lambda i: finished[i][1].started_at)
        return [["first", "t0", "t1", "t2", "urgent"][i] for i in order], [r[0][0].text for r in finished]

    try:
        order, texts = asyncio.run(run())
        assert order == ["first", "urgent", "t0", "t1", "t2"]
        alone = asyncio.run(_texts_alone(engine, ["the running one", "throughput job 0", "throughput job 1",
                                                  "throughput job 2", "the urgent one"]))
        assert texts == alone
    finally:
        engine.close()


async def _texts_alone(engine, prompts):
    from parrot.backends.engine import Fill, Gen, GenerationRequest
    from parrot.semantic_vars import SamplingConfig

    out = []
    for text in prompts:
        ids = tuple(engine.tokenizer.encode(text, add_bos=True))
        results, _ = await engine.submit(GenerationRequest([Fill(ids), Gen(SamplingConfig(max_tokens=8))])).results()
        out.append(results[0].text)
    return out


def test_default_session_uses_the_embedded_model():
    with P.Session() as s:
        out = summarize("the default runtime needs no arguments")
        assert isinstance(out.get(), str)
    assert type(s.runtime).__name__ == "LocalRuntime"


SYSTEM = (
    "You are the reviewer on a small software team. You read each change carefully, "
    "point out bugs and unclear names, and answer in one short sentence. "
)


@P.semantic_function(max_tokens=5)
def review(system: P.Input, change: P.Input, verdict: P.Output):
    """{{input:system}}
    Change: {{input:change}}
    Verdict: {{output:verdict}}"""


CHANGES = ["rename x to count", "add a retry loop", "delete dead code", "fix the off-by-one"]


def test_prefix_hints_reach_the_engine(runtime, default_engine):
    hits, saved = default_engine.counters.prefix_hits, default_engine.counters.prefix_tokens_saved
    with P.Session(runtime) as s:
        verdicts = [review(SYSTEM, c) for c in CHANGES]
        [v.get(perf="throughput") for v in verdicts]
    calls = runtime.graph.session_calls(s.id)
    assert len({c.prefix_key for c in calls}) == 1 and calls[0].prefix_key is not None
    # The shared system prompt was prefilled once; every other call reused it.
    assert default_engine.counters.prefix_hits - hits == len(CHANGES) - 1
    assert sorted(c.cached_tokens > 0 for c in calls) == [False] + [True] * (len(CHANGES) - 1)
    assert default_engine.counters.prefix_tokens_saved - saved == sum(c.cached_tokens for c in calls)


def test_request_level_baseline_gives_the_same_text_the_slow_way(default_engine):
    def program(runtime):
        with P.Session(runtime) as s:
            verdicts = [review(SYSTEM, c) for c in CHANGES[:2]]
            steps = workflows.chain_summary(["a b c", "d e f", "g h"])
            return [v.get() for v in verdicts] + [steps[-1].get()], s

    parrot_rt = LocalRuntime([default_engine])
    baseline_rt = LocalRuntime([default_engine], request_level=True)
    fast, _ = program(parrot_rt)
    slow, s = program(baseline_rt)
    assert fast == slow
    calls = baseline_rt.graph.session_calls(s.id)
    assert all(c.prefix_key is None and c.cached_tokens == 0 for c in calls)
    # No call had a variable input: the client fetched each value and sent its text.
    assert all(baseline_rt.graph.variables[v].constant for c in calls for v in c.inputs.values())
    assert baseline_rt.client_requests["get"] >= 2 + 2  # the chain's two links + the final reads
    assert baseline_rt.client_requests["submit"] == len(calls)


def test_closed_sessions_beyond_the_limit_are_forgotten_in_graph_and_store(default_engine):
    """A long-running service stays bounded: past ``keep_closed_sessions``
    the oldest closed session leaves the graph and the store; one whose
    variables another session still reads waits until that one goes."""
    from parrot.semantic_vars import Call, FunctionSpec, SamplingConfig, UnknownSessionError

    ask = FunctionSpec("ask", "Q: {{input:q}}\nA: {{output:a}}", {"a": SamplingConfig(max_tokens=2)})
    runtime = LocalRuntime([default_engine], keep_closed_sessions=1)
    events: list[dict] = []
    runtime.subscribe(events.append)

    async def one_call_session(name: str, inputs: dict | None = None) -> str:
        sid = await runtime.open_session()
        consts = {} if inputs else {"q": name}
        await runtime.submit_calls(sid, [Call(f"call-{name}", ask, inputs or {}, consts, {"a": f"var-{name}"})])
        await runtime.get_variable(sid, f"var-{name}")
        return sid

    async def stored(kind: str) -> set[str]:
        return {r["id"] for r in await runtime.store.load(kind)}

    async def main() -> None:
        s0, s1 = await one_call_session("s0"), await one_call_session("s1")
        await runtime.close_session(s0)
        assert s0 in runtime.sessions  # one closed session is kept
        await runtime.close_session(s1)
        assert set(runtime.sessions) == {s1} and await stored("session") == {s1}
        assert set(runtime.graph.calls) == {"call-s1"} and await stored("call") == {"call-s1"}
        assert "var-s0" not in runtime.graph.variables and "var-s0" not in await stored("variable")
        assert runtime.graph.session_calls(s0) == []
        assert [e for e in events if e["type"] == "session_forgotten"] == [
            {"type": "session_forgotten", "session_id": s0, "call_ids": ["call-s0"]}]
        with pytest.raises(UnknownSessionError):
            await runtime.get_variable(s0, "var-s0")

        # Session b reads a's output: a stays (postponed) until b is forgotten.
        a = await one_call_session("a")
        b = await one_call_session("b", inputs={"q": "var-a"})
        await runtime.close_session(a)
        assert a in runtime.sessions and s1 not in runtime.sessions
        c = await one_call_session("c")
        await runtime.close_session(c)  # a cannot go yet, so c (the next oldest) does
        assert a in runtime.sessions and c not in runtime.sessions
        assert runtime.graph.variables["var-a"].is_set
        await runtime.close_session(b)  # b goes (nothing reads it); a is the one kept
        assert set(runtime.sessions) == {a}
        d = await one_call_session("d")
        await runtime.close_session(d)  # now a can go
        assert set(runtime.sessions) == {d} and set(runtime.graph.calls) == {"call-d"}
        assert await stored("variable") == {"var-d", "call-d.q"}

    asyncio.run(main())


def test_restore_applies_the_closed_session_limit(default_engine):
    from parrot.semantic_vars import Call, FunctionSpec, SamplingConfig

    ask = FunctionSpec("ask", "Q: {{input:q}}\nA: {{output:a}}", {"a": SamplingConfig(max_tokens=2)})
    first = LocalRuntime([default_engine], keep_closed_sessions=None)

    async def fill() -> list[str]:
        sids = []
        for i in range(3):
            sid = await first.open_session()
            await first.submit_calls(sid, [Call(f"call-{i}", ask, {}, {"q": str(i)}, {"a": f"var-{i}"})])
            await first.get_variable(sid, f"var-{i}")
            await first.close_session(sid)
            sids.append(sid)
        return sids

    sids = asyncio.run(fill())
    assert set(first.sessions) == set(sids)  # None keeps everything
    again = LocalRuntime([default_engine], store=first.store, keep_closed_sessions=2)
    asyncio.run(again.restore())
    assert set(again.sessions) == set(sids[1:]) and set(again.graph.calls) == {"call-1", "call-2"}


def test_forgetting_a_session_drops_its_task_groups(default_engine):
    runtime = LocalRuntime([default_engine], keep_closed_sessions=0)
    with P.Session(runtime) as s:
        sums = [summarize(c) for c in ("one two", "three four")]
        merged = workflows.reducer(2, max_tokens=3)(*sums)
        merged.get()
        assert runtime.graph.groups  # the two maps formed a task group
    assert s.id not in runtime.sessions and not runtime.graph.groups and not runtime.graph.calls


class _SlowSubmitRuntime(LocalRuntime):
    """A runtime whose submissions take a round trip, as over HTTP: the
    submitting coroutine yields to the loop before the calls exist."""

    async def submit_calls(self, session_id, calls):
        await asyncio.sleep(0)  # a yield point standing for the network, not a wait for anything
        await super().submit_calls(session_id, calls)


def test_concurrent_async_reads_wait_for_the_batch_they_read(default_engine):
    """Several aget() at once: the first sends the batch, the others must not
    ask for their variables before the runtime has the calls."""
    runtime = _SlowSubmitRuntime([default_engine])

    async def app() -> list[str]:
        async with P.Session(runtime):
            maps = [summarize(c) for c in ("one", "two", "three")]
            merged = workflows.reducer(3, max_tokens=4)(*maps)
            return await asyncio.gather(*(m.aget(perf="throughput") for m in maps), merged.aget(perf="latency"))

    # On the runtime's own loop, so the readers interleave with the submission.
    values = runtime.portal.call(app())
    assert len(values) == 4 and all(isinstance(v, str) for v in values)
    assert runtime.client_requests["submit"] == 1


def test_the_public_read_api_answers_what_the_service_asks(runtime):
    """Owners, summaries, views and the non-waiting poll, as the server reads them."""
    portal = runtime.portal
    sid = portal.call(runtime.open_session(namespace="tenant-a"))
    portal.call(runtime.create_variable(sid, "free-1", "free"))
    spec = P.SemanticFunction("Echo {{input:x}} {{output:y|max_tokens=2}}", name="echo").spec
    portal.call(runtime.submit_calls(sid, [Call("call-1", spec, {"x": "free-1"}, {}, {"y": "out-1"})]))
    assert runtime.session_owner(sid) == "tenant-a" and runtime.session_owner("nope") is None
    assert runtime.variable_owner("out-1") == "tenant-a" and runtime.variable_owner("nope") is None
    assert runtime.session_summaries("tenant-a") == [(sid, True, 1)] and runtime.session_summaries("b") == []
    # A poll records the read's objective and returns at once (the call waits for its input).
    var = runtime.poll_variable(sid, "out-1", "throughput")
    assert var.value is None and runtime.variable("out-1").perf == "throughput"
    assert runtime.call("call-1").state == "waiting" and runtime.input_values("call-1") == {}
    portal.call(runtime.set_variable(sid, "free-1", "hello"))
    assert runtime.input_values("call-1") == {"x": "hello"}
    assert isinstance(portal.call(runtime.get_variable(sid, "out-1")), str)
    view = runtime.session_view(sid)
    assert [c.id for c in view.calls] == ["call-1"] and set(view.variables) >= {"free-1", "out-1"}
    portal.call(runtime.close_session(sid))
    assert runtime.session_summaries("tenant-a") == [(sid, False, 1)]
