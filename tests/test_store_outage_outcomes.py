"""A call whose outcome cannot be stored (Redis went away while it ran) is not
reported as failed: no client is told an outcome a restart would not find.
It runs again once the store answers, and what its client then reads is what
a restart restores."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `tests.redis_server` imports under a bare `pytest` too
    sys.path.insert(0, str(ROOT))

from tests.redis_server import DurableRedis  # noqa: E402

from parrot.dataflow import LocalRuntime  # noqa: E402
from parrot.semantic_vars import Call, FunctionSpec, SamplingConfig  # noqa: E402
from parrot.server.redis_store import RedisStore  # noqa: E402

STORY = FunctionSpec("story", "Tell a story about {{input:q}}: {{output:s}}", {"s": SamplingConfig(max_tokens=12)})


def test_a_call_caught_by_a_redis_outage_runs_again_and_its_value_survives_a_restart(default_engine, tmp_path):
    redis = DurableRedis(tmp_path)
    redis.start()
    try:
        async def during_outage():
            store = RedisStore.from_url(redis.url, prefix="outage-outcomes")
            runtime = LocalRuntime([default_engine], store=store)
            sid = await runtime.open_session(namespace="t")
            seen: list[dict] = []
            restarted = asyncio.Event()

            def on_event(event: dict) -> None:
                seen.append(event)
                if event["type"] == "token" and len([e for e in seen if e["type"] == "token"]) == 1:
                    redis.stop()  # away while the call generates: its value cannot be stored
                if event["type"] == "call_state" and event["state"] == "ready" and redis.proc is None:
                    redis.start()  # the call is held, not failed; the store comes back
                    restarted.set()

            runtime.subscribe(on_event)
            await runtime.submit_calls(sid, [Call("call-story", STORY, {}, {"q": "parrots"}, {"s": "var-story"})])
            value = await asyncio.wait_for(runtime.get_variable(sid, "var-story"), 120)
            call = runtime.graph.calls["call-story"]
            assert restarted.is_set() and call.requeues == 1 and call.error is None
            states = [e["state"] for e in seen if e["type"] == "call_state"]
            assert "failed" not in states
            task = runtime._tasks.get("call-story")
            if task is not None:
                await task  # its "done" record is written
            await store.close()  # a crash: no shutdown
            return sid, value

        sid, value = asyncio.run(during_outage())

        async def after_restart():
            store = RedisStore.from_url(redis.url, prefix="outage-outcomes")
            runtime = LocalRuntime([default_engine], store=store)
            requeued = await runtime.restore()
            var = runtime.graph.variables["var-story"]
            state = runtime.graph.calls["call-story"].state
            await store.close()
            return requeued, var.value, state

        requeued, restored, state = asyncio.run(after_restart())
        assert (requeued, restored, state) == (0, value, "done")
    finally:
        redis.stop()
