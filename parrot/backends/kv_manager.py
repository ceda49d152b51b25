"""The KV manager: which blocks of the pool each request holds, and what of
its context the prefix cache already has.

It owns the block accounting (:class:`~parrot.backends.block_manager.BlockManager`),
the prefix cache (:class:`~parrot.backends.prefix_cache.PrefixCache`: token
blocks per namespace plus entries for declared prefix hints) and the
coordination of hinted requests. The engine scheduler sees it only through
a few calls: what a request gets on admission (:meth:`admit`), how many new
positions the pool can grant it now (:meth:`grant`), making them writable
(:meth:`prepare`), and freeing what a leaving request holds (:meth:`release`).
No tensors: block copies are returned for the model runner to perform.

Prefix hints. A request may carry a hint ``(key, tokens)``: its first
context tokens are shared by a group of requests. On admission a hinted
request either

* finds the key stored with the same tokens (a hit): its block table starts
  with the entry's blocks (the last one possibly partial, copied on its
  first write) and those tokens are not prefilled -- unless published full
  blocks cover more of its context (an earlier request with the same
  continuation), then it starts from those and holds the entry only as a pin;
* finds the key being computed right now by another admitted request with
  the same tokens: it is *parked* (admitted but not fed) until that
  request's KV covers the prefix, which is then stored, and the parked
  requests resolve again (now hits); or
* finds neither (a miss): it prefills normally (reusing whatever full blocks
  are published) and, if the store can take the key, becomes the one
  computing it for the others.

So a group prefills its prefix once even when all of it arrives in one step.
Admitted requests that use a stored entry pin it until they leave.

In-flight dedup (``dedup``), for every request, hinted or not: an admitted
request whose next uncached full block is being computed right now by
another admitted request of the same namespace waits (parked, nothing
attached) until that block is published, then starts from the published
blocks and waits again for the next one while the other request still
computes it. So N requests that arrive together with one uncached prefix
compute it once, as a request-level server with an automatic prefix cache
would want. A request waits only when the other computes at least
``dedup_min_tokens`` of its next positions (or all its full blocks left):
waiting costs a step, which a short shared head (a template's first line)
does not repay.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from .block_manager import BlockManager, BlockTable
from .engine_request import EngineRequest
from .prefix_cache import PrefixCache, block_digest


class PrefixCounters(Protocol):
    prefix_hits: int
    prefix_misses: int
    prefix_tokens_saved: int


class KVManager:
    """Blocks, the prefix cache and hinted-prefix coordination of one engine."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_cache: bool, counters: PrefixCounters,
                 dedup: bool = True, dedup_min_tokens: int = 256) -> None:
        self.blocks = BlockManager(num_blocks, block_size)
        self.block_size = block_size
        self.prefix: PrefixCache | None = PrefixCache(self.blocks) if prefix_cache else None
        self.counters = counters
        self.computing: dict[str, EngineRequest] = {}  # key -> the request prefilling that prefix
        self.parked: dict[str, list[EngineRequest]] = {}  # key -> requests waiting for it
        self.dedup = dedup
        self.dedup_min_blocks = max(1, -(-dedup_min_tokens // block_size))
        self.inflight: dict[bytes, EngineRequest] = {}  # digest of a full block being computed -> who computes it
        self.block_waiters: dict[bytes, list[EngineRequest]] = {}  # digest -> requests parked until it is published

    # -- what the scheduler sees ----------------------------------------------
    def new_table(self) -> BlockTable:
        return BlockTable(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take now."""
        return self.blocks.num_free

    def admit(self, r: EngineRequest) -> None:
        """A request was admitted to the batch: start it from what is cached
        (a hinted prefix, else published full blocks), or park it behind the
        request computing its hinted prefix."""
        if self.prefix is None:
            return
        if r.prefix is not None and not r.preempted:
            self._resolve_prefix(r)
        if not r.parked and r.table.length == 0:
            self._match_blocks(r)

    def grant(self, r: EngineRequest, want: int) -> int:
        """How many of ``want`` new positions the pool can give ``r`` now,
        after dropping unpinned hinted prefixes if that helps."""
        table = r.table
        if want and table.fits_in_place(want):
            return want
        while table.blocks_needed(want) > self.blocks.num_free:
            if self.prefix is None or not self.prefix.evict_one():
                break
        return max(0, min(want, table.room(self.blocks.num_free)))

    def prepare(self, r: EngineRequest, n: int) -> list[tuple[int, int]]:
        """Make ``n`` new positions of ``r`` writable (allocating, or copying
        a shared last block first); returns the block copies to perform."""
        copies = r.table.prepare_append(n)
        assert copies is not None, "prepare() after a grant() that covers it"
        return copies

    def holds_blocks(self, r: EngineRequest) -> bool:
        return bool(r.table.blocks)

    def release(self, r: EngineRequest) -> None:
        """Free the blocks and drop the prefix references of a request leaving
        the batch (finished, failed, cancelled, preempted or closed); hand its
        computing role to its waiters."""
        r.table.release()
        self._leave_inflight(r)
        if r.prefix_entry is not None and self.prefix is not None:
            self.prefix.release(r.prefix_entry)
            r.prefix_entry = None
        if r.prefix is None:
            return
        key = r.prefix[0]
        if r.parked:
            waiters = self.parked.get(key, [])
            if r in waiters:
                waiters.remove(r)
            if not waiters:
                self.parked.pop(key, None)
            r.parked = False
        if r.computes:
            r.computes = False
            if self.computing.get(key) is r:
                del self.computing[key]
            self._wake_parked(key)

    def after_forward(self, fed: Sequence[EngineRequest], batch: Sequence[EngineRequest]) -> None:
        """Publish what the step made cacheable: the full blocks of every
        request fed, and the hinted prefixes now covered (waking their waiters)."""
        if self.prefix is None:
            return
        for r in fed:
            before = len(r.table.digests)
            self.prefix.publish(r.namespace, r.seq.tokens, r.table.blocks, r.table.digests, r.table.length)
            if self.inflight:
                for digest in r.table.digests[before:]:
                    if self.inflight.get(digest) is r:
                        del self.inflight[digest]
                    self._wake_block_waiters(digest)
        if self.computing:
            self._publish_prefixes(batch)

    def cached_keys(self) -> frozenset[str]:
        return self.prefix.keys() if self.prefix is not None else frozenset()

    # -- prefix reuse -------------------------------------------------------------
    def _match_blocks(self, r: EngineRequest) -> None:
        """Start from the longest run of published full blocks of the context
        (the sequence feeds its last position again when all of it is cached),
        or wait for the next block while another request computes it."""
        assert self.prefix is not None
        tokens, bs = r.seq.tokens, self.block_size
        blocks, digests = self.prefix.match(r.namespace, tokens, len(tokens))
        chain: list[bytes] = []  # digests of the full blocks after the cached run
        if self.dedup:
            parent = digests[-1] if digests else None
            for i in range(len(blocks), len(tokens) // bs):
                parent = block_digest(parent, r.namespace, tokens[i * bs : (i + 1) * bs])
                chain.append(parent)
            owner = self.inflight.get(chain[0]) if chain else None
            shared = 0  # the next blocks of ours that the owner computes
            while shared < len(chain) and shared < self.dedup_min_blocks and self.inflight.get(chain[shared]) is owner:
                shared += 1
            if owner is not None and owner is not r and not owner.gone and shared >= min(self.dedup_min_blocks, len(chain)):
                r.parked, r.waits_for = True, chain[0]
                self.block_waiters.setdefault(chain[0], []).append(r)
                return
        if blocks:
            saved = r.seq.attach_cached_prefix(blocks, len(blocks) * bs, digests)
            self.counters.prefix_tokens_saved += saved
        for digest in chain:  # what this request computes, others may wait for
            if self.inflight.setdefault(digest, r) is r:
                r.inflight.append(digest)

    def _wake_block_waiters(self, digest: bytes) -> None:
        """The block ``digest`` names was published, or its computer left:
        the requests waiting for it look again."""
        for w in self.block_waiters.pop(digest, []):
            w.parked, w.waits_for = False, None
            if not w.gone and w.table.length == 0:
                self._match_blocks(w)

    def _leave_inflight(self, r: EngineRequest) -> None:
        """``r`` leaves the batch: it no longer waits, and whoever waits for a
        block it was computing looks again (and may compute it itself)."""
        if r.waits_for is not None:
            waiters = self.block_waiters.get(r.waits_for, [])
            if r in waiters:
                waiters.remove(r)
            if not waiters:
                self.block_waiters.pop(r.waits_for, None)
            r.waits_for = None
            r.parked = False
        owned, r.inflight = r.inflight, []
        for digest in owned:
            if self.inflight.get(digest) is r:
                del self.inflight[digest]
                self._wake_block_waiters(digest)

    def _resolve_prefix(self, r: EngineRequest) -> None:
        """Park ``r`` behind the request computing the same prefix, take it
        from the store (hit), or prefill it (miss), computing it for the others
        when the store can take it."""
        assert self.prefix is not None and r.prefix is not None
        key, tokens = r.prefix
        computing = self.computing.get(key)
        if computing is not None and computing.prefix is not None and computing.prefix[1] == tokens:
            r.parked = True
            self.parked.setdefault(key, []).append(r)
            return
        entry = self.prefix.lookup(key, tokens)
        if entry is not None:
            self.prefix.acquire(entry)  # pinned while r runs, for the group's other members
            r.prefix_entry = entry
            self.counters.prefix_hits += 1
            if self.prefix.reaches_past(r.namespace, r.seq.tokens, entry.num_tokens):
                return  # published full blocks reach past the hinted prefix: admit() starts r from them
            saved = r.seq.attach_cached_prefix(entry.blocks, entry.num_tokens)
            self.counters.prefix_tokens_saved += saved
            return
        self.counters.prefix_misses += 1
        if computing is None and self.prefix.can_insert(key, tokens):
            r.computes = True
            self.computing[key] = r

    def _wake_parked(self, key: str) -> None:
        """Resolve again the requests parked on ``key`` (its computer is done or gone)."""
        for w in self.parked.pop(key, []):
            w.parked = False
            if not w.gone:
                self.admit(w)

    def _publish_prefixes(self, batch: Sequence[EngineRequest]) -> None:
        """Store the prefix of every computing request whose KV now covers it,
        then let the requests parked on it take it."""
        assert self.prefix is not None
        for r in batch:
            if not r.computes or r.prefix is None:
                continue
            key, tokens = r.prefix
            if r.table.length < len(tokens):
                continue
            blocks = r.table.blocks[: -(-len(tokens) // self.block_size)]
            r.prefix_entry = self.prefix.insert(key, tokens, blocks, acquire=True)
            r.computes = False
            del self.computing[key]
            self._wake_parked(key)
