"""The engine's queue of requests waiting for a place in the running batch.

Requests leave it by objective rank (latency-critical first, then requests
with no objective, then throughput work; see
:data:`parrot.backends.engine.OBJECTIVE_RANK`). Within a rank, the
namespaces (tenants) waiting take turns, round robin, and each namespace's
requests leave in the order they arrived: a tenant that queued 10,000
requests delays another tenant's request by at most one admission per
tenant waiting, never by its whole backlog. A preempted request goes back to
the head of its namespace, and its namespace takes the next turn, so it
resumes before anything that arrived after it. Aging bounds how long rank
order may hold work back: a request that has waited ``max_wait_s`` leaves
before better-ranked ones (the longest waiting first), so a steady stream of
latency-critical requests cannot starve throughput work. Pure Python: no
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

    @property
    def namespace(self) -> str: ...


T = TypeVar("T", bound=Queued)
Entry = tuple[int, float, T]  # (tokens when queued, when queued, the item)


class AdmissionQueue(Generic[T]):
    """Per objective rank, one FIFO per namespace taking turns; :meth:`pop`
    takes the head of the namespace whose turn it is in the best rank."""

    def __init__(self, max_wait_s: float | None = None) -> None:
        self.max_wait_s = max_wait_s  # aging bound (None: rank order always)
        # rank -> namespace -> its requests; a rank's dict is in turn order
        # (the first namespace goes next). Each entry keeps the token count
        # it was queued with, so the total stays exact whatever happens to
        # the item meanwhile.
        self._ranks: dict[int, dict[str, collections.deque[Entry]]] = {}
        self._size = 0
        self.tokens = 0  # context tokens of every queued request (its KV still to compute)

    def push(self, item: T, now: float = 0.0) -> None:
        self._deque(item).append(self._entry(item, now))

    def push_front(self, item: T, now: float = 0.0) -> None:
        """Back to the head of its namespace, which takes the next turn (a preempted request)."""
        queue = self._deque(item)
        queue.appendleft(self._entry(item, now))
        turns = self._ranks[item.rank]
        self._ranks[item.rank] = {item.namespace: queue, **{n: q for n, q in turns.items() if n != item.namespace}}

    def head(self, now: float = 0.0) -> T:
        """What :meth:`pop` would return at ``now``."""
        rank, namespace = self._next(now)
        return self._ranks[rank][namespace][0][2]

    def pop(self, now: float = 0.0) -> T:
        """The head of the best non-empty rank's namespace whose turn it is,
        unless a head has waited ``max_wait_s`` by ``now`` (then the longest waiting)."""
        rank, namespace = self._next(now)
        turns = self._ranks[rank]
        queue = turns.pop(namespace)
        entry = queue.popleft()
        if queue:
            turns[namespace] = queue  # to the back of the turn order
        return self._leave(entry)

    def _next(self, now: float) -> tuple[int, str]:
        ranks = [rank for rank in sorted(self._ranks) if self._ranks[rank]]
        if not ranks:
            raise IndexError("pop from an empty admission queue")
        if self.max_wait_s is not None and len(ranks) > 1:
            # Heads are each namespace's oldest; the longest waiting past the bound goes first.
            overdue = min(((queue[0][1], rank, ns) for rank in ranks[1:] for ns, queue in self._ranks[rank].items()),
                          default=None)
            if overdue is not None and now - overdue[0] >= self.max_wait_s:
                return overdue[1], overdue[2]
        return ranks[0], next(iter(self._ranks[ranks[0]]))

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out (and return) every queued item for which ``predicate`` holds."""
        removed: list[T] = []
        for turns in self._ranks.values():
            for namespace in list(turns):
                keep: collections.deque[Entry] = collections.deque()
                for entry in turns[namespace]:
                    if predicate(entry[2]):
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

    def _entry(self, item: T, now: float) -> Entry:
        tokens = item.queued_tokens
        self._size += 1
        self.tokens += tokens
        return tokens, now, item

    def _leave(self, entry: Entry) -> T:
        self._size -= 1
        self.tokens -= entry[0]
        return entry[2]

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[T]:
        """Every queued item, in the order :meth:`pop` would return them
        (before aging: see :meth:`head` for the next one at a given time)."""
        for rank in sorted(self._ranks):
            # Round robin over the namespaces in turn order, as pop takes
            # them; lazily, so the head costs O(1) however many wait.
            queues = self._ranks[rank].values()
            depth, more = 0, True
            while more:
                more = False
                for queue in queues:
                    if depth < len(queue):
                        yield queue[depth][2]
                        more = True
                depth += 1
