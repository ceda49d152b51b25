"""/metrics is the admin's, and tenants cannot grow its label values."""

from __future__ import annotations

import re

N_FUNCTIONS = 100


def _function_labels(text: str) -> set[str]:
    return set(re.findall(r'parrot_call_seconds_count\{function="([^"]*)"\}', text))


def test_metrics_need_the_admin_key(live_server):
    key = live_server.new_tenant("peeker")
    import httpx

    assert httpx.get(live_server.url + "/metrics").status_code == 401
    with live_server.client(key) as c:
        r = c.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    with live_server.admin() as admin:
        assert admin.get("/metrics").status_code == 200


def test_a_tenants_many_functions_do_not_grow_the_metric_labels(live_server):
    key = live_server.new_tenant("many-functions")
    with live_server.admin() as admin:
        before = _function_labels(admin.get("/metrics").text)
    with live_server.client(key) as c:
        ids = []
        for i in range(N_FUNCTIONS):
            r = c.post("/api/v1/functions", json={"name": f"secret-fn-{i}", "template": f"Step {i}: {{{{output:a|max_tokens=1}}}}"})
            assert r.status_code == 201, r.text
            ids.append(r.json()["function_id"])
        sid = c.post("/api/v1/sessions").json()["session_id"]
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [{"function_id": f} for f in ids]})
        assert r.status_code == 201, r.text
        assert c.delete(f"/api/v1/sessions/{sid}").json()["closed"]  # waits for every call
        states = {x["state"] for x in c.get(f"/api/v1/sessions/{sid}/dag").json()["calls"]}
    assert states == {"done"}
    with live_server.admin() as admin:
        text = admin.get("/metrics").text
    after = _function_labels(text)
    assert "secret-fn-" not in text
    assert after - before <= {"other"}
    assert "other" in after
