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
    # The client submitted 5 calls and read one value; it never set or read
    # an intermediate value, so every dependent call was started by the runtime.
    assert runtime.client_requests == {"submit": 5, "get": 1}
    for call in calls:
        for upstream in runtime.graph.upstream_calls(call):
            produced = [runtime.graph.variables[v] for v in upstream.outputs.values()]
            assert call.started_at >= min(v.set_at for v in produced)
    assert runtime.graph.variables[name.id].perf == "latency"


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
    with P.Session(runtime) as s:
        name, tag = title("anything")
        tag.get()
    call = runtime.graph.session_calls(s.id)[0]
    assert runtime.graph.variables[name.id].set_at <= runtime.graph.variables[tag.id].set_at <= call.finished_at


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
            partial, merged = workflows.map_reduce_summary(["one", "two", "three", "four"])
            merged.get()
        used = {c.engine for c in runtime.graph.session_calls(s.id)}
        assert used == {"e0", "e1"}
    finally:
        runtime.portal.call(runtime.shutdown())


def test_default_session_uses_the_embedded_model():
    with P.Session() as s:
        out = summarize("the default runtime needs no arguments")
        assert isinstance(out.get(), str)
    assert type(s.runtime).__name__ == "LocalRuntime"
