"""A seeded chaos run: a small workload of two-call chains against a real
``parrot serve`` on a durable Redis, while the engine's child process is
killed, Redis is restarted and the service itself is killed and started
again, each at a seeded random point. Every client is answered (retrying
through the outages, as a client would), no answer is a 5xx other than the
documented 503 of an outage, and no variable is lost or set twice: every
value a client read is the value the service holds at the end, and each
chain's second call read exactly its first call's output.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `tests.redis_server` imports under a bare `pytest` too
    sys.path.insert(0, str(ROOT))

from tests.redis_server import DurableRedis  # noqa: E402

SEED = 23
CLIENTS = 4
PROGRAMS = 6  # per client
ADMIN_KEY = "pa-chaos-admin"
#: How long one client keeps retrying one step through outages before the test fails.
STEP_BOUND_S = 120.0
#: Sampled, not greedy, and unseeded: a call run twice would give another value.
FIRST = {"name": "first", "template": "Topic {{input:q}}: {{output:y|max_tokens=6|temperature=1.0}}"}
SECOND = {"name": "second", "template": "Go on from {{input:x}} {{output:y|max_tokens=6|temperature=1.0}}"}


class Serve:
    """``parrot serve`` in a child process on one port for its whole life."""

    def __init__(self, model: Path, redis_url: str, log: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.model, self.redis_url, self.log = model, redis_url, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PARROT_ADMIN_KEY": ADMIN_KEY, "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "parrot.cli", "serve", "--model", str(self.model), "--device", "cpu",
                 "--host", "127.0.0.1", "--port", str(self.port), "--redis-url", self.redis_url],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # startup only: until the model is loaded and state restored
            assert self.proc.poll() is None, f"parrot serve exited; see {self.log}"
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"parrot serve did not become ready; see {self.log}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, as in a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def engine_pid(self) -> int:
        """The engine's child process (the spawned one that is not multiprocessing's resource tracker)."""
        assert self.proc is not None
        pid = self.proc.pid
        # Every thread's children: the engine is started from a worker thread.
        children: list[str] = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                children += (task / "children").read_text().split()
            except OSError:
                pass  # a thread that just ended
        for child in children:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
                return int(child)
        raise AssertionError(f"no engine child among {children}")


class Client:
    """One client's programs, retrying each step through outages."""

    def __init__(self, url: str, key: str, index: int, report) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        self.index, self.report = index, report
        self.server_errors: list[str] = []
        self.refused = threading.Semaphore(0)  # released at each 503 of an outage
        self.seen: dict[str, tuple[str, str]] = {}  # program -> (session, value of its final output)
        self.firsts: dict[str, str] = {}  # program -> value of its first output

    def request(self, method: str, path: str, ok: tuple[int, ...], **kwargs) -> httpx.Response:
        deadline = time.monotonic() + STEP_BOUND_S
        while True:
            try:
                r = self.http.request(method, path, **kwargs)
                if r.status_code in ok:
                    return r
                if r.status_code >= 500:
                    if r.status_code != 503 or "retry-after" not in r.headers:
                        self.server_errors.append(f"{method} {path}: {r.status_code} {r.text[:300]}")
                    else:
                        self.refused.release()
                elif r.status_code not in (429,):
                    raise AssertionError(f"{method} {path}: {r.status_code} {r.text[:300]}")
            except httpx.TransportError:
                pass  # the service is restarting
            if time.monotonic() > deadline:
                raise AssertionError(f"{method} {path}: no answer within {STEP_BOUND_S} s")
            time.sleep(0.2)  # between retries of one step, bounded by STEP_BOUND_S

    def run(self) -> None:
        for p in range(PROGRAMS):
            name = f"c{self.index}-p{p}"
            sid = self.request("POST", "/api/v1/sessions", (201,)).json()["session_id"]
            # Caller-chosen ids make a retried submit safe: a batch that was
            # stored before the connection dropped is refused the second time
            # as a whole (its call id or output id "already in use").
            calls = [{"call_id": f"first-{name}", "function": FIRST, "constants": {"q": name},
                      "outputs": {"y": f"a-{name}"}},
                     {"call_id": f"second-{name}", "function": SECOND, "inputs": {"x": f"a-{name}"},
                      "outputs": {"y": f"b-{name}"}}]
            r = self.request("POST", f"/api/v1/sessions/{sid}/calls", (201, 409, 422), json={"calls": calls})
            assert r.status_code != 422 or "already in use" in r.text, r.text
            while True:
                state = self.request("GET", f"/api/v1/sessions/{sid}/variables/b-{name}", (200,),
                                     params={"timeout": 20}).json()
                assert state["error"] is None, f"{name}: {state['error']}"
                if state["ready"]:
                    break
            first = self.request("GET", f"/api/v1/sessions/{sid}/variables/a-{name}", (200,)).json()
            self.seen[name] = (sid, state["value"])
            self.firsts[name] = first["value"]
            self.report()


def test_seeded_chaos_loses_nothing_and_sets_nothing_twice(default_model_dir, tmp_path):
    rng = random.Random(SEED)
    total = CLIENTS * PROGRAMS
    # Each fault at its own seeded point of the workload (programs finished so far).
    points = sorted(rng.sample(range(2, total - 2), 3))
    faults = dict(zip(points, rng.sample(["kill engine", "restart redis", "kill service"], 3)))
    redis = DurableRedis(tmp_path)
    redis.start()
    serve = Serve(default_model_dir, redis.url, tmp_path / "serve.log")
    clients: list[Client] = []
    try:
        serve.start()
        r = httpx.post(serve.url + "/admin/v1/tenants", json={"name": "chaos"},
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        key = r.json()["api_key"]
        done = threading.Semaphore(0)
        clients = [Client(serve.url, key, i, done.release) for i in range(CLIENTS)]
        errors: list[BaseException] = []

        def run(client: Client) -> None:
            try:
                client.run()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
            finally:
                done.release()  # never leave the main thread waiting

        threads = [threading.Thread(target=run, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        applied = []
        for finished in range(1, total + 1):
            assert done.acquire(timeout=STEP_BOUND_S * 2), "the workload stopped making progress"
            if errors:
                break
            fault = faults.get(finished)
            if fault == "kill engine":
                os.kill(serve.engine_pid(), signal.SIGKILL)
            elif fault == "restart redis":
                redis.stop()
                # Down until a client has felt it (a 503), or for a bounded while.
                outage_end = time.monotonic() + 10
                while time.monotonic() < outage_end and not any(c.refused.acquire(timeout=0.1) for c in clients):
                    pass
                redis.start()
            elif fault == "kill service":
                serve.kill()
                serve.start()
            if fault:
                applied.append(fault)
        for t in threads:
            t.join(timeout=STEP_BOUND_S)
        assert not errors, errors[0]
        assert sorted(applied) == sorted(faults.values())
        assert not [e for c in clients for e in c.server_errors]
        seen = {name: v for c in clients for name, v in c.seen.items()}
        assert len(seen) == total  # every client got every answer
        # What the clients read is what the service holds now: nothing lost,
        # nothing set twice, and each second call read its first's output.
        final = Client(serve.url, key, -1, lambda: None)
        firsts = {name: v for c in clients for name, v in c.firsts.items()}
        for name, (sid, value) in seen.items():
            now = final.request("GET", f"/api/v1/sessions/{sid}/variables/b-{name}", (200,)).json()
            assert now["ready"] and now["value"] == value, name
            detail = final.request("GET", f"/api/v1/sessions/{sid}/calls/second-{name}", (200,)).json()
            assert detail["state"] == "done" and detail["inputs"][0]["value"] == firsts[name], name
            first = final.request("GET", f"/api/v1/sessions/{sid}/calls/first-{name}", (200,)).json()
            assert first["state"] == "done" and first["outputs"][0]["value"] == firsts[name], name
    finally:
        for c in clients:
            c.http.close()
        serve.stop()
        redis.stop()
