"""A program waiting on a value keeps waiting across a restart of the
service: the SDK's long-poll reconnects (within ``reconnect_s``) instead of
failing the moment the connection drops."""

from __future__ import annotations

import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `tests.redis_server` imports under a bare `pytest` too
    sys.path.insert(0, str(ROOT))

from tests.redis_server import redis_url  # noqa: E402,F401  (a real redis-server)

import parrot as P  # noqa: E402

ADMIN = "pa-reconnect-admin"


def _start(settings, port: int):
    """A real uvicorn server on a fixed port (so a restart comes back at the same address)."""
    import uvicorn

    from parrot.server.serve import make_app

    server = uvicorn.Server(uvicorn.Config(make_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(2400):  # bounded: the model loads and state is restored first
        if server.started or not thread.is_alive():
            break
        thread.join(timeout=0.05)
    assert server.started, "the server did not start"
    return server, thread


def _stop(server, thread) -> None:
    server.should_exit = True
    thread.join(timeout=60)
    assert not thread.is_alive()


def test_a_waiting_get_survives_a_server_restart(default_model_dir, redis_url):  # noqa: F811
    from parrot.semantic_vars.http_runtime import HttpRuntime
    from parrot.server.serve import ServerSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    settings = ServerSettings(model=str(default_model_dir), device="cpu", redis_url=redis_url, admin_key=ADMIN)
    first = _start(settings, port)
    try:
        r = httpx.post(url + "/admin/v1/tenants", json={"name": "patient"}, headers={"Authorization": f"Bearer {ADMIN}"})
        key = r.json()["api_key"]
        # A short long-poll, so the server's graceful stop does not wait on it.
        runtime = HttpRuntime(url, api_key=key, poll_timeout=1)
        session = P.Session(runtime)
        session.open()
        later = session.variable("later")
        with session:
            out = P.SemanticFunction("Echo {{input:x}}: {{output:y|max_tokens=3}}")(x=later)
            session.flush()  # the call is on the server
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(out.get)
                _stop(*first)
                first = _start(settings, port)  # same Redis, same address
                r = httpx.put(f"{url}/api/v1/sessions/{session.id}/variables/{later.id}", json={"value": "back"},
                              headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, r.text
                assert isinstance(waiting.result(timeout=120), str)
        assert runtime.requests["get"] >= 2  # it polled across the restart
    finally:
        if first is not None:
            _stop(*first)
