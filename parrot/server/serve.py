"""Building the service from settings, and running it with uvicorn."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .service import ParrotService
from .tenancy import Quotas


@dataclass
class ServerSettings:
    """What ``parrot serve`` runs; every field has an environment variable."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None  # PARROT_MODEL; default: the embedded test model
    device: str | None = None  # PARROT_DEVICE
    engines: int = 1  # PARROT_ENGINES: engines in this process
    redis_url: str | None = None  # PARROT_REDIS_URL; default: state in memory
    admin_key: str | None = None  # PARROT_ADMIN_KEY; default: a fresh one, printed
    request_level: bool = False  # PARROT_REQUEST_LEVEL
    default_quotas: Quotas = field(default_factory=Quotas)

    @classmethod
    def from_env(cls, **overrides: object) -> "ServerSettings":
        env = os.environ
        settings = cls(
            model=env.get("PARROT_MODEL"),
            device=env.get("PARROT_DEVICE"),
            engines=int(env.get("PARROT_ENGINES", "1")),
            redis_url=env.get("PARROT_REDIS_URL"),
            admin_key=env.get("PARROT_ADMIN_KEY"),
            request_level=env.get("PARROT_REQUEST_LEVEL", "") not in ("", "0", "false"),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(settings, key, value)
        if settings.engines < 1:
            raise ValueError(f"engines must be >= 1, got {settings.engines}")
        return settings


async def build_service(settings: ServerSettings) -> ParrotService:
    """Engines, store and runtime as the settings say (run inside the server's loop)."""
    import asyncio

    from parrot.backends.torch_engine import TorchEngine
    from parrot.dataflow import LocalRuntime, default_model_dir

    model_dir = Path(settings.model).expanduser() if settings.model else default_model_dir(progress=print)
    engines = [
        await asyncio.to_thread(TorchEngine.from_pretrained, model_dir, device=settings.device, name=f"engine-{i}")
        for i in range(settings.engines)
    ]
    store = None
    if settings.redis_url:
        from .redis_store import RedisStore

        store = RedisStore.from_url(settings.redis_url)
    runtime = LocalRuntime(engines, store=store, request_level=settings.request_level)
    return ParrotService(runtime, admin_key=settings.admin_key, default_quotas=settings.default_quotas)


def make_app(settings: ServerSettings):
    """The FastAPI app for ``settings`` (what uvicorn serves)."""
    from .app import create_app

    return create_app(lambda: build_service(settings))


def run(settings: ServerSettings) -> None:
    """Serve until interrupted."""
    import uvicorn

    if not settings.admin_key:
        settings.admin_key = "pa-" + secrets.token_urlsafe(24)
        print(f"admin key (set PARROT_ADMIN_KEY to choose one): {settings.admin_key}", flush=True)
    store = f"Redis at {settings.redis_url}" if settings.redis_url else "memory (set PARROT_REDIS_URL to keep it)"
    print(f"parrot serve: http://{settings.host}:{settings.port}  state: {store}", flush=True)
    print(f"DAG visualizer: http://{settings.host}:{settings.port}/ui (sign in with a tenant's API key)", flush=True)
    uvicorn.run(make_app(settings), host=settings.host, port=settings.port, log_level="info")


class ThreadedServer:
    """A real uvicorn server for ``settings`` on a free loopback port, in a
    daemon thread: for tests, benchmarks and notebooks. ``url`` is its base
    address; :meth:`stop` shuts it down."""

    def __init__(self, settings: ServerSettings, *, ready_timeout_s: float = 120.0) -> None:
        import threading
        import time

        import uvicorn

        self.settings = settings
        # Port 0: the kernel picks a free port. (Handing uvicorn a pre-bound
        # socket instead loses TCP_NODELAY on its connections: +40 ms a request.)
        config = uvicorn.Config(make_app(settings), host=settings.host, port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + ready_timeout_s
        while not self.server.started:  # set once the lifespan ran and the socket listens
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server failed to start (see its log above)")
            self.thread.join(timeout=0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{settings.host}:{port}"
        self._wait_ready(max(1.0, end - time.monotonic()))

    def _wait_ready(self, deadline_s: float) -> None:
        """Readiness probe: /readyz answers 200 once engines are loaded and state restored."""
        import time

        import httpx

        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died during start-up")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            self.thread.join(timeout=0.1)  # wait on the thread itself between probes
        raise TimeoutError(f"server at {self.url} not ready after {deadline_s} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
