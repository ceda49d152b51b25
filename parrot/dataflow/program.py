"""Turning a ready call into an engine program of Fill and Gen steps."""

from __future__ import annotations

from typing import Mapping

from parrot.backends.engine import Fill, Gen, GenerationRequest, TokenizerLike
from parrot.semantic_vars import FunctionSpec, Placeholder, Template


def build_request(
    function: FunctionSpec,
    template: Template,
    values: Mapping[str, str],
    tokenizer: TokenizerLike,
    *,
    request_id: str,
) -> GenerationRequest:
    """Text and inputs up to each output become a Fill, each output a Gen.

    The text after the last output is not sent: nothing is generated after
    it. The first Fill starts with the model's BOS token.
    """
    program: list[Fill | Gen] = []
    buffer: list[str] = []
    for seg in template.segments:
        if not isinstance(seg, Placeholder):
            buffer.append(seg.text)
        elif seg.kind == "input":
            buffer.append(values[seg.name])
        else:
            text = "".join(buffer)
            buffer.clear()
            ids = tokenizer.encode(text, add_bos=not program)
            if ids:
                program.append(Fill(tuple(ids)))
            program.append(Gen(function.output_sampling[seg.name], name=seg.name))
    return GenerationRequest(program=program, request_id=request_id)
