"""Shutdown and dropped clients: SIGTERM stops `parrot serve` after a client
dropped a variable stream or a long-poll, and a non-streaming OpenAI request
whose client left is cancelled instead of generating to ``max_tokens``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile

import httpx
import pytest

ADMIN_KEY = "pa-shutdown-admin"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """`python -m parrot.cli serve` on a free loopback port, its log in a temp file."""

    def __init__(self, model_dir, ready_timeout_s: float = 180) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="parrot-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parrot.cli", "serve", "--model", str(model_dir), "--device", "cpu",
             "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "PARROT_ADMIN_KEY": ADMIN_KEY}, stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(int(ready_timeout_s / 0.25)):
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            try:  # the pause between probes: returns at once if the server died
                self.proc.wait(timeout=0.25)
                raise RuntimeError(f"parrot serve exited with {self.proc.returncode}: {self.tail()}")
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        raise TimeoutError(f"parrot serve not ready: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def test_sigterm_stops_the_server_after_dropped_stream_and_long_poll(default_model_dir):
    server = ServeProcess(default_model_dir)
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            key = admin.post("/admin/v1/tenants", json={"name": "t"}).json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=server.url, headers=auth, timeout=30) as c:
            sid = c.post("/api/v1/sessions").json()["session_id"]
            for var in ("never-a", "never-b"):
                assert c.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": var, "name": var}).status_code == 201
        # Each client gives up after a short read and drops its connection.
        with httpx.Client(base_url=server.url, headers=auth, timeout=httpx.Timeout(30, read=1)) as c:
            with pytest.raises(httpx.ReadTimeout):
                with c.stream("GET", f"/api/v1/sessions/{sid}/variables/never-a/stream") as r:
                    for _ in r.iter_bytes():
                        pass
        with httpx.Client(base_url=server.url, headers=auth, timeout=httpx.Timeout(30, read=1)) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.get(f"/api/v1/sessions/{sid}/variables/never-b", params={"timeout": 300})
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"parrot serve still up 40 s after SIGTERM: {server.tail()}")
        log = server.tail()
        # The dropped clients ended their own requests: no grace period ran out.
        assert "timeout graceful shutdown exceeded" not in log, log
        assert "Application shutdown complete" in log, log
    finally:
        server.kill()


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_dropped_non_streaming_request_is_cancelled(live_server, route):
    key = live_server.new_tenant("dropper")
    max_tokens = 3000
    # ignore_eos: the drop must find the call still generating (an early end-of-sequence
    # finished it within the client's 0.5 s once).
    body = {"model": _model_id(live_server, key), "max_tokens": max_tokens, "ignore_eos": True}
    if route == "/v1/completions":
        body["prompt"] = "Once upon a time"
    else:
        body["messages"] = [{"role": "user", "content": "Tell a long story"}]
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {key}"},
                      timeout=httpx.Timeout(30, read=0.5)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(route, json=body)
    with live_server.client(key) as c:
        sessions = c.get("/api/v1/sessions").json()["sessions"]
        assert len(sessions) == 1
        sid = sessions[0]["session_id"]
        dag = c.get(f"/api/v1/sessions/{sid}/dag").json()
        (call,) = dag["calls"]
        (var_id,) = call["outputs"].values()
        # Wait (bounded) for the call's output to be decided: cancelled, or generated in full.
        c.get(f"/api/v1/sessions/{sid}/variables/{var_id}", params={"timeout": 120})
        (call,) = c.get(f"/api/v1/sessions/{sid}/dag").json()["calls"]
    assert call["state"] == "cancelled", call
    assert call["generated_tokens"] < max_tokens


def _model_id(live_server, key: str) -> str:
    with live_server.client(key) as c:
        return c.get("/v1/models").json()["data"][0]["id"]
