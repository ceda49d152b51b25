"""Compressing a ready call's marked inputs before its prompt is built.

A function marks inputs for compression (``{{input:notes|compress=0.3}}`` or
``semantic_function(compress={"notes": 0.3})``; see ``CallNode.compress``).
When such a call becomes ready, the runtime hands its values to
:class:`InputCompression` (in a worker thread: compression runs model
forwards) and splices the compressed text into the prompt in place of the
value. The variables themselves keep their original values.

Scoring uses Parrot's own forward (:mod:`parrot.compression`): by default
with the model of the runtime's first engine that runs model jobs
(:meth:`Engine.run_model_job`; weights shared, not copied: the scores come
from the weights that will read the prompt), where that model lives: in this
process for a torch engine, in the engine's process for a process engine.
Else (remote engines hold no model here) a scorer model is loaded in this
process on first use: the runtime's ``scorer_model`` setting, else
``$PARROT_MODEL`` or the default model (:func:`parrot.backends.models.resolve_model`).

Question-aware mode. When the template asks a question *after* a compressed
input ("{{input:report|compress=0.3}} ... What did the audit find?
{{output:a}}"), that question is what the reader will answer, so the input
is compressed with it (LongLLMLingua: segments ranked by how well they
predict the question, contrastive token scores); see :func:`questions_after`.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parrot.backends.engine import Engine
    from parrot.compression import Compressor


_engine_compressors: "weakref.WeakKeyDictionary[Any, Compressor]" = weakref.WeakKeyDictionary()
_engine_compressors_lock = threading.Lock()


# A question: a run of text ending in "?" that starts after a sentence end or line break.
_QUESTION = re.compile(r"[^.!?\n]*\?")
_MAX_QUESTION_CHARS = 1000
# A field label before the question ("Question: ...", "User: ..."): not part of what is asked.
_LABEL = re.compile(r"^\s*\w{1,24}:\s+")


def questions_after(template: Any, values: Mapping[str, str], names: Sequence[str]) -> dict[str, str]:
    """For each compressed input in ``names``, the question the template asks
    after it, if any: the sentences ending in ``?`` in the prompt text
    between the input and the first output placeholder (template text and
    the values of uncompressed inputs), a leading field label such as
    ``Question:`` left out, joined by spaces. Inputs followed by
    no question are left out. ``template`` is a
    :class:`~parrot.semantic_vars.template.Template`."""
    from parrot.semantic_vars.template import Placeholder

    out: dict[str, str] = {}
    segments = list(template.segments)
    for name in names:
        start = next((i for i, seg in enumerate(segments)
                      if isinstance(seg, Placeholder) and seg.kind != "output" and seg.name == name), None)
        if start is None:
            continue
        tail: list[str] = []
        for seg in segments[start + 1:]:
            if isinstance(seg, Placeholder):
                if seg.kind == "output":
                    break
                if seg.name in names:
                    continue  # another compressed input: its text is not what is asked
                tail.append(values.get(seg.name) or "")
            else:
                tail.append(seg.text)
        asked = " ".join(_LABEL.sub("", q).strip() for q in _QUESTION.findall("".join(tail)) if q.strip(" ?"))
        if asked:
            out[name] = asked[-_MAX_QUESTION_CHARS:]
    return out


def compress_with_engine(engine: Any, rates: Mapping[str, float], values: Mapping[str, str],
                         questions: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """:meth:`InputCompression.apply` with a compressor on ``engine``'s own
    model (built once per engine). Runs where the engine lives, as an
    :meth:`~parrot.backends.engine.Engine.run_model_job`."""
    from parrot.compression import Compressor

    with _engine_compressors_lock:
        compressor = _engine_compressors.get(engine)
        if compressor is None:
            compressor = _engine_compressors[engine] = Compressor(engine)
    return compress_values(compressor, rates, values, questions)


class InputCompression:
    """Compresses input values for calls; thread-safe.

    ``compressor`` is a ready one; otherwise the first of ``engines`` that
    runs model jobs scores with its own model (in its own process when it has
    one), and failing that ``scorer_model`` (a model name or folder; None:
    the default model) is loaded here on first use.
    """

    def __init__(self, engines: Sequence["Engine"] = (), compressor: "Compressor | None" = None,
                 scorer_model: "str | os.PathLike[str] | None" = None) -> None:
        self._engine = None if compressor is not None else next((e for e in engines if e.runs_model_jobs), None)
        self._compressor = compressor
        self._scorer_model = scorer_model
        self._lock = threading.Lock()

    @property
    def compressor(self) -> "Compressor":
        """The local compressor, built on first use (blocking: may load a model)."""
        with self._lock:
            if self._compressor is None:
                from parrot.backends.models import resolve_model
                from parrot.compression import Compressor

                self._compressor = Compressor(resolve_model(self._scorer_model))
            return self._compressor

    def apply(self, rates: Mapping[str, float], values: Mapping[str, str],
              questions: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, Any]]:
        """Compress ``values[name]`` to ``rates[name]`` for each marked input,
        question-aware for the inputs in ``questions`` (see :func:`questions_after`).

        Returns the compressed texts by input name and the statistics for the
        call node: totals over the inputs (``original_tokens``,
        ``compressed_tokens``, ``ratio`` = original / compressed, ``seconds``,
        ``model``) and per input (the same, plus the requested ``rate`` and
        the ``question`` used, where one was).
        Blocking; run it in a worker thread.
        """
        if self._engine is not None:
            return self._engine.run_model_job(compress_with_engine, dict(rates), dict(values), dict(questions or {}))
        return compress_values(self.compressor, rates, values, questions)


def compress_values(compressor: "Compressor", rates: Mapping[str, float],
                    values: Mapping[str, str], questions: Mapping[str, str] | None = None,
                    ) -> tuple[dict[str, str], dict[str, Any]]:
    """Compress each marked input with ``compressor``; see :meth:`InputCompression.apply`."""
    texts: dict[str, str] = {}
    per_input: dict[str, dict[str, Any]] = {}
    questions = questions or {}
    for name, rate in rates.items():
        question = questions.get(name, "")
        if question:
            # The question ranks and scores the input but is not spliced in
            # with it: the budget is the rate of the input's own tokens, plus
            # the question kept whole.
            budget = max(1, round(rate * compressor.count_tokens(values[name])))
            result = compressor.compress(values[name], target_tokens=budget + compressor.count_tokens(question),
                                         question=question)
        else:
            result = compressor.compress(values[name], rate=rate)
        texts[name] = result.context
        per_input[name] = {
            "rate": rate,
            "original_tokens": len(result.original_token_ids),
            "compressed_tokens": len(result.kept_token_ids),
            "ratio": round(len(result.original_token_ids) / len(result.kept_token_ids), 4) if result.kept_token_ids else 1.0,
            "seconds": round(result.seconds, 6),
        }
        if question:
            per_input[name]["question"] = question
    original = sum(s["original_tokens"] for s in per_input.values())
    compressed = sum(s["compressed_tokens"] for s in per_input.values())
    stats = {
        "original_tokens": original,
        "compressed_tokens": compressed,
        "ratio": round(original / compressed, 4) if compressed else 1.0,
        "seconds": round(sum(s["seconds"] for s in per_input.values()), 6),
        "model": compressor.model_name,
        "inputs": per_input,
    }
    return texts, stats
