"""The engine's queue of requests waiting for a place in the running batch.

Requests leave it by objective rank (latency-critical first, then requests
with no objective, then throughput work; see
:data:`parrot.backends.engine.OBJECTIVE_RANK`). Within a rank, the
namespaces (tenants) waiting take turns, round robin, and each namespace's
requests leave in the order they arrived: a tenant that queued 10,000
requests delays another tenant's request by at most one admission per
tenant waiting, never by its whole backlog. A preempted request goes back to
the head of its namespace, and its namespace takes the next turn, so it
resumes before anything that arrived after it. Pure Python: no tensors, no
locks (the engine holds its own).
"""

from __future__ import annotations

import collections
from typing import Callable, Generic, Iterator, Protocol, TypeVar


class Queued(Protocol):
    @property
    def rank(self) -> int: ...

    @property
    def queued_tokens(self) -> int: ...

    @property
    def namespace(self) -> str: ...


T = TypeVar("T", bound=Queued)
Entry = tuple[int, T]


class AdmissionQueue(Generic[T]):
    """Per objective rank, one FIFO per namespace taking turns; :meth:`pop`
    takes the head of the namespace whose turn it is in the best rank."""

    def __init__(self) -> None:
        # rank -> namespace -> its requests; a rank's dict is in turn order
        # (the first namespace goes next). Each entry keeps the token count
        # it was queued with, so the total stays exact whatever happens to
        # the item meanwhile.
        self._ranks: dict[int, dict[str, collections.deque[Entry]]] = {}
        self._size = 0
        self.tokens = 0  # context tokens of every queued request (its KV still to compute)

    def push(self, item: T) -> None:
        self._deque(item).append(self._entry(item))

    def push_front(self, item: T) -> None:
        """Back to the head of its namespace, which takes the next turn (a preempted request)."""
        queue = self._deque(item)
        queue.appendleft(self._entry(item))
        turns = self._ranks[item.rank]
        self._ranks[item.rank] = {item.namespace: queue, **{n: q for n, q in turns.items() if n != item.namespace}}

    def pop(self) -> T:
        """The head of the best non-empty rank's namespace whose turn it is."""
        for rank in sorted(self._ranks):
            turns = self._ranks[rank]
            if turns:
                namespace = next(iter(turns))
                queue = turns.pop(namespace)
                entry = queue.popleft()
                if queue:
                    turns[namespace] = queue  # to the back of the turn order
                return self._leave(entry)
        raise IndexError("pop from an empty admission queue")

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out (and return) every queued item for which ``predicate`` holds."""
        removed: list[T] = []
        for turns in self._ranks.values():
            for namespace in list(turns):
                keep: collections.deque[Entry] = collections.deque()
                for entry in turns[namespace]:
                    if predicate(entry[1]):
                        removed.append(self._leave(entry))
                    else:
                        keep.append(entry)
                if keep:
                    turns[namespace] = keep
                else:
                    del turns[namespace]
        return removed

    def _deque(self, item: T) -> collections.deque[Entry]:
        turns = self._ranks.setdefault(item.rank, {})
        queue = turns.get(item.namespace)
        if queue is None:
            queue = turns[item.namespace] = collections.deque()  # a newcomer's turn comes last
        return queue

    def _entry(self, item: T) -> Entry:
        tokens = item.queued_tokens
        self._size += 1
        self.tokens += tokens
        return tokens, item

    def _leave(self, entry: Entry) -> T:
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
            # Round robin over the namespaces in turn order, as pop takes
            # them; lazily, so the head costs O(1) however many wait.
            queues = self._ranks[rank].values()
            depth, more = 0, True
            while more:
                more = False
                for queue in queues:
                    if depth < len(queue):
                        yield queue[depth][1]
                        more = True
                depth += 1
