"""Semantic Variables: handles to values that live in the runtime."""

from __future__ import annotations

from typing import Any, Callable, Protocol

from .errors import OutputParseError, ParrotTimeoutError
from .runtime import Perf, Runtime, check_perf


class VariableOwner(Protocol):
    """What a variable needs of its session (a
    :class:`~parrot.semantic_vars.session.Session`, which imports this module):
    its id and runtime, and to send the calls it still holds before a read."""

    id: str
    runtime: Runtime

    def flush(self) -> None: ...

    async def aflush(self) -> None: ...


class SemanticVariable:
    """A named value in a session's dataflow.

    It is either *free* (set by the program with :meth:`set`, or a constant)
    or the output of a call. Reading it (:meth:`get` / :meth:`aget`) is the
    only place a program waits, and the ``perf`` annotation tells the
    scheduler what the program wants: ``"latency"`` (this value soon) or
    ``"throughput"`` (many such values, in aggregate).
    """

    __slots__ = ("id", "name", "session", "producer", "_value", "_parse")

    def __init__(
        self,
        session: VariableOwner,
        var_id: str,
        name: str,
        producer: str | None = None,
        parse: Callable[[str], Any] | None = None,
    ) -> None:
        self.session = session
        self.id = var_id
        self.name = name
        self.producer = producer
        self._value: str | None = None
        self._parse = parse  # how get_parsed() reads the text (the output's schema)

    def get(self, perf: Perf = "latency", timeout: float | None = None) -> str:
        """Block until the value exists and return it.

        With ``timeout`` (seconds), raises :class:`ParrotTimeoutError` (a
        :class:`TimeoutError`) if the value is not there by then; the call
        keeps running, and a later ``get`` waits again.
        """
        if self._value is None:
            check_perf(perf)
            self.session.flush()
            coro = self.session.runtime.get_variable(self.session.id, self.id, perf)
            try:
                self._value = self.session.runtime.portal.call(coro, timeout=timeout)
            except ParrotTimeoutError:
                raise ParrotTimeoutError(
                    f"variable {self.name!r} ({self.id}) had no value after {timeout:g} s; "
                    "its call may still be queued or running (get it again to wait longer)"
                ) from None
        return self._value

    async def aget(self, perf: Perf = "latency") -> str:
        """Await the value (from any event loop)."""
        if self._value is None:
            check_perf(perf)
            await self.session.aflush()
            coro = self.session.runtime.get_variable(self.session.id, self.id, perf)
            self._value = await self.session.runtime.portal.call_async(coro)
        return self._value

    def get_parsed(self, perf: Perf = "latency", timeout: float | None = None) -> Any:
        """The value read by its output's schema: an instance of the
        ``P.Output(schema=Model)`` pydantic model, a dict/list for a JSON
        schema, else the text. :class:`OutputParseError` if it does not parse
        (e.g. generation stopped at ``max_tokens`` mid-object)."""
        return self._parsed(self.get(perf, timeout))

    async def aget_parsed(self, perf: Perf = "latency") -> Any:
        """:meth:`get_parsed` from an event loop."""
        return self._parsed(await self.aget(perf))

    def _parsed(self, text: str) -> Any:
        if self._parse is None:
            return text
        try:
            return self._parse(text)
        except ValueError as exc:  # json's and pydantic's errors are ValueErrors
            raise OutputParseError(self.name, f"the output does not parse under its schema: {exc}") from exc

    def set(self, value: str) -> None:
        """Give a free variable its value; calls waiting on it start."""
        if not isinstance(value, str):
            raise TypeError(f"a variable's value must be a str, got {type(value).__name__}")
        self.session.flush()
        self.session.runtime.portal.call(self.session.runtime.set_variable(self.session.id, self.id, value))
        self._value = value

    def __repr__(self) -> str:
        state = "set" if self._value is not None else "pending"
        return f"SemanticVariable({self.name!r}, id={self.id!r}, {state})"
