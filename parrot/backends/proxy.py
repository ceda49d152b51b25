"""The base of engines that stand in for an engine elsewhere: in another
process (:class:`~parrot.backends.process_engine.ProcessEngine`), in a Ray
actor (:class:`~parrot.backends.ray_engine.RayEngine`) or behind an
OpenAI-compatible server (:class:`~parrot.backends.remote_engine.RemoteEngine`).

What they share: a health flag the scheduler reads (:meth:`healthy`), and,
for proxies that pump each request's events in an asyncio task on the
submitting loop (Ray, remote), those tasks keyed by request id, so that a
cancel from any thread cancels the right task on its own loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

from .engine import Engine


class ProxyEngine(Engine):
    """An :class:`Engine` whose work happens somewhere else."""

    def __init__(self, *, healthy: bool = True) -> None:
        self._healthy = healthy
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def healthy(self) -> bool:
        return self._healthy

    def _spawn(self, request_id: str, pump: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``pump`` (the request's event pump) as a task on the running
        loop; :meth:`cancel` with ``request_id`` cancels it."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        task = loop.create_task(pump, name=f"{self.name}:{request_id}")
        self._tasks[request_id] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._tasks.get(request_id) is done:
                del self._tasks[request_id]

        task.add_done_callback(forget)
        return task

    def cancel(self, request_id: str) -> None:
        """Cancel the request's task (from any thread)."""
        task, loop = self._tasks.get(request_id), self._loop
        if task is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    def _cancel_tasks(self) -> None:
        """Cancel every request's task (at close)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for task in list(self._tasks.values()):
            loop.call_soon_threadsafe(task.cancel)


__all__ = ["ProxyEngine"]
