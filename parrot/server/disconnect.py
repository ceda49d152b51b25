"""Stop a request's work when its client goes away.

uvicorn does not cancel a handler whose client disconnected: a long-poll or
a non-streaming generation would run on for no one, and keep a SIGTERM
waiting for it. :func:`unless_disconnected` races the work against the
client's ``http.disconnect`` message and cancels the work if that comes first.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


async def _disconnected(request: Request) -> None:
    """Return once the client has disconnected (the body was read already,
    so every message left is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, but cancel it and raise :class:`ClientDisconnected`
    if the client disconnects first (the work's own cleanup runs)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        try:
            await task  # let its finally blocks (closing sessions, cancelling calls) run
        except asyncio.CancelledError:
            pass
        raise ClientDisconnected()
    return task.result()
