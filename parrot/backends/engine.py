"""The engine interface: what the dataflow layer may ask of any engine.

An engine runs *programs*: a sequence of :class:`Fill` (append these tokens
to the context) and :class:`Gen` (generate into the context) steps over one
growing context. A semantic function with several outputs is one program
(fill the text before the first output, generate it, fill the text up to the
next output, generate that, ...), so the context is prefilled once and never
re-sent. This is the Fill/Gen pair of the published Parrot; forking a child
context from a parent is how prefix sharing becomes explicit later.

Engines know nothing of sessions, variables or tenants.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Protocol, Sequence, TypeVar

from parrot.semantic_vars import EngineError, Perf, SamplingConfig, new_id

FinishReason = Literal["stop", "eos", "length"]
_T = TypeVar("_T")

#: Admission rank of a request by its objective: latency-critical work first,
#: then requests nobody annotated (plain OpenAI requests), then throughput work.
OBJECTIVE_RANK: dict[Perf | None, int] = {"latency": 0, None: 1, "throughput": 2}


@dataclass(frozen=True)
class Fill:
    """Append ``token_ids`` to the context."""

    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Gen:
    """Generate into the context under ``sampling``; ``name`` labels the events."""

    sampling: SamplingConfig
    name: str = ""


@dataclass(frozen=True)
class PrefixHint:
    """Tells the engine that the first ``num_tokens`` tokens are shared by a
    group of requests identified by ``key`` (already namespaced per tenant)."""

    key: str
    num_tokens: int


@dataclass
class GenerationRequest:
    """One program to run on one engine."""

    program: Sequence[Fill | Gen]
    request_id: str = field(default_factory=lambda: new_id("req"))
    prefix_hint: PrefixHint | None = None
    # Whose cached KV blocks this request may reuse (the tenant): token
    # blocks are only shared between requests of the same namespace.
    namespace: str = ""
    # The call's deduced objective (None: nobody said). Engines admit by it
    # (see OBJECTIVE_RANK); within a rank, first come first served.
    objective: Perf | None = None

    @property
    def rank(self) -> int:
        return OBJECTIVE_RANK[self.objective]

    @property
    def num_gens(self) -> int:
        return sum(isinstance(step, Gen) for step in self.program)


@dataclass(frozen=True)
class TokenDelta:
    """Newly decoded text of the ``gen_index``-th :class:`Gen` (for streaming)."""

    gen_index: int
    text: str


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model and the ``top``
    most likely alternatives ``(token id, logprob)``, best first (when the
    Gen's sampling asked for ``logprobs``)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenResult:
    """A finished :class:`Gen`: its text (stop string removed) and tokens."""

    gen_index: int
    name: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    # One entry per token of ``token_ids`` when the Gen asked for logprobs.
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class RequestStats:
    """Where a request's time and tokens went (monotonic seconds)."""

    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    prefill_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class RequestFinished:
    """The last event of a request that ran to its end."""

    stats: RequestStats


EngineEvent = TokenDelta | GenResult | RequestFinished


@dataclass(frozen=True)
class EngineCapacity:
    """Load figures a scheduler places calls by."""

    max_running: int
    running: int
    waiting: int
    free_kv_tokens: int | None = None
    cached_prefixes: frozenset[str] = frozenset()  # prefix-hint keys whose KV the engine holds now
    free_blocks: int | None = None  # KV blocks an allocation may take (empty or only cached)
    total_blocks: int | None = None  # KV blocks in the pool
    cached_blocks: int | None = None  # KV blocks findable by the prefix cache (held or free)
    waiting_tokens: int | None = None  # context tokens of the queued requests, still to be prefilled

    def room(self, queue_depth: int | None = None) -> int:
        """How many more requests this engine can usefully be given now.

        Work-conserving: the engine keeps a queue of up to ``queue_depth``
        requests (default: one full batch) beyond its batch, so a finished
        sequence is replaced at the engine's next step without waiting for
        the caller to place more work. Memory bounds it: once the queued
        prompts alone need more KV than is free, more work would only wait
        in the engine's queue, where the caller can no longer reorder or
        move it. An engine with an empty queue always has room for one.
        """
        depth = self.max_running if queue_depth is None else queue_depth
        room = self.max_running + depth - self.running - self.waiting
        if (self.waiting and self.waiting_tokens is not None and self.free_kv_tokens is not None
                and self.waiting_tokens >= self.free_kv_tokens):
            room = 0
        if self.waiting == 0:
            room = max(room, 1)
        return max(0, room)


class TokenizerLike(Protocol):
    """What layers above an engine use of its tokenizer: the model's own
    (:class:`~parrot.backends.tokenizer.Tokenizer`) or a remote engine's
    stand-in (:class:`~parrot.backends.remote_engine.ApproxTokenizer`)."""

    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    #: Whether a plain prompt starts with BOS (as the model's tokenizer does it).
    prompt_bos: bool
    #: The vocabulary's size; None when unknown (a stand-in tokenizer).
    vocab_size: int | None
    #: Whether :meth:`chat_frame` and :meth:`chat_prompt` can render chat
    #: turns with the model's template (False: no local template at all).
    renders_chat: bool

    def encode(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids; ``special=True`` reads control tokens written in the
        text (a template's own text), the default reads them as plain text."""
    def decode(self, token_ids: Sequence[int]) -> str: ...

    def chat_frame(self, messages: Sequence[dict[str, str]] = ()) -> tuple[list[int], list[int]]:
        """Token ids the chat template puts before and after one more user
        turn (``ValueError`` when the template cannot render the turns)."""

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The chat template's text of ``messages`` ready to prompt with
        (generation prompt added, no leading BOS: the engine adds its own);
        ``ValueError`` when the template cannot render them."""


class Mailbox(Protocol):
    """Where a :class:`RequestStream`'s events go: the submitting loop's
    mailbox by default, or an engine process's outbox (which sends each
    step's events to the API process in one message)."""

    def post(self, stream: "RequestStream", item: object) -> None: ...
    def flush(self) -> None: ...


class RequestStream:
    """The events of one request, consumed with ``async for`` on the loop
    that submitted it. Engines push from any thread with :meth:`push`.

    ``mailbox`` replaces the submitting loop as the events' destination (then
    no loop is needed and the stream is not iterated here)."""

    _END = object()

    def __init__(self, request: GenerationRequest, cancel: Callable[[str], None], *,
                 mailbox: Mailbox | None = None) -> None:
        self.request = request
        self._cancel = cancel
        self.done = False
        if mailbox is None:
            self._loop = asyncio.get_running_loop()
            self._queue: asyncio.Queue[object] = asyncio.Queue()
            mailbox = _mailbox(self._loop)
        self._box = mailbox

    # -- producer side (engine thread) ---------------------------------
    def push(self, event: EngineEvent) -> None:
        self._deliver(event)

    def fail(self, error: BaseException) -> None:
        self._deliver(error)

    def _deliver(self, item: object) -> None:
        if self.done:
            return
        self._box.post(self, item)

    # -- consumer side ------------------------------------------------
    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[EngineEvent]:
        while not self.done:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.done = True
                raise item
            if isinstance(item, RequestFinished):
                self.done = True
            yield item  # type: ignore[misc]

    async def results(self) -> tuple[list[GenResult], RequestStats]:
        """Drain the stream; return every :class:`GenResult` and the stats."""
        results: list[GenResult] = []
        stats = RequestStats()
        async for event in self:
            if isinstance(event, GenResult):
                results.append(event)
            elif isinstance(event, RequestFinished):
                stats = event.stats
        return results, stats

    def cancel(self) -> None:
        """Stop the request; the engine frees its memory at its next step."""
        if not self.done:
            self.done = True
            self._cancel(self.request.request_id)


class _Mailbox:
    """Events from engine threads to one event loop, delivered in batches:
    the loop is woken once per batch, not once per event (an engine step
    emits an event for every running request)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the registry is keyed weakly by the loop, so a strong
        # reference here would keep every loop ever used alive.
        self._loop = weakref.ref(loop)
        self._items: collections.deque[tuple[RequestStream, object]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, stream: RequestStream, item: object) -> None:
        held = getattr(_held, "boxes", None)
        with self._lock:
            self._items.append((stream, item))
            loop = self._loop()
            if loop is None or loop.is_closed():
                wake = False  # checked on every post: a pending wake-up will never run
            elif held is not None:  # inside batched_delivery(): wake the loop at its end
                held.add(self)
                return
            elif self._scheduled:
                return
            else:
                self._scheduled = wake = True
        self._wake() if wake else self._orphan()

    def flush(self) -> None:
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        self._wake()

    def _wake(self) -> None:
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("event loop is gone")
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            self._orphan()

    def _orphan(self) -> None:
        """The consumer's loop is closed: nobody is listening any more, and
        the engine thread must not die for it. Cancel the requests."""
        with self._lock:
            orphans = [s for s, _ in self._items]
            self._items.clear()
            self._scheduled = False
        for s in orphans:
            if not s.done:
                s.done = True
                s._cancel(s.request.request_id)

    def _drain(self) -> None:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._scheduled = False
        for stream, item in items:  # in posting order, so each stream's order holds
            stream._queue.put_nowait(item)


_held = threading.local()


@contextlib.contextmanager
def batched_delivery() -> Iterator[None]:
    """Hold the events this thread pushes until the block ends, then wake each
    consumer loop once (an engine wraps each step's events in it)."""
    if getattr(_held, "boxes", None) is not None:
        yield
        return
    _held.boxes = set()
    try:
        yield
    finally:
        boxes, _held.boxes = _held.boxes, None
        for box in boxes:
            box.flush()


def defer_flush(box: Mailbox) -> bool:
    """Inside :func:`batched_delivery`: flush ``box`` once when the block ends
    and return True; outside one return False (the caller sends at once)."""
    boxes = getattr(_held, "boxes", None)
    if boxes is None:
        return False
    boxes.add(box)
    return True


_mailboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        return box


class Engine(ABC):
    """Runs generation programs and reports its load."""

    name: str
    tokenizer: TokenizerLike

    @property
    def model_id(self) -> str:
        """The id clients name the served model by (a model folder's name); default: the engine's name."""
        return self.name

    @property
    def max_model_len(self) -> int | None:
        """The longest context (prompt and output tokens) a request may reach; None when unknown."""
        return None

    def stats(self) -> dict[str, int]:
        """Counters since start (tokens, steps, prefix-cache figures) for metrics; empty when the engine keeps none."""
        return {}

    @property
    def runs_model_jobs(self) -> bool:
        """True when :meth:`run_model_job` works (the engine holds a Parrot model)."""
        return False

    def run_model_job(self, fn: Callable[..., _T], *args: Any) -> _T:
        """The optional scoring capability: call ``fn(engine, *args)`` where the
        engine's model lives (this process, or the engine's own process) and
        return its result. ``engine`` there is a
        :class:`~parrot.backends.torch_engine.TorchEngine` whose ``model`` and
        ``tokenizer`` ``fn`` may read (compression scores tokens so, with the
        weights that serve). ``fn`` is a module-level function and its
        arguments and result are picklable. Blocking; call it off the event
        loop. Engines without a local model raise ``NotImplementedError``."""
        raise NotImplementedError(f"engine {self.name} has no model to run jobs on")

    @abstractmethod
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue ``request``; call from a running event loop, which receives its events."""

    @abstractmethod
    def capacity(self) -> EngineCapacity:
        """Current load."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a request if it is queued or running."""

    def healthy(self) -> bool:
        """False while the engine cannot take requests (a dead actor, an
        unreachable server); the scheduler then places calls elsewhere."""
        return True

    def gone(self) -> bool:
        """True once the engine will never take requests again (an actor with
        no restarts left, a closed engine). The default: never."""
        return False

    def close(self) -> None:
        """Release threads and memory. The default does nothing."""


__all__ = [
    "Engine", "EngineCapacity", "EngineError", "EngineEvent", "Fill", "FinishReason", "Gen", "GenResult",
    "GenerationRequest", "Mailbox", "OBJECTIVE_RANK", "PrefixHint", "RequestFinished", "RequestStats", "RequestStream", "TokenDelta", "TokenLogprob",
    "TokenizerLike",
]
