"""An engine that drives any OpenAI-compatible server (vLLM, SGLang, a hosted
API, another Parrot) through its streaming ``/v1/completions`` endpoint.

Parrot's DAG scheduling then works on top of deployments users already have:
the runtime builds a Fill/Gen program as for the torch engine, and this
engine turns it back into text. For each :class:`Gen` it sends the whole
context so far as the prompt (the server's own prefix cache makes the repeat
cheap), streams the completion under the Gen's sampling options, appends it
to the context and goes on to the next step.

Token counts. The program arrives as token ids, so the engine needs a
tokenizer that round-trips text. Given the served model's tokenizer (a local
Hugging Face folder) counts are exact; without one, :class:`ApproxTokenizer`
packs about four bytes of text into each id, the usual rule of thumb for
English BPE vocabularies: texts round-trip exactly, but token counts (and so
quotas and prompt-size checks that use them) are approximate. The usage the
server reports is preferred wherever it exists.

Errors. A server that cannot be reached, drops the connection, or answers
429/502/503/504 raises :class:`EngineUnavailableError` (the runtime re-queues
the call elsewhere) and the engine reports unhealthy until a probe of
``/v1/models`` succeeds again; any other HTTP error fails the call with the
server's message in an :class:`EngineError`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import httpx

from parrot.semantic_vars import EngineError, EngineUnavailableError, SamplingConfig, new_id

from .engine import (
    EngineCapacity,
    Fill,
    FinishReason,
    Gen,
    GenerationRequest,
    GenResult,
    RequestFinished,
    RequestStats,
    RequestStream,
    TokenDelta,
    TokenizerLike,
)
from .proxy import ProxyEngine

log = logging.getLogger(__name__)

#: Answers that mean "try elsewhere / later", not "this request is wrong".
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_RECENT_PREFIXES = 256  # prefix keys remembered as probably cached by the server


class ApproxTokenizer:
    """A stateless, exactly reversible stand-in tokenizer: each id packs up to
    four UTF-8 bytes of whole characters (``len << 32 | bytes``). Counts are
    an approximation of a real BPE vocabulary's, nothing more."""

    bos_token_id: int | None = None
    eos_token_ids: frozenset[int] = frozenset()
    prompt_bos = False
    vocab_size: int | None = None
    renders_chat = False  # no chat template here: chat turns go as plain text
    approximate = True
    BYTES_PER_ID = 4

    def chat_frame(self, messages: Sequence[dict[str, str]] = ()) -> tuple[list[int], list[int]]:
        raise ValueError("the served model's tokenizer has no chat template")

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        raise ValueError("the served model's tokenizer has no chat template")

    def encode(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        # ``special`` changes nothing here: the remote server tokenizes the text.
        ids: list[int] = []
        chunk = b""
        for ch in text:
            b = ch.encode("utf-8")
            if len(chunk) + len(b) > self.BYTES_PER_ID:
                ids.append(len(chunk) << 32 | int.from_bytes(chunk, "big"))
                chunk = b""
            chunk += b
        if chunk:
            ids.append(len(chunk) << 32 | int.from_bytes(chunk, "big"))
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        out = bytearray()
        for i in token_ids:
            n = i >> 32
            if not 0 < n <= self.BYTES_PER_ID:
                continue  # not one of ours (a stray special id): nothing to show
            out += (i & 0xFFFFFFFF).to_bytes(n, "big")
        return out.decode("utf-8", errors="replace")


def _api_base(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` -> the ``/v1`` base."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"remote engine URL must start with http:// or https://, got {url!r}")
    return base if base.endswith("/v1") else base + "/v1"


class RemoteEngine(ProxyEngine):
    """Runs Fill/Gen programs on an OpenAI-compatible completions server.

    ``max_concurrency`` bounds the requests in flight to the server (the
    engine's capacity, as the scheduler sees it); more wait here. ``model``
    defaults to the first id ``/v1/models`` lists. ``tokenizer`` is a local
    model folder or a tokenizer object; without one counts are approximate.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        tokenizer: TokenizerLike | str | Path | None = None,
        max_concurrency: int = 16,
        name: str | None = None,
        timeout_s: float = 300.0,
        probe_interval_s: float = 1.0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        super().__init__()
        self.url = url
        self.base_url = _api_base(url)
        self.model = model
        self.name = name or new_id("remote")
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.probe_interval_s = probe_interval_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._model_id = self.name  # clients' name for the model: the tokenizer folder's when given
        if tokenizer is None:
            self.tokenizer: TokenizerLike = ApproxTokenizer()
            log.warning("remote engine %s: no tokenizer given; token counts are approximate (~4 bytes a token)",
                        self.name)
        elif isinstance(tokenizer, (str, Path)):
            from .tokenizer import Tokenizer

            self.tokenizer = Tokenizer(tokenizer)
            self._model_id = Path(tokenizer).name
        else:
            self.tokenizer = tokenizer
        #: False when counts come from :class:`ApproxTokenizer` rather than the model's tokenizer.
        self.exact_counts = not getattr(self.tokenizer, "approximate", False)
        self._lock = threading.Lock()  # capacity() may be read from another thread
        self._running = 0
        self._waiting = 0
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._probe: asyncio.Task[None] | None = None

    # -- Engine API -------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self._model_id

    def submit(self, request: GenerationRequest) -> RequestStream:
        stream = RequestStream(request, self.cancel)
        if not any(not isinstance(step, Fill) for step in request.program):
            raise EngineError("the program has no generation step")
        if any(isinstance(step, Gen) and step.sampling.constraint is not None for step in request.program):
            # OpenAI's /v1/completions has no portable way to send a grammar.
            raise EngineError(f"remote engine {self.name} cannot constrain outputs (choices, regex, schema)")
        self._bind_loop()
        with self._lock:
            self._waiting += 1
        self._spawn(request.request_id, self._serve(request, stream))
        return stream

    def capacity(self) -> EngineCapacity:
        with self._lock:
            return EngineCapacity(self.max_concurrency, self._running, self._waiting,
                                  cached_prefixes=frozenset(self._recent))

    def close(self) -> None:
        client, loop = self._client, self._loop
        self._client = None
        if client is None or loop is None or loop.is_closed():
            return
        self._cancel_tasks()
        if self._probe is not None:
            loop.call_soon_threadsafe(self._probe.cancel)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(client.aclose())
        elif loop.is_running():
            asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=10)

    # -- health -----------------------------------------------------------
    async def check_health(self) -> bool:
        """Probe ``/v1/models`` once; updates :meth:`healthy` and returns it."""
        self._bind_loop()
        assert self._client is not None
        try:
            r = await self._client.get("/models", timeout=10)
            ok = r.status_code == 200
        except httpx.TransportError:
            ok = False
        self._healthy = ok
        return ok

    def _lost(self, why: str) -> EngineUnavailableError:
        """Mark the server unreachable, start probing it, and say why."""
        if self._healthy:
            log.warning("remote engine %s (%s) is unavailable: %s", self.name, self.base_url, why)
        self._healthy = False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_healthy())
        return EngineUnavailableError(f"remote engine {self.name} ({self.base_url}) is unavailable: {why}")

    async def _probe_until_healthy(self) -> None:
        # Back off before each probe: a server that answered 429 lists its
        # models at once, and calls must not bounce straight back to it.
        await asyncio.sleep(self.probe_interval_s)
        while not await self.check_health():
            await asyncio.sleep(self.probe_interval_s)
        log.info("remote engine %s (%s) is reachable again", self.name, self.base_url)

    # -- running a program ----------------------------------------------------
    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client is None:
            # One client per event loop: httpx connections belong to the loop that made them.
            self._loop = loop
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers,
                                             timeout=httpx.Timeout(self.timeout_s, connect=10.0))
            self._slots = asyncio.Semaphore(self.max_concurrency)

    async def _serve(self, request: GenerationRequest, stream: RequestStream) -> None:
        assert self._slots is not None
        admitted = False
        try:
            async with self._slots:
                with self._lock:
                    self._waiting -= 1
                    self._running += 1
                admitted = True
                try:
                    await self._run_program(request, stream)
                finally:
                    with self._lock:
                        self._running -= 1
        except asyncio.CancelledError:
            pass  # the consumer cancelled: nobody reads the stream any more
        except EngineError as exc:
            stream.fail(exc)
        except Exception as exc:  # a malformed answer, a bug: the call fails, the engine lives
            log.exception("remote engine %s failed a request", self.name)
            stream.fail(EngineError(f"remote engine {self.name}: {type(exc).__name__}: {exc}"))
        finally:
            if not admitted:
                with self._lock:
                    self._waiting -= 1

    async def _run_program(self, request: GenerationRequest, stream: RequestStream) -> None:
        stats = RequestStats(started_at=time.monotonic())
        if request.prefix_hint is not None:
            with self._lock:
                self._recent[request.prefix_hint.key] = None
                self._recent.move_to_end(request.prefix_hint.key)
                while len(self._recent) > _RECENT_PREFIXES:
                    self._recent.popitem(last=False)
        model = self.model or await self._discover_model()
        context = ""
        pending: list[int] = []
        gen_index = 0
        for step in request.program:
            if isinstance(step, Fill):
                pending.extend(step.token_ids)
                continue
            if pending:
                context += self.tokenizer.decode(pending)
                pending = []
            if not context:
                raise EngineError("a generation step needs a non-empty prompt before it")
            text, finish = await self._complete(model, context, step.sampling, gen_index, stream, stats)
            ids = tuple(self.tokenizer.encode(text))
            stream.push(GenResult(gen_index, step.name, text, ids, finish))
            context += text
            gen_index += 1
        stats.finished_at = time.monotonic()
        stream.push(RequestFinished(stats))

    async def _discover_model(self) -> str:
        assert self._client is not None
        try:
            r = await self._client.get("/models", timeout=30)
        except httpx.TransportError as exc:
            raise self._lost(f"{type(exc).__name__}: {exc}") from exc
        self._raise_for_status(r, r.text)
        data = r.json().get("data") or []
        if not data:
            raise EngineError(f"remote engine {self.name}: {self.base_url}/models lists no model")
        self.model = str(data[0]["id"])
        return self.model

    def _raise_for_status(self, r: httpx.Response, text: str) -> None:
        if r.status_code == 200:
            return
        try:
            detail = json.loads(text).get("error", text)
            message = detail.get("message", str(detail)) if isinstance(detail, dict) else str(detail)
        except (ValueError, AttributeError):
            message = text[:500]
        if r.status_code in RETRYABLE_STATUS:
            raise self._lost(f"HTTP {r.status_code}: {message}")
        raise EngineError(f"remote engine {self.name}: HTTP {r.status_code} from {r.request.url}: {message}")

    async def _complete(
        self,
        model: str,
        prompt: str,
        sampling: SamplingConfig,
        gen_index: int,
        stream: RequestStream,
        stats: RequestStats,
    ) -> tuple[str, FinishReason]:
        """Stream one completion of ``prompt``; returns its text and finish reason."""
        assert self._client is not None
        body: dict[str, Any] = {
            "model": model, "prompt": prompt, "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "stream": True, "stream_options": {"include_usage": True},
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.frequency_penalty:
            body["frequency_penalty"] = sampling.frequency_penalty
        if sampling.presence_penalty:
            body["presence_penalty"] = sampling.presence_penalty
        if sampling.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in sampling.logit_bias}
        if sampling.ignore_eos:
            body["ignore_eos"] = True  # vLLM's and Parrot's extension
        pieces: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] | None = None
        try:
            async with self._client.stream("POST", "/completions", json=body) as r:
                if r.status_code != 200:
                    self._raise_for_status(r, (await r.aread()).decode("utf-8", errors="replace"))
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # SSE comments, blank separators
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        err = chunk["error"]
                        message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                        raise EngineError(f"remote engine {self.name}: the server failed the request: {message}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        piece = choice.get("text") or ""
                        if piece:
                            if stats.first_token_at is None:
                                stats.first_token_at = time.monotonic()
                            pieces.append(piece)
                            stream.push(TokenDelta(gen_index, piece))
                        finish = choice.get("finish_reason") or finish
        except httpx.TransportError as exc:  # refused, reset, timed out, cut mid-stream
            raise self._lost(f"{type(exc).__name__}: {exc}") from exc
        if finish == "abort":  # vLLM: the server dropped the request (shutting down, preempted)
            raise self._lost("the server aborted the request")
        text = "".join(pieces)
        if usage:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            stats.prefill_tokens += int(usage.get("prompt_tokens", 0)) - int(cached)
            stats.cached_tokens += int(cached)
            stats.generated_tokens += int(usage.get("completion_tokens", 0))
        else:
            stats.prefill_tokens += len(self.tokenizer.encode(prompt, add_bos=True))
            stats.generated_tokens += len(self.tokenizer.encode(text))
        return text, ("length" if finish == "length" else "stop")


__all__ = ["ApproxTokenizer", "RemoteEngine", "RETRYABLE_STATUS"]
