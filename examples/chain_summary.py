"""Chain summarization: each call refines the summary of the chunks before it.

    python examples/chain_summary.py [FILE]

Every step's input is the previous step's output, yet the program submits
all steps at once and waits only for the last: the runtime starts each step
the moment its input exists, with no round trip to this program.

Runs on the model in $PARROT_MODEL, else Parrot's embedded test model (random
weights: the text is not meaningful, the dataflow is real).
"""

import sys
import time

import parrot as P


@P.semantic_function(max_tokens=48, stop=["\n"])
def first_summary(chunk: P.Input, summary: P.Output):
    """You are a careful editor. Summarize this part of a document in one sentence.
    Part: {{input:chunk}}
    One-sentence summary: {{output:summary}}"""


@P.semantic_function(max_tokens=48, stop=["\n"])
def refine(summary_so_far: P.Input, chunk: P.Input, summary: P.Output):
    """You are a careful editor. Update the running summary with the next part of the document.
    Running summary: {{input:summary_so_far}}
    Next part: {{input:chunk}}
    Updated one-sentence summary: {{output:summary}}"""


def main() -> None:
    if len(sys.argv) > 1:
        text = open(sys.argv[1], encoding="utf-8").read()
    else:
        text = "Parrot sees the whole program.\n\nIt runs dependent calls back to back.\n\nIt shares prompt prefixes."
    chunks = [c.strip() for c in text.split("\n\n") if c.strip()]

    started = time.perf_counter()
    with P.Session():
        summary = first_summary(chunks[0])
        for chunk in chunks[1:]:
            summary = refine(summary, chunk)  # chaining builds the DAG; nothing waits here
        print(summary.get(perf="latency"))  # the first and only wait
    print(f"{len(chunks)} calls in {time.perf_counter() - started:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
