"""Map-reduce summarization: summarize chunks independently, then merge.

    python examples/map_reduce.py [FILE]

The map calls are independent, so the runtime batches them; the reduce call
has one input per chunk and starts as soon as the last of them is set. The
partial summaries are read with perf="throughput" (finish the group soon),
the final one with perf="latency".

Runs on the model in $PARROT_MODEL, else Parrot's embedded test model (random
weights: the text is not meaningful, the dataflow is real).
"""

import sys
import time

import parrot as P


@P.semantic_function(max_tokens=40, stop=["\n"])
def summarize(chunk: P.Input, summary: P.Output):
    """Summarize the passage in one sentence.
    Passage: {{input:chunk}}
    Summary: {{output:summary}}"""


def make_reducer(n: int) -> P.SemanticFunction:
    """A function with one input per partial summary (templates are plain strings)."""
    notes = "\n".join(f"Note {i + 1}: {{{{input:note{i}}}}}" for i in range(n))
    return P.SemanticFunction(
        f"Merge the notes into a short summary.\n{notes}\nSummary: {{{{output:merged|max_tokens=64}}}}",
        name="merge",
    )


def main() -> None:
    if len(sys.argv) > 1:
        text = open(sys.argv[1], encoding="utf-8").read()
    else:
        text = "Calls form a graph.\n\nReady calls run at once.\n\nFan-outs are batched.\n\nChains go first."
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
