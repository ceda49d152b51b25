"""Prompt compression on the trained default model (SmolLM2-135M-Instruct).

What a reader of the compressed text needs: words that were apart stay
apart, line breaks stay line breaks, and the planted facts (numbers, names)
survive 3x compression; with the question asked after the text, 5x.
"""

from __future__ import annotations

import random
import re

import pytest

from parrot.compression import Compressor, render_kept
from parrot.dataflow.compress import InputCompression, questions_after
from parrot.semantic_vars import Template

pytestmark = pytest.mark.trained

SUBJECTS = ("The old bridge", "A quiet market", "The morning train", "The village school", "Our small garden",
            "The harbor office", "A wooden cart", "The town library", "The river path", "The bakery")
VERBS = ("stood near", "looked over", "was close to", "ran along", "faced", "led past", "opened onto")
OBJECTS = ("the river", "the hills", "the main square", "the station", "the old church", "the fields", "the mill")
TAILS = ("", " in the spring", " for many years", " on most days", " after the rain", " in the evening")
NAMES = ("Lindqvist", "Okonkwo", "Vasquez", "Nakamura", "Halvorsen", "Tremblay")


def report(seed: int, paragraphs: int = 10, facts: int = 4) -> tuple[str, list[tuple[str, str]]]:
    """Prose paragraphs with planted facts: (text, [(key, question)])."""
    rng = random.Random(seed)
    paras = [[f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}."
              for _ in range(4)] for _ in range(paragraphs)]
    planted = []
    for k, p in enumerate(rng.sample(range(paragraphs), facts)):
        ident = 10 + 7 * k
        if k % 2 == 0:
            key = str(rng.randint(1000, 9999))
            fact, question = f"The access code for vault {ident} is {key}.", f"What is the access code for vault {ident}?"
        else:
            key = NAMES[k]
            fact, question = f"The night courier for route {ident} is {key}.", f"Who is the night courier for route {ident}?"
        paras[p].insert(rng.randint(1, 3), fact)
        planted.append((key, question))
    # Line breaks inside paragraphs too: a list a reader must still see as lines.
    return "\n\n".join(" ".join(s[:2]) + "\n" + " ".join(s[2:]) for s in paras), planted


def glued(original: str, compressed: str) -> list[str]:
    """Words of ``compressed`` made of two words of ``original`` run together."""
    known = set(re.findall(r"\w+", original))
    return [w for w in re.findall(r"\w+", compressed)
            if w not in known and any(w[:k] in known and w[k:] in known for k in range(1, len(w)))]


@pytest.fixture(scope="module")
def compressor(trained_model_dir) -> Compressor:
    return Compressor(trained_model_dir, device="cpu")


def test_kept_tokens_keep_the_spacing_and_lines(compressor):
    text, _ = report(1)
    for kwargs in ({"rate": 1 / 3}, {"rate": 0.2, "coarse": False}):
        r = compressor.compress(text, **kwargs)
        assert r.ratio > 2.5
        assert glued(text, r.context) == []
        # Dropped line breaks are put back: the output has lines, and no more than the text had.
        assert 1 <= r.context.count("\n") <= text.count("\n")
        # The kept token ids are still a subsequence of the text's own tokens.
        it = iter(r.original_token_ids)
        assert all(any(x == y for y in it) for x in r.kept_token_ids)


def test_planted_facts_survive_3x(compressor):
    text, planted = report(2)
    r = compressor.compress(text, rate=1 / 3)
    assert r.ratio == pytest.approx(3, rel=0.2)
    assert [key for key, _ in planted if key not in r.context] == []


def test_question_after_the_input_keeps_its_answer_at_5x(compressor):
    text, planted = report(3)
    key, question = planted[1]
    template = Template("Report: {{input:report|compress=0.2}}\nQuestion: " + question + "\nAnswer: {{output:a}}")
    questions = questions_after(template, {"report": text}, ["report"])
    assert questions == {"report": question}
    texts, stats = InputCompression(compressor=compressor).apply({"report": 0.2}, {"report": text}, questions)
    assert stats["inputs"]["report"]["question"] == question
    assert stats["ratio"] == pytest.approx(5, rel=0.25)
    assert key in texts["report"]
    assert glued(text, texts["report"]) == []


def test_render_kept_puts_back_the_gaps_layout():
    text = "Buses leave every 12 minutes.\n\nLine 7 runs late."
    spans = [(m.start(), m.end()) for m in re.finditer(r" ?\w+|\s|[^\w\s]", text)]
    pieces = [text[a:b] for a, b in spans]
    keep = [i for i, p in enumerate(pieces) if p.strip() in {"Buses", "every", "12", "Line", "7", "late"}]
    assert render_kept(text, spans, keep) == "Buses every 12\n\nLine 7 late"
    assert render_kept(text, spans, list(range(len(spans)))) == text
