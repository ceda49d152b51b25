"""Caller-chosen variable and call ids are per tenant: tenant B can neither
learn that one of A's ids exists nor squat it, and the namespaces survive a
restart on Redis."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `tests.redis_server` imports under a bare `pytest` too
    sys.path.insert(0, str(ROOT))

from tests.redis_server import redis_url  # noqa: E402,F401  (a real redis-server)

ECHO = {"name": "echo", "template": "Say {{input:x}}: {{output:y|max_tokens=3}}"}


def _session(client) -> str:
    r = client.post("/api/v1/sessions")
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def _value(client, sid: str, var_id: str) -> str | None:
    r = client.get(f"/api/v1/sessions/{sid}/variables/{var_id}", params={"timeout": 60})
    assert r.status_code == 200, r.text
    return r.json()["value"]


def _a_then_b_use_the_same_ids(server) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """A and then B create the variable ``doc`` and the call ``summary`` with
    output ``out``; returns each tenant's (key, session, value of out)."""
    out = []
    for name in ("tenant-a", "tenant-b"):
        key = server.new_tenant(name)
        with server.client(key) as c:
            sid = _session(c)
            r = c.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": "doc", "name": "doc", "value": f"text of {name}"})
            assert r.status_code == 201, r.text
            assert r.json()["var_id"] == "doc"
            r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
                {"call_id": "summary", "function": ECHO, "inputs": {"x": "doc"}, "outputs": {"y": "out"}}]})
            assert r.status_code == 201, r.text
            assert r.json()["calls"] == [{"call_id": "summary", "outputs": {"y": "out"}}]
            out.append((key, sid, _value(c, sid, "out")))
    return out[0], out[1]


def test_b_creating_an_id_a_uses_succeeds_in_bs_namespace(live_server):
    (key_a, sid_a, _), (key_b, sid_b, _) = _a_then_b_use_the_same_ids(live_server)
    with live_server.client(key_a) as a, live_server.client(key_b) as b:
        assert _value(a, sid_a, "doc") == "text of tenant-a"
        assert _value(b, sid_b, "doc") == "text of tenant-b"
        # Each tenant's view names its own ids, as it wrote them.
        dag = b.get(f"/api/v1/sessions/{sid_b}/dag").json()
        assert [(c["call_id"], c["inputs"], c["outputs"]) for c in dag["calls"]] == [("summary", {"x": "doc"}, {"y": "out"})]
        assert {"doc", "out"} <= {v["var_id"] for v in dag["variables"]}
        detail = b.get(f"/api/v1/sessions/{sid_b}/calls/summary").json()
        assert detail["call_id"] == "summary"
        assert [v["var_id"] for v in detail["inputs"]] == ["doc"] and detail["inputs"][0]["value"] == "text of tenant-b"
        # Setting an id twice is still refused within one tenant.
        r = b.post(f"/api/v1/sessions/{sid_b}/variables", json={"var_id": "doc", "name": "doc"})
        assert r.status_code == 409 and "tenant" not in r.json()["error"]["message"]


def test_an_id_of_another_tenant_reads_as_one_nobody_uses(live_server):
    key_a, key_b = live_server.new_tenant("owner"), live_server.new_tenant("prober")
    with live_server.client(key_a) as a, live_server.client(key_b) as b:
        sid_a, sid_b = _session(a), _session(b)
        assert a.post(f"/api/v1/sessions/{sid_a}/variables", json={"var_id": "a-secret", "name": "s", "value": "v"}).status_code == 201

        def probe(var_id: str) -> tuple[int, str]:
            r = b.post(f"/api/v1/sessions/{sid_b}/calls", json={"calls": [
                {"function": ECHO, "inputs": {"x": var_id}}]})
            return r.status_code, r.json()["error"]["message"].replace(var_id, "ID")

        # The same answer for A's id as for an id nobody ever used.
        assert probe("a-secret") == probe("never-used") and probe("a-secret")[0] == 404
        r = b.get(f"/api/v1/sessions/{sid_b}/variables/a-secret")
        assert r.status_code == 404
        # And B may take the name for itself.
        assert b.post(f"/api/v1/sessions/{sid_b}/variables", json={"var_id": "a-secret", "name": "s", "value": "mine"}).status_code == 201
        assert _value(a, sid_a, "a-secret") == "v" and _value(b, sid_b, "a-secret") == "mine"


def test_the_same_ids_of_two_tenants_survive_a_restart_on_redis(default_model_dir, redis_url):  # noqa: F811
    from conftest import LiveServer

    from parrot.server.serve import ServerSettings

    def start() -> LiveServer:
        return LiveServer(ServerSettings(model=str(default_model_dir), device="cpu", redis_url=redis_url))

    first = start()
    try:
        (key_a, sid_a, out_a), (key_b, sid_b, out_b) = _a_then_b_use_the_same_ids(first)
    finally:
        first.stop()
    second = start()
    try:
        for key, sid, out, name in ((key_a, sid_a, out_a, "tenant-a"), (key_b, sid_b, out_b, "tenant-b")):
            with second.client(key) as c:
                assert _value(c, sid, "doc") == f"text of {name}"
                assert _value(c, sid, "out") == out
                calls = c.get(f"/api/v1/sessions/{sid}/dag").json()["calls"]
                assert [(x["call_id"], x["state"]) for x in calls] == [("summary", "done")]
    finally:
        second.stop()
