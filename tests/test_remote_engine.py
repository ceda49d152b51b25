"""The remote engine against a real OpenAI-compatible server: Parrot's own
``/v1/completions`` started on loopback (uvicorn in a thread), driven by a
:class:`LocalRuntime` whose engine is the :class:`RemoteEngine`."""

from __future__ import annotations

import asyncio
import socket

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

import parrot as P
from parrot import workflows
from parrot.backends.engine import Fill, Gen, GenerationRequest
from parrot.backends.remote_engine import ApproxTokenizer, RemoteEngine
from parrot.dataflow import LocalRuntime
from parrot.semantic_vars import EngineError, EngineUnavailableError, SamplingConfig


@P.semantic_function(max_tokens=6)
def describe(topic: P.Input, line: P.Output, tag: P.Output(max_tokens=3)):
    """Describe {{input:topic}} in one line.
    Line: {{output:line}}
    Tag: {{output:tag}}"""


@pytest.fixture(scope="module")
def key(live_server):
    return live_server.new_tenant("remote-engine-tests")


@pytest.fixture(scope="module")
def client(live_server, key):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workflow_through_a_remote_engine_matches_direct_completions(live_server, key, client, default_model_dir):
    engine = RemoteEngine(live_server.url, api_key=key, tokenizer=default_model_dir, name="remote-0",
                          max_concurrency=4)
    runtime = LocalRuntime([engine])
    events: list[dict] = []
    runtime.subscribe(events.append)
    try:
        with P.Session(runtime) as s:
            partial, merged = workflows.map_reduce_summary(workflows.split_paragraphs(workflows.SAMPLE_DOCUMENT)[:3])
            line, tag = describe("parrots")
            final = merged.get()
            got_line, got_tag = line.get(), tag.get()
        calls = runtime.graph.session_calls(s.id)
        assert all(c.state == "done" and c.engine == "remote-0" for c in calls)
        assert model_name(client) == default_model_dir.name  # discovered from /v1/models
        assert engine.model == default_model_dir.name and engine.exact_counts

        # Single output: the value is what the server completes for the same text.
        reduce_call = calls[3]
        prompt = _rendered_prompt(runtime, reduce_call, engine)
        direct = client.completions.create(model=engine.model, prompt=prompt, max_tokens=32, temperature=0,
                                           stop=["\n"]).choices[0].text
        assert final == direct
        # Two outputs: the second is conditioned on the first, as one context.
        # The spaces before each output are not sent; the model writes its own,
        # which the values do not keep (see parrot.dataflow.program.space_led_outputs).
        first = client.completions.create(model=engine.model, prompt="Describe parrots in one line.\nLine:",
                                          max_tokens=6, temperature=0).choices[0].text
        second = client.completions.create(model=engine.model,
                                           prompt=f"Describe parrots in one line.\nLine:{first}\nTag:",
                                           max_tokens=3, temperature=0).choices[0].text
        assert (got_line, got_tag) == (first.removeprefix(" "), second.removeprefix(" "))
        # Usage came from the server: prompt tokens of each Gen's request.
        assert reduce_call.prefill_tokens + reduce_call.cached_tokens == len(
            engine.tokenizer.encode(prompt, add_bos=engine.tokenizer.prompt_bos))
        assert 1 <= reduce_call.generated_tokens <= 32
        # Tokens were streamed to listeners, and they add up to the values.
        streamed = "".join(e["text"] for e in events if e["type"] == "token" and e["var_id"] == merged.id)
        assert streamed == final
        assert engine.capacity().running == 0 and engine.capacity().max_running == 4
    finally:
        runtime.portal.call(runtime.shutdown())


def test_compression_behind_a_remote_engine_scores_with_a_local_model(live_server, key, default_model_dir):
    """A remote engine (here: a second Parrot server) holds no model to score
    with: marked inputs are compressed by the local scorer model (the
    configured model folder), and the server prefills the shorter prompt."""
    from parrot.backends.models import resolve_model

    engine = RemoteEngine(live_server.url, api_key=key, tokenizer=default_model_dir, name="remote-c")
    assert not engine.runs_model_jobs
    runtime = LocalRuntime([engine])
    text = workflows.SAMPLE_DOCUMENT
    try:
        with P.Session(runtime) as s:
            plain = P.SemanticFunction("Notes: {{input:notes}}\nA: {{output:a|max_tokens=2}}")(text)
            marked = P.SemanticFunction("Notes: {{input:notes|compress=0.4}}\nA: {{output:a|max_tokens=2}}")(text)
            plain.get(), marked.get()
        call_plain, call_marked = runtime.session_view(s.id).calls
        assert call_marked.state == "done", call_marked.error
        stats = call_marked.compression
        assert stats is not None and stats["model"] == str(resolve_model(None))
        assert len(call_marked.compressed_inputs["notes"]) < len(text)
        # Usage came from the server: it saw the shorter prompt.
        assert (call_marked.prefill_tokens + call_marked.cached_tokens
                < call_plain.prefill_tokens + call_plain.cached_tokens)
    finally:
        runtime.portal.call(runtime.shutdown())


def model_name(client) -> str:
    return client.models.list().data[0].id


def _rendered_prompt(runtime: LocalRuntime, call, engine: RemoteEngine) -> str:
    """The text the engine sends before the call's first output: the program's
    first Fill (chat frame included), decoded as the engine decodes it."""
    from parrot.dataflow import build_request

    request = build_request(call.function, call.template, runtime.graph.prompt_values(call), engine.tokenizer,
                            request_id="rendered")
    return engine.tokenizer.decode(request.program[0].token_ids)


def test_unreachable_server_is_unavailable_and_calls_move_to_a_live_engine(live_server, key, default_model_dir):
    dead = RemoteEngine(f"http://127.0.0.1:{_closed_port()}", model="m", name="dead", probe_interval_s=0.2)
    live = RemoteEngine(live_server.url, api_key=key, tokenizer=default_model_dir, name="live")
    runtime = LocalRuntime([dead, live])  # equal load: the first listed is tried first
    try:
        with P.Session(runtime) as s:
            answer = P.SemanticFunction("{{input:q}}\nAnswer: {{output:a|max_tokens=4}}")
            values = [answer(f"question {i}") for i in range(3)]
            got = [v.get() for v in values]
        calls = runtime.graph.session_calls(s.id)
        assert all(c.state == "done" and c.engine == "live" for c in calls)
        assert sum(c.requeues for c in calls) >= 1
        assert all(isinstance(v, str) for v in got)
        assert not dead.healthy() and live.healthy()
    finally:
        runtime.portal.call(runtime.shutdown())


def test_direct_stream_errors_are_typed(live_server, key):
    async def run(engine: RemoteEngine) -> BaseException:
        request = GenerationRequest([Fill(tuple(engine.tokenizer.encode("Hello"))), Gen(SamplingConfig(max_tokens=2))])
        with pytest.raises(EngineError) as info:
            await engine.submit(request).results()
        engine.close()
        return info.value

    down = asyncio.run(run(RemoteEngine(f"http://127.0.0.1:{_closed_port()}", model="m", name="down")))
    assert isinstance(down, EngineUnavailableError) and "unavailable" in str(down)
    # A 4xx is the request's fault, not the server's: the call fails, the engine stays healthy.
    engine = RemoteEngine(live_server.url, api_key=key, model="no-such-model", name="wrong-model")
    wrong = asyncio.run(run(engine))
    assert not isinstance(wrong, EngineUnavailableError)
    assert "HTTP 404" in str(wrong) and "no-such-model" in str(wrong) and engine.healthy()
    bad_key = RemoteEngine(live_server.url, api_key="pk-wrong", name="bad-key")
    assert "HTTP 401" in str(asyncio.run(run(bad_key)))


def test_health_probe_reports_a_live_server(live_server, key):
    engine = RemoteEngine(live_server.url + "/v1/", api_key=key)
    assert engine.base_url == live_server.url + "/v1"
    assert asyncio.run(engine.check_health())
    dead = RemoteEngine(f"http://127.0.0.1:{_closed_port()}")
    assert not asyncio.run(dead.check_health()) and not dead.healthy()
    with pytest.raises(ValueError, match="http"):
        RemoteEngine("localhost:8000")


@given(st.text())
def test_approx_tokenizer_round_trips_any_text(text):
    tok = ApproxTokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) >= len(text.encode("utf-8")) / 4
    # Segments tokenized apart decode to their concatenation, as programs need.
    half = len(text) // 2
    assert tok.decode(tok.encode(text[:half]) + tok.encode(text[half:])) == text


def test_parrot_serves_on_top_of_a_remote_engine(live_server, key, client, default_model_dir):
    """``parrot serve --remote-engine URL``: a second Parrot whose only engine
    is the first one's OpenAI endpoint answers like the first one."""
    from conftest import LiveServer

    from parrot.server.serve import ServerSettings

    outer = LiveServer(ServerSettings(remote_engines=[live_server.url], remote_api_key=key,
                                      remote_tokenizer=str(default_model_dir)))
    try:
        service = outer.server.server.config.app.state.service
        assert [type(e).__name__ for e in service.runtime.engines] == ["RemoteEngine"]
        with outer.admin() as admin:
            ready = admin.get("/readyz").json()
        assert ready == {"ready": True, "engines": {"remote-0": True}, "store": True}
        front = openai.OpenAI(base_url=outer.url + "/v1", api_key=outer.new_tenant("front"), max_retries=0, timeout=60)
        model = model_name(front)
        assert model == default_model_dir.name  # named after the remote engine's tokenizer folder
        prompt = "Parrots can"
        got = front.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        want = client.completions.create(model=model_name(client), prompt=prompt, max_tokens=8, temperature=0)
        assert got.choices[0].text == want.choices[0].text
        assert got.usage.prompt_tokens == want.usage.prompt_tokens  # exact counts via the local tokenizer
    finally:
        outer.stop()


def test_settings_read_the_environment(monkeypatch):
    from parrot.server.serve import ServerSettings

    monkeypatch.setenv("PARROT_RAY_ADDRESS", "auto")
    monkeypatch.setenv("PARROT_ENGINES", "4")
    monkeypatch.setenv("PARROT_ENGINE_GPUS", "1")
    monkeypatch.setenv("PARROT_REMOTE_ENGINES", "http://a:8000, http://b:8000/v1")
    monkeypatch.setenv("PARROT_REMOTE_CONCURRENCY", "3")
    s = ServerSettings.from_env()
    assert (s.ray_address, s.torch_engines, s.engine_gpus, s.remote_concurrency) == ("auto", 4, 1.0, 3)
    assert s.remote_engines == ["http://a:8000", "http://b:8000/v1"]
    specs = s.engine_specs()
    assert [sp.name for sp in specs] == ["engine-0", "engine-1", "engine-2", "engine-3", "remote-0", "remote-1"]
    assert specs[-1].kind == "remote" and specs[-1].max_running == 3
    # A flag wins over the environment; remote engines alone mean no torch engine.
    monkeypatch.delenv("PARROT_ENGINES")
    assert ServerSettings.from_env(remote_engines=["http://c:1"]).torch_engines == 0
    with pytest.raises(ValueError, match="no engines"):
        ServerSettings(engines=0).validate()
    with pytest.raises(ValueError, match="http"):
        ServerSettings.from_env(remote_engines=["c:1"])
