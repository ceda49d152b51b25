"""Compressing a ready call's marked inputs before its prompt is built.

A function marks inputs for compression (``{{input:notes|compress=0.3}}`` or
``semantic_function(compress={"notes": 0.3})``; see ``CallNode.compress``).
When such a call becomes ready, the runtime hands its values to
:class:`InputCompression` (in a worker thread: compression runs model
forwards) and splices the compressed text into the prompt in place of the
value. The variables themselves keep their original values.

Scoring uses Parrot's own forward (:mod:`parrot.compression`): by default the
model of the runtime's first torch engine (weights shared, not copied: the
scores come from the weights that will read the prompt), else the model
``$PARROT_MODEL`` or the default model.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parrot.compression import Compressor


class InputCompression:
    """Compresses input values for calls; thread-safe, builds its
    :class:`~parrot.compression.Compressor` on first use.

    ``compressor`` is a ready one; otherwise ``engines`` are searched for one
    with a local model (a ``TorchEngine``), and failing that the default model
    folder is loaded.
    """

    def __init__(self, engines: Sequence[Any] = (), compressor: "Compressor | None" = None) -> None:
        self._engines = list(engines)
        self._compressor = compressor
        self._lock = threading.Lock()

    @property
    def compressor(self) -> "Compressor":
        """The compressor, built on first use (blocking: may load a model)."""
        with self._lock:
            if self._compressor is None:
                self._compressor = self._build()
            return self._compressor

    def _build(self) -> "Compressor":
        from parrot.compression import Compressor

        for engine in self._engines:
            if getattr(engine, "model", None) is not None and getattr(engine, "tokenizer", None) is not None:
                return Compressor(engine)
        from parrot.dataflow.runtime import default_model_dir

        return Compressor(default_model_dir())

    def apply(self, rates: Mapping[str, float], values: Mapping[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
        """Compress ``values[name]`` to ``rates[name]`` for each marked input.

        Returns the compressed texts by input name and the statistics for the
        call node: totals over the inputs (``original_tokens``,
        ``compressed_tokens``, ``ratio`` = original / compressed, ``seconds``,
        ``model``) and per input (the same, plus the requested ``rate``).
        Blocking; run it in a worker thread.
        """
        compressor = self.compressor
        texts: dict[str, str] = {}
        per_input: dict[str, dict[str, Any]] = {}
        for name, rate in rates.items():
            result = compressor.compress(values[name], rate=rate)
            texts[name] = result.context
            per_input[name] = {
                "rate": rate,
                "original_tokens": result.original_tokens,
                "compressed_tokens": result.compressed_tokens,
                "ratio": round(result.ratio, 4),
                "seconds": round(result.seconds, 6),
            }
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
