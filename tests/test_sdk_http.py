"""The SDK's HTTP runtime against a real uvicorn server: the same program,
the same greedy text, the DAG resolved server-side, the same typed errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

import parrot as P
from parrot import workflows
from parrot.semantic_vars import Call, FunctionSpec, SamplingConfig, new_id
from parrot.semantic_vars import session as session_module
from parrot.semantic_vars.http_runtime import (
    AuthenticationError,
    HttpRuntime,
    ParrotConnectionError,
    QuotaExceededError,
)


@P.semantic_function(max_tokens=5)
def summarize(chunk: P.Input, summary: P.Output):
    """Summarize the text below in one sentence.
    Text: {{input:chunk}}
    Summary: {{output:summary}}"""


@P.semantic_function(max_tokens=4)
def title(summary: P.Input, name: P.Output, tag: P.Output(max_tokens=3)):
    """Title for: {{input:summary}}
    Title: {{output:name}}
    Tag: {{output:tag}}"""


CHUNKS = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]


def program(runtime):
    """A chain, a map-reduce, a multi-output call and a free variable set
    later; all calls are queued before the first set, so they go in one batch."""
    with P.Session(runtime) as s:
        topic = s.variable("topic")
        chain = workflows.chain_summary(CHUNKS[:2])  # chain: step 2 reads step 1
        maps = [summarize(c) for c in CHUNKS]  # map ...
        merged = workflows.reducer(3, max_tokens=4)(*maps)  # ... reduce
        name, tag = title(merged)  # two outputs of one call
        late = summarize(topic)  # waits for the free variable
        topic.set("a topic given after submitting")  # flushes the whole batch

        async def read():
            return await asyncio.gather(name.aget(), tag.aget(perf="throughput"), late.aget())

        n, t, l = asyncio.run(read())
        values = {
            "chain": chain[-1].get(), "maps": [m.get(perf="throughput") for m in maps],
            "merged": merged.get(), "name": n, "tag": t, "late": l,
        }
    return s, values


@pytest.fixture(scope="module")
def key(live_server):
    return live_server.new_tenant("sdk-http")


@pytest.fixture
def http(live_server, key):
    runtime = HttpRuntime(live_server.url, api_key=key)
    yield runtime
    runtime.close()


@pytest.fixture
def restore_default_runtime(monkeypatch):
    """Leave the process default runtime (and the environment) as found."""
    original = session_module._default_factory
    monkeypatch.delenv("PARROT_URL", raising=False)
    monkeypatch.delenv("PARROT_API_KEY", raising=False)
    yield
    session_module.set_default_runtime_factory(original)


def test_same_program_same_text_in_process_and_over_http(runtime, http, live_server, key):
    local_session, local = program(runtime)
    remote_session, remote = program(http)
    assert remote == local
    assert all(isinstance(v, str) for v in [*local["maps"], local["name"], local["tag"]])
    assert runtime.client_requests["submit"] == 1
    # Over HTTP too: one submit request for the 8 calls of the batch.
    assert http.requests["submit"] == 1
    assert http.requests["open_session"] == 1 and http.requests["close_session"] == 1
    assert http.requests["create_variable"] == 1 and http.requests["set"] == 1
    with live_server.client(key) as c:
        dag = c.get(f"/api/v1/sessions/{remote_session.id}/dag").json()
    assert len(dag["calls"]) == 8 and all(call["state"] == "done" for call in dag["calls"])
    assert any(g["members"] for g in dag["groups"])  # the maps formed a task group server-side


def test_a_session_opens_with_its_first_calls_in_one_round_trip(http):
    """Entering a session over HTTP sends nothing; its first batch of calls
    opens it (one request), so a chain costs its client an open-with-submit
    and a read; a block left before anything was sent opens nothing, and
    the synchronous API opens the same way."""

    def sent() -> dict[str, int]:
        return {k: http.requests[k] for k in ("open_session", "submit", "get", "close_session")}

    async def chain() -> tuple[P.Session, str, dict[str, int]]:
        before = sent()
        async with P.Session(http) as s:
            assert s.id is None
            name, _tag = title(summarize(CHUNKS[0]))
            value = await name.aget()
            during = {k: v - before[k] for k, v in sent().items()}
        return s, value, during

    s, value, during = asyncio.run(chain())
    assert isinstance(value, str) and s.id is not None and s.closed
    assert during["open_session"] == 1 and during["submit"] == 0 and during["get"] >= 1
    assert during["close_session"] == 0  # the close comes after the block's last line

    before = sent()
    with pytest.raises(KeyError):
        with P.Session(http) as idle:
            summarize(CHUNKS[1])  # buffered, never sent: the block fails first
            raise KeyError("the program failed before reading anything")
    assert sent() == before and idle.closed and idle.id is None

    with P.Session(http) as sync:
        assert summarize(CHUNKS[2]).get()
    assert sent()["open_session"] == before["open_session"] + 1 and sent()["submit"] == before["submit"]


def test_template_error_from_the_server_keeps_its_position(http):
    bad = FunctionSpec("bad", "Hello {{input:x}} then {{output:y", {"y": SamplingConfig(max_tokens=2)})
    call = Call(new_id("call"), bad, constants={"x": "1"}, outputs={"y": new_id("var")})
    sid = http.portal.call(http.open_session())
    try:
        with pytest.raises(P.TemplateError) as info:
            http.portal.call(http.submit_calls(sid, [call]))
        assert info.value.position == 23  # the unclosed `{{`
        assert "line 1" in str(info.value)
        with pytest.raises(P.UnknownVariableError):  # nothing was stored
            http.portal.call(http.get_variable(sid, call.outputs["y"]))
    finally:
        http.portal.call(http.close_session(sid, cancel=True))


def test_typed_errors_over_http(http):
    too_long = "word " * 4200  # longer than the model's 4096 positions
    with P.Session(http) as s:
        question = s.variable("question")
        question.set("first")
        with pytest.raises(P.VariableAlreadySetError):
            question.set("again")
        broken = summarize(too_long)
        downstream = title(broken)[0]
        with pytest.raises(P.CallFailedError, match="exceeds"):
            broken.get()
        with pytest.raises(P.CallFailedError, match="exceeds"):
            downstream.get()
        assert isinstance(summarize(question).get(), str)  # the session goes on
        with pytest.raises(P.SamplingConfigError):
            P.SemanticFunction("{{output:x|top_p=2}}")  # checked on the client, as in-process
    with pytest.raises(P.SessionClosedError):
        with s:
            pass


def test_wrong_api_key_and_unreachable_server(live_server):
    wrong = HttpRuntime(live_server.url, api_key="pk-wrong")
    try:
        with pytest.raises(AuthenticationError, match="invalid API key"):
            P.Session(wrong).open()
    finally:
        wrong.close()
    assert issubclass(AuthenticationError, P.ParrotError)
    down = HttpRuntime("http://127.0.0.1:9", api_key="pk-x")
    try:
        with pytest.raises(ParrotConnectionError, match="127.0.0.1:9"):
            P.Session(down).open()
    finally:
        down.close()


def test_quota_error_carries_retry_after(live_server):
    runtime = HttpRuntime(live_server.url, api_key=live_server.new_tenant("one-call", max_concurrent_calls=1))
    try:
        with P.Session(runtime) as s:
            pending = s.variable("never set")
            summarize(pending), summarize(pending)
            with pytest.raises(QuotaExceededError) as info:
                s.flush()
        assert info.value.field == "max_concurrent_calls" and info.value.retry_after >= 1
        assert isinstance(info.value, P.ParrotError)
    finally:
        runtime.close()


def test_connect_and_the_default_runtime_read_the_environment(live_server, key, monkeypatch, restore_default_runtime):
    with pytest.raises(P.InvalidArgumentError, match="PARROT_URL"):
        P.connect()
    monkeypatch.setenv("PARROT_URL", live_server.url + "/")
    monkeypatch.setenv("PARROT_API_KEY", key)
    runtime = P.connect()
    try:
        assert isinstance(runtime, HttpRuntime) and runtime.url == live_server.url and runtime.api_key == key
        with P.Session() as s:  # connect() made it the default
            assert s.runtime is runtime
            assert isinstance(summarize("via connect").get(), str)
    finally:
        runtime.close()
    # With PARROT_URL set, the default factory builds an HttpRuntime itself.
    session_module.set_default_runtime_factory(P._default_runtime)
    with P.Session() as s:
        assert isinstance(s.runtime, HttpRuntime) and s.runtime.api_key == key
        assert isinstance(summarize("via the environment").get(), str)
    s.runtime.close()


def test_import_parrot_imports_no_http_library():
    code = "import sys, parrot; assert not {'httpx', 'fastapi'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)

