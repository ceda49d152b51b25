"""Shared-prefix analysis before calls run.

At submit time a call's prompt is known up to its first output, its first
input whose value is not set yet, or its first input marked for compression
(its compressed text exists only when the call runs). Its *prefix
boundaries* are the points in that known text where a template segment ends
(after literal text, after an input's value); each boundary gets a key that
hashes the tenant's namespace and the text before it, chained so that
computing all of them costs one pass over the text. Two calls share a prefix
exactly when they share a boundary key: a common system prompt shared by
many users, the constant head of a template, or a long document fed to
several questions.

The namespace is the tenant, so tenants never share a key, with one
exception the admin opts into: a function published with ``public_prefix``
keys the constant head of its template under the ``public`` namespace (one
system prompt of a public app, cached once for everyone) and mixes the
tenant in right after it.

When a call is dispatched, its hint is its longest boundary that some other
call has too; the engine prefills that text once and reuses its KV cache.
Token-level reuse that templates cannot declare is the engine's business.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

from parrot.semantic_vars import Placeholder

from .graph import CallNode, DataflowGraph


@dataclass(frozen=True)
class PrefixBoundary:
    """A point in a call's known prompt text: ``key`` names the text before ``end``."""

    key: str
    end: int


PUBLIC_NAMESPACE = "public"


def known_prefix(call: CallNode, graph: DataflowGraph) -> tuple[str, list[int]]:
    """The prompt text known now, and the offsets where template segments end."""
    parts: list[str] = []
    ends: list[int] = []
    length = 0
    for seg in call.template.segments:
        if isinstance(seg, Placeholder):
            if seg.kind == "output" or seg.name in call.compress:
                break  # a compressed input's text is not known before it runs
            value = graph.variables[call.inputs[seg.name]].value
            if value is None:
                break
            text = value
        else:
            text = seg.text
        if text:
            parts.append(text)
            length += len(text)
            ends.append(length)
    return "".join(parts), ends


class PrefixIndex:
    """Counts, per namespace, how many calls reach each prefix boundary.

    The counts are history (a later user's identical system prompt is a known
    prefix), kept for the ``max_keys`` most recently reached boundaries so a
    long-running service stays bounded; the least recently reached go first.
    """

    def __init__(self, *, min_chars: int = 32, max_keys: int = 1_000_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.min_chars = min_chars
        self.max_keys = max_keys
        self.counts: OrderedDict[str, int] = OrderedDict()
        self.boundaries: dict[str, list[PrefixBoundary]] = {}

    def add(self, call: CallNode, graph: DataflowGraph, namespace: str) -> None:
        """Register ``call``'s boundaries (at submit time)."""
        text, ends = known_prefix(call, graph)
        segments = call.template.segments
        # Length of the template's constant head, shareable across tenants
        # only when the function is public.
        public_head = 0
        if call.function.public_prefix and segments and not isinstance(segments[0], Placeholder):
            public_head = len(segments[0].text)
        digest = hashlib.sha256((PUBLIC_NAMESPACE if public_head else namespace).encode() + b"\0")
        if call.function.chat:  # the same text in another chat frame is another prompt
            digest.update(b"chat\0" + json.dumps(call.function.chat_messages()).encode() + b"\0")
        start = 0
        found: list[PrefixBoundary] = []
        for end in ends:
            if public_head and start == public_head:
                digest.update(b"\0" + namespace.encode() + b"\0")
            # surrogatepass: a record stored before text was validated still hashes.
            digest.update(text[start:end].encode("utf-8", "surrogatepass"))
            start = end
            if end >= self.min_chars:
                found.append(PrefixBoundary(digest.copy().hexdigest()[:32], end))
        call.prefix_text = text
        self.boundaries[call.id] = found
        counts = self.counts
        for b in found:
            counts[b.key] = counts.get(b.key, 0) + 1
            counts.move_to_end(b.key)
        while len(counts) > self.max_keys:
            counts.popitem(last=False)

    def hint_for(self, call: CallNode) -> PrefixBoundary | None:
        """The longest boundary of ``call`` that another call reaches too."""
        for boundary in reversed(self.boundaries.get(call.id, ())):
            if self.counts.get(boundary.key, 0) >= 2:
                return boundary
        return None

    def head(self, call: CallNode) -> PrefixBoundary | None:
        """The boundary at the end of ``call``'s known text (its longest), if
        that text is at least ``min_chars`` long."""
        found = self.boundaries.get(call.id)
        return found[-1] if found else None

    def reach(self, key: str) -> None:
        """Count one more request reaching ``key`` outside the calls (an early
        prefill of a call's head): the call is then hinted with it, so it
        takes the stored head and is placed where the head is."""
        self.counts[key] = self.counts.get(key, 0) + 1
        self.counts.move_to_end(key)

    def forget(self, call: CallNode) -> None:
        """Drop a finished call's boundary list (the counts stay: history is
        what makes a later user's identical system prompt a known prefix)."""
        self.boundaries.pop(call.id, None)
