"""A background event loop that the blocking SDK calls run coroutines on.

Runtimes are asynchronous; user programs are often not. Every runtime runs
its coroutines on one process-wide loop thread, and the blocking API
(``var.get()``, calling a semantic function) hands coroutines to it and waits.
``await var.aget()`` from the user's own loop wraps the same future, so both
APIs share one code path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine, TypeVar

from .errors import ParrotTimeoutError

T = TypeVar("T")


class Portal:
    """An asyncio loop running in a daemon thread."""

    _shared: "Portal | None" = None
    _shared_lock = threading.Lock()

    def __init__(self, name: str = "parrot-runtime") -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(started.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()
        started.wait()

    @classmethod
    def shared(cls) -> "Portal":
        """The process-wide portal, started on first use."""
        with cls._shared_lock:
            if cls._shared is None or not cls._shared.thread.is_alive():
                cls._shared = cls()
            return cls._shared

    def submit(self, coro: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
        """Schedule ``coro`` on the portal loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the portal loop and block until it returns; after
        ``timeout`` seconds, cancel it and raise :class:`ParrotTimeoutError`."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                "a blocking Parrot call was made from inside the runtime's own event loop; use the async API (aget)"
            )
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done():  # the coroutine's own TimeoutError
                raise
            future.cancel()  # the caller gave up: stop the coroutine too
            raise ParrotTimeoutError(f"no result after {timeout:g} s") from None

    async def call_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` from any event loop (including the portal's own)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return await coro
        return await asyncio.wrap_future(self.submit(coro))
