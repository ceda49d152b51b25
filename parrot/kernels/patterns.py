"""Sparse prefill pattern configuration: per layer, per head, which pattern and budget.

The offline search (:mod:`parrot.kernels.pattern_search`) writes a
:class:`SparseAttentionConfig` as JSON; the engine loads it and passes
``config.layer(i)`` to :func:`parrot.kernels.sparse_prefill_attention`.

JSON layout (version 1)::

    {"version": 1, "block_m": 64, "block_n": 64, "last_q": 64, "min_length": 16384,
     "layers": [[{"kind": "vertical_slash", "vertical": 1000, "slash": 1024},
                 {"kind": "a_shape", "sink": 64, "window": 2048},
                 {"kind": "block_sparse", "top_k": 64}, ...],   # one entry per query head
                ...]}                                            # one list per layer
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("a_shape", "vertical_slash", "block_sparse", "dense")


class PatternConfigError(ValueError):
    """A sparse attention config (or its JSON) is malformed; the message names the field."""


@dataclass(frozen=True)
class HeadPattern:
    """One head's pattern and budget.

    * ``a_shape``: ``sink`` first keys + ``window`` most recent keys (tokens);
    * ``vertical_slash``: ``vertical`` key columns + ``slash`` diagonals;
    * ``block_sparse``: ``top_k`` key blocks per query block;
    * ``dense``: every causal key.
    """

    kind: str
    sink: int = 64
    window: int = 1024
    vertical: int = 1000
    slash: int = 1024
    top_k: int = 64

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PatternConfigError(f"kind: {self.kind!r} is not one of {KINDS}")
        for name in ("sink", "window", "vertical", "slash", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise PatternConfigError(f"{name}: must be a non-negative integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that matter for this kind."""
        keep = {"a_shape": ("sink", "window"), "vertical_slash": ("vertical", "slash"), "block_sparse": ("top_k",)}
        return {"kind": self.kind, **{k: v for k, v in asdict(self).items() if k in keep.get(self.kind, ())}}

    @classmethod
    def from_dict(cls, data: Any) -> "HeadPattern":
        if not isinstance(data, dict) or "kind" not in data:
            raise PatternConfigError("head pattern: expected an object with a 'kind'")
        unknown = set(data) - {"kind", "sink", "window", "vertical", "slash", "top_k"}
        if unknown:
            raise PatternConfigError(f"head pattern: unknown field(s) {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class LayerPatterns:
    """What :func:`parrot.kernels.sparse_prefill_attention` needs for one layer.

    ``heads`` has one pattern per query head. Prompts shorter than
    ``min_length`` tokens use dense attention. ``block_m``/``block_n`` are
    the kernel's tile sizes and the index granularity; ``last_q`` is how many
    final queries estimate the vertical-slash index.
    """

    heads: tuple[HeadPattern, ...]
    block_m: int = 64
    block_n: int = 64
    last_q: int = 64
    min_length: int = 16384

    @classmethod
    def uniform(cls, pattern: HeadPattern, num_heads: int, **kwargs: int) -> "LayerPatterns":
        """The same pattern on every head."""
        return cls(heads=(pattern,) * num_heads, **kwargs)


@dataclass
class SparseAttentionConfig:
    """Patterns for every layer of a model, saved and loaded as JSON."""

    layers: list[tuple[HeadPattern, ...]]
    block_m: int = 64
    block_n: int = 64
    last_q: int = 64
    min_length: int = 16384
    meta: dict[str, Any] = field(default_factory=dict)  # how it was searched (free-form)

    def layer(self, i: int) -> LayerPatterns:
        """The patterns of layer ``i``."""
        return LayerPatterns(self.layers[i], self.block_m, self.block_n, self.last_q, self.min_length)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "block_m": self.block_m,
            "block_n": self.block_n,
            "last_q": self.last_q,
            "min_length": self.min_length,
            "meta": self.meta,
            "layers": [[h.to_dict() for h in layer] for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "SparseAttentionConfig":
        if not isinstance(data, dict):
            raise PatternConfigError("config: expected a JSON object")
        if data.get("version") != 1:
            raise PatternConfigError(f"version: expected 1, got {data.get('version')!r}")
        layers = data.get("layers")
        if not isinstance(layers, list) or not all(isinstance(layer, list) and layer for layer in layers):
            raise PatternConfigError("layers: expected a list of non-empty lists of head patterns")
        ints = {}
        for name, default in (("block_m", 64), ("block_n", 64), ("last_q", 64), ("min_length", 16384)):
            value = data.get(name, default)
            if not isinstance(value, int) or value < 1:
                raise PatternConfigError(f"{name}: must be a positive integer, got {value!r}")
            ints[name] = value
        for name in ("block_m", "block_n"):
            if ints[name] < 16 or ints[name] & (ints[name] - 1):
                raise PatternConfigError(f"{name}: must be a power of two >= 16")
        parsed = [tuple(HeadPattern.from_dict(h) for h in layer) for layer in layers]
        return cls(layers=parsed, meta=dict(data.get("meta") or {}), **ints)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SparseAttentionConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise PatternConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)
