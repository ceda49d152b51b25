"""A restart of the service on Redis keeps tenants, sessions, variables and
unfinished calls: the workflow picks up where it stopped."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `tests.redis_server` imports under a bare `pytest` too
    sys.path.insert(0, str(ROOT))

from tests.redis_server import redis_url  # noqa: E402,F401  (a real redis-server)

SUMMARIZE = {"name": "summarize", "template": "Summarize: {{input:text}}\nSummary: {{output:s}}", "sampling": {"max_tokens": 4}}


def test_restart_on_redis_keeps_the_session_and_its_variables(default_model_dir, redis_url):  # noqa: F811
    from conftest import LiveServer

    from parrot.server.serve import ServerSettings

    def start() -> LiveServer:
        return LiveServer(ServerSettings(model=str(default_model_dir), device="cpu", redis_url=redis_url))

    first = start()
    try:
        key = first.new_tenant("durable")
        with first.client(key) as c:
            sid = c.post("/api/v1/sessions").json()["session_id"]
            c.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": "var-doc", "name": "doc", "value": "kept text"})
            c.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": "var-later", "name": "later"})
            r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
                {"call_id": "call-done", "function": SUMMARIZE, "inputs": {"text": "var-doc"}, "outputs": {"s": "var-s1"}},
                {"call_id": "call-waits", "function": SUMMARIZE, "inputs": {"text": "var-later"}, "outputs": {"s": "var-s2"}},
            ]})
            assert r.status_code == 201, r.text
            before = c.get(f"/api/v1/sessions/{sid}/variables/var-s1", params={"timeout": 60}).json()
            assert before["ready"]
    finally:
        first.stop()

    second = start()
    try:
        with second.client(key) as c:  # the tenant and its key survived
            assert sid in [s["session_id"] for s in c.get("/api/v1/sessions").json()["sessions"]]
            assert c.get(f"/api/v1/sessions/{sid}/variables/var-doc").json()["value"] == "kept text"
            assert c.get(f"/api/v1/sessions/{sid}/variables/var-s1").json()["value"] == before["value"]
            states = {x["call_id"]: x["state"] for x in c.get(f"/api/v1/sessions/{sid}/dag").json()["calls"]}
            assert states == {"call-done": "done", "call-waits": "waiting"}
            # The waiting call resumes when its input arrives, on the new server.
            assert c.put(f"/api/v1/sessions/{sid}/variables/var-later", json={"value": "new text"}).status_code == 200
            after = c.get(f"/api/v1/sessions/{sid}/variables/var-s2", params={"timeout": 60}).json()
            assert after["ready"] and isinstance(after["value"], str)
            # Values are set once: the finished call was not run again.
            assert c.put(f"/api/v1/sessions/{sid}/variables/var-doc", json={"value": "x"}).status_code == 409
    finally:
        second.stop()
