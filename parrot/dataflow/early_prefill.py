"""Prefill the known head of a waiting call while its producers run.

A call that waits for an input (another call's output, or a value the
client sets later) already has a known prompt head: its template text and
the inputs that have values, up to the first input that has none. The KV of
that head does not depend on what arrives later, so it can be computed now,
on the engine the call will most likely run on, and when the inputs arrive
only the rest of the prompt is prefilled.

The warm-up is an ordinary engine request (see
:func:`~parrot.dataflow.program.head_request`: the head's tokens and one
greedy token nobody reads), so every engine runs it through its public
``submit``: in-process, in an engine process, as a Ray actor, or on an
OpenAI-compatible server with an automatic prefix cache. It carries

* the call's tenant as its namespace, so its blocks are found only by that
  tenant's requests (another tenant's identical head is another key and
  other block digests);
* the throughput objective, so engines admit latency-critical work before
  it, put its prefill after theirs in a step, and preempt it first;
* the head's prefix-boundary key as its prefix hint: the engine stores the
  head under it (the last, partial block too), and the call, hinted with
  the same key when it is dispatched, takes the stored head and is placed
  on the engine that holds it.

The head is not pinned beyond the warm-up: once it has run, the head stays
in the engine's prefix cache like any other request's prefix, kept until the
pool runs short and then dropped before any running request is preempted.
A pin held while producers run (for an unbounded time) would let one
tenant's waiting calls hold memory that others' running work needs.

When: only on engine time nobody else wants. A warm-up goes to an engine
with nothing running or queued (neither requests it holds nor calls the
runtime is placing on it); when none is idle, the call's head waits for the
next scheduling pass (a call or a warm-up finishing) and is tried again while
the call still waits. So a head is prefilled early while the engine would
otherwise idle -- its call waits for a tool, a client, or a producer on
another engine -- and never competes with running work, not even at
throughput priority. (Measured on one CPU engine, a warm-up that shares the
engine with the call's own producer only moves the same prefill earlier and
costs the producer its first token: see the README.)

Bounds: only heads of at least ``min_tokens`` tokens (shorter ones cost less
to prefill with the call than a request costs), at most one warm-up per head
key in flight, none when the head is stored on an engine already.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from parrot.backends.engine import Engine, GenerationRequest, RequestStream, TokenizerLike
from parrot.semantic_vars import ParrotError

from .graph import CallNode, DataflowGraph
from .prefix import PrefixBoundary
from .program import head_request

log = logging.getLogger(__name__)

#: Default shortest head worth a warm-up: 4 blocks of the torch engine's
#: default 16-token KV block (shorter heads are cheap to prefill with the call).
DEFAULT_MIN_TOKENS = 64


@dataclass
class EarlyPrefillCounters:
    """What early prefill did since start."""

    started: int = 0  # warm-ups submitted to an engine
    finished: int = 0  # warm-ups that ran to their end
    failed: int = 0  # warm-ups an engine refused or failed (the call runs as without them)
    tokens: int = 0  # head tokens sent in warm-ups
    skipped_short: int = 0  # heads under min_tokens
    skipped_inflight: int = 0  # a warm-up of the same head key was in flight
    skipped_stored: int = 0  # an engine held the head already
    deferred: int = 0  # passes that found no idle engine for the next head


class EarlyPrefillHost(Protocol):
    """What early prefill asks of the runtime."""

    def idle_engine_for(self, key: str) -> Engine | None:
        """The idle engine a call hinted with ``key`` would go to; None when no engine is idle."""

    def holds_prefix(self, key: str) -> bool:
        """Whether an engine holds the prefix ``key`` now."""

    def warmed(self, key: str, engine: Engine) -> None:
        """A warm-up of ``key`` went to ``engine`` (calls hinted with it should follow)."""

    def admit_warm_up(self, request: GenerationRequest, namespace: str) -> None:
        """Raise a :class:`ParrotError` if the tenant may not send ``request``."""

    def warm_up_ended(self) -> None:
        """An engine has room again: run a scheduling pass."""


class EarlyPrefill:
    """The waiting calls whose heads may be warmed up, and the warm-ups in flight.

    The runtime registers every call that is submitted waiting
    (:meth:`add`) and runs :meth:`run_pass` on its event loop at each
    scheduling pass.
    """

    def __init__(self, *, min_tokens: int = DEFAULT_MIN_TOKENS) -> None:
        if min_tokens < 1:
            raise ValueError(f"early prefill min_tokens must be >= 1, got {min_tokens}")
        self.min_tokens = min_tokens
        self.counters = EarlyPrefillCounters()
        # Waiting calls with a head to warm, oldest first: (call, its head, its tenant).
        self._pending: OrderedDict[str, tuple[CallNode, PrefixBoundary, str]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[None]] = {}  # head key -> its warm-up

    @property
    def inflight(self) -> frozenset[str]:
        """Head keys whose warm-up runs now."""
        return frozenset(self._inflight)

    @property
    def pending(self) -> int:
        """Waiting calls whose head may still be warmed up."""
        return len(self._pending)

    def add(self, call: CallNode, head: PrefixBoundary | None, namespace: str) -> None:
        """Consider warming ``call``'s ``head`` (the last boundary of its known text)."""
        if head is not None:
            self._pending[call.id] = (call, head, namespace)

    def discard(self, call_id: str) -> None:
        """``call_id`` no longer waits (ready, failed, cancelled or forgotten): no warm-up for it."""
        self._pending.pop(call_id, None)

    def run_pass(self, graph: DataflowGraph, host: EarlyPrefillHost) -> None:
        """Warm up the oldest pending heads while an engine is idle."""
        while self._pending:
            call_id, (call, head, namespace) = next(iter(self._pending.items()))
            if call.state != "waiting":
                del self._pending[call_id]
                continue
            if head.key in self._inflight or host.holds_prefix(head.key):
                del self._pending[call_id]
                if head.key in self._inflight:
                    self.counters.skipped_inflight += 1
                else:
                    self.counters.skipped_stored += 1
                continue
            engine = host.idle_engine_for(head.key)
            if engine is None:
                self.counters.deferred += 1
                return  # no engine is idle: every other head waits too
            del self._pending[call_id]
            request = self._request(call, head, graph, engine.tokenizer)
            if request is None:
                self.counters.skipped_short += 1
                continue
            self._submit(call, head.key, request, namespace, engine, host)

    def _request(self, call: CallNode, head: PrefixBoundary, graph: DataflowGraph,
                 tokenizer: TokenizerLike) -> GenerationRequest | None:
        """The warm-up request of ``call``'s head; None when the head is too short."""
        known = {name: value for name, value in graph.input_values(call).items()
                 if value is not None and name not in call.compress}
        request = head_request(call.function, call.template, known, tokenizer, key=head.key, end=head.end,
                               request_id=f"{call.id}.head")
        hint = request.prefix_hint if request is not None else None
        if request is None or hint is None or hint.num_tokens < self.min_tokens:
            return None
        return request

    def _submit(self, call: CallNode, key: str, request: GenerationRequest, namespace: str, engine: Engine,
                host: EarlyPrefillHost) -> None:
        request.namespace = namespace
        request.objective = "throughput"
        try:
            host.admit_warm_up(request, namespace)
            stream = engine.submit(request)
        except ParrotError as exc:  # the call itself will meet (and report) the same refusal
            log.info("no early prefill for call %s: %s", call.id, exc)
            self.counters.failed += 1
            return
        assert request.prefix_hint is not None
        self.counters.started += 1
        self.counters.tokens += request.prefix_hint.num_tokens
        host.warmed(key, engine)
        task = asyncio.get_running_loop().create_task(self._drain(stream), name=f"{call.id}.head")
        self._inflight[key] = task

        def ended(_task: asyncio.Task[None]) -> None:
            self._inflight.pop(key, None)
            host.warm_up_ended()

        task.add_done_callback(ended)

    async def _drain(self, stream: RequestStream) -> None:
        try:
            await stream.results()
            self.counters.finished += 1
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as exc:  # a lost warm-up costs only its saving
            self.counters.failed += 1
            log.info("early prefill %s failed: %s", stream.request.request_id, exc)

    async def wait(self) -> None:
        """Until the warm-ups in flight now have ended."""
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    def cancel_all(self) -> None:
        """Stop every warm-up in flight and forget the pending heads (the runtime is shutting down)."""
        self._pending.clear()
        for task in list(self._inflight.values()):
            task.cancel()


__all__ = ["DEFAULT_MIN_TOKENS", "EarlyPrefill", "EarlyPrefillCounters", "EarlyPrefillHost"]
