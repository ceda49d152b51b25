"""What a restart brings back: a finished call keeps its engine, token counts
and finish reasons; a one-request (ephemeral) session, such as an OpenAI
call's, is closed and its unfinished calls cancelled rather than re-run with
no one waiting."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `tests.redis_server` imports under a bare `pytest` too
    sys.path.insert(0, str(ROOT))

from tests.redis_server import redis_url  # noqa: E402,F401  (a real redis-server)

from parrot.dataflow import AppScheduler, LocalRuntime  # noqa: E402
from parrot.semantic_vars import Call, FunctionSpec, SamplingConfig  # noqa: E402
from parrot.server.redis_store import RedisStore  # noqa: E402

ASK = FunctionSpec("ask", "Q: {{input:q}} A: {{output:a}}", {"a": SamplingConfig(max_tokens=3)})
HELD = FunctionSpec("held", "Q: {{input:q}} A: {{output:a}}", {"a": SamplingConfig(max_tokens=3)})


class HoldingScheduler(AppScheduler):
    """Places no call of the held functions: they stay queued (the crash comes first)."""

    def schedule(self, ready, graph, engines):
        return super().schedule([c for c in ready if c.function.name != "held"], graph, engines)


def test_restart_keeps_call_stats_and_closes_ephemeral_sessions(redis_url, default_engine):  # noqa: F811
    prefix = f"outcomes-{uuid.uuid4().hex[:8]}"

    async def before_crash():
        store = RedisStore.from_url(redis_url, prefix=prefix)
        runtime = LocalRuntime([default_engine], store=store, scheduler=HoldingScheduler())
        kept = await runtime.open_session(namespace="t")
        one_shot = await runtime.open_session(namespace="t", ephemeral=True)
        await runtime.submit_calls(kept, [Call("call-kept", ASK, {}, {"q": "one"}, {"a": "var-kept"})])
        await runtime.submit_calls(one_shot, [Call("call-oneshot", HELD, {}, {"q": "two"}, {"a": "var-oneshot"})])
        await runtime.get_variable(kept, "var-kept")
        task = runtime._tasks.get("call-kept")
        if task is not None:
            await task  # its "done" record, with the engine's figures, is written
        call = runtime.graph.calls["call-kept"]
        stats = (call.engine, call.prefill_tokens, call.generated_tokens, dict(call.finish_reasons))
        assert runtime.graph.calls["call-oneshot"].state == "ready"
        await store.close()  # the crash: no shutdown
        return kept, one_shot, stats

    kept, one_shot, stats = asyncio.run(before_crash())
    finished = default_engine.counters.requests_finished

    async def after_restart():
        store = RedisStore.from_url(redis_url, prefix=prefix)
        runtime = LocalRuntime([default_engine], store=store)
        requeued = await runtime.restore()
        call = runtime.graph.calls["call-kept"]
        got = (call.engine, call.prefill_tokens, call.generated_tokens, dict(call.finish_reasons))
        oneshot_state = runtime.graph.calls["call-oneshot"].state if "call-oneshot" in runtime.graph.calls else None
        sessions = {r["id"]: r["open"] for r in await store.load("session")}
        calls = {r["id"]: r["state"] for r in await store.load("call")}
        await store.close()  # not shutdown(): that would close the shared engine
        return requeued, got, oneshot_state, sessions, calls

    requeued, got, oneshot_state, sessions, calls = asyncio.run(after_restart())
    assert got == stats and stats[0] == default_engine.name and stats[2] > 0 and stats[3]
    assert requeued == 0 and default_engine.counters.requests_finished == finished  # nothing re-ran
    assert oneshot_state in ("cancelled", None) and calls.get("call-oneshot", "cancelled") == "cancelled"
    assert sessions[kept] is True and sessions.get(one_shot, False) is False
