"""A real ``redis-server`` for the Redis tests (not a conftest: import the fixture).

Usage in a test module::

    from tests.redis_server import redis_url  # noqa: F401  (a pytest fixture)

``tests`` has no ``__init__.py``; it imports as a namespace package when the
repository root is on ``sys.path``, which ``python -m pytest`` (the project's
test command) arranges. Test modules that must also work under a bare
``pytest`` put the root on ``sys.path`` first, as tests/test_redis_store.py does.

The fixture starts ``redis-server`` on a free loopback port with persistence
off in a temporary directory, waits until it answers PING, yields its URL
(``redis://127.0.0.1:PORT/0``) and stops it when the module's tests are done.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

#: PING attempts before giving up on a server that started (50 ms apart: 10 s).
READY_TRIES = 200
READY_INTERVAL_S = 0.05


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5, retry=None)
    try:
        return bool(client.ping())
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        return False
    finally:
        client.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def running_redis_server() -> Iterator[str]:
    """Start a throwaway ``redis-server``; yields its URL, stops it on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not on PATH. The Redis store tests run a real Redis server; "
            "the test command installs it (apt-get install redis-server, brew install redis, "
            "or the redis image in docker-compose.yml). It is not skipped on purpose.",
            pytrace=False,
        )
    with tempfile.TemporaryDirectory(prefix="parrot-redis-") as tmp:
        log_path = Path(tmp) / "redis.log"
        last_log = ""
        for _ in range(5):  # another process may grab the free port before redis binds it
            port = _free_port()
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", tmp, "--daemonize", "no"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                )
            try:
                for _ in range(READY_TRIES):
                    if proc.poll() is not None or _ping(port):
                        break
                    time.sleep(READY_INTERVAL_S)  # between readiness probes, bounded by READY_TRIES
                if proc.poll() is None and _ping(port):
                    try:
                        yield f"redis://127.0.0.1:{port}/0"
                    finally:
                        _stop(proc)
                    return
            except BaseException:
                _stop(proc)
                raise
            _stop(proc)
            last_log = log_path.read_text(errors="replace")[-2000:]
        pytest.fail(f"redis-server did not start and answer PING; its log:\n{last_log}", pytrace=False)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """URL of a real ``redis-server`` shared by the tests of one module."""
    with running_redis_server() as url:
        yield url


class DurableRedis:
    """A ``redis-server`` with an append-only file synced on every write, on
    one port and folder for its whole life, so it can be stopped and started
    again with its data (the chaos test restarts it under a workload)."""

    def __init__(self, folder: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not on PATH (see running_redis_server)", pytrace=False)
        self.folder = folder
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.folder / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                 "--appendfsync", "always", "--dir", str(self.folder), "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
            )
        for _ in range(READY_TRIES):
            if self.proc.poll() is not None or _ping(self.port):
                break
            time.sleep(READY_INTERVAL_S)  # between readiness probes, bounded by READY_TRIES
        if not _ping(self.port):
            self.stop()
            pytest.fail(f"redis-server did not come up on {self.port}; its log:\n"
                        f"{(self.folder / 'redis.log').read_text(errors='replace')[-2000:]}", pytrace=False)

    def stop(self) -> None:
        """SIGTERM: the server flushes its append-only file and exits."""
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None
