"""The torch engine: our own Llama-family forward with continuous batching.

A worker thread runs steps. Each step builds one flat batch from every
running sequence: one token for each sequence that is decoding, then chunks
of pending prompt tokens (chunked prefill) up to a token budget, so a long
prompt never stalls the decoders. New requests join between steps.

The KV cache here is contiguous per sequence (:class:`SequenceKV`); the
paged pool with shared prefix blocks replaces it behind the same batch shape.
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
from .sampler import make_generator, sample
from .sequence import Sequence
from .tokenizer import Tokenizer, read_generation_eos

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchEngineConfig:
    """Sizes of the batching loop."""

    max_running: int = 32
    max_step_tokens: int = 2048  # flat-batch budget per step; bounds prefill chunks

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_step_tokens < self.max_running:
            raise ValueError("max_step_tokens must be at least max_running (one decode token each)")


@dataclass
class EngineCounters:
    """Totals since start, for benchmarks and metrics."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0


class _Running:
    """A sequence plus the engine-side state that sampling needs."""

    def __init__(self, seq: Sequence, stream: RequestStream, device: torch.device) -> None:
        self.seq = seq
        self.stream = stream
        self.device = device
        self.generators: dict[int, torch.Generator | None] = {}

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
        with self._cond:
            if self._closed:
                raise EngineError(f"engine {self.name} is closed")
            self._waiting.append(_Running(seq, stream, self.device))
            self._cond.notify()
        return stream

    def capacity(self) -> EngineCapacity:
        with self._cond:
            return EngineCapacity(self.config.max_running, len(self._running), len(self._waiting))

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
                    for r in [*self._running, *self._waiting]:
                        r.stream.fail(EngineError(f"engine {self.name} was closed"))
                    return
                self._drop_cancelled()
                while self._waiting and len(self._running) < self.config.max_running:
                    admitted = self._waiting.popleft()
                    admitted.seq.stats.started_at = time.monotonic()
                    self._running.append(admitted)
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

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        keep = lambda r: r.seq.request.request_id not in self._cancelled  # noqa: E731
        dropped = [r for r in [*self._running, *self._waiting] if not keep(r)]
        self._running = [r for r in self._running if keep(r)]
        self._waiting = collections.deque(r for r in self._waiting if keep(r))
        self.counters.requests_cancelled += len(dropped)
        self._cancelled.clear()

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
        if not sample_rows:
            return
        rows = torch.tensor([row for _, row in sample_rows], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        configs = [r.seq.current_gen.sampling for r, _ in sample_rows]
        tokens = sample(logits, configs, [r.generator() for r, _ in sample_rows])
        for (r, _), token in zip(sample_rows, tokens):
            r.seq.accept(token)
