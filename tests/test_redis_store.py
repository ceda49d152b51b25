"""The StateStore contract on MemoryStore and on RedisStore over a real
redis-server, and a LocalRuntime restart from Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `tests.redis_server` imports under a bare `pytest` too (no tests/__init__.py)
    sys.path.insert(0, str(ROOT))

from parrot.dataflow import AppScheduler, LocalRuntime  # noqa: E402
from parrot.dataflow.store import KINDS, MemoryStore  # noqa: E402
from parrot.semantic_vars import (  # noqa: E402
    Call,
    FunctionSpec,
    ParrotError,
    SamplingConfig,
    UnknownVariableError,
    VariableAlreadySetError,
    new_id,
)
from parrot.server.redis_store import RedisStore, StoreUnavailableError, redact_url  # noqa: E402
from tests.redis_server import redis_url  # noqa: E402,F401  (a pytest fixture: a real redis-server)


# -- helpers ------------------------------------------------------------------
def var_record(var_id: str, value: str | None = None, *, name: str = "v", producer: str | None = None) -> dict:
    return {"id": var_id, "name": name, "session_id": "s1", "value": value, "producer": producer, "constant": False}


@pytest.fixture(params=["memory", "redis"])
def new_store(request):
    """A factory of stores over one backing state (a fresh Redis prefix per test)."""
    if request.param == "memory":
        shared = MemoryStore()

        class _Shared(MemoryStore):  # every "new" MemoryStore sees the same dicts, like clients of one Redis
            def __init__(self) -> None:
                self._data = shared._data

        return _Shared
    url = request.getfixturevalue("redis_url")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return lambda: RedisStore.from_url(url, prefix=prefix)


def run_with(new_store, body):
    async def main():
        store = new_store()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


async def load_all(store) -> dict[str, list[dict]]:
    return {kind: await store.load(kind) for kind in KINDS}


# -- the StateStore contract ----------------------------------------------------
def test_load_keeps_first_insertion_order_and_replace_keeps_position(new_store):
    async def body(store):
        await store.write([("variable", "a", var_record("a")), ("session", "s1", {"id": "s1"})])
        await store.write([("variable", "b", var_record("b")), ("variable", "c", var_record("c"))])
        await store.write([("variable", "a", var_record("a", name="renamed"))])  # replace
        await store.write([("variable", "d", var_record("d")), ("variable", "b", var_record("b", name="B"))])
        return await store.load("variable"), await store.load("session"), await store.load("call")

    variables, sessions, calls = run_with(new_store, body)
    assert [r["id"] for r in variables] == ["a", "b", "c", "d"]
    assert variables[0]["name"] == "renamed" and variables[1]["name"] == "B"
    assert sessions == [{"id": "s1"}] and calls == []


def test_records_survive_a_new_client(new_store):
    run_with(new_store, lambda s: s.write([("call", f"c{i}", {"id": f"c{i}", "n": i}) for i in range(5)]))
    loaded = run_with(new_store, lambda s: s.load("call"))
    assert loaded == [{"id": f"c{i}", "n": i} for i in range(5)]


def test_a_batch_with_an_unknown_kind_writes_nothing(new_store):
    async def body(store):
        await store.write([("variable", "a", var_record("a"))])
        before = await load_all(store)
        with pytest.raises(ValueError, match="unknown record kind 'nonsense'"):
            await store.write([("variable", "a", var_record("a", "clobbered")), ("variable", "b", var_record("b")),
                               ("nonsense", "x", {"id": "x"})])
        return before, await load_all(store)

    before, after = run_with(new_store, body)
    assert after == before


def test_delete_removes_records_all_or_none(new_store):
    async def body(store):
        await store.write([("variable", v, var_record(v)) for v in "abcd"] + [("session", "s1", {"id": "s1"})])
        await store.delete([("variable", "b"), ("session", "s1"), ("variable", "missing")])
        after_delete = await load_all(store)
        with pytest.raises(ValueError, match="unknown record kind 'nonsense'"):
            await store.delete([("variable", "a"), ("nonsense", "x")])
        after_refused = await load_all(store)
        await store.write([("variable", "b", var_record("b"))])  # a deleted id comes back last
        return after_delete, after_refused, await store.load("variable")

    after_delete, after_refused, again = run_with(new_store, body)
    assert [r["id"] for r in after_delete["variable"]] == ["a", "c", "d"] and after_delete["session"] == []
    assert after_refused == after_delete
    assert [r["id"] for r in again] == ["a", "c", "d", "b"]


def test_set_value_once(new_store):
    async def body(store):
        await store.write([("variable", "a", var_record("a"))])
        first = await store.set_value("a", "one")
        second = await store.set_value("a", "two")
        return first, second, await store.load("variable")

    first, second, records = run_with(new_store, body)
    assert (first, second) == (True, False)
    assert records == [var_record("a", "one")]


def test_set_value_on_an_unknown_variable_is_refused(new_store):
    async def body(store):
        refused = await store.set_value("nobody", "x")
        return refused, await store.load("variable")

    assert run_with(new_store, body) == (False, [])


def test_set_value_keeps_the_value_and_the_rest_of_the_record_exact(new_store):
    value = 'quotes " back\\slash / new\nline \t tab é 中文 🦜 null {"value": null} \x01'

    async def body(store):
        record = var_record("a", name="naïve 🦜", producer="call-1")
        record["extra"] = {"nested": [1, "two", None, True], "n": 12345, "f": 0.5}
        await store.write([("variable", "a", record)])
        assert await store.set_value("a", value)
        return record, await store.load("variable")

    record, loaded = run_with(new_store, body)
    assert loaded == [{**record, "value": value}]


def test_concurrent_set_value_exactly_one_wins(new_store):
    async def body(store):
        await store.write([("variable", "a", var_record("a"))])
        others = [new_store() for _ in range(3)]  # more clients, more connections
        try:
            stores = [store, *others]
            results = await asyncio.gather(*(stores[i % 4].set_value("a", f"value-{i}") for i in range(64)))
        finally:
            for other in others:
                await other.close()
        return results, await store.load("variable")

    results, records = run_with(new_store, body)
    assert results.count(True) == 1
    assert records[0]["value"] == f"value-{results.index(True)}"


def test_concurrent_batches_land_whole_and_do_not_interleave(new_store):
    async def body(store):
        await store.write([("variable", "shared", var_record("shared"))])
        batches = [[("variable", f"b{i}-{j}", var_record(f"b{i}-{j}")) for j in range(3)]
                   + [("variable", "shared", var_record("shared", name=f"by {i}"))] for i in range(20)]
        await asyncio.gather(*(store.write(batch) for batch in batches))
        return await store.load("variable")

    records = run_with(new_store, body)
    ids = [r["id"] for r in records]
    assert ids[0] == "shared" and len(ids) == 61
    for k in range(1, 61, 3):  # each batch's new ids are consecutive, in batch order
        i = ids[k].split("-")[0]
        assert ids[k:k + 3] == [f"{i}-0", f"{i}-1", f"{i}-2"]


# -- Redis specifics ------------------------------------------------------------------
def test_redis_key_layout(redis_url):
    import redis

    prefix = f"layout-{uuid.uuid4().hex[:8]}"

    async def body():
        store = RedisStore.from_url(redis_url, prefix=prefix)
        await store.write([("variable", "a", var_record("a")), ("call", "c", {"id": "c"})])
        await store.write([("variable", "a", var_record("a", name="again")), ("variable", "b", var_record("b"))])
        await store.close()

    asyncio.run(body())
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert json.loads(client.hget(f"{prefix}:variable", "a"))["name"] == "again"
        assert client.zrange(f"{prefix}:variable:order", 0, -1, withscores=True) == [("a", 1.0), ("b", 3.0)]
        assert client.zrange(f"{prefix}:call:order", 0, -1, withscores=True) == [("c", 2.0)]
        assert client.get(f"{prefix}:seq") == "3"
    finally:
        client.close()


def test_redis_refuses_variable_records_cjson_would_change(redis_url):
    async def body():
        store = RedisStore.from_url(redis_url, prefix=f"cjson-{uuid.uuid4().hex[:8]}")
        try:
            for bad in ({"tags": []}, {"n": 10**15}, {"f": 1 / 3}):
                with pytest.raises(ValueError):
                    await store.write([("variable", "a", {**var_record("a"), **bad})])
            with pytest.raises(ValueError, match="value must be a string"):
                await store.write([("variable", "a", var_record("a", 3))])  # type: ignore[arg-type]
            return await load_all(store)
        finally:
            await store.close()

    assert all(records == [] for records in asyncio.run(body()).values())


def test_unreachable_redis_is_a_clear_error_without_the_password():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://user:hunter2@127.0.0.1:{port}/0"
    assert redact_url(url) == f"redis://user:***@127.0.0.1:{port}/0"
    assert "hunter2" not in redact_url("redis://127.0.0.1:6379/0?password=hunter2")

    async def body():
        store = RedisStore.from_url(url)
        errors = []
        for op in (lambda: store.load("session"), lambda: store.write([("session", "s", {"id": "s"})]),
                   lambda: store.set_value("v", "x"), store.ping):
            with pytest.raises(StoreUnavailableError) as info:
                await op()
            errors.append(info.value)
        await store.close()
        return errors

    for error in asyncio.run(body()):
        assert isinstance(error, ParrotError)
        assert f"127.0.0.1:{port}" in str(error) and "hunter2" not in str(error)
        assert error.url == f"redis://user:***@127.0.0.1:{port}/0"


# -- a LocalRuntime on Redis ---------------------------------------------------------
class CountingRedisStore(RedisStore):
    """A RedisStore that remembers every set_value and its answer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sets: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    async def set_value(self, var_id: str, value: str) -> bool:
        ok = await super().set_value(var_id, value)
        (self.sets if ok else self.refused)[var_id] += 1
        return ok


class HoldingScheduler(AppScheduler):
    """Places no call of the held functions: they stay queued (the crash comes first)."""

    def __init__(self, held: set[str]) -> None:
        super().__init__()
        self.held = held

    def schedule(self, ready, graph, engines):
        return super().schedule([c for c in ready if c.function.name not in self.held], graph, engines)


FIRST = FunctionSpec("first", "Write about {{input:topic}}: {{output:draft}}", {"draft": SamplingConfig(max_tokens=4)})
SECOND = FunctionSpec("second", "Improve this: {{input:draft}} Better: {{output:final}}",
                      {"final": SamplingConfig(max_tokens=4)})


def test_runtime_restarts_from_redis(redis_url, default_engine, caplog):
    caplog.set_level(logging.WARNING, logger="parrot.dataflow.runtime")
    prefix = f"restart-{uuid.uuid4().hex[:8]}"
    topic, draft, final = new_id("var"), new_id("var"), new_id("var")
    a = Call(new_id("call"), FIRST, inputs={"topic": topic}, outputs={"draft": draft})
    b = Call(new_id("call"), SECOND, inputs={"draft": draft}, outputs={"final": final})

    async def before_crash():
        store = CountingRedisStore.from_url(redis_url, prefix=prefix)
        runtime = LocalRuntime([default_engine], store=store, scheduler=HoldingScheduler({"second"}))
        session = await runtime.open_session()
        await runtime.create_variable(session, topic, "topic")
        await runtime.submit_calls(session, [a, b])
        await runtime.set_variable(session, topic, "parrots")
        first_output = await runtime.get_variable(session, draft)
        task = runtime._tasks.get(a.call_id)
        if task is not None:
            await task  # the first call records "done"; the second is still queued
        assert runtime.graph.calls[b.call_id].state == "ready"
        records = {r["id"]: r for r in await store.load("call")}
        # The crash: the process is gone, the runtime is never shut down.
        await store.close()
        return session, first_output, records, store.sets, store.refused

    session, first_output, records, sets1, refused1 = asyncio.run(before_crash())
    assert records[a.call_id]["state"] == "done" and records[b.call_id]["state"] == "waiting"

    finished_before = default_engine.counters.requests_finished

    async def after_restart():
        store = CountingRedisStore.from_url(redis_url, prefix=prefix)
        runtime = LocalRuntime([default_engine], store=store)
        started: list[str] = []
        runtime.subscribe(lambda e: started.append(e["call_id"]) if e.get("state") == "running" else None)
        requeued = await runtime.restore()
        assert requeued == 1
        assert session in runtime.sessions and runtime.sessions[session].open
        assert runtime.graph.variables[topic].value == "parrots"
        assert runtime.graph.variables[draft].value == first_output
        assert runtime.graph.calls[a.call_id].state == "done"
        with pytest.raises(VariableAlreadySetError):
            await runtime.set_variable(session, topic, "again")
        final_value = await runtime.get_variable(session, final)
        await runtime.close_session(session)  # waits for the re-queued call to finish
        states = {c.id: c.state for c in runtime.graph.calls.values()}
        stored = await load_all(store)
        await store.close()
        return final_value, started, states, stored, store.sets, store.refused

    final_value, started, states, stored, sets2, refused2 = asyncio.run(after_restart())
    assert isinstance(final_value, str)
    assert started == [b.call_id]  # the finished call was not run again
    assert default_engine.counters.requests_finished == finished_before + 1
    assert states == {a.call_id: "done", b.call_id: "done"}
    assert {r["id"]: r["state"] for r in stored["call"]} == states
    assert all(r["error"] is None for r in stored["call"])
    values = {r["id"]: r["value"] for r in stored["variable"]}
    assert values[topic] == "parrots" and values[draft] == first_output and values[final] == final_value
    assert [r["open"] for r in stored["session"]] == [False]
    # Every variable was set exactly once, across both lives of the service.
    assert sets1 + sets2 == Counter({topic: 1, draft: 1, final: 1})
    assert not refused1 and not refused2
    assert not [r for r in caplog.records if "failed" in r.getMessage() or "already" in r.getMessage()]


def test_an_invalid_call_in_a_batch_leaves_the_store_unchanged(redis_url, default_engine):
    async def body():
        store = RedisStore.from_url(redis_url, prefix=f"batch-{uuid.uuid4().hex[:8]}")
        runtime = LocalRuntime([default_engine], store=store)
        session = await runtime.open_session()
        topic = new_id("var")
        await runtime.create_variable(session, topic, "topic")
        before = await load_all(store)
        good = Call(new_id("call"), FIRST, inputs={"topic": topic}, outputs={"draft": new_id("var")})
        bad = Call(new_id("call"), SECOND, inputs={"draft": "var-does-not-exist"}, outputs={"final": new_id("var")})
        constant = Call(new_id("call"), FIRST, constants={"topic": "birds"}, outputs={"draft": new_id("var")})
        with pytest.raises(UnknownVariableError, match="var-does-not-exist"):
            await runtime.submit_calls(session, [good, constant, bad])
        after = await load_all(store)
        graph_calls = dict(runtime.graph.calls)
        await runtime.close_session(session, cancel=True)
        await store.close()
        return before, after, graph_calls

    before, after, graph_calls = asyncio.run(body())
    assert after == before and graph_calls == {}
    assert [r["id"] for r in before["variable"]] and before["call"] == []


def test_a_redis_that_goes_away_is_a_clear_error():
    from tests.redis_server import running_redis_server

    async def body():
        with running_redis_server() as url:
            store = RedisStore.from_url(url, prefix="gone")
            await store.write([("variable", "a", var_record("a"))])  # pooled connections now exist
        # The server is stopped: every operation fails fast with the store's error.
        errors = []
        for op in (lambda: store.write([("variable", "b", var_record("b"))]), lambda: store.set_value("a", "x"),
                   lambda: store.load("variable")):
            with pytest.raises(StoreUnavailableError, match="unavailable") as info:
                await op()
            errors.append(info.value)
        await store.close()
        return url, errors

    url, errors = asyncio.run(body())
    assert all(url in str(e) for e in errors)
