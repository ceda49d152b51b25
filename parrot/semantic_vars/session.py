"""Sessions: the scope in which a program submits calls to a runtime."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from types import TracebackType
from typing import Callable

from .errors import NoActiveSessionError, SessionClosedError
from .runtime import Call, Runtime, new_id
from .variable import SemanticVariable

_current: contextvars.ContextVar["Session | None"] = contextvars.ContextVar("parrot_session", default=None)

RuntimeFactory = Callable[[], Runtime]
_default_factory: RuntimeFactory | None = None
_default_runtime: Runtime | None = None
_default_lock = threading.Lock()


def set_default_runtime_factory(factory: RuntimeFactory) -> None:
    """Choose what ``Session()`` without a runtime connects to."""
    global _default_factory, _default_runtime
    with _default_lock:
        _default_factory, _default_runtime = factory, None


def default_runtime() -> Runtime:
    """The process-wide default runtime, created on first use."""
    global _default_runtime
    with _default_lock:
        if _default_runtime is None:
            if _default_factory is None:
                raise RuntimeError("no default runtime is configured; pass Session(runtime=...)")
            _default_runtime = _default_factory()
        return _default_runtime


def current_session() -> "Session":
    """The innermost open session of this context."""
    session = _current.get()
    if session is None:
        raise NoActiveSessionError("semantic functions are called inside `with P.Session():` (or `async with`)")
    return session


class Session:
    """A program's scope: calls made inside ``with Session() as s:`` go to ``s``.

    Calls are buffered and sent to the runtime together, in one message, the
    first time the program reads or sets a variable, calls :meth:`flush`, or
    leaves the block; so the runtime sees the DAG whole before it schedules
    any of it (and a remote runtime gets one request, not one per call).

    Leaving the block normally waits until every submitted call has finished
    (like ``concurrent.futures.Executor``); leaving it with an exception
    cancels what has not run yet.

    With a remote runtime (``runtime.opens_with_first_submit``) entering the
    block sends nothing: the session opens with its first batch of calls, in
    the same request, so ``id`` is None until then (declaring a free
    variable opens it at once).
    """

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime or default_runtime()
        self.id: str | None = None
        self.closed = False
        self._tokens: list[contextvars.Token["Session | None"]] = []
        self._buffer: list[Call] = []
        self._buffer_lock = threading.Lock()
        # Batches handed to the runtime by aflush() and not yet acknowledged:
        # a concurrent aget() must not read a variable before its call exists.
        self._submitting: list[asyncio.Future[None]] = []
        # The open that carries the first batch (lazy sessions), once begun.
        self._opening: asyncio.Future[None] | None = None
        self._open_lock = threading.Lock()

    @property
    def _lazy(self) -> bool:
        """Whether this session opens with its first batch of calls."""
        return self.runtime.opens_with_first_submit and not self.runtime.request_level

    # -- lifecycle ---------------------------------------------------------
    def open(self) -> "Session":
        self._refuse_if_closed()
        if self.id is None:
            self.id = self.runtime.portal.call(self.runtime.open_session())
        return self

    async def aopen(self) -> "Session":
        self._refuse_if_closed()
        if self.id is None:
            self.id = await self.runtime.portal.call_async(self.runtime.open_session())
        return self

    def close(self, *, cancel: bool = False) -> None:
        """Close the session, waiting for its calls unless ``cancel``."""
        if self.closed or (self.id is None and not self._lazy):
            return
        try:
            if cancel and self.id is None:
                self._take_buffer()  # never sent: nothing to run or cancel
            self.flush()  # a lazy session's buffered calls open it
        finally:
            self.closed = True
            if self.id is not None:
                self.runtime.portal.call(self.runtime.close_session(self.id, cancel=cancel))

    async def aclose(self, *, cancel: bool = False) -> None:
        if self.closed or (self.id is None and not self._lazy):
            return
        try:
            if cancel and self.id is None:
                self._take_buffer()
            await self.aflush()  # also waits for an open already under way
        finally:
            self.closed = True
            if self.id is not None:
                await self.runtime.portal.call_async(self.runtime.close_session(self.id, cancel=cancel))

    def _refuse_if_closed(self) -> None:
        if self.closed:
            raise SessionClosedError("this session was closed; open a new one")

    def __enter__(self) -> "Session":
        if self._lazy:
            self._refuse_if_closed()
        else:
            self.open()
        self._tokens.append(_current.set(self))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        _current.reset(self._tokens.pop())
        self.close(cancel=exc_type is not None)

    async def __aenter__(self) -> "Session":
        if self._lazy:
            self._refuse_if_closed()
        else:
            await self.aopen()
        self._tokens.append(_current.set(self))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _current.reset(self._tokens.pop())
        await self.aclose(cancel=exc_type is not None)

    # -- program API -------------------------------------------------------
    def _require_open(self) -> str:
        self._refuse_if_closed()
        if self.id is None and self._opening is not None and not self._opening.done():
            # Opening here would make a second session beside the one on its way.
            raise RuntimeError("the session is opening with its first calls; await one of their values first")
        if self.id is None:
            self.open()
        assert self.id is not None
        return self.id

    def variable(self, name: str = "var", value: str | None = None) -> SemanticVariable:
        """A free variable: pass it to calls now, :meth:`SemanticVariable.set` it later."""
        if value is not None and not isinstance(value, str):
            raise TypeError(f"a variable's value must be a str, got {type(value).__name__}")
        session_id = self._require_open()
        var_id = new_id("var")
        self.runtime.portal.call(self.runtime.create_variable(session_id, var_id, name, value))
        var = SemanticVariable(self, var_id, name)
        var._value = value
        return var

    def submit(self, call: Call) -> None:
        """Queue a call for the runtime (used by :class:`SemanticFunction`)."""
        if self._lazy:
            self._refuse_if_closed()  # the first flush opens the session
        else:
            self._require_open()
        with self._buffer_lock:
            self._buffer.append(call)
        if self.runtime.request_level:
            self.flush()

    def _take_buffer(self) -> list[Call]:
        with self._buffer_lock:
            calls, self._buffer = self._buffer, []
        return calls

    def flush(self) -> None:
        """Send the buffered calls to the runtime now (a lazy session opens
        with them, in one request)."""
        calls = self._take_buffer()
        if not calls:
            return
        if self.id is None:
            with self._open_lock:
                if self.id is None:
                    self.id = self.runtime.portal.call(self.runtime.open_session_with_calls(calls))
                    return
        self.runtime.portal.call(self.runtime.submit_calls(self.id, calls))

    async def aflush(self) -> None:
        """:meth:`flush` for async programs; returns once every batch sent
        so far (also by concurrent readers of this session) has arrived."""
        calls = self._take_buffer()
        if calls:
            if self.id is None and self._opening is None:
                self._opening = asyncio.ensure_future(self._open_with(calls))
                self._submitting.append(self._opening)
            else:
                self._submitting.append(asyncio.ensure_future(self._submit_after_open(calls)))
        self._submitting = [f for f in self._submitting if not f.done()]
        if self._submitting:
            # shield: a reader cancelled meanwhile must not cancel the batch.
            await asyncio.shield(asyncio.gather(*self._submitting))

    async def _open_with(self, calls: list[Call]) -> None:
        self.id = await self.runtime.portal.call_async(self.runtime.open_session_with_calls(calls))

    async def _submit_after_open(self, calls: list[Call]) -> None:
        if self._opening is not None:
            await asyncio.shield(self._opening)  # its failure is this batch's too
        assert self.id is not None
        await self.runtime.portal.call_async(self.runtime.submit_calls(self.id, calls))

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, runtime={type(self.runtime).__name__})"
