"""Per-token surprisal from a causal LM, through Parrot's own model forward.

The surprisal of token ``x_i`` is ``-log p(x_i | x_<i)`` in nats. The
compressor needs it in three shapes, all served by one batched primitive
(:meth:`TokenScorer._run`):

* many independent short texts at once (ranking segments): each text is its
  own sequence in one flat forward batch;
* a text conditioned on a context whose KV was computed once
  (:class:`ScoringContext`): the context's KV is copied
  (``SequenceKV.copy_prefix_from``) and extended, so scoring ``text`` after
  ``context`` gives the surprisals of ``context + text`` scored in one pass;
* iterative compression: a context that grows by the tokens just kept while
  the next window is scored on top of it, in a single forward per window.

A sequence starts with the model's BOS token when it has one, so every token
of a text gets a surprisal. Without BOS, the first token of a sequence that
has no context gets ``log(vocab_size)``: the surprisal of a uniform guess.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from parrot.backends.kv_cache import AttentionBatch, SequenceKV, SequenceSlice
from parrot.semantic_vars.errors import InvalidArgumentError

if TYPE_CHECKING:
    from parrot.backends.model import LlamaFamilyModel
    from parrot.backends.tokenizer import Tokenizer
    from parrot.backends.torch_engine import TorchEngine

__all__ = ["ScoringContext", "TokenScorer", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (default: CUDA when available, else CPU).

    Raises :class:`InvalidArgumentError` (field ``device``) for a string torch
    does not know, or a CUDA device this machine does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InvalidArgumentError("device", f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError("device", f"{device!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                "device", f"{device!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InvalidArgumentError("device", f"{device!r} requested but MPS is not available")
    elif dev.type != "cpu":
        raise InvalidArgumentError("device", f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


class ScoringContext:
    """A token sequence whose KV cache is computed, ready to condition on.

    ``ids`` are the tokens in the cache (BOS included when the model has one);
    ``next_logprobs`` is the log-distribution ``[vocab]`` predicting the token
    after them (``None`` for an empty context).
    """

    def __init__(self, kv: SequenceKV, ids: list[int], next_logprobs: torch.Tensor | None) -> None:
        self.kv = kv
        self.ids = ids
        self.next_logprobs = next_logprobs

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Job:
    """One sequence of a batched scoring pass (see :meth:`TokenScorer._run`)."""

    kv: SequenceKV
    ids: list[int]
    prev: torch.Tensor | None  # logprobs predicting ids[0]
    save_after: int | None = None  # keep the full logprob row that follows ids[save_after]
    surprisal: torch.Tensor | None = None  # [len(ids)] float32, filled by _run
    saved: torch.Tensor | None = None


class TokenScorer:
    """Scores tokens with a :class:`~parrot.backends.model.LlamaFamilyModel`.

    Build it from a model folder (:meth:`from_pretrained`), from a running
    :class:`~parrot.backends.torch_engine.TorchEngine` (:meth:`from_engine`:
    the engine's weights are shared, not copied), or from a model and a
    tokenizer. ``max_batch_tokens`` bounds the tokens of one forward (longer
    work is chunked, like chunked prefill), ``chunk_tokens`` the tokens of one
    sequence in one forward (default 512 on CPU, 2048 on CUDA); ``logits_rows`` bounds the rows
    projected to the vocabulary at once.
    """

    def __init__(
        self,
        model: "LlamaFamilyModel",
        tokenizer: "Tokenizer",
        *,
        max_batch_tokens: int = 4096,
        chunk_tokens: int | None = None,
        logits_rows: int = 512,
        name: str | None = None,
    ) -> None:
        if chunk_tokens is not None and chunk_tokens < 1:
            raise InvalidArgumentError("chunk_tokens", f"must be at least 1, got {chunk_tokens}")
        if max_batch_tokens < 1:
            raise InvalidArgumentError("max_batch_tokens", f"must be at least 1, got {max_batch_tokens}")
        if logits_rows < 1:
            raise InvalidArgumentError("logits_rows", f"must be at least 1, got {logits_rows}")
        self.model = model
        self.tokenizer = tokenizer
        first = next(model.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        self.max_batch_tokens = max_batch_tokens
        if chunk_tokens is None:
            # Attention over one long chunk is quadratic; on CPU short chunks
            # (each attending to the cache before it) are faster.
            chunk_tokens = 2048 if self.device.type == "cuda" else 512
        self.chunk_tokens = chunk_tokens
        self.logits_rows = logits_rows
        self.name = name or "model"
        config = model.config
        self.max_positions: int = config.max_position_embeddings
        self.vocab_size: int = config.vocab_size
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
        self.bos_token_id: int | None = bos
        self._uniform = math.log(config.vocab_size)

    # ---------------------------------------------------------------- building
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> "TokenScorer":
        """Load a local checkpoint folder (default: the embedded tiny model).

        ``dtype`` defaults to bfloat16 on CUDA and float32 on CPU. A missing
        or unusable folder raises :class:`InvalidArgumentError` (field
        ``model``); an unknown device, field ``device``.
        """
        from parrot.backends.checkpoint import load_model
        from parrot.backends.tokenizer import Tokenizer, read_generation_eos

        dev = resolve_device(device)
        if path is None:
            from parrot.backends.models import TEST_MODEL, resolve_model

            folder = resolve_model(TEST_MODEL)
        else:
            folder = Path(path).expanduser()
        try:
            model = load_model(folder, dtype=dtype, device=dev)
            tokenizer = Tokenizer(folder, eos_token_ids=[*model.config.eos_token_ids, *read_generation_eos(folder)])
        except (FileNotFoundError, ValueError) as e:
            raise InvalidArgumentError("model", str(e)) from e
        return cls(model, tokenizer, name=str(folder), **options)

    @classmethod
    def from_engine(cls, engine: "TorchEngine", **options: Any) -> "TokenScorer":
        """Score with a running torch engine's model and tokenizer (weights shared).

        Scoring runs in the caller's thread with KV caches of its own; the
        engine's weights are only read, so the engine keeps serving. Any
        other engine holds no model here: give it a job instead
        (:meth:`~parrot.backends.engine.Engine.run_model_job`).
        """
        from parrot.backends.torch_engine import TorchEngine

        if not isinstance(engine, TorchEngine):
            raise InvalidArgumentError(
                "engine", f"needs a TorchEngine (the engine with a Parrot model here), got {type(engine).__name__}"
            )
        return cls(engine.model, engine.tokenizer, name=engine.name, **options)

    # ---------------------------------------------------------------- tokens
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS)."""
        return self.tokenizer.encode(text, add_bos=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's ``(start, end)`` character span.

        Uses the fast tokenizer's offset mapping. For a slow tokenizer the
        spans are estimated by decoding token by token.
        """
        hf = self.tokenizer.hf
        if getattr(hf, "is_fast", False):
            enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        ids = self.encode(text)
        spans: list[tuple[int, int]] = []
        pos = 0
        for token in ids:
            piece = self.decode([token])
            start = text.find(piece, pos) if piece else -1
            if start < 0:
                start = pos
            end = min(len(text), start + len(piece))
            spans.append((start, end))
            pos = end
        return ids, spans

    def _head(self) -> list[int]:
        return [] if self.bos_token_id is None else [self.bos_token_id]

    def _new_kv(self, capacity: int) -> SequenceKV:
        c = self.model.config
        return SequenceKV(
            c.num_layers, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=self.device,
            initial_capacity=max(1, capacity),
        )

    # ---------------------------------------------------------------- public scoring
    def context(self, ids: Sequence[int] = (), *, add_bos: bool = True) -> ScoringContext:
        """Compute the KV of ``[BOS] + ids`` once, to score several texts after it."""
        head = self._head() if add_bos else []
        all_ids = head + list(ids)
        ctx = ScoringContext(self._new_kv(len(all_ids) + 64), [], None)
        if all_ids:
            self.extend(ctx, all_ids)
        return ctx

    def fork(self, ctx: ScoringContext, extra_capacity: int = 0) -> ScoringContext:
        """An independent copy of ``ctx`` (its KV copied, not recomputed)."""
        kv = self._new_kv(len(ctx) + extra_capacity)
        kv.copy_prefix_from(ctx.kv, ctx.kv.length)
        return ScoringContext(kv, list(ctx.ids), ctx.next_logprobs)

    @torch.inference_mode()
    def extend(self, ctx: ScoringContext, ids: Sequence[int]) -> torch.Tensor:
        """Score ``ids`` conditioned on ``ctx`` and append them to it (in place)."""
        return self.extend_many([(ctx, ids)])[0]

    @torch.inference_mode()
    def extend_many(self, items: Sequence[tuple[ScoringContext, Sequence[int]]]) -> list[torch.Tensor]:
        """:meth:`extend` for several contexts in one batched pass."""
        jobs = []
        for ctx, ids in items:
            ids = list(ids)
            jobs.append(_Job(ctx.kv, ids, ctx.next_logprobs, save_after=len(ids) - 1 if ids else None))
        self._run(jobs)
        out = []
        for (ctx, _), job in zip(items, jobs):
            ctx.ids.extend(job.ids)
            if job.ids:
                ctx.next_logprobs = job.saved
            out.append(job.surprisal.cpu())
        return out

    def surprisal(
        self, ids: Sequence[int], *, context: ScoringContext | Sequence[int] | None = None
    ) -> torch.Tensor:
        """Surprisal (nats, float32, CPU) of each token of ``ids``.

        ``context`` conditions the scores: a :class:`ScoringContext` (its KV
        is reused, not recomputed, and left unchanged) or token ids (scored
        as ``[BOS] + context + ids`` in one pass). Without it the text follows
        BOS alone.
        """
        return self.surprisal_batch([ids], contexts=[context])[0]

    @torch.inference_mode()
    def surprisal_batch(
        self,
        texts: Sequence[Sequence[int]],
        *,
        contexts: Sequence[ScoringContext | Sequence[int] | None] | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`surprisal` of several token sequences in batched forwards."""
        if contexts is None:
            contexts = [None] * len(texts)
        if len(contexts) != len(texts):
            raise InvalidArgumentError("contexts", f"got {len(contexts)} contexts for {len(texts)} texts")
        jobs: list[_Job] = []
        skip: list[int] = []
        for ids, ctx in zip(texts, contexts):
            ids = list(ids)
            if isinstance(ctx, ScoringContext):
                kv = self._new_kv(len(ctx) + len(ids))
                kv.copy_prefix_from(ctx.kv, ctx.kv.length)
                jobs.append(_Job(kv, ids, ctx.next_logprobs))
                skip.append(0)
            else:
                head = self._head() + (list(ctx) if ctx is not None else [])
                jobs.append(_Job(self._new_kv(len(head) + len(ids)), head + ids, None))
                skip.append(len(head))
        self._run(jobs)
        return [job.surprisal[s:].cpu() for job, s in zip(jobs, skip)]

    @torch.inference_mode()
    def step(
        self, items: Sequence[tuple[ScoringContext, Sequence[int], Sequence[int]]]
    ) -> list[torch.Tensor]:
        """One iterative-compression step for several contexts in one forward.

        Each item is ``(ctx, append, probe)``: ``append`` (tokens kept from the
        last window) joins the context for good, and ``probe`` (the next
        window) is scored after it but not kept in the cache. Returns the
        probe's surprisals per item, conditioned on ``ctx + append``.
        """
        jobs: list[_Job] = []
        for ctx, append, probe in items:
            append, probe = list(append), list(probe)
            jobs.append(_Job(ctx.kv, append + probe, ctx.next_logprobs, save_after=len(append) - 1 if append else None))
        self._run(jobs)
        out = []
        for (ctx, append, _), job in zip(items, jobs):
            n = len(append)
            ctx.kv.truncate(len(ctx.ids) + n)
            ctx.ids.extend(append)
            if n:
                ctx.next_logprobs = job.saved
            out.append(job.surprisal[n:].cpu())
        return out

    # ---------------------------------------------------------------- the primitive
    def _run(self, jobs: Sequence[_Job]) -> None:
        """Forward every job's ids on its KV (extending it) and fill surprisals.

        Jobs are packed into flat batches of at most ``max_batch_tokens``
        tokens; a long job is split across consecutive forwards. The
        surprisal of ``ids[t]`` (t >= 1) comes from the row of ``ids[t-1]``;
        that of ``ids[0]`` from ``job.prev``.
        """
        device = self.device
        for job in jobs:
            n = len(job.ids)
            job.surprisal = torch.zeros(n, dtype=torch.float32, device=device)
            if n:
                first = job.ids[0]
                if job.prev is not None:
                    job.surprisal[0] = -job.prev[first]
                else:
                    job.surprisal[0] = self._uniform
        cursors = [0] * len(jobs)
        pending = [j for j, job in enumerate(jobs) if job.ids]
        while pending:
            budget = self.max_batch_tokens
            batch = AttentionBatch()
            ids: list[int] = []
            positions: list[int] = []
            targets: list[int] = []
            pieces: list[tuple[int, int, int, int]] = []  # job, row start, cursor, take
            saves: list[tuple[int, int]] = []  # job, row
            still: list[int] = []
            for j in pending:
                job = jobs[j]
                c = cursors[j]
                take = min(len(job.ids) - c, budget, self.chunk_tokens)
                if take <= 0:
                    still.append(j)
                    continue
                kv = job.kv
                kv.reserve(take)
                start = len(ids)
                batch.sequences.append(SequenceSlice(kv, start, take))
                ids.extend(job.ids[c : c + take])
                positions.extend(range(kv.length, kv.length + take))
                n = len(job.ids)
                targets.extend(job.ids[t] if t < n else -1 for t in range(c + 1, c + take + 1))
                pieces.append((j, start, c, take))
                if job.save_after is not None and c <= job.save_after < c + take:
                    saves.append((j, start + job.save_after - c))
                budget -= take
                cursors[j] = c + take
                if cursors[j] < n:
                    still.append(j)
            pending = still
            input_ids = torch.tensor(ids, dtype=torch.long, device=device)
            pos = torch.tensor(positions, dtype=torch.long, device=device)
            hidden = self.model(input_ids, pos, batch)
            batch.commit()
            target = torch.tensor(targets, dtype=torch.long, device=device)
            row_surprisal = torch.empty(len(ids), dtype=torch.float32, device=device)
            save_rows = {row: j for j, row in saves}
            for lo in range(0, len(ids), self.logits_rows):
                hi = min(len(ids), lo + self.logits_rows)
                logprobs = torch.log_softmax(self.model.compute_logits(hidden[lo:hi]), dim=-1)
                t = target[lo:hi]
                row_surprisal[lo:hi] = -logprobs.gather(1, t.clamp(min=0)[:, None])[:, 0]
                for row, j in save_rows.items():
                    if lo <= row < hi:
                        jobs[j].saved = logprobs[row - lo].clone()
            for j, start, c, take in pieces:
                job = jobs[j]
                hi = min(c + take, len(job.ids) - 1)  # rows whose next token is in this job
                if hi > c:
                    job.surprisal[c + 1 : hi + 1] = row_surprisal[start : start + hi - c]
