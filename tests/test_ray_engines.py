"""Engines as actors on a real local Ray cluster (``ray.init`` with 4 CPUs):
two CPU engine actors on the embedded model, a map-reduce workflow placed
across both by the scheduler, an actor killed mid-workflow (the DAG still
completes, every variable set exactly once), and a restarted actor rejoining.

Synchronisation is by events: the kill happens inside the runtime's own
token event, and waits are on the proxy's health event, never on sleeps.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import ray  # noqa: E402  (the [ray] extra is part of the test extra)

import parrot as P  # noqa: E402
from parrot import workflows  # noqa: E402
from parrot.backends.engine import Fill  # noqa: E402
from parrot.backends.ray_engine import RayEngine, start_engines  # noqa: E402
from parrot.backends.spec import EngineSpec  # noqa: E402
from parrot.dataflow import LocalRuntime, build_request  # noqa: E402

DOC = workflows.split_paragraphs(workflows.SAMPLE_DOCUMENT)


@P.semantic_function(max_tokens=48)
def key_facts(chunk: P.Input, facts: P.Output):
    """List the key facts of the passage below as short notes.
    Passage: {{input:chunk}}
    Facts: {{output:facts}}"""


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def engines(cluster, default_model_dir):
    """Two engine actors, one CPU each; Ray restarts each once if it dies."""
    specs = [EngineSpec(name=f"actor-{i}", model=str(default_model_dir), device="cpu") for i in range(2)]
    engines = start_engines(specs, num_cpus=1, max_restarts=1)
    yield engines
    for engine in engines:
        engine.close()


def _two_map_reduces():
    """Two map-reduce workflows whose map functions have different prefixes."""
    partial = [workflows.summarize_chunk(c) for c in DOC]
    facts = [key_facts(c) for c in DOC]
    merged = workflows.reducer(len(partial))(*partial)
    merged_facts = workflows.reducer(len(facts))(*facts)
    return partial + facts, [merged, merged_facts]


def _assert_set_once(runtime: LocalRuntime, session_id: str, set_events: Counter) -> None:
    outputs = [v for c in runtime.graph.session_calls(session_id) for v in c.outputs.values()]
    assert outputs and all(runtime.graph.variables[v].value is not None for v in outputs)
    assert all(set_events[v] == 1 for v in outputs), {v: set_events[v] for v in outputs if set_events[v] != 1}


def test_map_reduce_runs_across_two_actors_with_prefix_affinity(engines):
    # Runtimes here are not shut down: that would close the shared actors.
    runtime = LocalRuntime(engines)
    with P.Session(runtime) as s:
        maps, reduces = _two_map_reduces()
        for r in reduces:
            r.get(perf="throughput")
    calls = runtime.graph.session_calls(s.id)
    assert all(c.state == "done" for c in calls)
    assert {c.engine for c in calls} == {"actor-0", "actor-1"}  # both served calls
    hinted = [c for c in calls if c.prefix_key is not None]
    by_key: dict[str, set[str]] = {}
    for c in hinted:
        by_key.setdefault(c.prefix_key, set()).add(c.engine)
    # Prefix affinity: every call sharing a prefix ran on one actor ...
    assert all(len(where) == 1 for where in by_key.values()), by_key
    # ... and the two map groups (different prefixes) went to different actors.
    map_keys = {c.function.name: c.prefix_key for c in hinted if c.function.name in ("summarize_chunk", "key_facts")}
    assert len(map_keys) == 2 and None not in map_keys.values()
    assert by_key[map_keys["summarize_chunk"]] != by_key[map_keys["key_facts"]]
    # The actors report the prefixes they cached (the scheduler reads this).
    for engine in engines:
        runtime.portal.call(engine.refresh())
    for key, where in by_key.items():
        engine = next(e for e in engines if e.name in where)
        assert key in engine.capacity().cached_prefixes
    assert sum(c.cached_tokens for c in hinted) > 0  # the shared prefix was reused
    assert all(e.capacity().running == 0 for e in engines)


def test_compression_scores_with_the_actors_model(engines):
    """A marked input behind Ray engines is compressed by a model job in the
    first actor (its own weights), not by a model loaded in this process."""
    runtime = LocalRuntime(engines)
    text = workflows.SAMPLE_DOCUMENT
    with P.Session(runtime) as s:
        plain = P.SemanticFunction("Notes: {{input:notes}}\nA: {{output:a|max_tokens=2}}")(text)
        marked = P.SemanticFunction("Notes: {{input:notes|compress=0.4}}\nA: {{output:a|max_tokens=2}}")(text)
        plain.get(), marked.get()
    call_plain, call_marked = runtime.session_view(s.id).calls
    assert call_plain.compression is None and call_marked.state == "done"
    stats = call_marked.compression
    assert stats is not None and stats["model"] == "actor-0"  # scored where actor-0's weights live
    assert len(call_marked.compressed_inputs["notes"]) < len(text)
    assert stats["compressed_tokens"] < stats["original_tokens"]
    # The engine prefilled the shorter prompt.
    assert (call_marked.prefill_tokens + call_marked.cached_tokens
            < call_plain.prefill_tokens + call_plain.cached_tokens)


def _kill_on_first_token(runtime: LocalRuntime, engines: list[RayEngine], *, restart: bool):
    """Kill the actor that streams the first token of a ``key_facts`` call (the
    long one, so the kill lands mid-call), from inside that token's event;
    record what the runtime saw (variable sets, tokens, health at re-queue)."""
    seen = {"victim": None, "healthy_at_requeue": [], "sets": Counter(), "tokens": {}}

    def listener(event: dict) -> None:
        if event["type"] == "variable_set":
            seen["sets"][event["var_id"]] += 1
        elif event["type"] == "token":
            seen["tokens"][event["var_id"]] = seen["tokens"].get(event["var_id"], "") + event["text"]
            call = runtime.graph.calls[event["call_id"]]
            if seen["victim"] is None and call.function.name == "key_facts":
                seen["victim"] = next(e for e in engines if e.name == call.engine)
                ray.kill(seen["victim"].actor, no_restart=not restart)
        elif event["type"] == "call_state" and event["state"] == "ready" and runtime.graph.calls[event["call_id"]].requeues:
            seen["healthy_at_requeue"].append(seen["victim"].healthy())

    runtime.subscribe(listener)
    return seen


def test_restarted_actor_reports_unhealthy_then_rejoins(engines):
    runtime = LocalRuntime(engines)
    seen = _kill_on_first_token(runtime, engines, restart=True)
    with P.Session(runtime) as s:
        maps, reduces = _two_map_reduces()
        values = [r.get(perf="throughput") for r in reduces]
    victim = seen["victim"]
    assert victim is not None and all(isinstance(v, str) for v in values)
    calls = runtime.graph.session_calls(s.id)
    assert all(c.state == "done" for c in calls)
    assert sum(c.requeues for c in calls) >= 1
    assert seen["healthy_at_requeue"] and not any(seen["healthy_at_requeue"])  # out of the pool while dead
    _assert_set_once(runtime, s.id, seen["sets"])

    assert runtime.portal.call(victim.wait_healthy()) is True  # Ray restarted it; the proxy saw it
    assert victim.healthy() and not victim.dead and victim.failures >= 1
    with P.Session(runtime) as s2:
        answer = P.SemanticFunction("{{input:q}}\nAnswer: {{output:a|max_tokens=4}}")
        answers = [answer(f"question {i}") for i in range(4)]
        for a in answers:
            a.get(perf="latency")
    assert victim.name in {c.engine for c in runtime.graph.session_calls(s2.id)}  # it rejoined


def test_actor_killed_mid_workflow_the_dag_completes_with_each_variable_set_once(engines):
    runtime = LocalRuntime(engines)
    seen = _kill_on_first_token(runtime, engines, restart=False)
    with P.Session(runtime) as s:
        maps, reduces = _two_map_reduces()
        values = [r.get(perf="throughput") for r in reduces]
    victim = seen["victim"]
    [survivor] = [e for e in engines if e is not victim]
    assert victim is not None and all(isinstance(v, str) for v in values)
    calls = runtime.graph.session_calls(s.id)
    assert all(c.state == "done" for c in calls)
    requeued = [c for c in calls if c.requeues]
    assert requeued and all(c.engine == survivor.name for c in requeued)
    _assert_set_once(runtime, s.id, seen["sets"])
    # What listeners were streamed adds up to each value: the dead actor's
    # partial tokens were not streamed twice.
    for var_id, text in seen["tokens"].items():
        assert text == runtime.graph.variables[var_id].value
    assert runtime.portal.call(victim.wait_healthy()) is False
    assert victim.dead and not victim.healthy()
    # The survivor alone still serves new work.
    with P.Session(runtime) as s2:
        assert isinstance(workflows.summarize_chunk("one more").get(), str)
    assert {c.engine for c in runtime.graph.session_calls(s2.id)} == {survivor.name}


def test_rerun_keeps_a_released_output_as_fill_text(default_engine):
    """A call re-run after its engine died keeps its already-released output:
    the program feeds that value as text and generates only the rest, and
    the rest is what the full program generates after the same value."""

    @P.semantic_function(max_tokens=5)
    def two(topic: P.Input, a: P.Output, b: P.Output(max_tokens=4)):
        """About {{input:topic}}: {{output:a}} then {{output:b}}"""

    runtime = LocalRuntime([default_engine])
    with P.Session(runtime) as s:
        a, b = two("birds")
        full = (a.get(), b.get())
    call = runtime.graph.session_calls(s.id)[0]
    request = build_request(call.function, call.template, {"topic": "birds"}, default_engine.tokenizer,
                            request_id="rerun", fixed_outputs={"a": full[0]})
    assert [type(step).__name__ for step in request.program] == ["Fill", "Gen"]
    assert request.program[1].name == "b"
    fed = default_engine.tokenizer.decode([t for st in request.program if isinstance(st, Fill) for t in st.token_ids])
    assert fed == f"About birds: {full[0]} then"  # the space before an output is the model's to write

    async def rerun():
        return await default_engine.submit(request).results()

    results, _ = asyncio.run(rerun())
    assert [(r.gen_index, r.name) for r in results] == [(0, "b")]  # only the missing output is generated


def test_parrot_serve_with_ray_address_runs_engines_as_actors(cluster, default_model_dir):
    """``parrot serve --ray-address local --engines 1``: the service's engine is
    an actor on the (already connected) cluster, and the OpenAI endpoint works."""
    import openai
    from conftest import LiveServer

    from parrot.server.serve import ServerSettings

    server = LiveServer(ServerSettings(ray_address="local", engines=1, model=str(default_model_dir), device="cpu",
                                       engine_restarts=0))
    try:
        service = server.server.server.config.app.state.service
        [engine] = service.runtime.engines
        assert isinstance(engine, RayEngine) and engine.name == "engine-0"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.new_tenant("ray"), max_retries=0, timeout=60)
        assert client.models.list().data[0].id == default_model_dir.name  # the tokenizer came from the actor
        r = client.completions.create(model=default_model_dir.name, prompt="Once upon a time", max_tokens=6,
                                      temperature=0)
        assert 1 <= r.usage.completion_tokens <= 6
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=default_model_dir.name, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
        assert streamed == r.choices[0].text
        with server.admin() as admin:
            assert admin.get("/readyz").json() == {"ready": True, "engines": {"engine-0": True}, "store": True}
            ray.kill(engine.actor, no_restart=True)
            # A health check on the server's loop finds the actor gone; readiness follows.
            alive = asyncio.run_coroutine_threadsafe(engine.check_health(), engine._loop).result(timeout=60)
            assert alive is False and not engine.healthy()
            r = admin.get("/readyz")
            assert r.status_code == 503 and r.json() == {"ready": False, "engines": {"engine-0": False}, "store": True}
    finally:
        server.stop()


def test_an_engine_error_in_the_actor_fails_the_call_not_the_actor(engines, default_model_dir):
    """A request the engine refuses (longer than the model's context) fails
    its call with the engine's message; the actor stays in the pool."""
    alive = [e for e in engines if not e.dead]
    runtime = LocalRuntime(alive)
    with P.Session(runtime) as s:
        too_long = P.SemanticFunction("{{input:text}} Summary: {{output:s|max_tokens=2}}")("word " * 5000)
        with pytest.raises(P.CallFailedError, match="exceeds the model's"):
            too_long.get()
    [call] = runtime.graph.session_calls(s.id)
    assert call.state == "failed" and call.requeues == 0
    assert all(e.healthy() for e in alive)


def test_a_remote_engine_runs_as_an_actor_too(cluster, live_server, default_model_dir):
    """An actor can hold a remote engine (an HTTP client of an OpenAI-compatible
    server): same results as the server answers directly."""
    import openai

    key = live_server.new_tenant("ray-remote")
    spec = EngineSpec(name="remote-actor", kind="remote", url=live_server.url, api_key=key,
                      tokenizer=str(default_model_dir), max_running=4)
    [engine] = start_engines([spec], num_cpus=0)  # IO only: it needs no CPU slot of its own
    try:
        assert engine.capacity().max_running == 4
        runtime = LocalRuntime([engine])
        with P.Session(runtime):
            value = P.SemanticFunction("Q: {{input:q}}\nA: {{output:a|max_tokens=5}}")("what is a parrot?").get()
        direct = openai.OpenAI(base_url=live_server.url + "/v1", api_key=key, max_retries=0).completions.create(
            model=default_model_dir.name, prompt="Q: what is a parrot?\nA:", max_tokens=5, temperature=0)
        # The space before the output is not sent; the value drops the one the model writes.
        assert value == direct.choices[0].text.removeprefix(" ")
    finally:
        engine.close()
