"""The torch engine: our own Llama-family forward with continuous batching
over a paged KV cache.

Three parts with one job each (the split of vLLM v1), wired here:

* :class:`~parrot.backends.engine_scheduler.EngineScheduler` (pure Python):
  admission by objective, batch planning with chunked prefill, preemption;
* :class:`~parrot.backends.kv_manager.KVManager`: block tables and reference
  counts, the prefix cache (token blocks per namespace, pinned entries for
  prefix hints), hinted-prefix coordination, eviction;
* :class:`~parrot.backends.model_runner.ModelRunner`: tensor packing, CUDA
  graphs, the forward and sampling.

A worker thread runs steps: admit, plan, forward, publish what became
cacheable, sample. New requests join between steps. Memory: the KV cache is
a pool of fixed-size blocks sized once at start
(:class:`~parrot.backends.kv_cache.PagedKVPool`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parrot.kernels import SparseAttentionConfig
from parrot.semantic_vars import EngineError, new_id

from .attention import decode_kernels_capturable, prepare_decode_kernels
from .checkpoint import load_model
from .cuda_graphs import DecodeGraphs
from .constraints import GrammarStates
from .engine import Engine, EngineCapacity, Gen, GenerationRequest, Mailbox, RequestStream
from .engine_request import EngineRequest
from .engine_scheduler import EngineScheduler
from .kv_cache import PagedKVPool, attention_scale
from .kv_manager import KVManager
from .model import LlamaFamilyModel
from .model_runner import ModelRunner
from .prefix_cache import PrefixCache
from .block_manager import BlockManager
from .sequence import Sequence
from .step_trace import StepTrace
from .tokenizer import Tokenizer, read_generation_eos

log = logging.getLogger(__name__)

_CPU_KV_CACHE_BYTES = 256 * 2**20
# The CPU default grows up to this to hold one request of the full context.
_CPU_KV_CACHE_MAX_BYTES = 2 * 2**30


@dataclass(frozen=True)
class TorchEngineConfig:
    """Sizes of the batching loop and of the KV pool."""

    max_running: int = 32
    max_step_tokens: int = 2048  # flat-batch budget per step; bounds prefill chunks
    # Places beyond max_running that only latency-critical requests may take,
    # so they start at the next step even when throughput work fills the batch.
    latency_reserve: int = 4
    # Step token budget while a latency-critical request decodes (None: no cap):
    # bounds its time per output token; throughput prefill chunks shrink
    # meanwhile. Off by default: on the H200 mixed map-reduce + chat workload
    # a 512-token cap made the applications' JCT 1.5x longer.
    latency_step_tokens: int | None = None
    # Aging: a request that has waited this long is admitted before
    # better-ranked ones (None: rank order always), so a steady stream of
    # latency-critical work cannot starve throughput work.
    admission_max_wait_s: float | None = 5.0
    prefix_cache: bool = True  # False: no block reuse, prefix hints ignored
    # Requests admitted together with one uncached prefix compute it once: a
    # request waits while another computes its next full block (see kv_manager).
    dedup_inflight_prefixes: bool = True
    # ... when the other request computes at least this many of its next
    # positions: a shorter shared head is cheaper to compute twice than to
    # wait a step for (measured in benchmarks/notes/engine-h200.md).
    dedup_min_prefix_tokens: int = 256
    block_size: int = 16  # token positions per KV block
    # KV pool size: ``kv_cache_bytes`` when set; else ``kv_cache_fraction`` of
    # the free GPU memory after the weights are loaded, or on CPU 256 MiB,
    # grown to one request of max_model_len (up to 2 GiB, past which
    # max_model_len is capped to the pool with a warning).
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.8
    # Longest context a request may reach; None: the model's max positions.
    # The pool must hold one request of this length.
    max_model_len: int | None = None
    # Replay decode-only steps of up to this many sequences as CUDA graphs
    # (CUDA only; 0 turns graphs off).
    cuda_graph_max_batch: int = 64
    # Short prefill chunks join those graphs, one row per new token (each row
    # reads its whole context through the paged decode kernel), while the
    # step's rows read at most this many context positions in all: a 32-token
    # suffix after a cached 4K prefix replays in a graph (H200, 8B shape:
    # TTFT measured in the README); longer contexts prefill eagerly.
    cuda_graph_prefill_positions: int = 160_000
    # Cascade decode: decoding sequences that share at least
    # ``cascade_min_prefix_tokens`` positions of prefix blocks read them once
    # per step through the shared-prefix kernel (inside the CUDA graphs).
    # None (default): on where that kernel is Triton (CUDA, bf16/fp16), off
    # elsewhere (the torch twin loops over rows on the host). H200, 8B
    # shape, 64 sequences after a 4K prefix: 7.6 vs 11.6 ms per step (README).
    cascade_decode: bool | None = None
    cascade_min_prefix_tokens: int = 256
    # MInference-style sparse prefill: a pattern config (a JSON file written
    # by ``parrot.kernels.pattern_search``, or the loaded config). A prompt
    # of at least its ``min_length`` tokens with nothing cached is prefilled
    # in one chunk with sparse attention; shorter ones stay dense.
    sparse_prefill: str | Path | SparseAttentionConfig | None = None
    # torch's cuDNN attention backend builds an execution plan for every new
    # sequence length (65 ms per length on the H200, torch 2.11, against
    # 0.1 ms for flash attention), and served prompts rarely repeat a length:
    # on CUDA the engine turns it off for the process unless this is True.
    sdpa_cudnn: bool = False
    # Compile every variant of the Triton decode kernels when the engine
    # starts (CUDA only): served steps that meet a new batch shape otherwise
    # waited 0.6-2 s for a JIT compile (H200, seen in the step traces of a
    # fresh server). Triton caches the binaries on disk, so only a machine's
    # first start pays the compile.
    precompile_decode_kernels: bool = True

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_step_tokens < self.max_running:
            raise ValueError("max_step_tokens must be at least max_running (one decode token each)")
        if self.cascade_min_prefix_tokens < 1:
            raise ValueError(f"cascade_min_prefix_tokens must be >= 1, got {self.cascade_min_prefix_tokens}")
        if self.latency_reserve < 0:
            raise ValueError(f"latency_reserve must be >= 0, got {self.latency_reserve}")
        if self.admission_max_wait_s is not None and self.admission_max_wait_s < 0:
            raise ValueError(f"admission_max_wait_s must be >= 0 or None, got {self.admission_max_wait_s}")
        if self.latency_step_tokens is not None and self.latency_step_tokens < 1:
            raise ValueError(f"latency_step_tokens must be >= 1 or None, got {self.latency_step_tokens}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.cuda_graph_prefill_positions < 0:
            raise ValueError(f"cuda_graph_prefill_positions must be >= 0, got {self.cuda_graph_prefill_positions}")
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
    cascade_steps: int = 0  # decode steps that read shared prefix blocks once per group
    graph_prefill_steps: int = 0  # steps with prefill chunks that replayed a CUDA graph


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
        if self.device.type == "cuda" and not self.config.sdpa_cudnn and torch.backends.cuda.cudnn_sdp_enabled():
            torch.backends.cuda.enable_cudnn_sdp(False)  # process-wide: see TorchEngineConfig.sdpa_cudnn
            log.info("torch's cuDNN SDPA backend turned off (it plans per prompt length); flash attention serves")
        self.counters = EngineCounters()
        c = model.config
        self._max_model_len = self.config.max_model_len or c.max_position_embeddings
        if self.max_model_len > c.max_position_embeddings:
            raise EngineError(
                f"max_model_len={self.max_model_len} exceeds the model's {c.max_position_embeddings} positions"
            )
        bs = self.config.block_size
        num_blocks = self._pool_blocks()
        self.kv = KVManager(num_blocks, bs, prefix_cache=self.config.prefix_cache, counters=self.counters,
                            dedup=self.config.dedup_inflight_prefixes,
                            dedup_min_tokens=self.config.dedup_min_prefix_tokens)
        self.pool = PagedKVPool(
            c.num_layers, num_blocks, bs, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=self.device
        )
        sparse = self.config.sparse_prefill
        if sparse is not None and not isinstance(sparse, SparseAttentionConfig):
            sparse = SparseAttentionConfig.load(sparse)  # PatternConfigError names a bad field
        if sparse is not None:
            heads = {len(layer) for layer in sparse.layers}
            if len(sparse.layers) != c.num_layers or heads != {c.num_heads}:
                raise EngineError(
                    f"sparse_prefill config has {len(sparse.layers)} layers x {sorted(heads)} heads;"
                    f" the model has {c.num_layers} x {c.num_heads}"
                )
        scale = attention_scale(c.head_dim)
        graphs: DecodeGraphs | None = None
        self.reserved_blocks = 0  # blocks the engine holds for itself (the graphs' scratch block)
        capturable = self.device.type == "cuda" and decode_kernels_capturable(self.dtype)
        # Whether decode steps group rows by shared prefix blocks (config None: where the kernel is Triton).
        self.cascade_decode = capturable if self.config.cascade_decode is None else self.config.cascade_decode
        if self.device.type == "cuda" and self.config.cuda_graph_max_batch:
            scratch = self.kv.blocks.allocate()
            assert scratch is not None
            self.reserved_blocks = 1
            graphs = DecodeGraphs(model, self.pool, scratch, scale, self.config.cuda_graph_max_batch,
                                  cascade=self.cascade_decode and capturable)
        if self.config.precompile_decode_kernels and capturable:
            started = time.perf_counter()
            launches = prepare_decode_kernels(c.num_heads, c.num_kv_heads, c.head_dim, bs, self.dtype, self.device)
            log.info("engine %s: %d decode kernel variants ready in %.1f s", self.name, launches,
                     time.perf_counter() - started)
        cascade = self.config.cascade_min_prefix_tokens if self.cascade_decode else None
        self.grammars = GrammarStates(tokenizer, c.vocab_size)  # compiles constrained Gens' grammars
        self.runner = ModelRunner(model, self.pool, bs, scale, self.counters, sparse=sparse, graphs=graphs,
                                  graph_prefill_positions=self.config.cuda_graph_prefill_positions,
                                  cascade_min_tokens=cascade, grammars=self.grammars)
        self._cond = threading.Condition()
        self.scheduler = EngineScheduler(
            self.kv, self.counters, self._cond, max_running=self.config.max_running,
            max_step_tokens=self.config.max_step_tokens, max_model_len=self.max_model_len,
            whole_prompt_from=sparse.min_length if sparse is not None else None,
            latency_reserve=self.config.latency_reserve, latency_step_tokens=self.config.latency_step_tokens,
            admission_max_wait_s=self.config.admission_max_wait_s,
        )
        self._closed = False
        self.trace = StepTrace.from_env(self.name)  # PARROT_STEP_TRACE: one JSON line per step
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
        spare = 1 + (self.device.type == "cuda" and cfg.cuda_graph_max_batch > 0)
        needed = -(-self.max_model_len // cfg.block_size) + spare
        if num_blocks < needed and cfg.kv_cache_bytes is None and self.device.type == "cpu":
            # The CPU default never refuses to start: grow the pool to one
            # full-context request up to a bound, else cap the context to it.
            if needed * per_block <= _CPU_KV_CACHE_MAX_BYTES:
                return needed
            num_blocks = _CPU_KV_CACHE_MAX_BYTES // per_block
            capped = (num_blocks - spare) * cfg.block_size
            log.warning("max_model_len capped from %d to %d tokens: the CPU KV pool (%d MiB) holds no more; "
                        "set kv_cache_bytes (--kv-cache-bytes, PARROT_KV_CACHE_BYTES) for longer contexts",
                        self.max_model_len, capped, _CPU_KV_CACHE_MAX_BYTES >> 20)
            self._max_model_len = capped
            return num_blocks
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
        seq = Sequence(request, self.kv.new_table(), self.tokenizer, stream.push, self.max_model_len)  # validates the program now
        self.grammars.check([s.sampling.constraint for s in request.program if isinstance(s, Gen)])  # ConstraintError
        if len(seq.tokens) > self.max_model_len:
            raise EngineError(f"prompt of {len(seq.tokens)} tokens exceeds the model's {self.max_model_len} positions")
        prefix = None
        hint = request.prefix_hint
        if hint is not None and self.kv.prefix is not None and not seq.finished:
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
            entry = EngineRequest(seq, stream, self.device, prefix)
            seq.before_finish = lambda: self.scheduler.finish(entry)
            self.scheduler.waiting.push(entry, seq.stats.submitted_at)
            self._cond.notify()
        return stream

    def capacity(self) -> EngineCapacity:
        cached = self.kv.cached_keys()
        blocks = self.kv.blocks
        with self._cond:
            # A sequence that has sent its last event no longer counts, even if
            # the worker has not swept it out of the batch yet.
            return EngineCapacity(
                self.config.max_running, self.scheduler.active(), len(self.scheduler.waiting),
                free_kv_tokens=blocks.num_free * blocks.block_size, cached_prefixes=cached,
                free_blocks=blocks.num_free, total_blocks=blocks.num_blocks, cached_blocks=blocks.num_cached,
                waiting_tokens=self.scheduler.waiting.tokens,
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
        prefix = self.kv.prefix
        if prefix is not None:
            out.update(block_hits=prefix.block_hits, block_misses=prefix.block_misses,
                       prefix_evictions=prefix.evictions)
        return out

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefix cache (None when ``prefix_cache`` is off)."""
        return self.kv.prefix

    @property
    def block_manager(self) -> BlockManager:
        """Reference counts and free lists of the KV pool's blocks."""
        return self.kv.blocks

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self.scheduler.cancelled.add(request_id)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        if self.trace is not None:
            self.trace.close()
        if not self._thread.is_alive():
            # Give the KV pool and the graphs' memory back now, not at garbage collection.
            self.runner.graphs = None
            self.pool.keys = self.pool.values = torch.empty(0, device=self.device)

    # -- worker ----------------------------------------------------------
    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._cond:
                while not self._closed and not scheduler.waiting and not scheduler.running:
                    if self.trace is not None:
                        self.trace.flush()  # idle: the trace is complete up to now
                    self._cond.wait()
                if self._closed:
                    for r in scheduler.leave_all():
                        r.stream.fail(EngineError(f"engine {self.name} was closed"))
                    return
                scheduler.admit(time.monotonic())
            if not scheduler.running:
                continue
            batch = list(scheduler.running)
            try:
                self._step(batch)
            except Exception as exc:  # a broken step fails its requests, not the engine
                log.exception("engine step failed")
                error = exc if isinstance(exc, EngineError) else EngineError(f"engine step failed: {exc!r}")
                for r in batch:
                    if not r.seq.finished:
                        r.seq.finished = True
                        scheduler.finish(r)
                        r.stream.fail(error)
            with self._cond:
                scheduler.sweep()

    def _step(self, batch: list[EngineRequest]) -> None:
        started = time.monotonic()
        plan = self.scheduler.plan(batch)
        if not plan.items:
            return
        samplers, logits = self.runner.forward(plan)
        self.counters.steps += 1
        # Publish before sampling: a request that finishes now frees its blocks.
        self.kv.after_forward([item.request for item in plan.items], batch)
        self.runner.sample(samplers, logits)
        if self.trace is not None:
            self.trace.record(started, plan)
