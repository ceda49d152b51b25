"""LLMLingua-family prompt compression on Parrot's own model forward.

The method follows two papers (no code of theirs is used):

* LLMLingua (Jiang et al., EMNLP 2023): a *budget controller* splits the
  token budget between the instruction, the context and the question (the
  first and last kept at high rates); a *coarse-grained* pass drops whole
  segments (demonstrations) of the context, keeping those of highest
  perplexity, down to an intermediate budget; *iterative token-level prompt
  compression* (ITPC) then walks the surviving tokens window by window and
  keeps, in each window, the tokens whose surprisal -- conditioned on the
  already *compressed* prefix, not the original one -- is above a threshold
  chosen so the window meets its share of the budget.
* LongLLMLingua (Jiang et al., 2023): with a question, segments are ranked
  by how well each one predicts the question (mean surprisal of the question
  given the segment, lower is better), better-ranked segments get a larger
  share of the token budget (dynamic compression ratio), and token
  importance is *contrastive*: the drop in a token's surprisal when the
  question is placed before the context.

Distribution alignment. LLMLingua instruction-tunes its small scoring model
so that its distribution matches the target LLM's. Parrot avoids the gap
instead of closing it: :class:`Compressor` accepts the serving engine itself
(``Compressor(engine)``), so the scores come from the very weights that will
read the compressed prompt. A smaller scorer is a speed choice, and then an
aligned (instruction-tuned) one is the better pick.

Invariants: the kept context tokens are a subsequence, in order, of the
context's token ids (``result.kept_token_ids`` of ``result.original_token_ids``);
force-kept tokens (numbers, capitalised names, the caller's ``force``
strings) in the segments that the coarse pass keeps are never dropped, and a
segment holding a ``force`` string is never dropped. Forced tokens count
towards the budget; when they alone exceed it the result is longer than the
target.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from parrot.backends.torch_engine import TorchEngine
from parrot.compression.scorer import ScoringContext, TokenScorer, resolve_device
from parrot.semantic_vars.errors import InvalidArgumentError

__all__ = ["COARSE_CRITERIA", "CompressionResult", "Compressor", "SegmentRanking", "compress", "render_kept"]

logger = logging.getLogger("parrot.compression")

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: stage is ``"rank"`` (segments scored) or
``"tokens"`` (context tokens through the iterative pass)."""

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_NUMBER = re.compile(r"\d+(?:[.,:/\-]\d+)*")
_WORD = re.compile(r"\w+")
_OPENERS = " \t\"'“‘([{*-–—•"
_SENTENCE_END = ".!?:;\n\r"
# Above this many input tokens, progress is logged at INFO.
_LOG_LONG_INPUTS = 4096


@dataclass(frozen=True)
class CompressionResult:
    """What :meth:`Compressor.compress` returns.

    ``text`` is the compressed prompt: instruction, context and question
    (those given) joined by ``separator``; ``context`` is the compressed
    context alone (what to splice where the original value went). Token
    counts cover all three parts. ``ratio`` is the compression ratio
    ``original_tokens / compressed_tokens`` (2.0 means half the tokens);
    ``rate`` its inverse, the kept fraction.
    """

    text: str
    original_tokens: int
    compressed_tokens: int
    ratio: float
    seconds: float
    context: str = ""
    kept_token_ids: tuple[int, ...] = ()
    original_token_ids: tuple[int, ...] = ()
    instruction: str = ""
    question: str = ""
    target_tokens: int = 0
    segments: int = 0
    kept_segments: tuple[int, ...] = ()
    forced_tokens: int = 0
    model: str = ""

    @property
    def rate(self) -> float:
        """Kept fraction of the tokens (``compressed / original``; 1.0 when unchanged)."""
        return self.compressed_tokens / self.original_tokens if self.original_tokens else 1.0

    @property
    def tokens_per_second(self) -> float:
        """Input tokens processed per second of compression."""
        return self.original_tokens / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate"] = self.rate
        d["tokens_per_second"] = self.tokens_per_second
        return d


@dataclass(frozen=True)
class SegmentRanking:
    """Scores of context segments and their order, best first.

    ``kind`` is ``"question"`` (score: mean surprisal of the question given
    the segment; lower ranks first), ``"perplexity"`` (score: mean surprisal
    of the segment itself; higher first), ``"peak"`` (score: mean of the
    segment's highest tenth of token surprisals; higher first) or
    ``"entities"`` (score: the fraction of the segment's tokens that are
    force-kept -- numbers, names, ``force`` strings; higher first, ties
    broken by ``tiebreak``, the peak score).
    """

    kind: str
    scores: tuple[float, ...]
    order: tuple[int, ...]
    tiebreak: tuple[float, ...] = ()


COARSE_CRITERIA = ("entities", "peak", "perplexity")
"""How the coarse pass ranks segments when there is no question (see
:class:`SegmentRanking`). ``"entities"`` is the default: measured on
SmolLM2-135M-Instruct (README, "Prompt compression"), a trained model finds
a grammatical fact sentence *less* surprising than its surroundings, so
LLMLingua's perplexity ranking drops the paragraphs that hold facts first;
the peak surprisal and, better, the density of force-kept tokens keep them."""


@dataclass
class _Part:
    """A tokenised piece of the prompt (instruction, context or question)."""

    text: str
    ids: list[int]
    spans: list[tuple[int, int]]
    forced: list[bool]
    groups: list[int]  # tokens sharing one character span (a split multi-byte char) share a group
    protected_chars: list[int] = field(default_factory=list)  # prefix sums of chars covered by force strings


# ----------------------------------------------------------------------------- validation
def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(name, f"must be a number in (0, 1], got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise InvalidArgumentError(name, f"must be in (0, 1] (the fraction of tokens to keep), got {value!r}")
    return value


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidArgumentError(name, f"must be at least {minimum}, got {value}")
    return value


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(name, f"must be a string, got {type(value).__name__}")
    return value


def _check_force(force: Any) -> tuple[str, ...]:
    if force is None:
        return ()
    items = (force,) if isinstance(force, str) else force
    try:
        items = tuple(items)
    except TypeError:
        raise InvalidArgumentError("force", f"must be a string or a list of strings, got {force!r}") from None
    for s in items:
        if not isinstance(s, str):
            raise InvalidArgumentError("force", f"every entry must be a string, got {s!r}")
        if not s:
            raise InvalidArgumentError("force", "entries must not be empty strings")
    return items


# ----------------------------------------------------------------------------- forced tokens
def _char_prefix(length: int, spans: Iterable[tuple[int, int]]) -> list[int]:
    """Prefix sums of a 0/1 mask over ``length`` characters marked by ``spans``."""
    mark = bytearray(length + 1)
    for a, b in spans:
        for i in range(max(0, a), min(length, b)):
            mark[i] = 1
    return list(itertools.accumulate(mark[:length], initial=0))


def _covered(prefix: list[int], a: int, b: int) -> bool:
    n = len(prefix) - 1
    a, b = max(0, min(a, n)), max(0, min(b, n))
    return b > a and prefix[b] - prefix[a] > 0


def _name_spans(text: str) -> list[tuple[int, int]]:
    """Capitalised words that do not open a sentence, and acronyms anywhere."""
    spans = []
    for m in _WORD.finditer(text):
        w = m.group()
        if len(w) < 2 or not w[0].isupper():
            continue
        if w.isupper() and any(c.isalpha() for c in w):
            spans.append(m.span())  # an acronym or a name in capitals
            continue
        j = m.start() - 1
        while j >= 0 and text[j] in _OPENERS:
            j -= 1
        if j < 0 or text[j] in _SENTENCE_END:
            continue  # sentence-initial: a capital that says nothing
        spans.append(m.span())
    return spans


def _string_spans(text: str, needles: Sequence[str]) -> list[tuple[int, int]]:
    spans = []
    for s in needles:
        start = text.find(s)
        while start >= 0:
            spans.append((start, start + len(s)))
            start = text.find(s, start + 1)
    return spans


# ----------------------------------------------------------------------------- readable output
_NEWLINES = re.compile(r"\r?\n")


def render_kept(text: str, spans: Sequence[tuple[int, int]], keep: Sequence[int]) -> str:
    """The kept tokens of ``text`` as a reader should see them.

    Runs of consecutive kept tokens are copied from ``text`` through their
    character spans (so a split character or a token's own spacing is never
    re-decoded). Where tokens were dropped between two runs, the gap's
    layout is kept in small: a paragraph break when the gap held a blank
    line, a line break when it held one, a space when it held any other
    whitespace, nothing when the gap was inside a word. So two words that
    were apart are never glued ("every 12", not "every12"), and lines stay lines.
    """
    out: list[str] = []
    prev_end: int | None = None
    prev_index = -2
    for i in keep:
        a, b = spans[i]
        piece = text[a:b]
        if prev_end is None:
            # The first kept token: no spacing left over from dropped text before it.
            out.append(piece.lstrip() if i > 0 else piece)
        elif i == prev_index + 1:
            out.append(text[prev_end:b] if a > prev_end else piece)  # consecutive: as written
        else:
            gap = text[prev_end:a]
            breaks = len(_NEWLINES.findall(gap))
            if breaks and "\n" not in piece:
                out.append("\n\n" if breaks > 1 else "\n")
                piece = piece.lstrip(" \t")
            elif any(ch.isspace() for ch in gap) and not piece[:1].isspace() and not out[-1][-1:].isspace():
                out.append(" ")
            out.append(piece)
        prev_end = max(prev_end or 0, b)
        prev_index = i
    return "".join(out)


# ----------------------------------------------------------------------------- the compressor
class Compressor:
    """LLMLingua / LongLLMLingua prompt compression with a Parrot model.

    ``model`` is a model folder (default: the embedded tiny test model), a
    running :class:`~parrot.backends.torch_engine.TorchEngine` (its weights
    are reused: the best distribution alignment there is), or a
    :class:`TokenScorer`. ``device`` and ``dtype`` apply to a folder only.

    ``window_tokens`` is the ITPC window (tokens scored per forward);
    ``max_context_tokens`` bounds the compressed prefix the windows are
    conditioned on (older kept tokens are let go past it); inputs of at most
    ``min_tokens`` tokens are returned unchanged.

    One instance may be used from several threads: each call has KV caches
    of its own and the weights are only read.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        window_tokens: int = 256,
        max_context_tokens: int = 4096,
        max_batch_tokens: int = 4096,
        min_tokens: int = 16,
    ) -> None:
        self.window_tokens = _check_int("window_tokens", window_tokens, 8)
        _check_int("max_context_tokens", max_context_tokens, 64)
        _check_int("max_batch_tokens", max_batch_tokens, 1)
        self.min_tokens = _check_int("min_tokens", min_tokens, 0)
        if isinstance(model, TokenScorer):
            self.scorer = model
        elif isinstance(model, TorchEngine):
            if device is not None and resolve_device(device) != torch.device(model.device):
                raise InvalidArgumentError("device", f"the engine's model is on {model.device}, not {device}")
            self.scorer = TokenScorer.from_engine(model, max_batch_tokens=max_batch_tokens)
        elif model is None or isinstance(model, (str, Path)):
            self.scorer = TokenScorer.from_pretrained(model, device=device, dtype=dtype, max_batch_tokens=max_batch_tokens)
        else:
            raise InvalidArgumentError(
                "model", f"must be a model folder, a TorchEngine or a TokenScorer, got {type(model).__name__}"
            )
        self.max_context_tokens = min(max_context_tokens, self.scorer.max_positions)
        if self.max_context_tokens < 4 * self.window_tokens:
            raise InvalidArgumentError(
                "window_tokens",
                f"{window_tokens} is too large for a context of {self.max_context_tokens} tokens "
                f"(at most {self.max_context_tokens // 4})",
            )

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    @property
    def model_name(self) -> str:
        return self.scorer.name

    # ------------------------------------------------------------------ public API
    def count_tokens(self, text: str) -> int:
        return len(self.scorer.encode(text))

    def compress(
        self,
        text: str | Sequence[str],
        *,
        rate: float | None = None,
        target_tokens: int | None = None,
        instruction: str = "",
        question: str = "",
        force: str | Sequence[str] = (),
        force_numbers: bool = True,
        force_names: bool = True,
        instruction_rate: float = 1.0,
        question_rate: float = 1.0,
        coarse: bool = True,
        fine: bool = True,
        coarse_factor: float = 2.0,
        coarse_criterion: str = "entities",
        dynamic_ratio: float | None = None,
        contrastive: bool | None = None,
        separator: str = "\n\n",
        progress: ProgressFn | None = None,
    ) -> CompressionResult:
        """Compress ``text`` (the context) to ``rate`` or ``target_tokens``.

        ``text`` is one string, split into segments at blank lines, or a list
        of segments (documents, demonstrations) joined by ``separator``. Give
        exactly one of ``rate`` (the fraction of tokens to keep, in (0, 1])
        or ``target_tokens``; both count the whole prompt: ``instruction``,
        context and ``question``. Instruction and question are kept at
        ``instruction_rate`` / ``question_rate`` (default: whole) and the
        context gets the rest of the budget.

        ``coarse`` enables segment dropping (to ``coarse_factor`` times the
        context budget when ``fine`` follows, else to the budget itself);
        ``fine`` the iterative token-level pass. Without a question, segments
        are ranked by ``coarse_criterion`` (one of :data:`COARSE_CRITERIA`);
        with a ``question``, ranking is question-aware, ``dynamic_ratio`` (default 0.25, else 0) shifts
        budget towards better-ranked segments and ``contrastive`` (default
        on) scores tokens by contrastive surprisal.
        """
        started = time.perf_counter()
        # -- options
        if (rate is None) == (target_tokens is None):
            field_name = "rate" if rate is None else "target_tokens"
            raise InvalidArgumentError(field_name, "give exactly one of rate and target_tokens")
        if rate is not None:
            rate = _check_rate("rate", rate)
        if target_tokens is not None:
            if isinstance(target_tokens, bool) or not isinstance(target_tokens, int):
                raise InvalidArgumentError("target_tokens", f"must be an integer, got {target_tokens!r}")
            if target_tokens < 1:
                raise InvalidArgumentError("target_tokens", f"must be a positive number of tokens, got {target_tokens}")
        instruction = _check_str("instruction", instruction)
        question = _check_str("question", question)
        separator = _check_str("separator", separator)
        force_strings = _check_force(force)
        instruction_rate = _check_rate("instruction_rate", instruction_rate)
        question_rate = _check_rate("question_rate", question_rate)
        if isinstance(coarse_factor, bool) or not isinstance(coarse_factor, (int, float)) or not (
            math.isfinite(coarse_factor) and coarse_factor >= 1.0
        ):
            raise InvalidArgumentError("coarse_factor", f"must be a number >= 1, got {coarse_factor!r}")
        if coarse_criterion not in COARSE_CRITERIA:
            raise InvalidArgumentError(
                "coarse_criterion", f"must be one of {', '.join(COARSE_CRITERIA)}, got {coarse_criterion!r}"
            )
        if dynamic_ratio is None:
            dynamic_ratio = 0.25 if question else 0.0
        if isinstance(dynamic_ratio, bool) or not isinstance(dynamic_ratio, (int, float)) or not (
            0.0 <= dynamic_ratio < 1.0
        ):
            raise InvalidArgumentError("dynamic_ratio", f"must be in [0, 1), got {dynamic_ratio!r}")
        if contrastive is None:
            contrastive = bool(question)
        if contrastive and not question:
            raise InvalidArgumentError("contrastive", "contrastive scoring needs a question")
        if progress is not None and not callable(progress):
            raise InvalidArgumentError("progress", "must be callable as progress(stage, done, total)")

        if isinstance(text, str):
            context_text = text
            boundaries = [m.end() for m in _PARAGRAPH_BREAK.finditer(text)]
        else:
            if isinstance(text, (bytes, bytearray)) or not isinstance(text, Sequence):
                raise InvalidArgumentError("text", f"must be a string or a list of strings, got {type(text).__name__}")
            docs = list(text)
            for d in docs:
                if not isinstance(d, str):
                    raise InvalidArgumentError("text", f"every segment must be a string, got {type(d).__name__}")
            context_text = separator.join(docs)
            boundaries, pos = [], 0
            for d in docs[:-1]:
                pos += len(d) + len(separator)
                boundaries.append(pos)

        # -- tokenise
        flags = (force_strings, force_numbers, force_names)
        ins = self._part(instruction, *flags)
        ctx = self._part(context_text, *flags)
        que = self._part(question, *flags)
        n_ins, n_ctx, n_que = len(ins.ids), len(ctx.ids), len(que.ids)
        total = n_ins + n_ctx + n_que
        target = target_tokens if target_tokens is not None else max(1, round(rate * total))
        full_text = self._join([instruction, context_text, question], separator)

        segments = self._segments(ctx, boundaries)

        def unchanged() -> CompressionResult:
            return CompressionResult(
                text=full_text, original_tokens=total, compressed_tokens=total, ratio=1.0,
                seconds=time.perf_counter() - started, context=context_text,
                kept_token_ids=tuple(ctx.ids), original_token_ids=tuple(ctx.ids),
                instruction=instruction, question=question, target_tokens=target,
                segments=len(segments), kept_segments=tuple(range(len(segments))),
                forced_tokens=sum(ctx.forced), model=self.model_name,
            )

        if total == 0 or total <= self.min_tokens or target >= total:
            return unchanged()
        loud = total >= _LOG_LONG_INPUTS
        log = logger.info if loud else logger.debug
        log("compressing %d tokens to %d (instruction %d, context %d, question %d)", total, target, n_ins, n_ctx, n_que)

        # -- budget controller: instruction and question at their (high) rates, the context gets the rest
        ins_budget = min(n_ins, math.ceil(instruction_rate * n_ins))
        que_budget = min(n_que, math.ceil(question_rate * n_que))
        ctx_budget = target - ins_budget - que_budget
        if ctx_budget < 0:
            # The target is below what instruction and question alone keep: shrink them to fit.
            scale = target / (ins_budget + que_budget)
            ins_budget = math.floor(ins_budget * scale)
            que_budget = target - ins_budget
            ctx_budget = 0
        ctx_budget = min(ctx_budget, n_ctx)

        ins_keep = self._compress_plain(ins, ins_budget) if ins_budget < n_ins else list(range(n_ins))
        que_keep = self._compress_plain(que, que_budget) if que_budget < n_que else list(range(n_que))
        ins_kept_ids = [ins.ids[i] for i in ins_keep]
        que_kept_ids = [que.ids[i] for i in que_keep]

        # -- segments of the context (token ranges of one tokenisation), coarse pass
        kept_segments = list(range(len(segments)))
        ranking: SegmentRanking | None = None
        seg_rates = [1.0] * len(segments)
        if ctx_budget < n_ctx:
            coarse_budget = math.ceil(coarse_factor * ctx_budget) if fine else ctx_budget
            need_coarse = coarse and len(segments) > 1 and coarse_budget < n_ctx
            if need_coarse or (fine and dynamic_ratio > 0 and len(segments) > 1):
                ranking = self._rank(
                    [[ctx.ids[i] for i in range(a, b)] for a, b in segments], que.ids if question else [],
                    prefix=ins_kept_ids, progress=progress, criterion=coarse_criterion,
                    forced=[ctx.forced[a:b] for a, b in segments],
                )
            if need_coarse:
                assert ranking is not None
                kept_segments = self._coarse(ctx, segments, ranking, coarse_budget, exact=not fine)
            # Share the context budget among the kept segments (LongLLMLingua's dynamic ratio).
            seg_rates = self._segment_rates(segments, kept_segments, ranking, ctx_budget, dynamic_ratio if fine else 0.0)

        candidates = [i for s in kept_segments for i in range(*segments[s])]
        if fine and ctx_budget < len(candidates):
            rates = [seg_rates[s] for s in kept_segments for _ in range(*segments[s])]
            ctx_keep = self._itpc(
                ctx, candidates, rates, ctx_budget, prefix=ins_kept_ids,
                contrast_prefix=ins_kept_ids + que.ids if contrastive else None, progress=progress,
            )
        else:
            ctx_keep = candidates
        kept_ids = [ctx.ids[i] for i in ctx_keep]

        context_out = render_kept(ctx.text, ctx.spans, ctx_keep) if ctx_keep != list(range(n_ctx)) else context_text
        ins_out = render_kept(ins.text, ins.spans, ins_keep) if len(ins_keep) < n_ins else instruction
        que_out = render_kept(que.text, que.spans, que_keep) if len(que_keep) < n_que else question
        compressed = len(ins_keep) + len(ctx_keep) + len(que_keep)
        seconds = time.perf_counter() - started
        log("compressed %d -> %d tokens (%.2fx) in %.2f s", total, compressed, total / max(1, compressed), seconds)
        return CompressionResult(
            text=self._join([ins_out, context_out, que_out], separator),
            original_tokens=total,
            compressed_tokens=compressed,
            ratio=total / max(1, compressed),
            seconds=seconds,
            context=context_out,
            kept_token_ids=tuple(kept_ids),
            original_token_ids=tuple(ctx.ids),
            instruction=ins_out,
            question=que_out,
            target_tokens=target,
            segments=len(segments),
            kept_segments=tuple(kept_segments),
            forced_tokens=sum(ctx.forced[i] for i in ctx_keep),
            model=self.model_name,
        )

    def rank_segments(
        self, segments: Sequence[str], question: str = "", *, instruction: str = "",
        criterion: str = "entities", force: str | Sequence[str] = (),
    ) -> SegmentRanking:
        """Score and order ``segments`` as the coarse pass does (best first).

        With a ``question``: mean surprisal of the question's tokens given
        ``[BOS] + instruction + segment``, lower first (LongLLMLingua). Without:
        mean surprisal of the segment's tokens given ``[BOS] + instruction``,
        higher first (LLMLingua keeps the demonstrations of highest perplexity)
        with ``criterion="perplexity"``; ``"peak"`` and ``"entities"`` (the
        default) as :class:`SegmentRanking` says (``force``: extra strings
        counted as entities).
        """
        for s in segments:
            _check_str("segments", s)
        _check_str("question", question)
        _check_str("instruction", instruction)
        if criterion not in COARSE_CRITERIA:
            raise InvalidArgumentError("criterion", f"must be one of {', '.join(COARSE_CRITERIA)}, got {criterion!r}")
        parts = [self._part(s, _check_force(force), True, True) for s in segments]
        return self._rank(
            [p.ids for p in parts], self.scorer.encode(question) if question else [],
            prefix=self.scorer.encode(instruction) if instruction else [], progress=None,
            criterion=criterion, forced=[p.forced for p in parts],
        )

    # ------------------------------------------------------------------ stages
    def _part(self, text: str, force_strings: Sequence[str], numbers: bool, names: bool) -> _Part:
        if not text:
            return _Part(text, [], [], [], [], [0])
        ids, spans = self.scorer.encode_with_offsets(text)
        marks: list[tuple[int, int]] = []
        if numbers:
            marks.extend(m.span() for m in _NUMBER.finditer(text))
        if names:
            marks.extend(_name_spans(text))
        user = _string_spans(text, force_strings)
        marks.extend(user)
        prefix = _char_prefix(len(text), marks)
        forced = [_covered(prefix, a, b) for a, b in spans]
        groups, g = [], -1
        for i, span in enumerate(spans):
            if i == 0 or span != spans[i - 1] or span[0] == span[1]:
                g += 1
            groups.append(g)
        # A token of a split character is forced when any of its group is.
        for i in range(1, len(ids)):
            if groups[i] == groups[i - 1] and (forced[i] or forced[i - 1]):
                forced[i] = forced[i - 1] = True
        return _Part(text, ids, spans, forced, groups, _char_prefix(len(text), user))

    @staticmethod
    def _join(parts: Sequence[str], separator: str) -> str:
        return separator.join(p for p in parts if p)

    @staticmethod
    def _segments(part: _Part, boundaries: Sequence[int]) -> list[tuple[int, int]]:
        """Token ranges of the context's segments; a boundary is the character
        where a segment starts, mapped to the first token ending after it."""
        n = len(part.ids)
        if n == 0:
            return []
        ends = [b for _, b in part.spans]
        cuts = sorted({bisect.bisect_right(ends, pos) for pos in boundaries} - {0, n})
        edges = [0, *cuts, n]
        return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]

    def _rank(
        self,
        segments: Sequence[Sequence[int]],
        question_ids: Sequence[int],
        *,
        prefix: Sequence[int],
        progress: ProgressFn | None,
        criterion: str = "perplexity",
        forced: Sequence[Sequence[bool]] = (),
    ) -> SegmentRanking:
        scorer = self.scorer
        limit = self.max_context_tokens - 1 - len(prefix)
        if question_ids:
            limit -= len(question_ids)
        limit = max(16, limit)
        scores: list[float] = []
        peaks: list[float] = []
        done = 0
        # Score in groups so that the KV of a huge input is never held at once.
        group_tokens = 4 * scorer.max_batch_tokens
        pending: list[list[int]] = []

        def flush() -> None:
            nonlocal done
            if not pending:
                return
            if question_ids:
                values = scorer.surprisal_batch([list(question_ids)] * len(pending), contexts=[list(prefix) + s for s in pending])
            else:
                values = scorer.surprisal_batch(pending, contexts=[list(prefix)] * len(pending))
            for v in values:
                scores.append(float(v.mean()) if len(v) else 0.0)
                peaks.append(float(torch.topk(v, max(1, math.ceil(0.1 * len(v)))).values.mean()) if len(v) else 0.0)
            done += len(pending)
            pending.clear()
            if progress is not None:
                progress("rank", done, len(segments))

        size = 0
        for seg in segments:
            seg = list(seg)
            # Question-aware: the segment's tail is what sits next to the question.
            seg = seg[-limit:] if question_ids else seg[:limit]
            if size + len(seg) > group_tokens and pending:
                flush()
                size = 0
            pending.append(seg)
            size += len(seg) + len(question_ids) + len(prefix)
        flush()
        if question_ids:
            order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
            return SegmentRanking("question", tuple(scores), tuple(order))
        if criterion == "perplexity":
            order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
            return SegmentRanking("perplexity", tuple(scores), tuple(order))
        if criterion == "peak":
            order = sorted(range(len(peaks)), key=lambda i: (-peaks[i], i))
            return SegmentRanking("peak", tuple(peaks), tuple(order))
        density = [sum(f) / len(f) if len(f) else 0.0 for f in forced]
        order = sorted(range(len(density)), key=lambda i: (-density[i], -peaks[i], i))
        return SegmentRanking("entities", tuple(density), tuple(order), tuple(peaks))

    @staticmethod
    def _coarse(
        part: _Part, segments: Sequence[tuple[int, int]], ranking: SegmentRanking, budget: int, *, exact: bool
    ) -> list[int]:
        """Segments to keep, in text order: those holding a ``force`` string,
        then the best-ranked until ``budget`` tokens are reached (``exact``:
        never beyond it, skipping segments that do not fit)."""
        def protected(s: int) -> bool:
            a, b = segments[s]
            return _covered(part.protected_chars, part.spans[a][0], part.spans[b - 1][1])

        first = [s for s in range(len(segments)) if protected(s)]
        chosen, total = set(first), sum(segments[s][1] - segments[s][0] for s in first)
        for s in ranking.order:
            if s in chosen:
                continue
            size = segments[s][1] - segments[s][0]
            if exact:
                if total + size <= budget:
                    chosen.add(s)
                    total += size
            else:
                if total >= budget:
                    break
                chosen.add(s)
                total += size
        if not chosen and not exact:
            chosen.add(ranking.order[0])
        return sorted(chosen)

    @staticmethod
    def _segment_rates(
        segments: Sequence[tuple[int, int]],
        kept: Sequence[int],
        ranking: SegmentRanking | None,
        budget: int,
        dynamic_ratio: float,
    ) -> list[float]:
        """Keep rate per segment so that ``sum(rate * length) == budget`` over
        the kept ones; with ``dynamic_ratio`` the best-ranked kept segment's
        weight is ``1 + dynamic_ratio`` and the worst's ``1 - dynamic_ratio``
        (linear in rank), rates capped at 1 (water-filling)."""
        rates = [0.0] * len(segments)
        lengths = {s: segments[s][1] - segments[s][0] for s in kept}
        total = sum(lengths.values())
        if total == 0:
            return rates
        weights = {s: 1.0 for s in kept}
        if ranking is not None and dynamic_ratio > 0 and len(kept) > 1:
            kept_set = set(kept)
            ranked = [s for s in ranking.order if s in kept_set]
            k = len(ranked) - 1
            for r, s in enumerate(ranked):
                weights[s] = 1.0 + dynamic_ratio * (1.0 - 2.0 * r / k)
        if budget >= total:
            for s in kept:
                rates[s] = 1.0
            return rates

        def kept_for(rho: float) -> float:
            return sum(min(1.0, rho * weights[s]) * lengths[s] for s in kept)

        lo, hi = 0.0, 1.0 / min(weights.values())
        for _ in range(60):
            mid = (lo + hi) / 2
            if kept_for(mid) < budget:
                lo = mid
            else:
                hi = mid
        for s in kept:
            rates[s] = min(1.0, hi * weights[s])
        return rates

    def _windows(self, part: _Part, candidates: Sequence[int]) -> list[tuple[int, int]]:
        """Index ranges into ``candidates`` of at most about ``window_tokens``,
        never splitting the tokens of one character."""
        out, start, n = [], 0, len(candidates)
        while start < n:
            end = min(n, start + self.window_tokens)
            while end < n and part.groups[candidates[end]] == part.groups[candidates[end - 1]]:
                end += 1
            out.append((start, end))
            start = end
        return out

    def _compress_plain(self, part: _Part, budget: int) -> list[int]:
        """Token-level compression of a whole part (instruction or question)."""
        candidates = list(range(len(part.ids)))
        rate = budget / len(candidates) if candidates else 1.0
        return self._itpc(part, candidates, [rate] * len(candidates), budget, prefix=[], contrast_prefix=None, progress=None)

    def _itpc(
        self,
        part: _Part,
        candidates: Sequence[int],
        rates: Sequence[float],
        budget: int,
        *,
        prefix: Sequence[int],
        contrast_prefix: Sequence[int] | None,
        progress: ProgressFn | None,
    ) -> list[int]:
        """Iterative token-level prompt compression over ``candidates``.

        Window ``j`` is scored conditioned on ``[BOS] + prefix`` followed by
        the tokens kept from windows ``< j`` (one forward per window: the
        previous window's kept tokens join the cached context and the new
        window is probed on top). The window keeps its forced tokens and the
        most important others, up to its share of ``budget``: the running
        sum of ``rates`` rounded, minus what earlier windows kept, so overshoot
        (forced tokens) and rounding are paid back by the next windows.
        """
        scorer = self.scorer
        ids = part.ids
        cum = list(itertools.accumulate(rates))
        streams: list[tuple[ScoringContext, list[int]]] = [(scorer.context(prefix), list(prefix))]
        if contrast_prefix is not None:
            streams.append((scorer.context(contrast_prefix), list(contrast_prefix)))
        kept: list[int] = []
        kept_ids: list[int] = []
        append: list[int] = []
        windows = self._windows(part, candidates)
        for w, (a, b) in enumerate(windows):
            window_ids = [ids[candidates[i]] for i in range(a, b)]
            for k, (ctx, head) in enumerate(streams):
                if len(ctx) + len(append) + len(window_ids) > self.max_context_tokens:
                    streams[k] = (self._rebuild(head, kept_ids[: len(kept_ids) - len(append)]), head)
            probes = scorer.step([(ctx, append, window_ids) for ctx, _ in streams])
            importance = probes[0] if len(probes) == 1 else probes[0] - probes[1]
            n = b - a
            goal = budget if w == len(windows) - 1 else round(cum[b - 1])
            quota = max(0, min(n, goal - len(kept)))
            forced = [i for i in range(n) if part.forced[candidates[a + i]]]
            take = max(quota, len(forced))
            chosen = set(forced)
            if take > len(chosen):
                # Threshold = the importance of the last token that fits the quota;
                # ties go to the earlier token.
                free = [i for i in range(n) if i not in chosen]
                values = importance[free]
                order = sorted(range(len(free)), key=lambda j: (-float(values[j]), j))
                chosen.update(free[j] for j in order[: take - len(chosen)])
            # Keep the tokens of a split character together.
            groups = {part.groups[candidates[a + i]] for i in chosen}
            chosen.update(i for i in range(n) if part.groups[candidates[a + i]] in groups)
            selected = sorted(chosen)
            kept.extend(candidates[a + i] for i in selected)
            append = [window_ids[i] for i in selected]
            kept_ids.extend(append)
            if progress is not None:
                progress("tokens", b, len(candidates))
            if len(candidates) >= _LOG_LONG_INPUTS and (w + 1) % 16 == 0:
                logger.info("compression: %d/%d tokens scored, %d kept", b, len(candidates), len(kept))
        return kept

    def _rebuild(self, head: Sequence[int], kept_ids: Sequence[int]) -> ScoringContext:
        """A fresh conditioning context once the compressed prefix outgrows
        ``max_context_tokens``: the head (instruction, question) when it fits,
        then the most recent kept tokens, to half the limit."""
        half = self.max_context_tokens // 2
        head = list(head) if len(head) <= half // 2 else []
        tail = list(kept_ids)[-(half - len(head)) :] if half > len(head) else []
        return self.scorer.context(head + tail)


# ----------------------------------------------------------------------------- module-level helper
_shared: dict[tuple[str, str], Compressor] = {}
_shared_lock = threading.Lock()


def _shared_compressor(model: str | Path | None, device: str | torch.device | None) -> Compressor:
    dev = resolve_device(device)
    key = ("" if model is None else str(Path(model).expanduser().resolve()), str(dev))
    with _shared_lock:
        comp = _shared.get(key)
        if comp is None:
            comp = _shared[key] = Compressor(model, device=dev)
        return comp


def compress(
    text: str | Sequence[str],
    *,
    rate: float | None = None,
    target_tokens: int | None = None,
    instruction: str = "",
    question: str = "",
    force: str | Sequence[str] = (),
    model: Any = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> CompressionResult:
    """Compress ``text`` with a shared :class:`Compressor`.

    ``model`` is a folder (default: the embedded tiny model, random weights),
    a ``TorchEngine`` or a ``TokenScorer``; compressors built from folders are
    cached per (folder, device). Other options as :meth:`Compressor.compress`.
    """
    if model is None or isinstance(model, (str, Path)):
        compressor = _shared_compressor(model, device)
    else:
        compressor = Compressor(model, device=device)
    return compressor.compress(
        text, rate=rate, target_tokens=target_tokens, instruction=instruction, question=question, force=force,
        **options,
    )
