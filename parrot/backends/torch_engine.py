"""The torch engine: our own Llama-family forward with continuous batching.

A worker thread runs steps. Each step builds one flat batch from every
running sequence: one token for each sequence that is decoding, then chunks
of pending prompt tokens (chunked prefill) up to a token budget, so a long
prompt never stalls the decoders. New requests join between steps.

The KV cache here is contiguous per sequence (:class:`SequenceKV`); the
paged pool with shared prefix blocks replaces it behind the same batch shape.

Prefix hints. A request may carry a :class:`PrefixHint` ``(key, num_tokens)``:
its first ``num_tokens`` context tokens are shared by a group of requests.
The engine prefills such a prefix once and keeps its KV in a
:class:`PrefixCache`. On admission a hinted request either

* finds the key stored with the same tokens (a hit): its KV starts as a copy
  of the stored snapshot and those tokens are not prefilled;
* finds the key being computed right now by another admitted request with
  the same tokens: it is *parked* (admitted but not fed) until that request's
  KV covers the prefix, which is then snapshotted into the store, and the
  parked requests resolve again (now hits); or
* finds neither (a miss): it prefills normally and, if the store can take the
  key, becomes the one computing it for the others.

So a group prefills its prefix once even when all of it arrives in one step.
Admitted requests that use a stored entry hold a reference on it (pinned,
never evicted) until they finish, fail or are cancelled.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parrot.semantic_vars import EngineError, new_id

from .checkpoint import load_model
from .engine import Engine, EngineCapacity, GenerationRequest, RequestStream
from .kv_cache import AttentionBatch, SequenceKV, SequenceSlice
from .model import LlamaFamilyModel
from .prefix_cache import PrefixEntry, PrefixCache
from .sampler import make_generator, sample
from .sequence import Sequence
from .tokenizer import Tokenizer, read_generation_eos

log = logging.getLogger(__name__)

_CPU_PREFIX_CACHE_BYTES = 256 * 2**20
_CUDA_PREFIX_CACHE_FRACTION = 0.1  # of the free GPU memory when the engine starts


@dataclass(frozen=True)
class TorchEngineConfig:
    """Sizes of the batching loop."""

    max_running: int = 32
    max_step_tokens: int = 2048  # flat-batch budget per step; bounds prefill chunks
    prefix_cache: bool = True  # False: prefix hints are ignored (no store)
    # Byte budget of the prefix store; None: 256 MiB on CPU, 10% of free memory on CUDA.
    prefix_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_step_tokens < self.max_running:
            raise ValueError("max_step_tokens must be at least max_running (one decode token each)")
        if self.prefix_cache_bytes is not None and self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")


@dataclass
class EngineCounters:
    """Totals since start, for benchmarks and metrics."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    prefix_hits: int = 0  # hinted requests that started from a stored prefix
    prefix_misses: int = 0  # hinted requests that prefilled their prefix themselves
    prefix_tokens_saved: int = 0  # prefill tokens not computed thanks to hits


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
        self._prefix: PrefixCache | None = None
        if self.config.prefix_cache:
            budget = self.config.prefix_cache_bytes
            self._prefix = PrefixCache(_default_prefix_cache_bytes(self.device) if budget is None else budget)
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

    # -- Engine API -----------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestStream:
        stream = RequestStream(request, self.cancel)
        kv = SequenceKV(
            self.model.config.num_layers,
            self.model.config.num_kv_heads,
            self.model.config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        seq = Sequence(request, kv, self.tokenizer, stream.push)  # validates the program now
        limit = self.model.config.max_position_embeddings
        if len(seq.tokens) > limit:
            raise EngineError(f"prompt of {len(seq.tokens)} tokens exceeds the model's {limit} positions")
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
        with self._cond:
            # A sequence that has sent its last event no longer counts, even if
            # the worker has not swept it out of the batch yet.
            running = sum(not r.seq.finished for r in self._running)
            return EngineCapacity(self.config.max_running, running, len(self._waiting), cached_prefixes=cached)

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The store of shared prefixes (None when ``prefix_cache`` is off)."""
        return self._prefix

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

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
                    admitted.seq.stats.started_at = time.monotonic()
                    self._running.append(admitted)
                    if admitted.prefix is not None:
                        self._resolve_prefix(admitted)
            if not self._running:
                continue
            batch = list(self._running)
            try:
                self._step(batch)
            except Exception as exc:  # a broken step fails its requests, not the engine
                log.exception("engine step failed")
                error = exc if isinstance(exc, EngineError) else EngineError(f"engine step failed: {exc!r}")
                for r in batch:
                    r.stream.fail(error)
                    r.seq.finished = True
            with self._cond:
                done = [r for r in self._running if r.seq.finished]
                self.counters.requests_finished += len(done)
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

    # -- prefix hints (worker thread) ---------------------------------------
    def _resolve_prefix(self, r: _Running) -> None:
        """Decide how an admitted hinted request gets its prefix: park it behind
        the request computing the same prefix, copy it from the store (hit), or
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
            saved = r.seq.use_cached_prefix(entry.kv, entry.num_tokens)
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
                self._resolve_prefix(w)

    def _publish_prefixes(self, batch: list[_Running]) -> None:
        """Snapshot the prefix of every computing request whose KV now covers
        it into the store, then let the requests parked on it copy it."""
        assert self._prefix is not None
        for r in batch:
            if not r.computes or r.prefix is None:
                continue
            key, tokens = r.prefix
            if r.seq.kv.length < len(tokens):
                continue
            snapshot = r.seq.kv.snapshot(len(tokens))
            r.prefix_entry = self._prefix.insert(key, tokens, snapshot, acquire=True)
            r.computes = False
            del self._computing[key]
            self._wake_parked(key)

    def _release(self, r: _Running) -> None:
        """A request just finished (worker thread, inside a step): drop its
        prefix references now, before its last event is sent."""
        r.gone = True
        self._forget(r)

    def _forget(self, r: _Running) -> None:
        """Drop every prefix reference of a request leaving the engine (finished,
        failed, cancelled or closed); hand its computing role to its waiters."""
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

    @torch.inference_mode()
    def _step(self, batch: list[_Running]) -> None:
        budget = self.config.max_step_tokens
        # Decoders first (one token each), then prefill chunks with what is left.
        order = sorted(batch, key=lambda r: len(r.seq.pending) > 1)
        ids: list[int] = []
        positions: list[int] = []
        attn = AttentionBatch()
        sample_rows: list[tuple[_Running, int]] = []
        for r in order:
            if r.parked:
                continue  # waits for another request to compute its prefix
            pending = r.seq.pending
            take = min(len(pending), budget)
            if take == 0:
                continue
            budget -= take
            kv = r.seq.kv
            kv.reserve(take)
            attn.sequences.append(SequenceSlice(kv, len(ids), take))
            ids.extend(pending[:take])
            positions.extend(range(kv.length, kv.length + take))
            if r.seq.is_decoding:
                self.counters.decode_tokens += take
            else:
                r.seq.stats.prefill_tokens += take
                self.counters.prefill_tokens += take
            if take == len(pending) and r.seq.generating:
                sample_rows.append((r, len(ids) - 1))
        if not ids:
            return
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, attn)
        attn.commit()
        self.counters.steps += 1
        if self._computing:
            self._publish_prefixes(batch)
        if not sample_rows:
            return
        rows = torch.tensor([row for _, row in sample_rows], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        configs = [r.seq.current_gen.sampling for r, _ in sample_rows]
        tokens = sample(logits, configs, [r.generator() for r, _ in sample_rows])
        for (r, _), token in zip(sample_rows, tokens):
            r.seq.accept(token)


def _default_prefix_cache_bytes(device: torch.device) -> int:
    """256 MiB on CPU; a tenth of the free memory on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * _CUDA_PREFIX_CACHE_FRACTION)
    return _CPU_PREFIX_CACHE_BYTES
