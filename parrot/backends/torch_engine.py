"""The torch engine: our own Llama-family forward with continuous batching
over a paged KV cache.

A worker thread runs steps. Each step builds one flat batch from every
running sequence: one token for each sequence that is decoding, then chunks
of pending prompt tokens (chunked prefill) up to a token budget, so a long
prompt never stalls the decoders. New requests join between steps.

Memory. The KV cache is a pool of fixed-size blocks sized once at start
(:class:`~parrot.backends.kv_cache.PagedKVPool`); each sequence holds a
block table (:class:`~parrot.backends.block_manager.BlockTable`). When a
step needs blocks and none is free, the engine first drops unpinned hinted
prefixes, then *preempts* the most recently admitted running request: its
blocks are released and it goes back to the head of the queue; when it runs
again its whole context (prompt and tokens generated so far) is recomputed,
so greedy outputs are the same as if it had never stopped.

Prefix cache (:class:`~parrot.backends.prefix_cache.PrefixCache`). Every
full block is published under a digest of its tokens chained with those
before it and the request's namespace; a new request starts from the longest
run of published blocks of its prompt and shares them by reference.

Prefix hints. A request may carry a :class:`PrefixHint` ``(key, num_tokens)``:
its first ``num_tokens`` context tokens are shared by a group of requests.
On admission a hinted request either

* finds the key stored with the same tokens (a hit): its block table starts
  with the entry's blocks (the last one possibly partial, copied on its first
  write) and those tokens are not prefilled;
* finds the key being computed right now by another admitted request with
  the same tokens: it is *parked* (admitted but not fed) until that request's
  KV covers the prefix, which is then stored, and the parked requests
  resolve again (now hits); or
* finds neither (a miss): it prefills normally (reusing whatever full blocks
  are published) and, if the store can take the key, becomes the one
  computing it for the others.

So a group prefills its prefix once even when all of it arrives in one step.
Admitted requests that use a stored entry pin it until they finish, fail,
are preempted or are cancelled.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parrot.kernels import SparseAttentionConfig
from parrot.semantic_vars import EngineError, new_id

from .block_manager import BlockManager, BlockTable
from .checkpoint import load_model
from .cuda_graphs import DecodeGraphs
from .engine import Engine, EngineCapacity, GenerationRequest, Mailbox, RequestStream, batched_delivery
from .kv_cache import PagedBatch, PagedKVPool, PrefillSlice, attention_scale
from .model import LlamaFamilyModel
from .prefix_cache import PrefixCache, PrefixEntry
from .sampler import make_generator, sample
from .sequence import Sequence
from .tokenizer import Tokenizer, read_generation_eos

log = logging.getLogger(__name__)

_CPU_KV_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TorchEngineConfig:
    """Sizes of the batching loop and of the KV pool."""

    max_running: int = 32
    max_step_tokens: int = 2048  # flat-batch budget per step; bounds prefill chunks
    prefix_cache: bool = True  # False: no block reuse, prefix hints ignored
    block_size: int = 16  # token positions per KV block
    # KV pool size: ``kv_cache_bytes`` when set; else ``kv_cache_fraction`` of
    # the free GPU memory after the weights are loaded, or 256 MiB on CPU.
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.8
    # Longest context a request may reach; None: the model's max positions.
    # The pool must hold one request of this length.
    max_model_len: int | None = None
    # Replay decode-only steps of up to this many sequences as CUDA graphs
    # (CUDA only; 0 turns graphs off).
    cuda_graph_max_batch: int = 64
    # MInference-style sparse prefill: a pattern config (a JSON file written
    # by ``parrot.kernels.pattern_search``, or the loaded config). A prompt
    # of at least its ``min_length`` tokens with nothing cached is prefilled
    # in one chunk with sparse attention; shorter ones stay dense.
    sparse_prefill: str | Path | SparseAttentionConfig | None = None

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_step_tokens < self.max_running:
            raise ValueError("max_step_tokens must be at least max_running (one decode token each)")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.cuda_graph_max_batch < 0:
            raise ValueError(f"cuda_graph_max_batch must be >= 0, got {self.cuda_graph_max_batch}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass
class EngineCounters:
    """Totals since start, for benchmarks and metrics."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    preemptions: int = 0  # requests sent back to the queue to free blocks
    prefix_hits: int = 0  # hinted requests that started from a stored prefix
    prefix_misses: int = 0  # hinted requests that prefilled their prefix themselves
    prefix_tokens_saved: int = 0  # prefill tokens not computed: positions taken from the cache (hints and blocks)


class _Running:
    """A sequence plus the engine-side state that sampling needs."""

    def __init__(
        self,
        seq: Sequence,
        stream: RequestStream,
        device: torch.device,
        prefix: tuple[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.seq = seq
        self.stream = stream
        self.device = device
        self.namespace = seq.request.namespace
        self.generators: dict[int, torch.Generator | None] = {}
        # Prefix-hint state (worker thread only): the hint's key and tokens,
        # the store entry this request holds a reference on, whether it waits
        # for another request computing the prefix (parked), whether it is
        # the one computing it, and whether it has left the engine.
        self.prefix = prefix
        self.prefix_entry: PrefixEntry | None = None
        self.parked = False
        self.computes = False
        self.gone = False
        self.preempted = 0  # times sent back to the queue

    @property
    def table(self) -> BlockTable:
        return self.seq.kv  # type: ignore[return-value]

    def generator(self) -> torch.Generator | None:
        index = self.seq.gen_index
        if index not in self.generators:
            self.generators[index] = make_generator(self.seq.current_gen.sampling, self.device)
        return self.generators[index]


class TorchEngine(Engine):
    """Serves one Llama-family model from a local folder on CPU or one GPU."""

    def __init__(
        self,
        model: LlamaFamilyModel,
        tokenizer: Tokenizer,
        *,
        name: str | None = None,
        config: TorchEngineConfig | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or new_id("engine")
        self.config = config or TorchEngineConfig()
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.counters = EngineCounters()
        c = model.config
        self._max_model_len = self.config.max_model_len or c.max_position_embeddings
        if self.max_model_len > c.max_position_embeddings:
            raise EngineError(
                f"max_model_len={self.max_model_len} exceeds the model's {c.max_position_embeddings} positions"
            )
        bs = self.config.block_size
        num_blocks = self._pool_blocks()
        self._blocks = BlockManager(num_blocks, bs)
        self.pool = PagedKVPool(
            c.num_layers, num_blocks, bs, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=self.device
        )
        self._scale = attention_scale(c.head_dim)
        self._sparse = self.config.sparse_prefill
        if self._sparse is not None and not isinstance(self._sparse, SparseAttentionConfig):
            self._sparse = SparseAttentionConfig.load(self._sparse)  # PatternConfigError names a bad field
        if self._sparse is not None:
            heads = {len(layer) for layer in self._sparse.layers}
            if len(self._sparse.layers) != c.num_layers or heads != {c.num_heads}:
                raise EngineError(
                    f"sparse_prefill config has {len(self._sparse.layers)} layers x {sorted(heads)} heads;"
                    f" the model has {c.num_layers} x {c.num_heads}"
                )
        self._graphs: DecodeGraphs | None = None
        self.reserved_blocks = 0  # blocks the engine holds for itself (the graphs' scratch block)
        if self.device.type == "cuda" and self.config.cuda_graph_max_batch:
            scratch = self._blocks.allocate()
            assert scratch is not None
            self.reserved_blocks = 1
            self._graphs = DecodeGraphs(model, self.pool, scratch, self._scale, self.config.cuda_graph_max_batch)
        self._prefix: PrefixCache | None = PrefixCache(self._blocks) if self.config.prefix_cache else None
        self._computing: dict[str, _Running] = {}  # key -> the request prefilling that prefix
        self._parked: dict[str, list[_Running]] = {}  # key -> requests waiting for it
        self._waiting: collections.deque[_Running] = collections.deque()
        self._running: list[_Running] = []
        self._cancelled: set[str] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"parrot-{self.name}", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        name: str | None = None,
        config: TorchEngineConfig | None = None,
    ) -> "TorchEngine":
        """Load a local HF folder (config.json, *.safetensors, tokenizer files).

        Defaults: CUDA in bfloat16 when available, else CPU in float32.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(path, dtype=dtype, device=device)
        tokenizer = Tokenizer(path, eos_token_ids=[*model.config.eos_token_ids, *read_generation_eos(path)])
        return cls(model, tokenizer, name=name, config=config)

    def _pool_blocks(self) -> int:
        """Blocks the KV budget buys; an error when one longest request would not fit."""
        c, cfg = self.model.config, self.config
        per_block = PagedKVPool.bytes_per_block(c.num_layers, cfg.block_size, c.num_kv_heads, c.head_dim, self.dtype)
        if cfg.kv_cache_bytes is not None:
            budget, source = cfg.kv_cache_bytes, f"kv_cache_bytes={cfg.kv_cache_bytes}"
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * cfg.kv_cache_fraction)
            source = f"kv_cache_fraction={cfg.kv_cache_fraction} of {free / 2**30:.1f} GiB free"
        else:
            budget, source = _CPU_KV_CACHE_BYTES, "the CPU default of 256 MiB"
        num_blocks = budget // per_block
        # One block more than the longest context: a copy-on-write needs a
        # spare; one more for the CUDA graphs' padding rows.
        needed = -(-self.max_model_len // cfg.block_size) + 1 + (self.device.type == "cuda" and cfg.cuda_graph_max_batch > 0)
        if num_blocks < needed:
            raise EngineError(
                f"the KV pool ({source}) holds {num_blocks} blocks of {cfg.block_size} tokens "
                f"({per_block} bytes each) but one request of max_model_len={self.max_model_len} tokens "
                f"needs {needed}: raise kv_cache_bytes / kv_cache_fraction or lower max_model_len"
            )
        return num_blocks

    # -- Engine API -----------------------------------------------------
    def submit(self, request: GenerationRequest, *, mailbox: Mailbox | None = None) -> RequestStream:
        """Queue ``request``. Its events go to the calling loop, or to
        ``mailbox`` when given (an engine process's outbox: no loop needed)."""
        stream = RequestStream(request, self.cancel, mailbox=mailbox)
        seq = Sequence(request, BlockTable(self._blocks), self.tokenizer, stream.push, self.max_model_len)  # validates the program now
        if len(seq.tokens) > self.max_model_len:
            raise EngineError(f"prompt of {len(seq.tokens)} tokens exceeds the model's {self.max_model_len} positions")
        prefix = None
        hint = request.prefix_hint
        if hint is not None and self._prefix is not None and not seq.finished:
            # seq.tokens holds the context up to the first Gen here.
            if not 0 < hint.num_tokens <= len(seq.tokens):
                raise EngineError(
                    f"prefix hint {hint.key!r} covers {hint.num_tokens} tokens but the context "
                    f"before the first generation has {len(seq.tokens)}"
                )
            prefix = (hint.key, tuple(seq.tokens[: hint.num_tokens]))
        with self._cond:
            if self._closed:
                raise EngineError(f"engine {self.name} is closed")
            running = _Running(seq, stream, self.device, prefix)
            seq.before_finish = lambda: self._release(running)
            self._waiting.append(running)
            self._cond.notify()
        return stream

    def capacity(self) -> EngineCapacity:
        cached = self._prefix.keys() if self._prefix is not None else frozenset()
        blocks = self._blocks
        with self._cond:
            # A sequence that has sent its last event no longer counts, even if
            # the worker has not swept it out of the batch yet.
            running = sum(not r.seq.finished for r in self._running)
            return EngineCapacity(
                self.config.max_running, running, len(self._waiting),
                free_kv_tokens=blocks.num_free * blocks.block_size, cached_prefixes=cached,
                free_blocks=blocks.num_free, total_blocks=blocks.num_blocks, cached_blocks=blocks.num_cached,
            )

    @property
    def max_model_len(self) -> int:
        """The longest context a request may reach (``config.max_model_len``, else the model's positions)."""
        return self._max_model_len

    @property
    def model_id(self) -> str:
        """The model folder's name."""
        return self.tokenizer.path.name

    @property
    def runs_model_jobs(self) -> bool:
        return True

    def run_model_job(self, fn, *args):  # type: ignore[no-untyped-def]
        """Runs ``fn(self, *args)`` in the calling thread (the weights are here)."""
        return fn(self, *args)

    def stats(self) -> dict[str, int]:
        """Counters and pool figures in one flat dict (for metrics and benchmarks)."""
        cap = self.capacity()
        out = dict(vars(self.counters))
        out.update(running=cap.running, waiting=cap.waiting, free_blocks=cap.free_blocks or 0,
                   total_blocks=cap.total_blocks or 0, cached_blocks=cap.cached_blocks or 0,
                   cached_prefixes=len(cap.cached_prefixes))
        if self._prefix is not None:
            out.update(block_hits=self._prefix.block_hits, block_misses=self._prefix.block_misses,
                       prefix_evictions=self._prefix.evictions)
        return out

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefix cache (None when ``prefix_cache`` is off)."""
        return self._prefix

    @property
    def block_manager(self) -> BlockManager:
        """Reference counts and free lists of the KV pool's blocks."""
        return self._blocks

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            # Give the KV pool and the graphs' memory back now, not at garbage collection.
            self._graphs = None
            self.pool.keys = self.pool.values = torch.empty(0, device=self.device)

    # -- worker ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed:
                    leaving = [*self._running, *self._waiting]
                    for r in leaving:
                        r.gone = True
                        r.stream.fail(EngineError(f"engine {self.name} was closed"))
                    for r in leaving:
                        self._forget(r)
                    return
                self._drop_cancelled()
                while self._waiting and len(self._running) < self.config.max_running:
                    admitted = self._waiting.popleft()
                    if admitted.seq.stats.started_at is None:
                        admitted.seq.stats.started_at = time.monotonic()
                    self._running.append(admitted)
                    self._start(admitted)
            if not self._running:
                continue
            batch = list(self._running)
            try:
                self._step(batch)
            except Exception as exc:  # a broken step fails its requests, not the engine
                log.exception("engine step failed")
                error = exc if isinstance(exc, EngineError) else EngineError(f"engine step failed: {exc!r}")
                for r in batch:
                    if not r.seq.finished:
                        r.seq.finished = True
                        self._release(r)
                        r.stream.fail(error)
            with self._cond:
                done = [r for r in self._running if r.seq.finished]
                self._running = [r for r in self._running if not r.seq.finished]
                for r in done:
                    r.gone = True
                for r in done:
                    self._forget(r)

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        keep = lambda r: r.seq.request.request_id not in self._cancelled  # noqa: E731
        dropped = [r for r in [*self._running, *self._waiting] if not keep(r)]
        self._running = [r for r in self._running if keep(r)]
        self._waiting = collections.deque(r for r in self._waiting if keep(r))
        self.counters.requests_cancelled += len(dropped)
        self._cancelled.clear()
        for r in dropped:
            r.gone = True
        for r in dropped:
            self._forget(r)

    # -- prefix reuse (worker thread) ----------------------------------------
    def _start(self, r: _Running) -> None:
        """A request was admitted: find what of its context is cached."""
        if self._prefix is None:
            return
        if r.prefix is not None and not r.preempted:
            self._resolve_prefix(r)
        if not r.parked and r.table.length == 0:
            self._match_blocks(r)

    def _match_blocks(self, r: _Running) -> None:
        """Start from the longest run of published full blocks of the context
        (always leaving one token to feed: sampling needs its logits)."""
        assert self._prefix is not None
        tokens = r.seq.tokens
        blocks, digests = self._prefix.match(r.namespace, tokens, len(tokens) - 1)
        if blocks:
            saved = r.seq.attach_cached_prefix(blocks, len(blocks) * self._blocks.block_size, digests)
            self.counters.prefix_tokens_saved += saved

    def _resolve_prefix(self, r: _Running) -> None:
        """Decide how an admitted hinted request gets its prefix: park it behind
        the request computing the same prefix, take it from the store (hit), or
        prefill it itself (miss), computing it for the others when it can."""
        assert self._prefix is not None and r.prefix is not None
        key, tokens = r.prefix
        computing = self._computing.get(key)
        if computing is not None and computing.prefix is not None and computing.prefix[1] == tokens:
            r.parked = True
            self._parked.setdefault(key, []).append(r)
            return
        entry = self._prefix.lookup(key, tokens)
        if entry is not None:
            saved = r.seq.attach_cached_prefix(entry.blocks, entry.num_tokens)
            self._prefix.acquire(entry)
            r.prefix_entry = entry
            self.counters.prefix_hits += 1
            self.counters.prefix_tokens_saved += saved
            return
        self.counters.prefix_misses += 1
        if computing is None and self._prefix.can_insert(key, tokens):
            r.computes = True
            self._computing[key] = r

    def _wake_parked(self, key: str) -> None:
        """Resolve again the requests parked on ``key`` (its computer is done or gone)."""
        for w in self._parked.pop(key, []):
            w.parked = False
            if not w.gone:
                self._start(w)

    def _publish_prefixes(self, batch: list[_Running]) -> None:
        """Store the prefix of every computing request whose KV now covers it,
        then let the requests parked on it take it."""
        assert self._prefix is not None
        for r in batch:
            if not r.computes or r.prefix is None:
                continue
            key, tokens = r.prefix
            if r.table.length < len(tokens):
                continue
            blocks = r.table.blocks[: -(-len(tokens) // self._blocks.block_size)]
            r.prefix_entry = self._prefix.insert(key, tokens, blocks, acquire=True)
            r.computes = False
            del self._computing[key]
            self._wake_parked(key)

    def _release(self, r: _Running) -> None:
        """A request just finished or failed (worker thread, inside a step):
        free what it holds and count it now, before its last event is sent, so
        whoever sees that event sees an engine that no longer holds it."""
        r.gone = True
        self.counters.requests_finished += 1
        self._forget(r)

    def _forget(self, r: _Running) -> None:
        """Free the blocks and drop the prefix references of a request leaving
        the engine (finished, failed, cancelled, preempted or closed); hand its
        computing role to its waiters."""
        r.table.release()
        if r.prefix_entry is not None and self._prefix is not None:
            self._prefix.release(r.prefix_entry)
            r.prefix_entry = None
        if r.prefix is None:
            return
        key = r.prefix[0]
        if r.parked:
            waiters = self._parked.get(key, [])
            if r in waiters:
                waiters.remove(r)
            if not waiters:
                self._parked.pop(key, None)
            r.parked = False
        if r.computes:
            r.computes = False
            if self._computing.get(key) is r:
                del self._computing[key]
            self._wake_parked(key)

    # -- memory (worker thread) -----------------------------------------------
    def _fit(self, table: BlockTable, want: int) -> int:
        """How many of ``want`` new positions the pool can give ``table`` now,
        after dropping unpinned hinted prefixes if that helps."""
        while table.blocks_needed(want) > self._blocks.num_free:
            if self._prefix is None or not self._prefix.evict_one():
                break
        return max(0, min(want, table.room(self._blocks.num_free)))

    def _preempt(self, victim: _Running) -> None:
        """Send ``victim`` back to the queue head, freeing its blocks; it
        recomputes its context when it runs again."""
        with self._cond:
            self._running.remove(victim)
            self._forget(victim)
            victim.preempted += 1
            self._waiting.appendleft(victim)
        self.counters.preemptions += 1

    def _newest_holder(self, skip: set[int]) -> _Running | None:
        """The most recently admitted running request holding blocks, not in ``skip`` (ids)."""
        for r in reversed(self._running):
            if id(r) not in skip and r.table.blocks and not r.seq.finished:
                return r
        return None

    def _plan(self, batch: list[_Running]) -> list[tuple[_Running, int, bool]]:
        """Choose ``(request, new tokens, decoding)`` for this step and make
        their blocks writable, preempting when decoders need room."""
        budget = self.config.max_step_tokens
        plan: list[tuple[_Running, int, bool]] = []
        copies: list[tuple[int, int]] = []
        # Decoders first (one token each, oldest first), then prefill chunks.
        order = sorted(batch, key=lambda r: not r.seq.is_decoding)
        planned: set[int] = set()
        for r in order:
            if r.parked or r.seq.finished or r not in self._running:
                continue
            table = r.table
            pending = len(r.seq.tokens) - table.length
            take = min(pending, budget)
            if self._sparse is not None and table.length == 0 and pending >= self._sparse.min_length:
                take = pending  # sparse prefill needs the whole prompt in one chunk
            if take == 0:
                continue
            if table.length + take > self.max_model_len:
                r.seq.finished = True
                self._release(r)  # before the error reaches the caller, as for a finish
                r.stream.fail(EngineError(f"context reached max_model_len={self.max_model_len} tokens"))
                continue
            decoding = r.seq.is_decoding
            fit = self._fit(table, take)
            while decoding and fit < take:
                # A decoder needs its block: preempt the newest request not
                # already in this step, or this one when it is the newest.
                victim = self._newest_holder(planned | {id(r)})
                self._preempt(victim if victim is not None else r)
                if victim is None:
                    break
                fit = self._fit(table, take)
            if fit == 0 or (decoding and fit < take):
                continue
            step_copies = table.prepare_append(fit)
            assert step_copies is not None
            copies.extend(step_copies)
            budget -= fit
            planned.add(id(r))
            plan.append((r, fit, decoding))
        if not plan:
            # Prefill chunks hold the pool and none can grow: free the newest.
            victim = self._newest_holder(set())
            if victim is not None:
                self._preempt(victim)
        self.pool.copy_blocks(copies)
        return plan

    @torch.inference_mode()
    def _step(self, batch: list[_Running]) -> None:
        plan = self._plan(batch)
        if not plan:
            return
        bs = self._blocks.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        decode_tables: list[list[int]] = []
        prefill_meta: list[tuple[int, int, int, int]] = []  # (start, n, past, offset in the flat block list)
        prefill_blocks: list[int] = []
        sample_rows: list[tuple[_Running, int]] = []
        for r, take, decoding in plan:
            table, seq = r.table, r.seq
            past = table.length
            start = len(ids)
            ids.extend(seq.tokens[past : past + take])
            positions.extend(range(past, past + take))
            # Slots block by block, not position by position (long prefills).
            pos = past
            while pos < past + take:
                block, offset = divmod(pos, bs)
                end = min(past + take, (block + 1) * bs)
                base = table.blocks[block] * bs
                slots.extend(range(base + offset, base + offset + end - pos))
                pos = end
            if decoding:
                context_lens.append(past + 1)
                decode_tables.append(table.blocks)
                self.counters.decode_tokens += 1
            else:
                prefill_meta.append((start, take, past, len(prefill_blocks)))
                prefill_blocks.extend(table.blocks)
                seq.stats.prefill_tokens += take
                self.counters.prefill_tokens += take
            if past + take == len(seq.tokens) and seq.generating:
                sample_rows.append((r, len(ids) - 1))
        num_decode = len(decode_tables)
        if not prefill_meta and self._graphs is not None and self._graphs.accepts(num_decode):
            # Decode only: replay the captured graph (every row samples).
            logits = self._graphs.run(ids, positions, slots, context_lens, decode_tables)
            for r, take, _ in plan:
                r.table.length += take
            self._after_forward(plan, batch)
            self._sample(sample_rows, logits)
            return
        max_blocks = max((len(t) for t in decode_tables), default=0)
        flat_tables = [b for t in decode_tables for b in (*t, *([0] * (max_blocks - len(t))))]
        rows = [row for _, row in sample_rows]
        # Every index goes to the device in one copy.
        parts = [ids, positions, slots, context_lens, flat_tables, prefill_blocks, rows]
        host = torch.tensor([x for part in parts for x in part], dtype=torch.long)
        dev = host.to(self.device, non_blocking=True)
        n = len(ids)
        input_ids, pos_t, slot_t = dev[:n], dev[n : 2 * n], dev[2 * n : 3 * n]
        o = 3 * n
        ctx_t = dev[o : o + num_decode].to(torch.int32)
        o += num_decode
        tables_t = dev[o : o + len(flat_tables)].view(num_decode, max_blocks).to(torch.int32)
        o += len(flat_tables)
        pblocks_t = dev[o : o + len(prefill_blocks)]
        o += len(prefill_blocks)
        rows_t = dev[o : o + len(rows)]
        prefills = [
            PrefillSlice(start, take, past, pblocks_t[off : off + -(-(past + take) // bs)])
            for start, take, past, off in prefill_meta
        ]
        attn = PagedBatch(
            self.pool, [(r.table, take) for r, take, _ in plan], slot_t, num_decode, tables_t, ctx_t,
            prefills, self._scale, self._sparse,
        )
        hidden = self.model(input_ids, pos_t, attn)
        attn.commit()
        self._after_forward(plan, batch)
        if sample_rows:
            self._sample(sample_rows, self.model.compute_logits(hidden.index_select(0, rows_t)))

    def _after_forward(self, plan: list[tuple[_Running, int, bool]], batch: list[_Running]) -> None:
        """Count the step and publish what it made cacheable."""
        self.counters.steps += 1
        if self._prefix is not None:
            for r, _, _ in plan:
                self._prefix.publish(r.namespace, r.seq.tokens, r.table.blocks, r.table.digests, r.table.length)
            if self._computing:
                self._publish_prefixes(batch)

    def _sample(self, sample_rows: list[tuple[_Running, int]], logits: torch.Tensor) -> None:
        configs = [r.seq.current_gen.sampling for r, _ in sample_rows]
        tokens = sample(logits, configs, [r.generator() for r, _ in sample_rows])
        with batched_delivery():
            for (r, _), token in zip(sample_rows, tokens):
                r.seq.accept(token)
