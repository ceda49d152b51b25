"""Turning a ready call into an engine program of Fill and Gen steps."""

from __future__ import annotations

from typing import Mapping

from parrot.backends.engine import Fill, Gen, GenerationRequest, PrefixHint, TokenizerLike
from parrot.semantic_vars import FunctionSpec, Placeholder, SamplingConfig, Template, Text


#: Spaces and tabs a template's text ends in before an output are not sent
#: (see :func:`build_request`).
_HORIZONTAL = " \t"


def space_led_outputs(template: Template) -> frozenset[str]:
    """Outputs whose template text just before them ends in a space or tab.

    That whitespace is not sent (a lone space token is a poor prompt end for
    BPE vocabularies, whose words carry their leading space); the model
    writes its own space before the first word instead, and
    :func:`output_value` takes it off again, so ``"Summary: {{output:s}}"``
    reads back as ``"Summary: " + value``.
    """
    led: set[str] = set()
    previous = None
    for seg in template.segments:
        if isinstance(seg, Placeholder) and seg.kind == "output":
            if isinstance(previous, Text) and previous.text[-1:] in (" ", "\t"):
                led.add(seg.name)
        previous = seg
    return frozenset(led)


def output_value(template: Template, name: str, text: str) -> str:
    """The value of output ``name`` from its generated ``text`` (one leading space
    dropped where :func:`space_led_outputs` says the prompt's space was)."""
    if text[:1] == " " and name in space_led_outputs(template):
        return text[1:]
    return text


def segment_ids(seg: object, text: str, tokenizer: TokenizerLike, *, add_bos: bool) -> list[int]:
    """Tokens of one template segment. The template's own text is read with
    its control tokens (``<|user|>``, ``</s>``); a value (an input, a
    constant, an earlier output) is user text, read as plain characters, so
    a user cannot forge a turn or an end of sequence."""
    return tokenizer.encode(text, add_bos=add_bos, special=not isinstance(seg, Placeholder))


def prompt_token_count(function: FunctionSpec, values: Mapping[str, str], tokenizer: TokenizerLike) -> int:
    """Prompt tokens of a call of ``function`` with ``values``, counted on the
    request :func:`build_request` makes (chat frame, BOS, every Fill before
    the last output; the text after it is never sent). Inputs without a value
    count as empty; generated outputs count nothing."""
    template = Template(function.template)
    filled = {name: values.get(name) or "" for name in template.inputs}
    program = build_request(function, template, filled, tokenizer, request_id="count").program
    last = max((i for i, step in enumerate(program) if isinstance(step, Gen)), default=len(program))
    return sum(len(step.token_ids) for step in program[:last] if isinstance(step, Fill))


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
    :class:`PrefixHint`. A plain prompt starts with the model's BOS when its
    tokenizer adds one itself; the text after the last output is not sent
    (nothing is generated after it). Spaces and tabs that literal text ends
    in just before a placeholder go with what follows: before an input they
    are tokenized with its value (``"Passage: " + value`` as one piece, the
    way a whole-string tokenizer sees it), before an output they are not sent
    (see :func:`space_led_outputs`); a prefix boundary there counts the
    tokens before the spaces.

    A chat function (``function.chat``) is rendered with the model's chat
    template (``tokenizer.chat_frame``): its system text and history, then a
    user turn holding the template up to the first output (trailing
    whitespace dropped), then the assistant's turn with the outputs. BOS is
    whatever the chat template writes, once. A tokenizer without a chat
    template (a remote engine's stand-in) gets the turns as plain text.

    ``fixed_outputs`` are outputs that already have a value (released by an
    engine that died before the call finished): they become Fill text, so a
    re-run conditions the later outputs on the value its readers saw and
    never generates that output again.
    """
    fixed = fixed_outputs or {}
    segments = template.segments
    program: list[Fill | Gen] = []
    pending: list[int] = []
    chars = tokens = 0
    tokens_at: dict[int, int] = {}  # char offset of a boundary before the first Gen -> tokens
    first_gen_seen = False
    user_end = len(segments)  # chat: segments before this index are the user's turn
    tail: list[int] = []
    add_bos = tokenizer.prompt_bos
    carry = ""  # trailing spaces of a text, tokenized with the segment after it
    if function.chat:
        if tokenizer.renders_chat:
            head, tail = tokenizer.chat_frame(function.chat_messages())
            add_bos = False  # the chat template writes BOS where the model wants one
        else:  # no local chat template (a remote engine without a tokenizer folder): the turns as plain text
            turns = "".join(f"{m['content']}\n\n" for m in function.chat_messages())
            head = tokenizer.encode(turns, add_bos=add_bos) if turns else []
            tail = tokenizer.encode("\n")
            add_bos = add_bos and not head
        pending.extend(head)
        tokens = len(head)
        user_end = next((i for i, seg in enumerate(segments)
                         if isinstance(seg, Placeholder) and seg.kind == "output"), len(segments))
    for i, seg in enumerate(segments):
        if i == user_end:
            pending.extend(tail)  # close the user's turn, open the assistant's
            tokens += len(tail)
        if isinstance(seg, Placeholder) and seg.kind == "output" and seg.name not in fixed:
            if pending:
                program.append(Fill(tuple(pending)))
                pending = []
            program.append(Gen(function.output_sampling[seg.name], name=seg.name))
            first_gen_seen = True
            continue
        if isinstance(seg, Placeholder) and seg.kind == "output":
            text = fixed[seg.name]  # the template's space before it comes as carry
        elif isinstance(seg, Placeholder):
            text = values[seg.name]
        else:
            text = seg.text
        length = len(text)  # characters of the template's text this segment stands for
        text, carry = carry + text, ""
        following = segments[i + 1] if i + 1 < len(segments) else None
        if i + 1 == user_end:
            text = text.rstrip()  # the chat template ends the user's turn itself
        elif isinstance(seg, Text) and isinstance(following, Placeholder):
            # "Passage: {{input:x}}" is "Passage:" + " " + value: the spaces go
            # with what follows (the value's first word, or the model's own).
            stripped = text.rstrip(_HORIZONTAL)
            if following.kind == "input" or following.name in fixed:
                carry = text[len(stripped):]
            text = stripped
        ids = segment_ids(seg, text, tokenizer, add_bos=add_bos and not program and not pending) if text else []
        pending.extend(ids)
        if not first_gen_seen and length:
            chars += length
            tokens += len(ids)
            tokens_at[chars] = tokens
    hint = None
    if prefix is not None:
        key, end = prefix
        if end in tokens_at:
            hint = PrefixHint(key, tokens_at[end])
    return GenerationRequest(program=program, request_id=request_id, prefix_hint=hint)


def head_request(
    function: FunctionSpec,
    template: Template,
    known: Mapping[str, str],
    tokenizer: TokenizerLike,
    *,
    key: str,
    end: int,
    request_id: str,
) -> GenerationRequest | None:
    """A request that prefills only the known head of a call: the first
    ``end`` characters of its prompt text (template text and the ``known``
    input values before its first unknown input), hinted under ``key``.

    The head's tokens are those :func:`build_request` gives the full prompt
    up to that boundary (each segment is tokenized on its own, and the
    spaces before the unknown input go with its value), so they are an exact
    prefix of the call's request once every input has a value. The program
    generates one greedy token, which nobody reads: an engine needs a Gen to
    run a program, and one sampled token costs no forward beyond the prefill.
    None when ``end`` is not a segment boundary of the known text.
    """
    filled = {name: known.get(name) or "" for name in template.inputs}
    probe = build_request(function, template, filled, tokenizer, request_id=request_id, prefix=(key, end))
    hint = probe.prefix_hint
    if hint is None:
        return None
    tokens = [t for step in probe.program if isinstance(step, Fill) for t in step.token_ids][: hint.num_tokens]
    one = SamplingConfig(max_tokens=1, temperature=0.0)
    return GenerationRequest(program=[Fill(tuple(tokens)), Gen(one, name="head")], request_id=request_id,
                             prefix_hint=hint)
