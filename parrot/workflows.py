"""Reference agent workflows, used by ``parrot demo`` and the benchmarks.

Each builds its DAG in the current session and returns the variables a
program would read; nothing here waits.
"""

from __future__ import annotations

from typing import Sequence

from parrot.semantic_vars import Input, Output, SemanticFunction, SemanticVariable, semantic_function

SAMPLE_DOCUMENT = """\
Parrot serves programs of language model calls rather than single requests.
A program names the values that flow between calls, so the service can see
which call waits for which, and run the next call the moment its inputs exist.

Calls that share the start of their prompt can share the work of reading it.
A long system prompt used by many users is read once and kept in memory while
the group of calls that needs it runs.

When many calls feed one final call, finishing the whole group soon matters
more than finishing any single call early, so the scheduler batches them.
When a user waits on a chain of calls, each step of the chain goes first.

Long intermediate results can be compressed before they are passed on, and
long prompts can be read with sparse attention, so large documents stay fast.
"""


def split_paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs of ``text``."""
    return [p.strip() for p in text.split("\n\n") if p.strip()]


# Chat functions: each prompt is the model's own chat template around the
# template text (the model's default system prompt, shared by every call).
@semantic_function(max_tokens=48, stop=["\n"], chat=True)
def summarize_chunk(chunk: Input, summary: Output):
    """Summarize the following text in one sentence.

    {{input:chunk}}{{output:summary}}"""


@semantic_function(max_tokens=60, stop=["\n"], chat=True)
def refine_summary(previous: Input, chunk: Input, summary: Output):
    """Summarize the following text in one sentence.

    {{input:previous}} {{input:chunk}}{{output:summary}}"""


@semantic_function(max_tokens=16, stop=["\n"], chat=True)
def make_title(summary: Input, title: Output):
    """{{input:summary}}

    Give this text a short title.{{output:title}}"""


def chain_summary(chunks: Sequence[str]) -> list[SemanticVariable]:
    """Summarize chunk by chunk, each step refining the previous summary.
    Returns the summary after every step; the last one is the answer."""
    if not chunks:
        raise ValueError("chain_summary needs at least one chunk")
    steps = [summarize_chunk(chunks[0])]
    for chunk in chunks[1:]:
        steps.append(refine_summary(steps[-1], chunk))
    return steps


def reducer(n: int, *, max_tokens: int = 32) -> SemanticFunction:
    """A function that merges ``n`` partial summaries into one."""
    parts = "\n".join(f"- {{{{input:part{i}}}}}" for i in range(n))
    template = f"Here are notes about one topic:\n{parts}\n\nDescribe the topic in one sentence.{{{{output:summary}}}}"
    return SemanticFunction(template, name=f"reduce_{n}", chat=True,
                            defaults=summarize_chunk.output_sampling["summary"].merged(max_tokens=max_tokens))


def map_reduce_summary(chunks: Sequence[str]) -> tuple[list[SemanticVariable], SemanticVariable]:
    """Summarize every chunk independently (the map), then merge them (the reduce)."""
    if not chunks:
        raise ValueError("map_reduce_summary needs at least one chunk")
    partial = [summarize_chunk(c) for c in chunks]
    merged = reducer(len(partial))(*partial)
    return partial, merged
