"""Engines as Ray actors, and the in-process proxy the runtime drives.

:class:`EngineActor` builds an engine from an :class:`EngineSpec` on its own
node: a torch engine (one actor per GPU, ``num_gpus=1``, or per CPU slot) or
a remote engine. :class:`RayEngine` is an ordinary :class:`Engine` in the
service's process: the scheduler sees it like any other, with its capacity
and the prefix keys the actor's cache holds.

Streaming. ``submit`` starts a task on the caller's event loop that calls the
actor's async generator ``generate`` as a Ray streaming generator
(``num_returns="streaming"``) and awaits each ObjectRef as it arrives, so
tokens flow back one by one and the loop never blocks on ``ray.get``. The
last item of a stream is the actor's capacity after the request, which keeps
the proxy's view of cached prefixes current without a round trip of its own.

Failure. If the actor dies under a request (``RayActorError`` and kin), the
stream fails with :class:`EngineUnavailableError`: the runtime re-queues the
call on another engine and discards what the dead one had streamed. The
proxy reports unhealthy until a ping reaches the actor again (Ray restarts it
when ``max_restarts`` allows), and then rejoins the scheduler's pool. Ray is
imported only when an actor is started, so ``parrot.backends`` imports
without it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator, Callable, TypeVar

from parrot.semantic_vars import EngineError, EngineUnavailableError

from .engine import (
    EngineCapacity,
    EngineEvent,
    GenerationRequest,
    RequestFinished,
    RequestStream,
    TokenizerLike,
)
from .proxy import ProxyEngine
from .spec import EngineSpec

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class EngineActor:
    """The body of an engine actor (``ray.remote`` is applied in :meth:`RayEngine.start`)."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.engine = spec.build()

    def ready(self) -> dict[str, Any]:
        """What the proxy needs once: the tokenizer and the starting capacity."""
        return {"tokenizer": self.engine.tokenizer, "capacity": self.engine.capacity(), "name": self.engine.name,
                "model_id": self.engine.model_id, "max_model_len": self.engine.max_model_len,
                "runs_model_jobs": self.engine.runs_model_jobs}

    async def run_model_job(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """``fn(engine, *args)`` on the actor's engine, in a worker thread so
        the actor's event loop keeps streaming other requests meanwhile."""
        return await asyncio.to_thread(self.engine.run_model_job, fn, *args)

    async def ping(self) -> bool:
        return self.engine.healthy()

    async def capacity(self) -> EngineCapacity:
        return self.engine.capacity()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent | EngineCapacity]:
        """The request's events, then the engine's capacity after it."""
        stream = self.engine.submit(request)
        try:
            async for event in stream:
                yield event
        finally:
            stream.cancel()  # a no-op once finished; frees the engine if the caller went away
        yield self.engine.capacity()


def _ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Ray engines need Ray: pip install 'parrot-serve[ray]'") from exc
    return ray


class RayEngine(ProxyEngine):
    """An engine that lives in a Ray actor, seen from the service's process."""

    def __init__(self, actor: Any, *, name: str, tokenizer: TokenizerLike, capacity: EngineCapacity,
                 probe_interval_s: float = 0.5, model_id: str | None = None,
                 max_model_len: int | None = None, runs_model_jobs: bool = False) -> None:
        super().__init__()
        self.actor = actor
        self.name = name
        self._model_id = model_id or name
        self._max_model_len = max_model_len
        self._runs_model_jobs = runs_model_jobs
        self.tokenizer = tokenizer
        self.probe_interval_s = probe_interval_s
        self._max_running = capacity.max_running
        self._cached = capacity.cached_prefixes
        self._lock = threading.Lock()
        self._in_flight = 0
        self.dead = False  # True once Ray says the actor will not come back
        self.failures = 0  # times the actor died under a request
        self._monitor: asyncio.Task[None] | None = None
        self._health_event: asyncio.Event | None = None

    @classmethod
    def start(
        cls,
        spec: EngineSpec,
        *,
        num_gpus: float = 0,
        num_cpus: float = 1,
        max_restarts: int = 0,
        ready_timeout_s: float = 600.0,
        **actor_options: Any,
    ) -> "RayEngine":
        """Start an actor for ``spec`` on the connected Ray cluster and wait
        until its engine is loaded (blocking: call it off the event loop)."""
        return start_engines([spec], num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
                             ready_timeout_s=ready_timeout_s, **actor_options)[0]

    # -- Engine API ---------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def max_model_len(self) -> int | None:
        return self._max_model_len

    @property
    def runs_model_jobs(self) -> bool:
        """True when the actor's engine holds a Parrot model (a torch engine)."""
        return self._runs_model_jobs

    def run_model_job(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Runs ``fn(engine, *args)`` in the actor, beside its engine, and
        returns the result (blocking: call it off the event loop)."""
        if not self._runs_model_jobs:
            return super().run_model_job(fn, *args)
        return _ray().get(self.actor.run_model_job.remote(fn, args))

    def submit(self, request: GenerationRequest) -> RequestStream:
        if not self._healthy:
            raise EngineUnavailableError(f"engine actor {self.name} is not reachable")
        stream = RequestStream(request, self.cancel)
        with self._lock:
            self._in_flight += 1
        self._spawn(request.request_id, self._pump(request, stream))
        return stream

    def capacity(self) -> EngineCapacity:
        with self._lock:
            # Requests in flight are counted here (exact for this process);
            # cached prefixes are the actor's own report after its last request.
            return EngineCapacity(self._max_running, self._in_flight, 0, cached_prefixes=self._cached)

    def gone(self) -> bool:
        return self.dead

    def close(self) -> None:
        """Stop the actor (the proxy's own tasks end with it)."""
        ray = _ray()
        if ray.is_initialized():
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # already gone
                pass
        self._healthy = False
        self.dead = True

    # -- streaming ------------------------------------------------------------
    async def _pump(self, request: GenerationRequest, stream: RequestStream) -> None:
        ray = _ray()
        from ray import exceptions as rex

        lost = (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError, rex.NodeDiedError)
        gen = None
        counted = True  # this request still counts as in flight

        def release() -> None:
            nonlocal counted
            if counted:
                counted = False
                with self._lock:
                    self._in_flight -= 1

        try:
            gen = self.actor.generate.options(num_returns="streaming").remote(request)
            async for ref in gen:
                item = await ref
                if isinstance(item, EngineCapacity):
                    with self._lock:
                        self._max_running, self._cached = item.max_running, item.cached_prefixes
                    continue
                if isinstance(item, RequestFinished):
                    release()  # its slot is free before the runtime's next pass
                stream.push(item)
        except asyncio.CancelledError:
            if gen is not None:
                try:
                    ray.cancel(gen)
                except Exception:  # the task already ended
                    pass
        except lost as exc:
            stream.fail(self._lost(exc))
        except rex.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, EngineError):
                stream.fail(cause)  # EngineUnavailableError of an inner remote engine stays retryable
            else:
                stream.fail(EngineError(f"engine actor {self.name}: {cause!r}"))
        except Exception as exc:
            stream.fail(EngineError(f"engine actor {self.name}: {type(exc).__name__}: {exc}"))
        finally:
            release()

    async def refresh(self) -> EngineCapacity:
        """Ask the actor for its capacity now (cached prefixes included)."""
        cap = await self.actor.capacity.remote()
        with self._lock:
            self._max_running, self._cached = cap.max_running, cap.cached_prefixes
        return self.capacity()

    # -- health -------------------------------------------------------------
    def _lost(self, exc: BaseException) -> EngineUnavailableError:
        """The actor died: report unhealthy, watch for its restart."""
        self.failures += 1
        if self._healthy:
            log.warning("engine actor %s died: %s", self.name, exc)
        self._healthy = False
        with self._lock:
            self._cached = frozenset()  # a restarted actor starts with an empty cache
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._watch())
        return EngineUnavailableError(f"engine actor {self.name} died: {type(exc).__name__}")

    async def _watch(self) -> None:
        """Ping until the actor answers again (restarted) or is gone for good."""
        from ray import exceptions as rex

        while not self._healthy:
            try:
                # A call to a restarting actor waits for the restart.
                if await asyncio.wait_for(self.actor.ping.remote(), timeout=60):
                    await self.refresh()
                    self._healthy = True
                    log.info("engine actor %s is back", self.name)
            except rex.ActorDiedError:
                self.dead = True  # no restarts left: stays out of the pool
                log.warning("engine actor %s is gone for good", self.name)
                break
            except (rex.RayActorError, asyncio.TimeoutError):
                await asyncio.sleep(self.probe_interval_s)  # back-off between pings, not synchronisation
        if self._health_event is not None:
            self._health_event.set()

    async def wait_healthy(self) -> bool:
        """Wait until the actor is back (True) or known dead for good (False)."""
        if self._healthy or self.dead:
            return self._healthy
        self._health_event = self._health_event or asyncio.Event()
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._watch())
        await self._health_event.wait()
        self._health_event = None
        return self._healthy

    async def check_health(self) -> bool:
        """Ping the actor once (up to 10 s); marks the proxy unhealthy if it is gone."""
        from ray import exceptions as rex

        try:
            ok = bool(await asyncio.wait_for(self.actor.ping.remote(), timeout=10))
        except (rex.RayActorError, asyncio.TimeoutError) as exc:
            if self._healthy:
                self._lost(exc)
            return False
        return ok


def connect(address: str) -> None:
    """Join a Ray cluster once per process: ``"local"`` starts one on this
    machine, ``"auto"`` joins the cluster this node belongs to, anything else
    is a head's address (``ray://head:10001``, ``head:6379``)."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=address)


def start_engines(
    specs: list[EngineSpec],
    *,
    num_gpus: float = 0,
    num_cpus: float = 1,
    max_restarts: int = 0,
    ready_timeout_s: float = 600.0,
    **actor_options: Any,
) -> list[RayEngine]:
    """Start one actor per spec on the connected Ray cluster, loading them in
    parallel, and block until every engine is loaded (call it off the loop)."""
    ray = _ray()
    if not ray.is_initialized():
        raise RuntimeError("connect to Ray first (ray.init(address=...))")
    actor_cls = ray.remote(EngineActor)
    actors = [
        actor_cls.options(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0,
                          **actor_options).remote(spec)
        for spec in specs
    ]
    infos = ray.get([a.ready.remote() for a in actors], timeout=ready_timeout_s)
    return [RayEngine(a, name=s.name, tokenizer=i["tokenizer"], capacity=i["capacity"], model_id=i["model_id"],
                      max_model_len=i["max_model_len"], runs_model_jobs=i["runs_model_jobs"])
            for a, s, i in zip(actors, specs, infos)]


__all__ = ["EngineActor", "RayEngine", "connect", "start_engines"]
