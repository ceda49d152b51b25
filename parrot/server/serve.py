"""Building the service from settings, and running it with uvicorn."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, replace

from parrot.backends.engine import Engine
from parrot.backends.spec import EngineSpec
from parrot.semantic_vars.env import env_flag

from .service import ParrotService
from .tenancy import Quotas

#: On SIGTERM, how long requests still in flight (a client still long-polling
#: or streaming) may run before uvicorn cancels them and the process exits.
SHUTDOWN_GRACE_S = 10.0


def _urls(value: str | None) -> list[str]:
    return [u.strip() for u in (value or "").split(",") if u.strip()]


def _keep(value: str | None) -> int | None:
    """PARROT_KEEP_CLOSED_SESSIONS: a count >= 0, or "all"."""
    if value is None or value == "":
        return 1000
    if value.strip().lower() == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"PARROT_KEEP_CLOSED_SESSIONS must be a count >= 0 or 'all', got {value!r}")
    return count


@dataclass
class ServerSettings:
    """What ``parrot serve`` runs; every field has an environment variable."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None  # PARROT_MODEL; default: SmolLM2-135M-Instruct (see backends.models)
    device: str | None = None  # PARROT_DEVICE
    kv_cache_bytes: int | None = None  # PARROT_KV_CACHE_BYTES (e.g. 512MiB): each torch engine's KV pool
    max_model_len: int | None = None  # PARROT_MAX_MODEL_LEN: longest context (default: the model's)
    sparse_config: str | None = None  # PARROT_SPARSE_CONFIG: sparse prefill pattern JSON for the torch engines
    # PARROT_ENGINES: torch engines (in this process, or Ray actors with
    # ray_address); default 1, or 0 when remote engines are given.
    engines: int | None = None
    redis_url: str | None = None  # PARROT_REDIS_URL; default: state in memory
    admin_key: str | None = None  # PARROT_ADMIN_KEY; default: a fresh one, printed
    request_level: bool = False  # PARROT_REQUEST_LEVEL
    # PARROT_KEEP_CLOSED_SESSIONS: closed sessions kept (in memory and in the
    # store) before the oldest are forgotten; "all" keeps every one.
    keep_closed_sessions: int | None = 1000
    default_quotas: Quotas = field(default_factory=Quotas)
    # PARROT_RAY_ADDRESS: run the torch engines as Ray actors on this cluster
    # ("auto": the cluster this node belongs to; "local": start one here;
    # else a head's address, e.g. ray://head:10001).
    ray_address: str | None = None
    engine_gpus: float = 0.0  # PARROT_ENGINE_GPUS: GPUs per engine actor (1: one engine per GPU)
    engine_cpus: float = 1.0  # PARROT_ENGINE_CPUS: CPUs per engine actor
    engine_restarts: int = 3  # PARROT_ENGINE_RESTARTS: times Ray restarts a dead engine actor
    # PARROT_ENGINE_PROCESS (default on): each local torch engine runs in its
    # own process behind a proxy; 0 keeps it in the API process.
    engine_process: bool = True
    max_running: int | None = None  # PARROT_MAX_RUNNING: batch limit of each torch engine (default 32)
    # PARROT_MAX_STEP_TOKENS: tokens per step of each torch engine (default
    # 2048): a request-level server's latency/throughput knob.
    max_step_tokens: int | None = None
    prefix_cache: bool = True  # PARROT_PREFIX_CACHE=0: the torch engines' automatic prefix cache off
    # PARROT_EARLY_PREFILL: prefill the known head of calls that wait for
    # inputs while their producers run (see parrot.dataflow.early_prefill);
    # None: the runtime's default. Off with the prefix cache, which holds the heads.
    early_prefill: bool | None = None
    # PARROT_EARLY_PREFILL_MIN_TOKENS: shortest head worth it (default 64).
    early_prefill_min_tokens: int = 64
    # PARROT_REMOTE_ENGINES (comma-separated): OpenAI-compatible servers to
    # drive as engines; PARROT_REMOTE_MODEL, PARROT_REMOTE_API_KEY,
    # PARROT_REMOTE_TOKENIZER (a local folder: exact token counts) and
    # PARROT_REMOTE_CONCURRENCY (requests in flight per server) apply to all.
    remote_engines: list[str] = field(default_factory=list)
    remote_model: str | None = None
    remote_api_key: str | None = None
    remote_tokenizer: str | None = None
    remote_concurrency: int = 16

    @classmethod
    def from_env(cls, **overrides: object) -> "ServerSettings":
        from parrot.backends.spec import engine_sizes_from_env

        env = os.environ
        settings = cls(
            **engine_sizes_from_env(),
            model=env.get("PARROT_MODEL"),
            device=env.get("PARROT_DEVICE"),
            sparse_config=env.get("PARROT_SPARSE_CONFIG") or None,
            engines=int(env["PARROT_ENGINES"]) if env.get("PARROT_ENGINES") else None,
            redis_url=env.get("PARROT_REDIS_URL"),
            admin_key=env.get("PARROT_ADMIN_KEY"),
            request_level=env_flag("PARROT_REQUEST_LEVEL"),
            keep_closed_sessions=_keep(env.get("PARROT_KEEP_CLOSED_SESSIONS")),
            ray_address=env.get("PARROT_RAY_ADDRESS") or None,
            engine_gpus=float(env.get("PARROT_ENGINE_GPUS", "0")),
            engine_cpus=float(env.get("PARROT_ENGINE_CPUS", "1")),
            engine_restarts=int(env.get("PARROT_ENGINE_RESTARTS", "3")),
            engine_process=env_flag("PARROT_ENGINE_PROCESS", default=True),
            max_running=int(env["PARROT_MAX_RUNNING"]) if env.get("PARROT_MAX_RUNNING") else None,
            max_step_tokens=int(env["PARROT_MAX_STEP_TOKENS"]) if env.get("PARROT_MAX_STEP_TOKENS") else None,
            prefix_cache=env_flag("PARROT_PREFIX_CACHE", default=True),
            early_prefill=env_flag("PARROT_EARLY_PREFILL") if env.get("PARROT_EARLY_PREFILL") is not None else None,
            early_prefill_min_tokens=int(env.get("PARROT_EARLY_PREFILL_MIN_TOKENS", "64")),
            remote_engines=_urls(env.get("PARROT_REMOTE_ENGINES")),
            remote_model=env.get("PARROT_REMOTE_MODEL") or None,
            remote_api_key=env.get("PARROT_REMOTE_API_KEY") or None,
            remote_tokenizer=env.get("PARROT_REMOTE_TOKENIZER") or None,
            remote_concurrency=int(env.get("PARROT_REMOTE_CONCURRENCY", "16")),
        )
        for key, value in overrides.items():
            if value is not None and value != []:
                setattr(settings, key, value)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        if self.engines is not None and self.engines < 0:
            raise ValueError(f"engines must be >= 0, got {self.engines}")
        if self.torch_engines + len(self.remote_engines) < 1:
            raise ValueError("no engines: give engines >= 1 or at least one remote engine")
        if self.engine_gpus < 0 or self.engine_cpus < 0:
            raise ValueError("engine_gpus and engine_cpus must be >= 0")
        if self.early_prefill_min_tokens < 1:
            raise ValueError(f"early_prefill_min_tokens must be >= 1, got {self.early_prefill_min_tokens}")
        if self.engine_restarts < -1:
            raise ValueError(f"engine_restarts must be >= -1 (-1: forever), got {self.engine_restarts}")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_step_tokens is not None and self.max_step_tokens < max(1, self.max_running or 32):
            raise ValueError(f"max_step_tokens must be >= max_running ({self.max_running or 32}: one decode token "
                             f"each), got {self.max_step_tokens}")
        if self.remote_concurrency < 1:
            raise ValueError(f"remote_concurrency must be >= 1, got {self.remote_concurrency}")
        for url in self.remote_engines:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"remote engine URL must start with http:// or https://, got {url!r}")

    @property
    def torch_engines(self) -> int:
        """Torch engines to run: ``engines``, else 1 unless remote engines serve."""
        if self.engines is not None:
            return self.engines
        return 0 if self.remote_engines else 1

    def engine_specs(self) -> list[EngineSpec]:
        """One picklable recipe per engine these settings ask for."""
        # Ray actors are processes of their own already.
        process = self.engine_process and not self.ray_address
        specs = [EngineSpec(name=f"engine-{i}", model=self.model, device=self.device, process=process,
                            max_running=self.max_running, kv_cache_bytes=self.kv_cache_bytes,
                            max_model_len=self.max_model_len, max_step_tokens=self.max_step_tokens,
                            prefix_cache=self.prefix_cache, sparse_config=self.sparse_config)
                 for i in range(self.torch_engines)]
        specs += [
            EngineSpec(name=f"remote-{i}", kind="remote", url=url, remote_model=self.remote_model,
                       api_key=self.remote_api_key, tokenizer=self.remote_tokenizer,
                       max_running=self.remote_concurrency)
            for i, url in enumerate(self.remote_engines)
        ]
        return specs


async def build_engines(settings: ServerSettings) -> list[Engine]:
    """The engines the settings ask for: torch engines in-process or as Ray
    actors, and remote engines in-process (they only hold HTTP connections)."""
    import asyncio

    specs = settings.engine_specs()
    torch_specs = [s for s in specs if s.kind == "torch"]
    if torch_specs and (not settings.model or settings.model.endswith(".gguf") or "/" not in settings.model):
        # Fetch, convert or build the model once here, not in every engine
        # (a folder path is left to the engines: on Ray it is their node's).
        from parrot.backends.models import resolve_model

        model = str(resolve_model(settings.model, progress=print))
        torch_specs = [replace(s, model=model) for s in torch_specs]
    engines: list[Engine] = []
    if torch_specs and settings.ray_address:
        from parrot.backends.ray_engine import connect, start_engines

        await asyncio.to_thread(connect, settings.ray_address)
        engines += await asyncio.to_thread(
            start_engines, torch_specs, num_gpus=settings.engine_gpus, num_cpus=settings.engine_cpus,
            max_restarts=settings.engine_restarts,
        )
    else:
        # Engine processes load side by side.
        engines += await asyncio.gather(*(asyncio.to_thread(spec.build) for spec in torch_specs))
    engines += [s.build() for s in specs if s.kind == "remote"]
    return engines


async def build_service(settings: ServerSettings) -> ParrotService:
    """Engines, store and runtime as the settings say (run inside the server's loop)."""
    from parrot.dataflow import LocalRuntime

    engines = await build_engines(settings)
    store = None
    if settings.redis_url:
        from .redis_store import RedisStore

        store = RedisStore.from_url(settings.redis_url)
    # Remote engines hold no model to score compression with: the model setting names the local scorer.
    early = False if not settings.prefix_cache else settings.early_prefill  # no cache: nothing holds a warmed head
    runtime = LocalRuntime(engines, store=store, request_level=settings.request_level,
                           keep_closed_sessions=settings.keep_closed_sessions, scorer_model=settings.model,
                           early_prefill=early, early_prefill_min_tokens=settings.early_prefill_min_tokens)
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
    uvicorn.run(make_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)


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
        config = uvicorn.Config(make_app(settings), host=settings.host, port=0, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
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
