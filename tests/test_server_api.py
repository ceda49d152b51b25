"""The native HTTP API against a real uvicorn server: tenancy, quotas, the
DAG resolved server-side, and 4xx answers to bad input."""

from __future__ import annotations

import pytest

SUMMARIZE = {
    "name": "summarize",
    "template": "Summarize: {{input:text}}\nSummary: {{output:summary}}",
    "sampling": {"max_tokens": 5},
}
TITLE = {"name": "title", "template": "Title for {{input:s}}: {{output:t|max_tokens=3}}"}


@pytest.fixture(scope="module")
def key(live_server):
    return live_server.new_tenant("api-tests")


def test_health_and_openapi(live_server):
    with live_server.client("none") as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").status_code == 200
        spec = c.get("/openapi.json").json()
    assert "/api/v1/sessions/{session_id}/calls" in spec["paths"]


def test_a_chain_runs_server_side(live_server, key):
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
            {"call_id": "call-a1", "function": SUMMARIZE, "constants": {"text": "the quick brown fox"},
             "outputs": {"summary": "var-a1"}},
            {"call_id": "call-a2", "function": TITLE, "inputs": {"s": "var-a1"}, "outputs": {"t": "var-a2"}},
        ]})
        assert r.status_code == 201, r.text
        state = c.get(f"/api/v1/sessions/{sid}/variables/var-a2", params={"timeout": 60}).json()
        assert state["ready"] and isinstance(state["value"], str)
        dag = c.get(f"/api/v1/sessions/{sid}/dag").json()
        assert [x["state"] for x in dag["calls"]] == ["done", "done"]
        assert dag["calls"][1]["objective"] == "latency"
        assert c.delete(f"/api/v1/sessions/{sid}").json()["closed"]
    with live_server.admin() as admin:
        metrics = admin.get("/metrics").text
    assert 'parrot_calls_total{state="done"}' in metrics
    assert "parrot_engine_tokens_total" in metrics
    assert 'parrot_kv_blocks{engine=' in metrics and 'state="free"' in metrics


def test_admin_publishes_a_function_whose_system_prompt_is_cached_for_all_tenants(live_server):
    system = "You are the help desk of a public app; answer briefly and politely. "
    with live_server.admin() as admin:
        r = admin.post("/admin/v1/functions", json={
            "name": "helpdesk", "template": system + "Q: {{input:q}}\nA: {{output:a}}", "sampling": {"max_tokens": 2}})
        assert r.status_code == 201, r.text
        fn = r.json()["function_id"]
        assert admin.post("/admin/v1/functions", json={"template": "{{output:a"}).status_code == 422
    keys = [live_server.new_tenant(f"public-user-{i}") for i in range(3)]
    calls = []
    for i, key in enumerate(keys):  # one after another: each later call finds the head cached
        with live_server.client(key) as c:
            sid = c.post("/api/v1/sessions").json()["session_id"]
            r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [{"function_id": fn, "constants": {"q": f"question {i}"}}]})
            assert r.status_code == 201, r.text
            var = r.json()["calls"][0]["outputs"]["a"]
            assert c.get(f"/api/v1/sessions/{sid}/variables/{var}", params={"timeout": 60}).json()["ready"]
            calls.append(c.get(f"/api/v1/sessions/{sid}/dag").json()["calls"][0])
    # The second tenant's call is the first to share the head, so it carries the
    # hint and the engine keeps the prefix; the third reuses it.
    assert calls[1]["prefix_key"] is not None and calls[1]["prefix_key"] == calls[2]["prefix_key"]
    assert calls[2]["cached_tokens"] > 0
    # A tenant's own function is invisible to the others.
    with live_server.client(keys[0]) as c:
        own = c.post("/api/v1/functions", json={"template": system + "{{output:a}}"}).json()["function_id"]
    with live_server.client(keys[1]) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [{"function_id": own}]})
        assert r.status_code == 404 and r.json()["error"]["field"] == "calls.0.function_id"


def test_other_tenants_get_404_for_everything(live_server, key):
    other = live_server.new_tenant("intruder")
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        vid = c.post(f"/api/v1/sessions/{sid}/variables", json={"name": "x", "value": "secret"}).json()["var_id"]
    with live_server.client(other) as c:
        assert c.get(f"/api/v1/sessions/{sid}/variables/{vid}").status_code == 404
        assert c.delete(f"/api/v1/sessions/{sid}").status_code == 404
        own = c.post("/api/v1/sessions").json()["session_id"]
        r = c.post(f"/api/v1/sessions/{own}/calls", json={"calls": [
            {"function": TITLE, "inputs": {"s": vid}}]})
        assert r.status_code == 404 and r.json()["error"]["field"] == "calls.0.inputs.s"
        assert sid not in [s["session_id"] for s in c.get("/api/v1/sessions").json()["sessions"]]


def test_authentication(live_server):
    with live_server.client("pk-wrong") as c:
        r = c.post("/api/v1/sessions")
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    with live_server.client("pk-wrong") as c:
        assert c.post("/admin/v1/tenants", json={"name": "x"}).status_code == 401


def test_quotas_answer_429_with_retry_after(live_server):
    key = live_server.new_tenant("small", max_concurrent_calls=2, max_prompt_tokens=50)
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        late = c.post(f"/api/v1/sessions/{sid}/variables", json={"name": "late"}).json()["var_id"]
        three = [{"function": TITLE, "inputs": {"s": late}} for _ in range(3)]
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": three})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["field"] == "max_concurrent_calls"
        assert c.get(f"/api/v1/sessions/{sid}/dag").json()["calls"] == []  # nothing was stored
        long = {"function": SUMMARIZE, "constants": {"text": "word " * 200}}
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [long]})
        assert r.status_code == 413 and r.json()["error"]["type"] == "PromptTooLongError"


def test_a_session_opens_with_its_first_calls_in_one_request(live_server, key):
    """``POST /sessions`` with ``calls`` opens the session and submits them
    (one round trip); refused calls leave no open session and no call."""
    with live_server.client(key) as c:
        r = c.post("/api/v1/sessions", json={"calls": [
            {"call_id": "call-o1", "function": SUMMARIZE, "constants": {"text": "a grey tram"}, "outputs": {"summary": "var-o1"}},
            {"call_id": "call-o2", "function": TITLE, "inputs": {"s": "var-o1"}, "outputs": {"t": "var-o2"}},
        ]})
        assert r.status_code == 201, r.text
        opened = r.json()
        sid = opened["session_id"]
        assert [x["call_id"] for x in opened["calls"]] == ["call-o1", "call-o2"]
        assert opened["calls"][1]["outputs"] == {"t": "var-o2"}
        state = c.get(f"/api/v1/sessions/{sid}/variables/var-o2", params={"timeout": 60}).json()
        assert state["ready"] and isinstance(state["value"], str)
        assert c.delete(f"/api/v1/sessions/{sid}").json()["closed"]
        assert c.post("/api/v1/sessions", json={"calls": []}).status_code == 201  # an empty batch: a plain open

        before = {x["session_id"] for x in c.get("/api/v1/sessions").json()["sessions"]}
        bad = c.post("/api/v1/sessions", json={"calls": [
            {"function": SUMMARIZE, "constants": {"text": "fine"}},
            {"function": SUMMARIZE, "constants": {"text": 5}},
        ]})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "calls.1.constants.text"
        bad = c.post("/api/v1/sessions", json={"calls": [
            {"function": SUMMARIZE, "constants": {"text": "fine"}},
            {"function": SUMMARIZE, "inputs": {"text": "var-missing"}},
        ]})
        assert bad.status_code == 404 and bad.json()["error"]["field"] == "calls.1.inputs.text"
        new = [x for x in c.get("/api/v1/sessions").json()["sessions"] if x["session_id"] not in before]
        assert all(not x["open"] and x["calls"] == 0 for x in new)  # the refused opens were closed again, empty


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"calls": [{"function": {"template": "no outputs {{input:x}}"}, "constants": {"x": "1"}}]}, 422, None),
        ({"calls": [{"function": {"template": "{{oops:x}} {{output:y}}"}}]}, 422, None),
        ({"calls": [{"function": SUMMARIZE, "constants": {"text": "x"}, "colour": "red"}]}, 422, "calls.1.colour"),
        ({"calls": [{"function": SUMMARIZE, "constants": {"text": 5}}]}, 422, "calls.1.constants.text"),
        ({"calls": [{"function": SUMMARIZE, "inputs": {"text": "var-missing"}}]}, 404, "calls.1.inputs.text"),
        ({"calls": [{"function": {**SUMMARIZE, "sampling": {"max_tokens": 0}}, "constants": {"text": "x"}}]}, 422,
         "calls.1.function.sampling.max_tokens"),
        ({"calls": [{"function": {**SUMMARIZE, "sampling": {"top_p": 2}}, "constants": {"text": "x"}}]}, 422,
         "calls.1.function.sampling.top_p"),
        ({"calls": [{"function": SUMMARIZE}]}, 422, "calls.1.inputs.text"),
        ({"calls": []}, 422, "calls"),
    ],
)
def test_bad_calls_are_4xx_with_a_field_and_store_nothing(live_server, key, body, status, field):
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        ok = {"call_id": "call-ok-" + sid[-8:], "function": SUMMARIZE, "constants": {"text": "fine"}}
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [ok, *body["calls"]]} if body["calls"] else body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["message"]
        if field is not None:
            assert error["field"] == field
        assert c.get(f"/api/v1/sessions/{sid}/dag").json()["calls"] == []  # the good call was rolled back too


def test_malformed_json_and_cycles(live_server, key):
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        r = c.post(f"/api/v1/sessions/{sid}/calls", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "MalformedJSON"
        for name in ("x", "y"):
            c.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": f"{name}-{sid[-8:]}", "name": name})
        x, y = f"x-{sid[-8:]}", f"y-{sid[-8:]}"
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
            {"function": TITLE, "inputs": {"s": x}, "outputs": {"t": y}},
            {"function": TITLE, "inputs": {"s": y}, "outputs": {"t": x}},
        ]})
        assert r.status_code == 422 and r.json()["error"]["type"] == "DataflowCycleError"
        assert c.put(f"/api/v1/sessions/{sid}/variables/{x}", json={"value": "v"}).status_code == 200
        r = c.put(f"/api/v1/sessions/{sid}/variables/{x}", json={"value": "again"})
        assert r.status_code == 409
        assert c.get(f"/api/v1/sessions/{sid}/variables/{x}").json()["value"] == "v"


def test_streaming_a_variable(live_server, key):
    import httpx

    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
            {"function": {**SUMMARIZE, "sampling": {"max_tokens": 12}}, "constants": {"text": "stream me"},
             "outputs": {"summary": "var-s-" + sid[-8:]}}]})
        pieces, final = [], None
        with c.stream("GET", f"/api/v1/sessions/{sid}/variables/var-s-{sid[-8:]}/stream") as r:
            event = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    data = line[5:].removeprefix(" ")
                    if event == "token":
                        pieces.append(data)
                    elif event == "value":
                        final = data
                        break
    assert final is not None
    value = httpx.get(f"{live_server.url}/api/v1/sessions/{sid}/variables/var-s-{sid[-8:]}",
                      headers={"Authorization": f"Bearer {key}"}).json()["value"]
    assert final == value.split("\n")[0] or final == value
