"""One request's progress through its Fill/Gen program.

A :class:`Sequence` owns the token list of its context and knows which of
those tokens are already in the KV cache (``kv.length``) and which are still
*pending* (to be fed to the model). The engine loop only asks it for pending
tokens and hands it sampled tokens; everything about outputs, stop strings
and moving to the next program step lives here, free of any model code.
"""

from __future__ import annotations

import time
from typing import Callable

from parrot.semantic_vars import EngineError

from .engine import (
    EngineEvent,
    Fill,
    FinishReason,
    Gen,
    GenerationRequest,
    GenResult,
    RequestFinished,
    RequestStats,
    TokenDelta,
    TokenizerLike,
    TokenLogprob,
)
from .block_manager import BlockTable

# Tokens of context decoded before a generation so the first generated token
# gets its leading space right (SentencePiece tokenizers drop it otherwise).
_DECODE_CONTEXT = 4


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could begin a stop string
    (they are not streamed until it is clear they are not one)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest


class Sequence:
    """Context tokens, KV state and output bookkeeping of one request."""

    def __init__(
        self,
        request: GenerationRequest,
        kv: BlockTable,
        tokenizer: TokenizerLike,
        emit: Callable[[EngineEvent], None],
        max_context: int | None = None,
    ) -> None:
        self.request = request
        # A Gen ends with reason "length" when the context reaches this many
        # tokens (the engine's max_model_len), as it does at max_tokens.
        self.max_context = max_context
        self.kv = kv
        self.tokenizer = tokenizer
        self.emit = emit
        self.stats = RequestStats()
        self.tokens: list[int] = []
        self.cursor = 0  # index of the program step being run
        self.gen_index = -1
        self.gen_start = 0  # index in self.tokens of the current Gen's first token
        self._context: tuple[int, list[int], int] | None = None  # (gen index, tokens before it, their text's length)
        self.gen_ids: list[int] = []
        self.gen_logprobs: list[TokenLogprob] = []  # when the Gen asks for logprobs
        self.streamed = 0  # characters of the current Gen already sent as deltas
        self.finished = False
        self.before_finish: Callable[[], None] | None = None
        self._advance()

    # -- what the engine asks ---------------------------------------------
    @property
    def pending(self) -> list[int]:
        """Tokens of the context not yet in the KV cache."""
        return self.tokens[self.kv.length :]

    @property
    def generating(self) -> bool:
        return not self.finished and isinstance(self.request.program[self.cursor], Gen)

    @property
    def is_decoding(self) -> bool:
        """True when the only pending token is one this Gen just sampled."""
        return self.generating and bool(self.gen_ids) and len(self.tokens) - self.kv.length == 1

    @property
    def current_gen(self) -> Gen:
        step = self.request.program[self.cursor]
        assert isinstance(step, Gen)
        return step

    def attach_cached_prefix(self, blocks: list[int], n: int, digests: list[bytes] | None = None) -> int:
        """Start the context from ``blocks`` that already hold the KV of its
        first ``n`` positions (a shared prefix) instead of prefilling them.

        Call before any token was fed. When the prefix is the whole context
        before a Gen, its last position is fed again (generating needs its
        logits). Returns the positions actually skipped, also added to
        ``stats.cached_tokens``.
        """
        if self.kv.length:
            raise ValueError("a cached prefix must be attached before the sequence runs")
        if not 0 < n <= len(self.tokens):
            raise ValueError(f"a cached prefix of {n} tokens does not fit a context of {len(self.tokens)}")
        self.kv.attach(blocks, n, digests)
        if self.generating and self.kv.length == len(self.tokens):
            self.kv.truncate(self.kv.length - 1)
        self.stats.cached_tokens += self.kv.length
        return self.kv.length

    def restart(self) -> None:
        """Forget every cached position (preemption): the whole context is
        pending again and is recomputed when the sequence runs next."""
        self.kv.release()

    # -- program steps ----------------------------------------------------
    def _advance(self) -> None:
        """Consume Fill steps up to the next Gen (or the end)."""
        program = self.request.program
        while self.cursor < len(program) and isinstance(program[self.cursor], Fill):
            self.tokens.extend(program[self.cursor].token_ids)  # type: ignore[union-attr]
            self.cursor += 1
        if self.cursor == len(program):
            self._finish()
            return
        if not self.tokens:
            raise EngineError("a generation step needs a non-empty prompt before it")
        if self.kv.length == len(self.tokens):
            # Everything is cached but generating needs the last position's
            # logits: drop it from the cache so it is fed again.
            self.kv.truncate(self.kv.length - 1)
        self.gen_index += 1
        self.gen_start = len(self.tokens)
        self.gen_ids = []
        self.gen_logprobs = []
        self.streamed = 0
        self._context = None

    def _gen_text(self, ids: list[int]) -> str:
        if self._context is None or self._context[0] != self.gen_index:
            # The few tokens before the Gen and their text, once per Gen: the
            # Gen's text is what decoding them with its tokens adds.
            context = self.tokens[max(0, self.gen_start - _DECODE_CONTEXT) : self.gen_start]
            self._context = (self.gen_index, context, len(self.tokenizer.decode(context)))
        _, context, prefix_len = self._context
        return self.tokenizer.decode(context + ids)[prefix_len:]

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Take one sampled token of the current Gen (and its log-probability,
        when the Gen asked for them) and emit what follows."""
        now = time.monotonic()
        if self.stats.first_token_at is None:
            self.stats.first_token_at = now
        self.stats.generated_tokens += 1
        gen = self.current_gen
        stops = gen.sampling.stop
        self.gen_ids.append(token)
        self.tokens.append(token)
        if logprob is not None:
            self.gen_logprobs.append(logprob)

        finish: FinishReason | None = None
        keep = len(self.gen_ids)
        if token in self.tokenizer.eos_token_ids and not gen.sampling.ignore_eos:
            finish, keep = "eos", keep - 1
            text = self._gen_text(self.gen_ids[:keep])
        else:
            text = self._gen_text(self.gen_ids)
            hits = [(text.find(s), s) for s in stops if s in text]
            if hits:
                finish = "stop"
                text = text[: min(hits)[0]]
                keep = self._tokens_within(text)
            elif len(self.gen_ids) >= gen.sampling.max_tokens or (
                self.max_context is not None and len(self.tokens) >= self.max_context
            ):
                finish = "length"

        if finish is None:
            visible = len(text) - _held_back(text, stops)
            if text.endswith("\ufffd"):  # half of a multi-byte character
                visible = min(visible, len(text.rstrip("\ufffd")))
            if visible > self.streamed:
                self.emit(TokenDelta(self.gen_index, text[self.streamed : visible]))
                self.streamed = visible
            return

        if len(text) > self.streamed:
            self.emit(TokenDelta(self.gen_index, text[self.streamed :]))
        # The context keeps exactly the output's tokens, so what follows in
        # the program continues from the text the caller sees.
        del self.tokens[self.gen_start + keep :]
        if self.kv.length > len(self.tokens):
            self.kv.truncate(len(self.tokens))
        logprobs = tuple(self.gen_logprobs[:keep]) if gen.sampling.logprobs is not None else None
        self.emit(GenResult(self.gen_index, gen.name, text, tuple(self.gen_ids[:keep]), finish, logprobs))
        self.cursor += 1
        self._advance()

    def _tokens_within(self, text: str) -> int:
        """The most generated tokens whose text is a prefix of ``text``."""
        for k in range(len(self.gen_ids), -1, -1):
            if text.startswith(self._gen_text(self.gen_ids[:k])):
                return k
        return 0

    def _finish(self) -> None:
        self.finished = True
        self.stats.finished_at = time.monotonic()
        if self.before_finish is not None:
            # The engine releases what the request held first, so whoever sees
            # RequestFinished sees an engine that no longer counts it.
            self.before_finish()
        self.emit(RequestFinished(self.stats))
