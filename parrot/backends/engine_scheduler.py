"""The engine scheduler: which requests run, and how many tokens each feeds
in the next step. Pure Python: no tensors; it sees the KV cache only through
the :class:`~parrot.backends.kv_manager.KVManager`'s small interface (what a
request gets on admission, positions granted, blocks to copy, release).

* **Admission.** Waiting requests join the running batch, up to
  ``max_running``, by objective rank (:mod:`parrot.backends.admission`):
  latency-critical first, then unannotated requests, then throughput work.
  Latency-critical requests may take ``latency_reserve`` places beyond
  ``max_running``, so one arriving while throughput work fills the batch
  starts at the next step instead of waiting for a sequence to finish.
* **Batch planning.** Each step feeds one token for every decoding request,
  then chunks of pending prompt tokens (chunked prefill) up to the step's
  token budget, latency-critical prompts first, so a long prompt never
  stalls the decoders. While a latency-critical request is decoding, the
  budget is ``latency_step_tokens`` (a step's time grows with its tokens:
  this bounds the time per output token of latency work, and throughput
  prefill proceeds in smaller chunks meanwhile).
* **Preemption.** When a decoder needs a block and none is free, the most
  recently admitted request of the worst rank gives its blocks back and
  returns to the head of its rank's queue (throughput work before latency
  work; never better-ranked work for worse). It recomputes its whole context
  when it runs again, so greedy outputs are unchanged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

from parrot.semantic_vars import EngineError

from .admission import AdmissionQueue
from .engine import OBJECTIVE_RANK
from .engine_request import EngineRequest
from .kv_manager import KVManager


LATENCY_RANK = OBJECTIVE_RANK["latency"]


class SchedulerCounters(Protocol):
    requests_finished: int
    requests_cancelled: int
    preemptions: int


@dataclass(frozen=True)
class StepItem:
    """One request's share of a step: ``tokens`` new positions to feed."""

    request: EngineRequest
    tokens: int
    decoding: bool


@dataclass
class StepPlan:
    """What the model runner does in one step."""

    items: list[StepItem] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) blocks, before the forward


class EngineScheduler:
    """Waiting queue, running batch and step planning of one engine.

    The engine's ``lock`` guards ``waiting`` and ``running`` against the
    threads that submit, cancel and read capacity; methods that say so are
    called with it held.
    """

    def __init__(
        self,
        kv: KVManager,
        counters: SchedulerCounters,
        lock: threading.Condition,
        *,
        max_running: int,
        max_step_tokens: int,
        max_model_len: int,
        whole_prompt_from: int | None = None,
        latency_reserve: int = 0,
        latency_step_tokens: int | None = None,
        admission_max_wait_s: float | None = None,
    ) -> None:
        self.kv = kv
        self.counters = counters
        self.lock = lock
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self.max_model_len = max_model_len
        # Prompts at least this long with nothing cached are fed in one chunk
        # (sparse prefill needs the whole prompt at once); None: never.
        self.whole_prompt_from = whole_prompt_from
        self.latency_reserve = latency_reserve
        self.latency_step_tokens = latency_step_tokens
        # Queued with their submission time: aging counts from there.
        self.waiting: AdmissionQueue[EngineRequest] = AdmissionQueue(admission_max_wait_s)
        self.running: list[EngineRequest] = []
        self.cancelled: set[str] = set()

    # -- with the lock held ---------------------------------------------------
    def admit(self, now: float) -> None:
        """Drop cancelled requests, then fill the batch from the queue."""
        self._drop_cancelled()
        while self.waiting and len(self.running) < self.max_running + self.latency_reserve:
            if len(self.running) >= self.max_running and self.waiting.head(now).rank != LATENCY_RANK:
                break  # the reserve is for latency-critical work only
            r = self.waiting.pop(now)
            if r.seq.stats.started_at is None:
                r.seq.stats.started_at = now
            self.running.append(r)
            self.kv.admit(r)

    def sweep(self) -> None:
        """Take the requests that finished in the last step out of the batch."""
        done = [r for r in self.running if r.seq.finished]
        self.running = [r for r in self.running if not r.seq.finished]
        for r in done:
            r.gone = True
        for r in done:
            self.kv.release(r)

    def leave_all(self) -> list[EngineRequest]:
        """Empty the engine (it is closing); returns who was in it."""
        leaving = [*self.running, *self.waiting]
        self.running = []
        self.waiting.remove_if(lambda r: True)
        for r in leaving:
            r.gone = True
        for r in leaving:
            self.kv.release(r)
        return leaving

    def active(self) -> int:
        """Running requests that have not sent their last event."""
        return sum(not r.seq.finished for r in self.running)

    # -- worker thread ----------------------------------------------------------
    def finish(self, r: EngineRequest) -> None:
        """A request just finished or failed (inside a step): free what it
        holds and count it now, before its last event is sent, so whoever
        sees that event sees an engine that no longer holds it."""
        r.gone = True
        self.counters.requests_finished += 1
        self.kv.release(r)

    def plan(self, batch: list[EngineRequest]) -> StepPlan:
        """Choose each request's new tokens for this step and make their
        blocks writable, preempting when decoders need room."""
        budget = self.step_budget(batch)
        plan = StepPlan()
        # Decoders first (one token each, oldest first), then prefill chunks,
        # latency-critical prompts before throughput ones.
        order = sorted(batch, key=lambda r: (not r.seq.is_decoding, r.rank))
        planned: set[int] = set()
        running = {id(r) for r in self.running}
        for r in order:
            if r.parked or r.seq.finished or id(r) not in running:
                continue
            table = r.table
            pending = len(r.seq.tokens) - table.length
            take = min(pending, budget)
            if self.whole_prompt_from is not None and table.length == 0 and pending >= self.whole_prompt_from:
                take = pending
            if take == 0:
                continue
            if table.length + take > self.max_model_len:
                r.seq.finished = True
                self.finish(r)  # before the error reaches the caller, as for a finish
                r.stream.fail(EngineError(f"context reached max_model_len={self.max_model_len} tokens"))
                continue
            decoding = r.seq.is_decoding
            fit = self.kv.grant(r, take)
            while decoding and fit < take:
                # A decoder needs its block: preempt the newest request of the
                # worst rank not already in this step, or this one.
                victim = self._victim(planned | {id(r)})
                if victim is not None and victim.rank < r.rank:
                    victim = None  # better-ranked work never makes room for worse
                target = victim if victim is not None else r
                self._preempt(target)
                running.discard(id(target))
                if victim is None:
                    break
                fit = self.kv.grant(r, take)
            if fit == 0 or (decoding and fit < take):
                continue
            plan.copies.extend(self.kv.prepare(r, fit))
            budget -= fit
            planned.add(id(r))
            plan.items.append(StepItem(r, fit, decoding))
        if not plan.items:
            # Prefill chunks hold the pool and none can grow: free the newest.
            victim = self._victim(set())
            if victim is not None:
                self._preempt(victim)
        return plan

    def step_budget(self, batch: list[EngineRequest]) -> int:
        """Tokens the next step may feed: ``latency_step_tokens`` while a
        latency-critical request decodes (never fewer than the decoders)."""
        if self.latency_step_tokens is None:
            return self.max_step_tokens
        decoders = [r for r in batch if r.seq.is_decoding and not r.seq.finished and not r.parked]
        if not any(r.rank == LATENCY_RANK for r in decoders):
            return self.max_step_tokens
        return min(self.max_step_tokens, max(self.latency_step_tokens, len(decoders)))

    # -- helpers ------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        if not self.cancelled:
            return
        cancelled = self.cancelled
        dropped = [r for r in self.running if r.request_id in cancelled]
        self.running = [r for r in self.running if r.request_id not in cancelled]
        dropped += self.waiting.remove_if(lambda r: r.request_id in cancelled)
        self.counters.requests_cancelled += len(dropped)
        self.cancelled = set()
        for r in dropped:
            r.gone = True
        for r in dropped:
            self.kv.release(r)

    def _victim(self, skip: set[int]) -> EngineRequest | None:
        """Among running requests holding blocks and not in ``skip`` (ids),
        the most recently admitted of the worst objective rank."""
        victim: EngineRequest | None = None
        for r in reversed(self.running):  # newest first; a later one wins only with a worse rank
            if id(r) not in skip and self.kv.holds_blocks(r) and not r.seq.finished:
                if victim is None or r.rank > victim.rank:
                    victim = r
        return victim

    def _preempt(self, victim: EngineRequest) -> None:
        """Send ``victim`` back to the head of its rank's queue, freeing its
        blocks; it recomputes its context when it runs again."""
        with self.lock:
            self.running.remove(victim)
            self.kv.release(victim)
            victim.preempted += 1
            self.waiting.push_front(victim, victim.seq.stats.submitted_at)
        self.counters.preemptions += 1
