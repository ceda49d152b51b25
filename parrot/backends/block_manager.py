"""Block accounting of the paged KV cache: who holds which block.

The KV pool (:class:`parrot.backends.kv_cache.PagedKVPool`) is cut into
fixed-size blocks of ``block_size`` token positions. This module only counts:
it never touches tensors.

* Every block has a reference count: one per :class:`BlockTable` (a
  sequence) that lists it, plus one per prefix-hint entry that pins it. A
  block listed by several tables is *shared*: its positions are read by all
  of them and written by none (the writer copies it first, see
  :meth:`BlockTable.writable_block`).
* A *full* block may carry a content digest (a hash of its tokens chained
  with the digests before it and the tenant namespace, see
  :mod:`parrot.backends.prefix_cache`). A block whose count falls to zero is
  *free*; if it has a digest it stays findable by that digest until the pool
  needs it for something else (least recently freed first), which is what
  makes finished requests' prefixes reusable.
"""

from __future__ import annotations

import collections

from parrot.semantic_vars import EngineError


class BlockManager:
    """Reference counts, free lists and content digests of ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one position, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refcount = [0] * num_blocks
        # Free blocks without content, used first (a stack: recently freed
        # blocks are still warm in caches).
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))
        # Free blocks that still hold a findable prefix; least recently freed first.
        self._cached_free: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._digest_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.reused_cached = 0  # cached blocks overwritten to make room (evictions)

    # -- reading ------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation may take now (empty or only cached)."""
        return len(self._empty) + len(self._cached_free)

    @property
    def num_cached(self) -> int:
        """Blocks that carry a digest (findable by the prefix cache), in use or not."""
        return len(self._digest_of)

    @property
    def num_cached_free(self) -> int:
        """Cached blocks that nobody holds (evictable)."""
        return len(self._cached_free)

    def digest_of(self, block: int) -> bytes | None:
        return self._digest_of.get(block)

    def find(self, digest: bytes) -> int | None:
        """The block holding the content ``digest`` names, or None."""
        return self._block_of.get(digest)

    # -- counting -----------------------------------------------------------
    def allocate(self) -> int | None:
        """A block with count 1 and no digest, or None when every block is held."""
        if self._empty:
            block = self._empty.pop()
        elif self._cached_free:
            block, _ = self._cached_free.popitem(last=False)
            self._forget_digest(block)
            self.reused_cached += 1
        else:
            return None
        self.refcount[block] = 1
        return block

    def incref(self, block: int) -> None:
        """One more holder of ``block`` (which may be free but cached)."""
        if self.refcount[block] == 0:
            if block not in self._cached_free:
                raise EngineError(f"block {block} is free and holds nothing to share")
            del self._cached_free[block]
        self.refcount[block] += 1

    def decref(self, block: int) -> None:
        """One holder fewer; at zero the block becomes free (still findable if cached)."""
        count = self.refcount[block]
        if count <= 0:
            raise EngineError(f"block {block} released more often than held")
        self.refcount[block] = count - 1
        if count == 1:
            if block in self._digest_of:
                self._cached_free[block] = None
            else:
                self._empty.append(block)

    # -- digests ------------------------------------------------------------
    def register(self, block: int, digest: bytes) -> bool:
        """Make held ``block`` findable by ``digest``; False when another block
        already holds that content (this one stays anonymous)."""
        if digest in self._block_of or block in self._digest_of:
            return self._block_of.get(digest) == block
        self._block_of[digest] = block
        self._digest_of[block] = digest
        return True

    def unregister(self, block: int) -> None:
        """Forget ``block``'s digest (its content is about to change)."""
        self._forget_digest(block)
        if self.refcount[block] == 0 and block in self._cached_free:
            del self._cached_free[block]
            self._empty.append(block)

    def drop_cached_free(self) -> int:
        """Forget every free cached block (they become empty); returns how many."""
        dropped = list(self._cached_free)
        for block in dropped:
            self.unregister(block)
        return len(dropped)

    def _forget_digest(self, block: int) -> None:
        digest = self._digest_of.pop(block, None)
        if digest is not None:
            del self._block_of[digest]

    def check(self) -> None:
        """Assert the internal invariants (tests and debugging)."""
        free = set(self._empty) | set(self._cached_free)
        assert len(free) == len(self._empty) + len(self._cached_free), "a block is free twice"
        for block in range(self.num_blocks):
            assert (self.refcount[block] == 0) == (block in free), f"block {block} count/free mismatch"
        assert set(self._cached_free) <= set(self._digest_of)
        assert all(self._block_of[d] == b for b, d in self._digest_of.items())


class BlockTable:
    """One sequence's blocks, in position order, and how many positions hold KV.

    Position ``p`` lives in slot ``p % block_size`` of block
    ``blocks[p // block_size]``. ``digests[i]`` is the chained digest of full
    block ``i`` once it was offered to the prefix cache.
    """

    def __init__(self, manager: BlockManager) -> None:
        self.manager = manager
        self.block_size = manager.block_size
        self.blocks: list[int] = []
        self.digests: list[bytes] = []
        self.length = 0

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.block_size

    def blocks_needed(self, num_new_tokens: int) -> int:
        """New blocks an append of ``num_new_tokens`` positions needs (copy-on-write included)."""
        end = self.length + num_new_tokens
        grow = max(0, -(-end // self.block_size) - len(self.blocks))
        return grow + (1 if num_new_tokens and self._first_write_copies() else 0)

    def fits_in_place(self, num_new_tokens: int) -> bool:
        """True when an append of ``num_new_tokens`` positions needs no block:
        it fits the blocks held, and the first it writes is ours alone and
        not published (the common decode step)."""
        end = self.length + num_new_tokens
        if end > len(self.blocks) * self.block_size:
            return False
        block = self.blocks[self.length // self.block_size]
        return self.manager.refcount[block] == 1 and self.manager.digest_of(block) is None

    def room(self, num_free: int) -> int:
        """Most new positions an append can take with ``num_free`` free blocks."""
        cow = 1 if self._first_write_copies() else 0
        return (len(self.blocks) + num_free - cow) * self.block_size - self.length

    def _first_write_copies(self) -> bool:
        index = self.length // self.block_size
        return index < len(self.blocks) and self.manager.refcount[self.blocks[index]] > 1

    def attach(self, blocks: list[int], length: int, digests: list[bytes] | None = None) -> None:
        """Start from shared ``blocks`` holding ``length`` positions (each gets a reference)."""
        if self.blocks or self.length:
            raise EngineError("cached blocks must be attached before the sequence runs")
        if not 0 <= length <= len(blocks) * self.block_size:
            raise EngineError(f"{length} positions do not fit {len(blocks)} blocks")
        for block in blocks:
            self.manager.incref(block)
        self.blocks = list(blocks)
        self.digests = list(digests or [])
        self.length = length

    def prepare_append(self, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Make positions ``[length, length + num_new_tokens)`` writable: copy a
        shared first block (copy-on-write), un-publish a cached one that is
        only ours, and allocate the rest. Returns the ``(src, dst)`` block
        copies the caller must perform on the KV tensors, or None (nothing
        changed) when the pool has too few free blocks."""
        if num_new_tokens and self.fits_in_place(num_new_tokens):
            del self.digests[self.length // self.block_size :]  # digests stay those of the full blocks before the write
            return []
        if self.manager.num_free < self.blocks_needed(num_new_tokens):
            return None
        copies: list[tuple[int, int]] = []
        index = self.length // self.block_size
        if num_new_tokens and index < len(self.blocks):
            block = self.blocks[index]
            if self.manager.refcount[block] > 1:
                fresh = self.manager.allocate()
                assert fresh is not None
                copies.append((block, fresh))
                self.manager.decref(block)
                self.blocks[index] = fresh
            elif self.manager.digest_of(block) is not None:
                self.manager.unregister(block)
        del self.digests[index:]
        end = self.length + num_new_tokens
        while self.capacity < end:
            fresh = self.manager.allocate()
            assert fresh is not None
            self.blocks.append(fresh)
        return copies

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on and release blocks past it."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a sequence of length {self.length} to {length}")
        self.length = length
        keep = -(-length // self.block_size)
        for block in self.blocks[keep:]:
            self.manager.decref(block)
        del self.blocks[keep:]
        del self.digests[length // self.block_size :]

    def release(self) -> None:
        """Drop every block (finished, cancelled or preempted)."""
        for block in reversed(self.blocks):  # tail blocks are the least likely to be shared
            self.manager.decref(block)
        self.blocks, self.digests, self.length = [], [], 0

    def slot(self, position: int) -> int:
        """Flat slot index of ``position`` in a ``[num_blocks * block_size]`` view of the pool."""
        return self.blocks[position // self.block_size] * self.block_size + position % self.block_size


__all__ = ["BlockManager", "BlockTable"]
