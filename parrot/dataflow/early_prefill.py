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

Bounds: only heads of at least ``min_tokens`` tokens (shorter ones cost less
to prefill with the call than a request costs), at most one warm-up per head
key in flight, none when the head is already stored on an engine, and none
when no engine has room for more work (then it would only queue).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable, Mapping

from parrot.backends.engine import Engine, GenerationRequest, RequestStream
from parrot.semantic_vars import ParrotError

from .graph import CallNode
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
    skipped_no_engine: int = 0  # the head was stored already, or no engine had room


class EarlyPrefill:
    """Issues warm-ups of waiting calls' heads and tracks those in flight.

    The runtime calls :meth:`consider` on its event loop for every call that
    is submitted waiting; it supplies ``pick(key)``, the engine the call
    would be placed on (None: do not warm up).
    """

    def __init__(self, *, min_tokens: int = DEFAULT_MIN_TOKENS) -> None:
        if min_tokens < 1:
            raise ValueError(f"early prefill min_tokens must be >= 1, got {min_tokens}")
        self.min_tokens = min_tokens
        self.counters = EarlyPrefillCounters()
        self._inflight: dict[str, asyncio.Task[None]] = {}  # head key -> its warm-up

    @property
    def inflight(self) -> frozenset[str]:
        """Head keys whose warm-up runs now."""
        return frozenset(self._inflight)

    def consider(
        self,
        call: CallNode,
        head: PrefixBoundary | None,
        known: Mapping[str, str],
        namespace: str,
        pick: Callable[[str], Engine | None],
        *,
        placed: Callable[[str, Engine], None] | None = None,
        check: Callable[[GenerationRequest], None] | None = None,
    ) -> bool:
        """Warm up ``call``'s ``head`` (its known text's last boundary, with
        the ``known`` input values) if it is worth it; True when a warm-up
        was submitted. ``placed(key, engine)`` is told where one went;
        ``check`` may raise to refuse the request (a tenant's prompt limit)."""
        if head is None:
            return False
        if head.key in self._inflight:
            self.counters.skipped_inflight += 1
            return False
        engine = pick(head.key)
        if engine is None:
            self.counters.skipped_no_engine += 1
            return False
        request = head_request(call.function, call.template, known, engine.tokenizer, key=head.key,
                               end=head.end, request_id=f"{call.id}.head")
        hint = request.prefix_hint if request is not None else None
        if request is None or hint is None or hint.num_tokens < self.min_tokens:
            self.counters.skipped_short += 1
            return False
        request.namespace = namespace
        request.objective = "throughput"
        try:
            if check is not None:
                check(request)
            stream = engine.submit(request)
        except ParrotError as exc:  # the call itself will meet (and report) the same refusal
            log.info("no early prefill for call %s: %s", call.id, exc)
            self.counters.failed += 1
            return False
        self.counters.started += 1
        self.counters.tokens += hint.num_tokens
        if placed is not None:
            placed(head.key, engine)
        task = asyncio.get_running_loop().create_task(self._drain(stream), name=f"{call.id}.head")
        self._inflight[head.key] = task
        task.add_done_callback(lambda _t, key=head.key: self._inflight.pop(key, None))
        return True

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
        """Until every warm-up in flight now has ended."""
        tasks = list(self._inflight.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def cancel_all(self) -> None:
        """Stop every warm-up in flight (the runtime is shutting down)."""
        for task in list(self._inflight.values()):
            task.cancel()


__all__ = ["DEFAULT_MIN_TOKENS", "EarlyPrefill", "EarlyPrefillCounters"]
