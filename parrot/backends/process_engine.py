"""The torch engine in its own process, behind a thin proxy.

Why. In one process the API's event loop, the dataflow runtime, HTTP
streaming and the engine's step loop share one GIL, so every Python line the
service runs under load delays the next decode step. :class:`ProcessEngine`
runs a :class:`~parrot.backends.torch_engine.TorchEngine` in a child process
(multiprocessing's ``spawn`` context: CUDA does not survive a fork) and is an
ordinary :class:`~parrot.backends.engine.Engine` in the API process.

The boundary is one duplex pipe, and what crosses it is batched:

* API -> engine: submits (the pickled :class:`GenerationRequest`, so every
  field crosses, present and future), cancels and model jobs. A sender
  thread sends whatever is queued as one message, so the event loop only
  appends to a queue.
* engine -> API: per engine step, **one** message with every event of every
  request of that step (TokenDelta, GenResult, RequestFinished, errors) and
  the engine's capacity after it. A reader thread delivers the events into
  the request streams inside :func:`batched_delivery`, so each submitting
  loop wakes once per step.

Prompts are tokenized in the API process (the proxy loads the same
tokenizer), output text is detokenized in the child, in the engine's step
thread, exactly as in process: the code behind the boundary is the torch
engine's own ``submit``, with an outbox in place of the caller's loop.

Failure. When the child dies, every request in flight fails with
:class:`EngineUnavailableError` while restarts remain (the runtime re-queues
the call; the proxy starts a new child and reports unhealthy until it has
loaded), and with :class:`EngineError` once none remain. The child ignores
SIGINT and exits when its pipe closes, so it never outlives the API process;
:meth:`ProcessEngine.close` stops it.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from parrot.semantic_vars import EngineError, EngineUnavailableError, new_id

from .engine import (
    Engine,
    EngineCapacity,
    GenerationRequest,
    RequestFinished,
    RequestStream,
    batched_delivery,
    defer_flush,
)
from .proxy import ProxyEngine
from .tokenizer import Tokenizer, read_generation_eos

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else an :class:`EngineError` naming it
    (an exception whose ``__init__`` does not take its ``args`` back would
    fail to unpickle on the other side)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return EngineError(f"{type(exc).__name__}: {exc}")


def _engine_stats(engine: Engine) -> dict[str, int]:
    return engine.stats()


# -- the child's side -----------------------------------------------------------
class _Outbox:
    """Collects the events the engine pushes during one step (its
    :func:`batched_delivery` block) and sends them, with the capacity after
    the step, as one message."""

    def __init__(self, engine: Engine, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._engine = engine
        self._send = send
        self._items: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._prefixes: frozenset[str] = frozenset()  # the cached prefix keys last sent

    def post(self, stream: RequestStream, item: object) -> None:
        if isinstance(item, BaseException):
            item = _portable(item)
            stream.done = True  # nothing follows an error or the last event
        elif isinstance(item, RequestFinished):
            stream.done = True
        with self._lock:
            self._items.append((stream.request.request_id, item))
        if not defer_flush(self):  # an event outside a step (an error at submit, a close)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            if items:
                self._send(("events", items, *self._capacity()))

    def _capacity(self) -> tuple[EngineCapacity, frozenset[str] | None]:
        """The capacity, and its cached prefix keys only when they changed
        since the last message (a long-running engine holds many)."""
        cap = self._engine.capacity()
        prefixes = cap.cached_prefixes
        changed = prefixes != self._prefixes
        self._prefixes = prefixes
        return replace(cap, cached_prefixes=frozenset()), prefixes if changed else None


def _child_main(conn: Any, folder: str, config: Any, device: str | None, dtype: torch.dtype | None,
                name: str) -> None:
    """The engine process: build the engine, then serve commands until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process decides when this one stops
    from .torch_engine import TorchEngine

    try:
        engine = TorchEngine.from_pretrained(folder, device=device, dtype=dtype, name=name, config=config)
    except BaseException as exc:
        conn.send(("failed", _portable(exc)))
        return
    # The engine's thread only queues its messages: a sender thread pickles
    # and writes them, so a step never waits on the pipe (or on the API
    # process reading it); messages that piled up meanwhile go as one.
    pending: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
    send = pending.put
    sender = threading.Thread(target=_send_loop, args=(conn, pending), name="parrot-send", daemon=True)
    sender.start()

    def run_job(job_id: int, payload: bytes) -> None:
        try:
            fn, args = pickle.loads(payload)
            ok, value = True, fn(engine, *args)
        except BaseException as exc:
            ok, value = False, _portable(exc)
        try:
            pickle.dumps(value)
        except Exception as exc:
            ok, value = False, EngineError(f"model job result cannot cross the process boundary: {exc}")
        send(("job", job_id, ok, value))

    outbox = _Outbox(engine, send)
    jobs = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="parrot-job")
    send(("ready", {"max_model_len": engine.max_model_len, "capacity": engine.capacity(), "pid": os.getpid()}))
    try:
        while True:
            try:
                batch = conn.recv()
            except (EOFError, OSError):
                return  # the API process closed the pipe or died
            for command in batch:
                kind = command[0]
                if kind == "submit":
                    request: GenerationRequest = command[1]
                    try:
                        engine.submit(request, mailbox=outbox)
                    except Exception as exc:  # a bad program: this request fails, nothing else
                        stream = RequestStream(request, engine.cancel, mailbox=outbox)
                        stream.fail(exc)
                elif kind == "cancel":
                    engine.cancel(command[1])
                elif kind == "job":
                    jobs.submit(run_job, command[1], command[2])
                elif kind == "close":
                    return
    finally:
        engine.close()  # fails what is in flight: those errors go out first
        pending.put(None)
        sender.join(timeout=10)
        os._exit(0)  # do not wait for job threads: the API process is not waiting for them


def _send_loop(conn: Any, pending: "queue.SimpleQueue[tuple[Any, ...] | None]") -> None:
    """The child's sender: coalesce queued step messages, write them in order."""
    while True:
        batch = [pending.get()]
        while True:
            try:
                batch.append(pending.get_nowait())
            except queue.Empty:
                break
        stop = None in batch
        out: list[tuple[Any, ...]] = []
        for msg in batch:
            if msg is None:
                break
            if msg[0] == "events" and out and out[-1][0] == "events":
                # The newer capacity wins; prefixes too, unless they did not change since the older.
                prefixes = msg[3] if msg[3] is not None else out[-1][3]
                out[-1] = ("events", out[-1][1] + msg[1], msg[2], prefixes)
            else:
                out.append(msg)
        try:
            for msg in out:
                conn.send(msg)
        except (OSError, ValueError):
            return  # the API process is gone: the main thread's recv() sees the pipe close
        if stop:
            return


# -- the API process's side ---------------------------------------------------------
_open_engines: "weakref.WeakSet[ProcessEngine]" = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    """At exit, close engines nobody closed: before multiprocessing terminates
    their children, which the proxies would otherwise take for deaths and
    restart."""
    for engine in list(_open_engines):
        engine.close()

class _Child:
    """One engine process, its pipe and the queue its sender thread drains."""

    def __init__(self, ctx: Any, args: tuple[Any, ...], name: str,
                 undeliverable: Callable[[tuple[Any, ...], Exception], None]) -> None:
        self.undeliverable = undeliverable  # called with a command that does not pickle
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_child_main, args=(child_conn, *args), name=f"parrot-{name}", daemon=True)
        self.process.start()
        child_conn.close()  # only the child holds its end: its death closes the pipe
        self.outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self.pid = self.process.pid

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        if not self.conn.poll(timeout_s):
            self.kill()
            raise EngineError(f"the engine process did not load its model in {timeout_s} s")
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=10)
            raise EngineError(f"the engine process exited with code {self.process.exitcode} while loading") from None
        if kind == "failed":
            self.process.join(timeout=10)
            raise value
        return value

    def send_loop(self) -> None:
        """Send what is queued, everything queued so far in one message."""
        while True:
            batch = [self.outbox.get()]
            while True:
                try:
                    batch.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            commands = [c for c in batch if c is not None]
            if commands:
                try:
                    self.conn.send(commands)
                except (OSError, ValueError):
                    return  # the child is gone; the reader sees it and reports
                except Exception:  # one of them does not pickle: send the others, fail that one
                    for command in commands:
                        try:
                            self.conn.send([command])
                        except (OSError, ValueError):
                            return
                        except Exception as exc:
                            self.undeliverable(command, exc)
            if len(commands) < len(batch):
                return

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)


class ProcessEngine(ProxyEngine):
    """A :class:`~parrot.backends.torch_engine.TorchEngine` on ``model`` (a
    local Hugging Face folder) running in a child process; see the module
    docstring. ``config``, ``device`` and ``dtype`` are the torch engine's;
    ``max_restarts`` bounds how often a dead child is replaced. The
    constructor blocks until the model is loaded (call it off the event loop).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        config: Any = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        name: str | None = None,
        max_restarts: int = 3,
        start_timeout_s: float = 600.0,
    ) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        super().__init__(healthy=False)  # until the child has loaded
        self.folder = Path(model)
        self.name = name or new_id("engine")
        self.max_restarts = max_restarts
        self.start_timeout_s = start_timeout_s
        self.restarts = 0  # children started to replace a dead one
        self.dead = False  # True once the child died with no restarts left
        self._args = (str(self.folder), config, device, dtype, self.name)
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # health changed
        self._streams: dict[str, RequestStream] = {}
        self._jobs: dict[int, concurrent.futures.Future[Any]] = {}
        self._job_ids = itertools.count()
        self._closing = False
        self._child: _Child | None = None
        self._reader: threading.Thread | None = None
        child = _Child(self._ctx, self._args, self.name, self._undeliverable)
        try:
            # The tokenizer loads here while the child loads the weights.
            from .checkpoint import read_model_config

            eos = [*read_model_config(self.folder).eos_token_ids, *read_generation_eos(self.folder)]
            self.tokenizer = Tokenizer(self.folder, eos_token_ids=eos)
            self._attach(child)
        except BaseException:
            child.kill()
            raise
        _open_engines.add(self)

    # -- Engine API ---------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.folder.name

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def gone(self) -> bool:
        """True once the child died with no restarts left."""
        return self.dead

    @property
    def pid(self) -> int | None:
        """The engine process's id (None before it started)."""
        return self._child.pid if self._child is not None else None

    def submit(self, request: GenerationRequest) -> RequestStream:
        stream = RequestStream(request, self.cancel)
        with self._lock:
            self._check_up()
            if request.request_id in self._streams:
                raise EngineError(f"request {request.request_id!r} is already running on engine {self.name}")
            self._streams[request.request_id] = stream
            assert self._child is not None
            self._child.outbox.put(("submit", request))
        return stream

    def capacity(self) -> EngineCapacity:
        with self._lock:
            # Requests in flight are counted here, exactly; pool figures and
            # cached prefixes are the child's report after its last step.
            snap, in_flight = self._snapshot, len(self._streams)
        running = min(in_flight, snap.max_running)
        return replace(snap, running=running, waiting=in_flight - running)

    def cancel(self, request_id: str) -> None:
        # No task here: the request lives in the child, which is told.
        with self._lock:
            if self._streams.pop(request_id, None) is None or self._child is None:
                return
            self._child.outbox.put(("cancel", request_id))

    def stats(self) -> dict[str, int]:
        """The child engine's counters (a round trip; empty while it is down)."""
        try:
            return self._job(_engine_stats, (), timeout_s=30)
        except (EngineError, concurrent.futures.TimeoutError):
            return {}

    def wait_healthy(self, timeout_s: float | None = None) -> bool:
        """Block until the engine takes requests (True) or never will again
        (dead or closed: False); False too when ``timeout_s`` passes first."""
        with self._changed:
            self._changed.wait_for(lambda: self._healthy or self.dead or self._closing, timeout_s)
            return self._healthy

    @property
    def runs_model_jobs(self) -> bool:
        return True

    def run_model_job(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Runs ``fn(engine, *args)`` in the engine process (in a thread of its
        own, beside the step loop) and returns its result."""
        return self._job(fn, args)

    def close(self) -> None:
        """Stop the child (it fails its requests as closed) and wait for it."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._healthy = False
            self._changed.notify_all()
            child, reader = self._child, self._reader
        if child is None:
            return
        child.outbox.put(("close",))
        child.outbox.put(None)
        # Only the reader thread reaps the child (two threads joining one
        # process race: the loser sees no exit code). Here: wait for the exit.
        if not multiprocessing.connection.wait([child.process.sentinel], timeout=30):
            log.warning("engine process %s (pid %s) did not stop in 30 s; killing it", self.name, child.pid)
            child.process.kill()
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=30)

    # -- inside ----------------------------------------------------------------
    def _check_up(self) -> None:
        """Raise unless requests can be taken now (call with the lock held)."""
        if self._closing:
            raise EngineError(f"engine {self.name} is closed")
        if self.dead:
            raise EngineError(f"engine process {self.name} died and has no restarts left")
        if not self._healthy:
            raise EngineUnavailableError(f"engine process {self.name} is restarting")

    def _job(self, fn: Callable[..., _T], args: tuple[Any, ...], timeout_s: float | None = None) -> _T:
        payload = pickle.dumps((fn, args))
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._check_up()
            job_id = next(self._job_ids)
            self._jobs[job_id] = future
            assert self._child is not None
            self._child.outbox.put(("job", job_id, payload))
        try:
            return future.result(timeout=timeout_s)
        finally:
            with self._lock:
                self._jobs.pop(job_id, None)

    def _undeliverable(self, command: tuple[Any, ...], exc: Exception) -> None:
        """A submit that could not be pickled fails its own stream."""
        if command[0] != "submit":
            return
        with self._lock:
            stream = self._streams.pop(command[1].request_id, None)
        if stream is not None:
            stream.fail(EngineError(f"the request cannot cross to engine process {self.name}: "
                                    f"{type(exc).__name__}: {exc}"))

    def _attach(self, child: _Child) -> None:
        """Wait for ``child`` to load, then route requests to it."""
        info = child.wait_ready(self.start_timeout_s)
        self._max_model_len = int(info["max_model_len"])
        with self._lock:
            self._snapshot: EngineCapacity = info["capacity"]
            self._prefixes = frozenset()  # a new child starts with an empty cache
            if self._closing:
                child.outbox.put(("close",))
                child.outbox.put(None)
                return
            self._child = child
            self._healthy = True
            self._changed.notify_all()
        threading.Thread(target=child.send_loop, name=f"parrot-{self.name}-send", daemon=True).start()
        self._reader = threading.Thread(target=self._read_loop, args=(child,), name=f"parrot-{self.name}-read",
                                        daemon=True)
        self._reader.start()

    def _read_loop(self, child: _Child) -> None:
        while True:
            try:
                msg = child.conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._handle(msg)
            except Exception:  # a bug here must not strand every stream
                log.exception("engine process %s: could not handle a message", self.name)
        self._child_gone(child)

    def _handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "events":
            _, items, snapshot, prefixes = msg
            out: list[tuple[RequestStream, object]] = []
            with self._lock:
                if prefixes is not None:
                    self._prefixes = prefixes
                self._snapshot = replace(snapshot, cached_prefixes=self._prefixes)
                for request_id, item in items:
                    stream = self._streams.get(request_id)
                    if stream is None:
                        continue  # cancelled here; the child had not seen it yet
                    if isinstance(item, (RequestFinished, BaseException)):
                        del self._streams[request_id]  # its slot is free before its consumer runs
                    out.append((stream, item))
            with batched_delivery():  # one wake-up per event loop for the whole step
                for stream, item in out:
                    if isinstance(item, BaseException):
                        stream.fail(item)
                    else:
                        stream.push(item)  # type: ignore[arg-type]
        elif kind == "job":
            _, job_id, ok, value = msg
            with self._lock:
                future = self._jobs.pop(job_id, None)
            if future is not None:
                future.set_result(value) if ok else future.set_exception(value)

    def _child_gone(self, child: _Child) -> None:
        """The pipe closed: the child exited (closed, or died). Fail what was in
        flight, and start a new child when restarts remain."""
        child.outbox.put(None)  # ends its sender thread
        child.process.join(timeout=10)
        code = child.process.exitcode
        with self._lock:
            self._healthy = False
            streams, self._streams = list(self._streams.values()), {}
            jobs, self._jobs = list(self._jobs.values()), {}
            closing = self._closing
            restart = not closing and self.restarts < self.max_restarts
            if not closing and not restart:
                self.dead = True
                self._changed.notify_all()
        child.conn.close()
        if closing:
            error: EngineError = EngineError(f"engine {self.name} was closed")
        else:
            why = f"engine process {self.name} (pid {child.pid}) died (exit code {code})"
            log.warning("%s; %s", why, "restarting it" if restart else "no restarts left")
            error = (EngineUnavailableError(f"{why}; restarting it") if restart
                     else EngineError(f"{why}; no restarts left"))
        with batched_delivery():
            for stream in streams:
                stream.fail(error)
        for future in jobs:
            if not future.done():
                future.set_exception(error)
        if restart:
            self.restarts += 1
            try:
                self._attach(_Child(self._ctx, self._args, self.name, self._undeliverable))
            except Exception:
                log.exception("engine process %s could not be restarted", self.name)
                with self._lock:
                    self.dead = True
                    self._changed.notify_all()


__all__ = ["ProcessEngine"]
