"""Constrained decoding: token masks from a grammar library (xgrammar).

A :class:`~parrot.semantic_vars.constraint.Constraint` on a Gen becomes a
compiled grammar (cached per tokenizer and constraint) and, for each running
generation, a matcher that knows which tokens may come next. At each step the
engine asks :class:`GrammarStates` for the matchers of the rows it samples;
:func:`fill_masks` computes their bitmasks and :func:`apply_masks` writes them
into the logits of the constrained rows only, so constrained and free
sequences share one batch, and
:meth:`GrammarStates.accept` advances the matchers by the sampled tokens.

The masks are filled on the CPU before the engine touches the logits, so on
a GPU that work overlaps the forward pass still running there.

Why xgrammar (and not llguidance): measured on CPU with the embedded model's
tokenizer, its per-token mask cost on JSON schemas was about a third of
llguidance's (see README, "Structured outputs"); both install as wheels.
xgrammar is imported on first use, so engines without constraints never load it.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Sequence

import torch

from parrot.semantic_vars import Constraint, ConstraintError

if TYPE_CHECKING:
    import xgrammar

#: Compiled grammars kept per compiler (least recently used are dropped).
CACHE_SIZE = 256


def _ebnf_literal(text: str) -> str:
    """``text`` as an EBNF string literal (escapes for quotes, backslashes, controls)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def choices_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose only sentences are ``choices``."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and logits width, with a cache."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        try:
            import xgrammar as xgr
        except ImportError:
            raise ConstraintError(
                "constraint", "constrained decoding needs the xgrammar package: pip install 'parrot-serve[structured]'"
            ) from None

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        # Our own LRU (per constraint) decides what stays; xgrammar's cache is off.
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._cache: OrderedDict[Constraint, "xgrammar.CompiledGrammar"] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # compilations done (cache misses), for tests and metrics
        # Tokens holding a raw control character (bytes below 0x20). Compact
        # JSON never contains one, but xgrammar 0.2.9's rule for strings with
        # a maxLength lets them in (strict JSON parsers then reject the
        # text), so JSON rows ban them on top of the grammar's mask.
        banned = {i for i, b in enumerate(info.decoded_vocab[:vocab_size]) if any(x < 0x20 for x in b)}
        words = [0] * ((vocab_size + 31) // 32)
        for i in range(vocab_size):
            if i not in banned:
                words[i // 32] |= 1 << (i % 32)
        # Packed like xgrammar's bitmask (bit i of word i // 32 = token i allowed), int32.
        self.json_bits = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)

    def compile(self, constraint: Constraint) -> "xgrammar.CompiledGrammar":
        """The compiled grammar of ``constraint``; :class:`ConstraintError` if it does not compile."""
        with self._lock:
            hit = self._cache.get(constraint)
            if hit is not None:
                self._cache.move_to_end(constraint)
                return hit
        try:
            grammar = self._compile(constraint)
        except RuntimeError as exc:  # xgrammar's parse errors ("Regex parsing error at position 4: ...")
            message = str(exc).strip().splitlines()[0]
            message = message.split(": ", 1)[1] if message.startswith("[") and ": " in message else message
            raise ConstraintError(f"{constraint.field}.{constraint.kind}", f"does not compile: {message}") from None
        with self._lock:
            self._cache[constraint] = grammar
            self.compiled += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, c: Constraint) -> "xgrammar.CompiledGrammar":
        comp = self._compiler
        if c.kind == "choices":
            return comp.compile_grammar(choices_grammar(c.spec))  # type: ignore[arg-type]
        if c.kind == "regex":
            return comp.compile_regex(c.spec)  # type: ignore[arg-type]
        if c.kind == "grammar":
            return comp.compile_grammar(c.spec)  # type: ignore[arg-type]
        # JSON on one line with json.dumps' default separators: a model
        # cannot pad it with whitespace for ever.
        if c.kind == "json_object":
            return comp.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False, strict_mode=False)
        return comp.compile_json_schema(c.spec, any_whitespace=False, strict_mode=c.strict)  # type: ignore[arg-type]

    def matcher(self, constraint: Constraint) -> "RowGrammar":
        """A fresh matcher at the start of ``constraint``'s grammar."""
        json_kind = constraint.kind in ("json_schema", "json_object")
        return RowGrammar(self._xgr.GrammarMatcher(self.compile(constraint)), self.json_bits if json_kind else None)


class RowGrammar:
    """One generation's place in its grammar, plus a packed mask of the tokens
    it may ever use (``allowed``, ANDed into the grammar's; None: all)."""

    __slots__ = ("matcher", "allowed")

    def __init__(self, matcher: "xgrammar.GrammarMatcher", allowed: torch.Tensor | None) -> None:
        self.matcher = matcher
        self.allowed = allowed

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)


_compilers: dict[tuple[int, int], GrammarCompiler] = {}
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Any, vocab_size: int | None = None) -> GrammarCompiler:
    """The shared compiler of ``tokenizer`` (a :class:`~parrot.backends.tokenizer.Tokenizer`)
    for logits ``vocab_size`` wide (default: the tokenizer's own size)."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None:
        raise ConstraintError("constraint", "this engine's tokenizer cannot run constrained decoding")
    width = vocab_size or len(hf)
    key = (id(hf), width)
    with _compilers_lock:
        compiler = _compilers.get(key)
        if compiler is None:
            compiler = _compilers[key] = GrammarCompiler(hf, width, tokenizer.eos_token_ids)
            weakref.finalize(hf, _compilers.pop, key, None)  # id() is reused once the tokenizer is gone
        return compiler


def check(constraint: Constraint, tokenizer: Any) -> None:
    """Raise :class:`ConstraintError` now if ``constraint`` does not compile for ``tokenizer``."""
    compiler_for(tokenizer).compile(constraint)


class GrammarStates:
    """The grammar compiler of one engine and the matchers of its running
    constrained generations.

    A matcher is kept on the engine's request object (its ``grammar``
    attribute, with the Gen's index in its program), so it lives exactly as
    long as the request and a preempted request keeps its place in the
    grammar (its tokens are kept).
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler: GrammarCompiler | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = compiler_for(self.tokenizer, self.vocab_size)
        return self._compiler

    def check(self, constraints: Sequence[Constraint | None]) -> None:
        """Compile every constraint now (at submit), so a bad one fails its own request only."""
        for c in constraints:
            if c is not None:
                self.compiler.compile(c)

    def matchers(self, requests: Sequence[Any]) -> list[RowGrammar | None]:
        """The matcher of each request's current Gen (None: unconstrained).
        A request is anything with ``seq`` (its sequence) and a ``grammar``
        slot (the torch engine's ``EngineRequest``)."""
        out: list[RowGrammar | None] = []
        for r in requests:
            constraint = r.seq.current_gen.sampling.constraint
            if constraint is None:
                out.append(None)
                continue
            state = r.grammar
            if state is None or state[0] != r.seq.gen_index:
                state = r.grammar = (r.seq.gen_index, self.compiler.matcher(constraint))
            out.append(state[1])
        return out

    @staticmethod
    def accept(matchers: Sequence[RowGrammar | None], tokens: Sequence[int]) -> None:
        """Advance each matcher by its row's sampled token."""
        for m, token in zip(matchers, tokens):
            if m is not None:
                m.accept(token)


def fill_masks(matchers: Sequence[RowGrammar | None], width: int) -> tuple[torch.Tensor, list[int]] | None:
    """The packed token bitmask of every row (CPU work only, so on a GPU it
    runs while the step's forward is still in flight) and the constrained
    rows' indices; None when no row is constrained."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(matchers), width)
    for i in rows:
        row = matchers[i]
        row.matcher.fill_next_token_bitmask(bitmask, i)  # type: ignore[union-attr]
        if row.allowed is not None:  # type: ignore[union-attr]
            bitmask[i] &= row.allowed  # type: ignore[union-attr]
    return bitmask, rows


def apply_masks(logits: torch.Tensor, masks: tuple[torch.Tensor, list[int]] | None) -> None:
    """Set to -inf, in place, the logits (``[rows, vocab]``) of the tokens each
    constrained row's grammar forbids next; other rows are left alone."""
    if masks is None:
        return
    import xgrammar as xgr

    bitmask, rows = masks
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
