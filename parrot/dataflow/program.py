"""Turning a ready call into an engine program of Fill and Gen steps."""

from __future__ import annotations

from typing import Mapping

from parrot.backends.engine import Fill, Gen, GenerationRequest, PrefixHint, TokenizerLike
from parrot.semantic_vars import FunctionSpec, Placeholder, Template


def segment_ids(seg: object, text: str, tokenizer: TokenizerLike, *, add_bos: bool) -> list[int]:
    """Tokens of one template segment. The template's own text is read with
    its control tokens (``<|user|>``, ``</s>``); a value (an input, a
    constant, an earlier output) is user text, read as plain characters, so
    a user cannot forge a turn or an end of sequence."""
    return tokenizer.encode(text, add_bos=add_bos, special=not isinstance(seg, Placeholder))


def prompt_token_count(template: Template, values: Mapping[str, str], tokenizer: TokenizerLike) -> int:
    """Tokens of the prompt text ``template`` makes of ``values``, BOS
    included, tokenized as :func:`build_request` does: every text segment
    and input value before the last output (the text after it is never
    sent). Generated outputs and inputs without a value are not counted."""
    segments = template.segments
    last = max((i for i, seg in enumerate(segments) if isinstance(seg, Placeholder) and seg.kind == "output"),
               default=len(segments))
    count = 0
    for seg in segments[:last]:
        if isinstance(seg, Placeholder) and seg.kind == "output":
            continue
        text = values.get(seg.name) if isinstance(seg, Placeholder) else seg.text
        if text:
            count += len(segment_ids(seg, text, tokenizer, add_bos=count == 0))
    return count


def build_request(
    function: FunctionSpec,
    template: Template,
    values: Mapping[str, str],
    tokenizer: TokenizerLike,
    *,
    request_id: str,
    prefix: tuple[str, int] | None = None,
    fixed_outputs: Mapping[str, str] | None = None,
) -> GenerationRequest:
    """Text and inputs up to each output become a Fill, each output a Gen.

    Each template segment (literal text, an input's value) is tokenized on
    its own (see :func:`segment_ids`: only the template's text may hold
    control tokens), so the tokens of any segment boundary are an exact prefix of the
    program whether or not a prefix hint is given: hinted and unhinted runs
    see the same tokens. ``prefix`` is ``(key, char_end)`` of a shared
    boundary (see :mod:`parrot.dataflow.prefix`); it becomes the request's
    :class:`PrefixHint`. The first token is the model's BOS; the text after
    the last output is not sent (nothing is generated after it).

    ``fixed_outputs`` are outputs that already have a value (released by an
    engine that died before the call finished): they become Fill text, so a
    re-run conditions the later outputs on the value its readers saw and
    never generates that output again.
    """
    fixed = fixed_outputs or {}
    program: list[Fill | Gen] = []
    pending: list[int] = []
    chars = tokens = 0
    tokens_at: dict[int, int] = {}  # char offset of a boundary before the first Gen -> tokens
    first_gen_seen = False
    for seg in template.segments:
        if isinstance(seg, Placeholder) and seg.kind == "output" and seg.name not in fixed:
            if pending:
                program.append(Fill(tuple(pending)))
                pending = []
            program.append(Gen(function.output_sampling[seg.name], name=seg.name))
            first_gen_seen = True
            continue
        if isinstance(seg, Placeholder):
            text = fixed[seg.name] if seg.kind == "output" else values[seg.name]
        else:
            text = seg.text
        if not text:
            continue
        ids = segment_ids(seg, text, tokenizer, add_bos=not program and not pending)
        pending.extend(ids)
        if not first_gen_seen:
            chars += len(text)
            tokens += len(ids)
            tokens_at[chars] = tokens
    hint = None
    if prefix is not None:
        key, end = prefix
        if end in tokens_at:
            hint = PrefixHint(key, tokens_at[end])
    return GenerationRequest(program=program, request_id=request_id, prefix_hint=hint)
