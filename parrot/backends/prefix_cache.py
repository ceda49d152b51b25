"""The prefix cache: KV blocks of prompt prefixes, found again by their tokens.

Two levels over the paged pool (:mod:`parrot.backends.block_manager`):

* **Token blocks** (automatic, every request). Each full block of a
  sequence is published under a digest chained from the tenant namespace,
  the digest of the block before it and its own tokens (``blake2b``), so a
  digest names the whole prefix up to that block and two tenants never see
  each other's blocks. A new request walks its prompt block by block and
  starts from the longest run of published blocks (:meth:`PrefixCache.match`);
  it shares them by reference, without copying. Blocks nobody holds stay
  findable until the pool needs them, least recently freed first.
* **Prefix hints** (Parrot's dataflow). A :class:`~parrot.backends.engine.PrefixHint`
  ``(key, num_tokens)`` names a prefix that a group of calls shares. Its
  entry holds the prefix's blocks -- the last one may be partially filled;
  a sequence that appends after it copies that block on its first write --
  and a count of the requests in the engine that use it: while that count
  is above zero the entry is *pinned*. Unpinned entries are kept until the
  pool runs short, then dropped least recently used first, before any
  running request is preempted.

Counters: ``hits``/``misses`` and ``tokens_saved`` of hint lookups,
``block_hits``/``block_misses`` of token-block lookups, ``evictions`` of
hint entries.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from array import array
from dataclasses import dataclass, field
from typing import Sequence

from .block_manager import BlockManager


def block_digest(parent: bytes | None, namespace: str, tokens: Sequence[int]) -> bytes:
    """Digest of one full block of ``tokens`` after the prefix ``parent`` names."""
    h = hashlib.blake2b(digest_size=16)
    if parent is None:
        h.update(b"ns\0" + namespace.encode() + b"\0")
    else:
        h.update(parent)
    h.update(array("q", tokens).tobytes())
    return h.digest()


@dataclass(eq=False)
class PrefixEntry:
    """One hinted prefix: its tokens, the blocks holding their KV (each with
    one reference owned by the entry), and the live requests using it."""

    key: str
    tokens: tuple[int, ...]
    blocks: list[int]
    refs: int = 0
    stored: bool = field(default=True, repr=False)  # False once evicted or replaced

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def pinned(self) -> bool:
        return self.refs > 0


class PrefixCache:
    """Token-block digests plus hinted prefix entries over one :class:`BlockManager`.

    The engine's worker thread mutates it; other threads may read
    :meth:`keys` and the counters (a lock guards the entry table).
    """

    def __init__(self, blocks: BlockManager) -> None:
        self.blocks = blocks
        self.block_size = blocks.block_size
        # Least recently used first; a hit or an insert moves an entry to the end.
        self._entries: collections.OrderedDict[str, PrefixEntry] = collections.OrderedDict()
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0
        self.evictions = 0
        self.block_hits = 0
        self.block_misses = 0

    # -- token blocks -------------------------------------------------------
    def match(
        self, namespace: str, tokens: Sequence[int], limit: int
    ) -> tuple[list[int], list[bytes]]:
        """The longest run of published full blocks that starts ``tokens``,
        covering at most ``limit`` positions: ``(blocks, digests)``. Counts
        one block hit per block found and one miss when the walk stops early."""
        found, digests, missed = self._walk(namespace, tokens, limit)
        self.block_misses += 1 if missed else 0
        self.block_hits += len(found)
        return found, digests

    def reaches_past(self, namespace: str, tokens: Sequence[int], positions: int) -> bool:
        """Whether published full blocks that start ``tokens`` cover more than
        its first ``positions`` (walks one block past them; counts nothing)."""
        end = (positions // self.block_size + 1) * self.block_size
        if end > len(tokens):
            return False
        found, _, _ = self._walk(namespace, tokens, end)
        return len(found) * self.block_size == end

    def _walk(self, namespace: str, tokens: Sequence[int], limit: int) -> tuple[list[int], list[bytes], bool]:
        """Published full blocks that start ``tokens`` (at most ``limit``
        positions), their digests, and whether the walk stopped at a miss."""
        bs = self.block_size
        found: list[int] = []
        digests: list[bytes] = []
        parent: bytes | None = None
        for i in range(min(limit, len(tokens)) // bs):
            digest = block_digest(parent, namespace, tokens[i * bs : (i + 1) * bs])
            block = self.blocks.find(digest)
            if block is None:
                return found, digests, True
            found.append(block)
            digests.append(digest)
            parent = digest
        return found, digests, False

    def publish(self, namespace: str, tokens: Sequence[int], blocks: list[int], digests: list[bytes], length: int) -> None:
        """Publish every full block among the first ``length`` positions that
        is not yet (``digests`` is the sequence's list, extended in place)."""
        bs = self.block_size
        for i in range(len(digests), length // bs):
            parent = digests[i - 1] if i else None
            digest = block_digest(parent, namespace, tokens[i * bs : (i + 1) * bs])
            self.blocks.register(blocks[i], digest)
            digests.append(digest)

    # -- hinted prefixes ----------------------------------------------------
    def keys(self) -> frozenset[str]:
        """The hint keys stored now."""
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
        """Live requests using the entry stored under ``key`` (0 when absent)."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.refs if entry is not None else 0

    def lookup(self, key: str, tokens: tuple[int, ...]) -> PrefixEntry | None:
        """The entry under ``key`` if its tokens equal ``tokens`` (a hit, which
        refreshes its LRU place), else None (a miss). Does not pin."""
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
        """Whether :meth:`insert` would be accepted: the key is absent, holds
        the same tokens, or holds other tokens but is unpinned."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is None or entry.tokens == tuple(tokens) or not entry.pinned

    def insert(self, key: str, tokens: tuple[int, ...], blocks: list[int], *, acquire: bool = False) -> PrefixEntry | None:
        """Store the prefix ``tokens`` held by ``blocks`` under ``key`` (the
        entry takes a reference on each block).

        Same key and tokens already stored: that entry is kept. Same key with
        other tokens: replaced if unpinned, else refused (None). With
        ``acquire`` the returned entry counts one more live request.
        """
        tokens = tuple(tokens)
        if len(blocks) != -(-len(tokens) // self.block_size):
            raise ValueError(f"{len(blocks)} blocks for a prefix of {len(tokens)} tokens")
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if entry.tokens == tokens:
                    self._entries.move_to_end(key)
                    entry.refs += acquire
                    return entry
                if entry.pinned:
                    return None
                self._drop(entry)
                self.evictions += 1
            for block in blocks:
                self.blocks.incref(block)
            entry = PrefixEntry(key, tokens, list(blocks), refs=int(acquire))
            self._entries[key] = entry
            return entry

    def acquire(self, entry: PrefixEntry) -> None:
        """Pin ``entry`` for one more live request."""
        with self._lock:
            entry.refs += 1

    def release(self, entry: PrefixEntry) -> None:
        """Drop one live request's pin."""
        with self._lock:
            if entry.refs <= 0:
                raise ValueError(f"release of prefix {entry.key!r} without a reference")
            entry.refs -= 1

    def evict_one(self) -> bool:
        """Drop the least recently used unpinned entry; False when none is."""
        with self._lock:
            for entry in self._entries.values():
                if not entry.pinned:
                    self._drop(entry)
                    self.evictions += 1
                    return True
            return False

    def evict(self, keep: int = 0) -> int:
        """Drop unpinned entries, least recently used first, until at most
        ``keep`` entries remain; with ``keep == 0`` also forget every free
        cached block, so nothing unpinned can be reused. Returns the number
        of entries dropped."""
        dropped = 0
        with self._lock:
            while len(self._entries) > keep and self.evict_one():
                dropped += 1
            if keep == 0:
                self.blocks.drop_cached_free()
        return dropped

    def _drop(self, entry: PrefixEntry) -> None:
        del self._entries[entry.key]
        entry.stored = False
        for block in entry.blocks:
            self.blocks.decref(block)


__all__ = ["PrefixCache", "PrefixEntry", "block_digest"]
