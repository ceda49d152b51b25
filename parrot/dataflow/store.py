"""Where the runtime's state is kept: sessions, variables, calls.

The runtime's graph is the working copy; a :class:`StateStore` is the record
it can be rebuilt from after a restart. Writes are JSON-able dicts grouped by
kind ("session", "variable", "call", and the service's "tenant", "key",
"function"). Two operations must be atomic: :meth:`StateStore.write` (a batch
of records lands whole or not at all) and :meth:`StateStore.set_value` (a
variable's value is set once; a second set is refused, never overwrites).

:class:`MemoryStore` is the default; the Redis store lives in
``parrot.server.redis_store``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable

from parrot.semantic_vars import ParrotError

Record = dict[str, Any]
Write = tuple[str, str, Record]  # (kind, id, record)

KINDS = ("tenant", "key", "function", "session", "variable", "call")


class StoreUnavailableError(ParrotError, ConnectionError):
    """The state store cannot be reached (or refused the connection); the
    service answers 503 and is not ready until it is back.

    ``url`` is the store's address with any password masked."""

    def __init__(self, url: str, message: str) -> None:
        self.url = url
        super().__init__(message)


class StateStore(ABC):
    """Durable record of the runtime and service state."""

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailableError` unless the store answers.
        The default (an in-process store) always answers."""

    @abstractmethod
    async def write(self, records: Iterable[Write]) -> None:
        """Insert or replace records, all or none."""

    @abstractmethod
    async def set_value(self, var_id: str, value: str) -> bool:
        """Set a variable's value if it has none; False if it already had one."""

    @abstractmethod
    async def load(self, kind: str) -> list[Record]:
        """Every record of ``kind``, in first-insertion order."""

    @abstractmethod
    async def delete(self, keys: Iterable[tuple[str, str]]) -> None:
        """Remove the records ``(kind, id)``, all or none (missing ones are skipped)."""

    async def close(self) -> None:
        """Release connections. The default does nothing."""


class MemoryStore(StateStore):
    """Keeps records in dicts: nothing survives the process, as a default should."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Record]] = {kind: {} for kind in KINDS}

    async def write(self, records: Iterable[Write]) -> None:
        batch = list(records)
        for kind, _, _ in batch:
            if kind not in self._data:
                raise ValueError(f"unknown record kind {kind!r}")
        for kind, record_id, record in batch:
            self._data[kind][record_id] = dict(record)

    async def set_value(self, var_id: str, value: str) -> bool:
        record = self._data["variable"].get(var_id)
        if record is None or record.get("value") is not None:
            return False
        record["value"] = value
        return True

    async def load(self, kind: str) -> list[Record]:
        return [dict(r) for r in self._data[kind].values()]

    async def delete(self, keys: Iterable[tuple[str, str]]) -> None:
        batch = list(keys)
        for kind, _ in batch:
            if kind not in self._data:
                raise ValueError(f"unknown record kind {kind!r}")
        for kind, record_id in batch:
            self._data[kind].pop(record_id, None)
