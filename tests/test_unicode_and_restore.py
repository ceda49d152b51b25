"""Text no store or tokenizer accepts (a lone surrogate, ``"a\\ud800b"``) is
refused where it enters, naming the field, before anything is stored; a
batch of calls lands whole or not at all; and a restart survives records it
cannot read back."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `tests.redis_server` imports under a bare `pytest` too
    sys.path.insert(0, str(ROOT))

from tests.redis_server import redis_url  # noqa: E402,F401  (a real redis-server)

BAD = "a\ud800b"  # httpx sends it as the JSON escape "a\ud800b"
FN = {"template": "Q: {{input:q}} A: {{output:a|max_tokens=2}}"}


@pytest.fixture(scope="module")
def key(live_server):
    return live_server.new_tenant("unicode")


def _post(c, url, body):
    # The raw JSON escape, exactly as a client would send it.
    return c.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"})


def _stored(c, sid):
    dag = c.get(f"/api/v1/sessions/{sid}/dag")
    assert dag.status_code == 200, dag.text
    return [x["call_id"] for x in dag.json()["calls"]], [v["var_id"] for v in dag.json()["variables"]]


def test_a_lone_surrogate_is_a_422_naming_the_field_at_every_entry_point(live_server, key):
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        free = c.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": "var-free", "name": "free"}).json()["var_id"]
        before = _stored(c, sid)
        cases = [
            (f"/api/v1/sessions/{sid}/calls", {"calls": [{"function": FN, "constants": {"q": BAD}}]}, "calls.0.constants.q"),
            (f"/api/v1/sessions/{sid}/calls", {"calls": [{"function": FN, "constants": {"q": "fine"}},
                                                         {"function": FN, "constants": {"q": BAD}}]}, "calls.1.constants.q"),
            (f"/api/v1/sessions/{sid}/calls", {"calls": [{"function": {"template": BAD + "{{output:a}}"}}]},
             "calls.0.function.template"),
            (f"/api/v1/sessions/{sid}/variables", {"name": "v", "value": BAD}, "value"),
            ("/api/v1/functions", {"template": "{{input:q}}" + BAD + "{{output:a}}"}, "template"),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": BAD}]}, "messages.0.content"),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": BAD}]}]},
             "messages.0.content"),
            ("/v1/completions", {"model": "m", "prompt": BAD}, "prompt"),
        ]
        for url, body, field in cases:
            r = _post(c, url, body)
            assert r.status_code == 422, (url, r.text)
            assert r.json()["error"]["field"].startswith(field), (field, r.json())
            assert "unicode" in r.json()["error"]["message"].lower()
        r = c.put(f"/api/v1/sessions/{sid}/variables/{free}", content=json.dumps({"value": BAD}),
                  headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "value", r.text
        assert _stored(c, sid) == before  # nothing was stored, not even the good half of the batch
        # The connection and the session still work, and the free variable can still be set.
        assert c.put(f"/api/v1/sessions/{sid}/variables/{free}", json={"value": "ok"}).status_code == 200
        assert c.delete(f"/api/v1/sessions/{sid}").status_code == 200


def test_a_call_whose_output_id_is_its_own_id_is_refused_and_leaves_nothing(live_server, key):
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        for call in ({"call_id": "call-self", "function": FN, "constants": {"q": "x"}, "outputs": {"a": "call-self"}},
                     {"call_id": "call-k", "function": FN, "constants": {"q": "x"}, "outputs": {"a": "call-k.q"}}):
            r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [call]})
            assert r.status_code == 422 and r.json()["error"]["field"] == "calls.0.outputs.a", r.text
        (info,) = [s for s in c.get("/api/v1/sessions").json()["sessions"] if s["session_id"] == sid]
        assert info["calls"] == 0
        assert _stored(c, sid) == ([], [])
        assert c.get(f"/api/v1/sessions/{sid}/calls/call-self").status_code == 404
        assert c.delete(f"/api/v1/sessions/{sid}").status_code == 200


def test_the_in_process_runtime_refuses_it_too(runtime):
    from parrot.semantic_vars import Call, FunctionSpec, InvalidArgumentError, SamplingConfig

    spec = FunctionSpec("f", "Q: {{input:q}} A: {{output:a}}", {"a": SamplingConfig(max_tokens=2)})

    async def body():
        sid = await runtime.open_session()
        with pytest.raises(InvalidArgumentError) as e:
            await runtime.submit_calls(sid, [Call("call-u1", spec, {}, {"q": "ok"}, {"a": "var-u1"}),
                                             Call("call-u2", spec, {}, {"q": BAD}, {"a": "var-u2"})])
        assert e.value.field == "calls.1.constants.q"
        with pytest.raises(InvalidArgumentError):
            await runtime.create_variable(sid, "var-u3", "v", BAD)
        assert not runtime.graph.calls and not runtime.graph.variables
        assert not await runtime.store.load("call") and not await runtime.store.load("variable")
        await runtime.close_session(sid)

    asyncio.run(body())


def test_restore_skips_records_it_cannot_read_and_starts(redis_url, default_engine, caplog):  # noqa: F811
    from parrot.dataflow import LocalRuntime
    from parrot.semantic_vars import CallFailedError, Call, FunctionSpec, SamplingConfig
    from parrot.server.redis_store import RedisStore
    from parrot.server.service import ParrotService

    prefix = f"unreadable-{uuid.uuid4().hex[:8]}"
    spec = FunctionSpec("f", "Q: {{input:q}} A: {{output:a}}", {"a": SamplingConfig(max_tokens=2)})

    async def before():
        store = RedisStore.from_url(redis_url, prefix=prefix)
        service = ParrotService(LocalRuntime([default_engine], store=store))
        await service.start()
        tenant, api_key = await service.create_tenant("t")
        sid = await service.open_session(tenant)
        await service.runtime.submit_calls(sid, [Call("call-good", spec, {}, {"q": "kept"}, {"a": "var-good"})])
        value = await service.runtime.get_variable(sid, "var-good")
        # What an older version could store: a call whose constant holds a lone
        # surrogate, a record that is not JSON, and one with fields missing.
        await store.write([
            ("variable", "call-old.q", {"id": "call-old.q", "name": "q", "session_id": sid, "value": BAD,
                                        "producer": None, "constant": True}),
            ("variable", "var-old", {"id": "var-old", "name": "a", "session_id": sid, "value": None,
                                     "producer": "call-old", "constant": False}),
            ("call", "call-old", {"id": "call-old", "session_id": sid, "function": spec.to_dict(),
                                  "inputs": {"q": "call-old.q"}, "outputs": {"a": "var-old"}, "state": "ready",
                                  "engine": None, "error": None, "compression": None}),
            ("call", "call-partial", {"id": "call-partial", "session_id": sid}),
            ("session", "session-partial", {"id": "session-partial"}),
        ])
        await store.client.hset(store.records_key("call"), "call-garbage", "{not json")
        await store.client.zadd(store.order_key("call"), {"call-garbage": 10**9})
        await store.client.hset(store.records_key("tenant"), "tenant-garbage", "[1, 2]")
        await store.client.zadd(store.order_key("tenant"), {"tenant-garbage": 10**9})
        await store.close()
        return api_key, sid, value

    api_key, sid, value = asyncio.run(before())
    caplog.set_level(logging.INFO)

    async def after():
        store = RedisStore.from_url(redis_url, prefix=prefix)
        service = ParrotService(LocalRuntime([default_engine], store=store))
        await service.start()  # must not raise
        tenant = service.authenticate(api_key)
        assert service.runtime.graph.variables["var-good"].value == value
        assert service.runtime.graph.calls["call-good"].state == "done"
        assert "call-partial" not in service.runtime.graph.calls
        # The old call is back and runs; its bad text can fail it, and only it.
        try:
            old = await service.runtime.get_variable(sid, "var-old")
        except CallFailedError:
            old = None
        assert old is None or isinstance(old, str)
        calls = set(service.runtime.graph.calls)
        await service.close_session(tenant, sid, cancel=True)
        await store.close()  # not service.stop(): that would close the shared engine
        return calls

    calls = asyncio.run(after())
    assert {"call-good", "call-old"} <= calls
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "call-garbage" in logged and "call-partial" in logged and "tenant-garbage" in logged
