"""The engine's queue of requests waiting for a place in the running batch.

Requests leave it by objective rank (latency-critical first, then requests
with no objective, then throughput work; see
:data:`parrot.backends.engine.OBJECTIVE_RANK`) and, within a rank, in the
order they arrived. A preempted request goes back to the head of its rank,
so it resumes before anything that arrived after it. Pure Python: no
tensors, no locks (the engine holds its own).
"""

from __future__ import annotations

import collections
from typing import Callable, Generic, Iterator, Protocol, TypeVar


class Queued(Protocol):
    @property
    def rank(self) -> int: ...

    @property
    def queued_tokens(self) -> int: ...


T = TypeVar("T", bound=Queued)


class AdmissionQueue(Generic[T]):
    """FIFO queues, one per objective rank; :meth:`pop` takes the best rank's head."""

    def __init__(self) -> None:
        # Each entry keeps the token count it was queued with, so the total
        # stays exact whatever happens to the item meanwhile.
        self._ranks: dict[int, collections.deque[tuple[int, T]]] = {}
        self._size = 0
        self.tokens = 0  # context tokens of every queued request (its KV still to compute)

    def push(self, item: T) -> None:
        self._deque(item.rank).append(self._entry(item))

    def push_front(self, item: T) -> None:
        """Back to the head of its rank (a preempted request)."""
        self._deque(item.rank).appendleft(self._entry(item))

    def pop(self) -> T:
        """The head of the best non-empty rank."""
        for rank in sorted(self._ranks):
            queue = self._ranks[rank]
            if queue:
                return self._leave(queue.popleft())
        raise IndexError("pop from an empty admission queue")

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out (and return) every queued item for which ``predicate`` holds."""
        removed: list[T] = []
        for rank, queue in self._ranks.items():
            keep: collections.deque[tuple[int, T]] = collections.deque()
            for entry in queue:
                if predicate(entry[1]):
                    removed.append(self._leave(entry))
                else:
                    keep.append(entry)
            self._ranks[rank] = keep
        return removed

    def _deque(self, rank: int) -> collections.deque[tuple[int, T]]:
        queue = self._ranks.get(rank)
        if queue is None:
            queue = self._ranks[rank] = collections.deque()
        return queue

    def _entry(self, item: T) -> tuple[int, T]:
        tokens = item.queued_tokens
        self._size += 1
        self.tokens += tokens
        return tokens, item

    def _leave(self, entry: tuple[int, T]) -> T:
        self._size -= 1
        self.tokens -= entry[0]
        return entry[1]

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[T]:
        """Every queued item, in the order :meth:`pop` would return them."""
        for rank in sorted(self._ranks):
            for _, item in self._ranks[rank]:
                yield item
