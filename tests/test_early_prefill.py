"""Early prefill: the known head of a waiting call is prefilled while its
producers run (parrot.dataflow.early_prefill), on the real engine with the
embedded tiny model.

Each test writes its own head text, so the shared engine's prefix cache
never carries a head from one test into another.
"""

from __future__ import annotations

import uuid

import pytest

import parrot as P
from parrot.dataflow import LocalRuntime
from parrot.semantic_vars import Call, SamplingConfig


def _head(tag: str, rules: int = 30) -> str:
    """A long constant instruction head, unique per test."""
    nonce = uuid.uuid4().hex[:8]
    return f"You are a careful critic ({tag} {nonce}). " + " ".join(
        f"Rule {i}: check claim number {i} twice before you accept it." for i in range(rules))


def _greedy(template: str, name: str, max_tokens: int, *, ignore_eos: bool = False) -> P.SemanticFunction:
    return P.SemanticFunction(template, name=name,
                              defaults=SamplingConfig(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos))


def _cold(engine) -> None:
    """Forget every unpinned cached prefix of the (idle) engine."""
    engine.prefix_cache.evict(0)


def _tool_chain(runtime: LocalRuntime, head: str, writer_head: str, *, listener=None) -> tuple[list[str], str]:
    """A tool's result (a value the client sets) feeds a writer (the model
    producer), whose draft feeds a critic with a long constant head. Before
    the tool's value is set the engine is idle, so early prefill warms both
    heads then. Returns the outputs and the session id."""
    writer = _greedy(writer_head + "\nFacts:{{input:facts}}\nNote:{{output:draft}}", "writer", 8,
                     ignore_eos=True)
    critic = _greedy(head + "\nDraft:{{input:draft}}\nCritique:{{output:critique}}", "critic", 8)
    portal = runtime.portal
    sid = portal.call(runtime.open_session())
    tag = uuid.uuid4().hex[:6]
    facts, draft, critique = f"facts-{tag}", f"draft-{tag}", f"critique-{tag}"
    portal.call(runtime.create_variable(sid, facts, "facts"))
    portal.call(runtime.submit_calls(sid, [
        Call(f"writer-{tag}", writer.spec, {"facts": facts}, {}, {"draft": draft}),
        Call(f"critic-{tag}", critic.spec, {"draft": draft}, {}, {"critique": critique}),
    ]))
    portal.call(runtime.early_prefill_settled())  # the tool runs meanwhile
    if listener is not None:
        listener(runtime, sid)
    portal.call(runtime.set_variable(sid, facts, "Two trams were late at Harbor Gate."))
    out = [portal.call(runtime.get_variable(sid, critique)), portal.call(runtime.get_variable(sid, draft))]
    portal.call(runtime.close_session(sid))
    return out, sid


def _call(runtime: LocalRuntime, session_id: str, function: str):
    return next(c for c in runtime.session_view(session_id).calls if c.function.name == function)


def test_greedy_text_is_identical_with_early_prefill_on_and_off(default_engine):
    head, writer_head = _head("identical"), _head("writer", 8)
    outputs = {}
    for early in (False, True, False):
        _cold(default_engine)
        runtime = LocalRuntime([default_engine], early_prefill=early)
        out, sid = _tool_chain(runtime, head, writer_head)
        outputs.setdefault(early, []).append(out)
        if early:
            assert runtime.early_prefill.counters.started == 2  # the writer's head and the critic's
            assert runtime.early_prefill.counters.finished == 2
            assert _call(runtime, sid, "critic").cached_tokens > 0
        else:
            assert runtime.early_prefill is None
    assert outputs[True][0] == outputs[False][0] == outputs[False][1]


def test_the_consumers_head_is_cached_before_its_producer_finishes(default_engine):
    """The critic's head is in the engine's prefix cache when the writer's
    draft is released, and the critic then prefills only its suffix."""
    head, writer_head = _head("before"), _head("writer", 8)
    figures = {}
    for early in (False, True):
        _cold(default_engine)
        runtime = LocalRuntime([default_engine], early_prefill=early)
        seen: dict[str, bool] = {}

        def on_event(event, runtime=runtime, seen=seen) -> None:
            # At the moment the producer's output is set, before the critic runs.
            if event["type"] == "variable_set" and event["name"] == "draft":
                critic = next(c for c in runtime.calls() if c.function.name == "critic" and c.id in keys)
                seen["stored"] = keys[critic.id] in default_engine.capacity().cached_prefixes
                seen["critic_not_run"] = critic.state in ("waiting", "ready")

        keys: dict[str, str] = {}

        def before_tool(runtime: LocalRuntime, sid: str) -> None:
            critic = _call(runtime, sid, "critic")
            keys[critic.id] = runtime.prefixes.head(critic).key

        runtime.subscribe(on_event)
        saved = default_engine.counters.prefix_tokens_saved
        _, sid = _tool_chain(runtime, head, writer_head, listener=before_tool)
        critic = _call(runtime, sid, "critic")
        figures[early] = (seen, critic.cached_tokens, critic.prefill_tokens,
                          default_engine.counters.prefix_tokens_saved - saved)
    (seen_off, cached_off, prefill_off, _), (seen_on, cached_on, prefill_on, saved_on) = figures[False], figures[True]
    assert seen_off == {"stored": False, "critic_not_run": True}
    assert seen_on == {"stored": True, "critic_not_run": True}
    assert cached_off == 0
    # With early prefill the critic took its whole head from the cache and
    # computed only the draft and what follows it.
    head_tokens = len(default_engine.tokenizer.encode(head, add_bos=default_engine.tokenizer.prompt_bos))
    assert cached_on >= head_tokens - 1 and cached_on + prefill_on == cached_off + prefill_off
    assert prefill_on < prefill_off - head_tokens // 2
    assert saved_on >= cached_on


def test_no_warm_up_competes_with_running_work(default_engine):
    """A critic whose producer runs on the only engine: the engine is never
    idle while the critic waits, so its head is not prefilled early (the
    same prefill would only move ahead of the producer's tokens)."""
    runtime = LocalRuntime([default_engine], early_prefill=True)
    writer = _greedy("Write a short note about trams.\nNote:{{output:draft}}", "writer", 8, ignore_eos=True)
    critic = _greedy(_head("busy") + "\nDraft:{{input:draft}}\nCritique:{{output:critique}}", "critic", 4)
    with P.Session(runtime) as s:
        critique = critic(writer())
        critique.get()
    counters = runtime.early_prefill.counters
    assert counters.started == 0 and counters.deferred >= 1 and runtime.early_prefill.pending == 0
    assert _call(runtime, s.id, "critic").cached_tokens == 0


def test_a_head_waiting_for_a_client_value_is_prefilled_before_the_value_arrives(default_engine):
    """Deterministic without timing: the warm-up ends while the input is unset."""
    runtime = LocalRuntime([default_engine])  # on by default
    portal = runtime.portal
    critic = _greedy(_head("client") + "\nDraft:{{input:draft}}\nCritique:{{output:c}}", "critic", 4)
    sid = portal.call(runtime.open_session(namespace="tenant-a"))
    portal.call(runtime.create_variable(sid, "draft-1", "draft"))
    portal.call(runtime.submit_calls(sid, [Call("critic-1", critic.spec, {"draft": "draft-1"}, {}, {"c": "c-1"})]))
    key = runtime.prefixes.head(runtime.call("critic-1")).key
    portal.call(runtime.early_prefill_settled())
    assert runtime.early_prefill.counters.started == 1
    assert runtime.call("critic-1").state == "waiting"
    assert key in default_engine.capacity().cached_prefixes
    hits = default_engine.counters.prefix_hits
    portal.call(runtime.set_variable(sid, "draft-1", "The tram was late twice."))
    portal.call(runtime.get_variable(sid, "c-1"))
    call = runtime.call("critic-1")
    assert call.prefix_key == key and default_engine.counters.prefix_hits == hits + 1
    assert call.cached_tokens > call.prefill_tokens > 0
    portal.call(runtime.close_session(sid))


def test_tenants_never_share_a_warmed_head(default_engine):
    """Tenant B's identical head is another key and other block digests: B
    does not hit the head warmed for tenant A."""
    head = _head("tenants")
    critic = _greedy(head + "\nDraft:{{input:draft}}\nCritique:{{output:c}}", "critic", 4)
    _cold(default_engine)

    def run(runtime: LocalRuntime, tenant: str) -> tuple[str, int]:
        portal = runtime.portal
        sid = portal.call(runtime.open_session(namespace=tenant))
        portal.call(runtime.create_variable(sid, f"{tenant}-draft", "draft"))
        portal.call(runtime.submit_calls(sid, [Call(f"{tenant}-critic", critic.spec, {"draft": f"{tenant}-draft"},
                                                    {}, {"c": f"{tenant}-c"})]))
        key = runtime.prefixes.head(runtime.call(f"{tenant}-critic")).key
        portal.call(runtime.early_prefill_settled())
        portal.call(runtime.set_variable(sid, f"{tenant}-draft", "The same draft for both."))
        portal.call(runtime.get_variable(sid, f"{tenant}-c"))
        call = runtime.call(f"{tenant}-critic")
        portal.call(runtime.close_session(sid))
        return key, call.cached_tokens

    key_a, cached_a = run(LocalRuntime([default_engine], early_prefill=True), "tenant-a")
    assert cached_a > 0 and key_a in default_engine.capacity().cached_prefixes
    # B runs without warm-ups of its own, right after A on the same engine.
    key_b, cached_b = run(LocalRuntime([default_engine], early_prefill=False), "tenant-b")
    assert key_b != key_a and cached_b == 0


def test_warm_ups_are_bounded(default_engine):
    """One warm-up per head key in flight (both waiting calls then take it);
    none for a head under min_tokens; none in the request-level baseline."""
    runtime = LocalRuntime([default_engine], early_prefill_min_tokens=64)
    portal = runtime.portal
    long_fn = _greedy(_head("bounded") + "\nDraft:{{input:d}}\nCritique:{{output:c}}", "critic", 3)
    short_fn = _greedy("A short head of one line, well under the bound: {{input:d}} -> {{output:c}}", "short", 3)
    sid = portal.call(runtime.open_session())
    for v in ("d1", "d2", "d3"):
        portal.call(runtime.create_variable(sid, v, "d"))
    portal.call(runtime.submit_calls(sid, [
        Call("k1", long_fn.spec, {"d": "d1"}, {}, {"c": "o1"}),
        Call("k2", long_fn.spec, {"d": "d2"}, {}, {"c": "o2"}),
        Call("k3", short_fn.spec, {"d": "d3"}, {}, {"c": "o3"}),
    ]))
    portal.call(runtime.early_prefill_settled())
    counters = runtime.early_prefill.counters
    # k2's head is k1's: in flight (or stored) when its turn came.
    assert counters.started == 1 and counters.skipped_inflight + counters.skipped_stored == 1
    assert counters.skipped_short == 1
    for v in ("d1", "d2", "d3"):
        portal.call(runtime.set_variable(sid, v, "A draft."))
    for o in ("o1", "o2", "o3"):
        portal.call(runtime.get_variable(sid, o))
    assert runtime.call("k1").cached_tokens > 0 and runtime.call("k2").cached_tokens > 0
    portal.call(runtime.close_session(sid))
    assert LocalRuntime([default_engine], request_level=True, early_prefill=True).early_prefill is None
    with pytest.raises(ValueError, match="min_tokens"):
        LocalRuntime([default_engine], early_prefill_min_tokens=0)


def test_the_serve_setting_and_its_environment_variable(monkeypatch):
    from parrot.server.serve import ServerSettings

    monkeypatch.setenv("PARROT_EARLY_PREFILL", "0")
    monkeypatch.setenv("PARROT_EARLY_PREFILL_MIN_TOKENS", "128")
    settings = ServerSettings.from_env()
    assert settings.early_prefill is False and settings.early_prefill_min_tokens == 128
    monkeypatch.delenv("PARROT_EARLY_PREFILL")
    assert ServerSettings.from_env().early_prefill is None
    assert ServerSettings.from_env(early_prefill=True).early_prefill is True
    monkeypatch.setenv("PARROT_EARLY_PREFILL_MIN_TOKENS", "0")
    with pytest.raises(ValueError, match="early_prefill_min_tokens"):
        ServerSettings.from_env()
