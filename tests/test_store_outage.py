"""A state store that goes away makes the service say so: requests that need
it answer 503 (with Retry-After) and ``/readyz`` reports not ready."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `tests.redis_server` imports under a bare `pytest` too
    sys.path.insert(0, str(ROOT))

from tests.redis_server import running_redis_server  # noqa: E402


def test_a_redis_outage_is_503_and_not_ready(default_model_dir):
    from conftest import LiveServer

    from parrot.server.serve import ServerSettings

    with running_redis_server() as url:
        server = LiveServer(ServerSettings(model=str(default_model_dir), device="cpu", redis_url=url))
        try:
            key = server.new_tenant("outage")
            with server.client(key) as c:
                assert c.get("/readyz").json()["store"] is True
                sid = c.post("/api/v1/sessions").json()["session_id"]
        except BaseException:
            server.stop()
            raise
    try:  # Redis is stopped now
        with server.client(key) as c:
            r = c.post("/api/v1/sessions")
            assert r.status_code == 503 and r.json()["error"]["type"] == "StoreUnavailableError", r.text
            assert r.headers["retry-after"]
            r = c.post(f"/api/v1/sessions/{sid}/variables", json={"name": "x", "value": "y"})
            assert r.status_code == 503, r.text
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["store"] is False and not ready.json()["ready"]
            assert c.get("/healthz").status_code == 200  # the process itself is up
    finally:
        server.stop()
