"""The prefix store: KV snapshots of shared prompt prefixes, by key.

When several calls share the same leading prompt text, the dataflow layer
tags their requests with a :class:`~parrot.backends.engine.PrefixHint`
``(key, num_tokens)``. The engine prefills that prefix once, snapshots the
KV of its first ``num_tokens`` positions into this store, and every later
request of the group starts from a copy of the snapshot instead of
prefilling it again.

This is the first, contiguous-KV cut: an entry owns its own
:class:`~parrot.backends.kv_cache.SequenceKV` (capacity exactly
``num_tokens``), and a hit *copies* it into the new sequence. The paged
pool shares blocks instead; the operations stay the same.

Operations (in the spirit of SGLang's ``radix_cache.py``, on flat keys):

* :meth:`PrefixCache.lookup` -- the entry for a key *if* its stored token
  tuple equals the asked one (a mismatch is a miss, never a hit); counts
  hits and misses and refreshes the entry's LRU position.
* :meth:`PrefixCache.insert` -- store a snapshot under a key, evicting
  least recently used unpinned entries to stay within ``max_bytes``.
* :meth:`PrefixCache.acquire` / :meth:`PrefixCache.release` -- reference
  counts: the number of live requests of the engine using an entry. An
  entry with references is *pinned* and never evicted.
* :meth:`PrefixCache.evict` -- drop unpinned entries, least recently used
  first, until the store fits a byte target.

The budget is enforced over unpinned entries only: pinned entries may hold
the store above ``max_bytes`` for as long as they are pinned; the store
shrinks back as soon as their last reference is released.

The store has its own lock, so an engine's worker thread may mutate it
while other threads read :meth:`keys` (for ``EngineCapacity``).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

from .kv_cache import SequenceKV


@dataclass(eq=False)
class PrefixEntry:
    """One stored prefix: its tokens, the KV of exactly those positions,
    and the number of live requests using it (``refs``)."""

    key: str
    tokens: tuple[int, ...]
    kv: SequenceKV
    nbytes: int
    refs: int = 0
    stored: bool = field(default=True, repr=False)  # False once evicted or replaced

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def pinned(self) -> bool:
        return self.refs > 0


class PrefixCache:
    """Key -> :class:`PrefixEntry` with reference counts and LRU eviction
    under a byte budget.

    Counters (totals since creation): ``hits`` and ``misses`` of
    :meth:`lookup`, ``tokens_saved`` (the entry lengths served by hits,
    i.e. prefill tokens not computed thanks to a hit) and ``evictions``.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        # Least recently used first; a lookup hit or an insert moves an entry to the end.
        self._entries: collections.OrderedDict[str, PrefixEntry] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0
        self.evictions = 0

    # -- reading ------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        """Bytes held by every stored snapshot, pinned or not."""
        with self._lock:
            return self._bytes

    def keys(self) -> frozenset[str]:
        """The keys stored now."""
        with self._lock:
            return frozenset(self._entries)

    def get(self, key: str) -> PrefixEntry | None:
        """The entry stored under ``key`` whatever its tokens; no counting, no LRU touch."""
        with self._lock:
            return self._entries.get(key)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def refcount(self, key: str) -> int:
        """References held on the entry stored under ``key`` (0 when absent)."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.refs if entry is not None else 0

    # -- operations ---------------------------------------------------------
    def lookup(self, key: str, tokens: tuple[int, ...]) -> PrefixEntry | None:
        """The entry under ``key`` if its tokens equal ``tokens``, else None.

        A hit moves the entry to the most recently used end and counts a hit
        and its length in ``tokens_saved``; anything else (absent key, or the
        same key with other tokens) counts a miss. Does not pin: call
        :meth:`acquire` for that.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.tokens != tuple(tokens):
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            self.tokens_saved += entry.num_tokens
            return entry

    def can_insert(self, key: str, tokens: tuple[int, ...]) -> bool:
        """Whether :meth:`insert` of ``key`` would be accepted now: the key is
        absent, holds the same tokens, or holds other tokens but is unpinned."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is None or entry.tokens == tuple(tokens) or not entry.pinned

    def insert(
        self, key: str, tokens: tuple[int, ...], kv: SequenceKV, *, acquire: bool = False
    ) -> PrefixEntry | None:
        """Store ``kv`` (a snapshot of exactly ``len(tokens)`` positions) under ``key``.

        * Same key and tokens already stored: the existing entry is kept
          (and refreshed); ``kv`` is dropped.
        * Same key with other tokens: replaced if unpinned, else the insert is
          refused (None) -- a pinned entry is never pushed out.
        * Then least recently used unpinned entries are evicted until the store
          fits ``max_bytes``. With ``acquire=True`` the new entry is pinned
          before that, so it survives even if it alone exceeds the budget;
          otherwise it may be evicted at once (None is returned then).
        """
        tokens = tuple(tokens)
        if kv.length != len(tokens):
            raise ValueError(f"snapshot holds {kv.length} positions for {len(tokens)} tokens")
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if entry.tokens == tokens:
                    self._entries.move_to_end(key)
                    if acquire:
                        entry.refs += 1
                    return entry
                if entry.pinned:
                    return None
                self._remove(entry)
                self.evictions += 1
            entry = PrefixEntry(key, tokens, kv, kv.nbytes(), refs=1 if acquire else 0)
            self._entries[key] = entry
            self._bytes += entry.nbytes
            self._evict_to(self.max_bytes)
            return entry if entry.stored else None

    def acquire(self, entry: PrefixEntry) -> None:
        """Pin ``entry`` for one more live request."""
        with self._lock:
            entry.refs += 1

    def release(self, entry: PrefixEntry) -> None:
        """Drop one reference; an entry that becomes unpinned may be evicted
        at once if the store is above its budget."""
        with self._lock:
            if entry.refs <= 0:
                raise ValueError(f"release of prefix {entry.key!r} without a reference")
            entry.refs -= 1
            if entry.refs == 0 and entry.stored:
                self._evict_to(self.max_bytes)

    def evict(self, target_bytes: int | None = None) -> int:
        """Evict unpinned entries, least recently used first, until the store
        holds at most ``target_bytes`` (default ``max_bytes``; 0 empties every
        unpinned entry). Returns how many were evicted."""
        with self._lock:
            return self._evict_to(self.max_bytes if target_bytes is None else target_bytes)

    # -- internals (lock held) ----------------------------------------------
    def _evict_to(self, target_bytes: int) -> int:
        evicted = 0
        if self._bytes <= target_bytes:
            return 0
        for entry in list(self._entries.values()):  # least recently used first
            if self._bytes <= target_bytes:
                break
            if entry.pinned:
                continue
            self._remove(entry)
            self.evictions += 1
            evicted += 1
        return evicted

    def _remove(self, entry: PrefixEntry) -> None:
        del self._entries[entry.key]
        self._bytes -= entry.nbytes
        entry.stored = False


__all__ = ["PrefixEntry", "PrefixCache"]
