"""Sampling options of one output variable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import SamplingConfigError
from .validation import unicode_problem

# The accepted ranges, in one place: the HTTP models and the OpenAI routes
# derive their bounds from these names.
#: Upper bound on ``max_tokens`` accepted from users; engines may cap lower.
MAX_TOKENS_LIMIT = 1 << 16
#: Highest temperature (OpenAI's range is 0 to 2).
TEMPERATURE_MAX = 2.0
#: Temperatures below this sample greedily: dividing logits by a tinier
#: number overflows to inf and the softmax to nan.
GREEDY_BELOW = 1e-5
#: Seeds are signed 64-bit integers (what a torch generator takes).
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1
#: Most stop strings one output may have.
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingConfig:
    """How one output is generated.

    ``temperature == 0`` (or below :data:`GREEDY_BELOW`) means greedy
    decoding; the highest is :data:`TEMPERATURE_MAX`. ``seed`` (a signed
    64-bit integer) makes sampling at a positive temperature reproducible. Generation stops at the first of:
    ``max_tokens`` tokens, the model's end-of-sequence token, or any string
    in ``stop`` (the stop string itself is not part of the output).
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SamplingConfigError` naming the first bad field."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise SamplingConfigError("max_tokens", f"must be an integer, got {self.max_tokens!r}")
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise SamplingConfigError("max_tokens", f"must be between 1 and {MAX_TOKENS_LIMIT}, got {self.max_tokens}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise SamplingConfigError("temperature", f"must be a number, got {self.temperature!r}")
        if not 0.0 <= float(self.temperature) <= TEMPERATURE_MAX:  # also refuses nan
            raise SamplingConfigError("temperature", f"must be between 0 and {TEMPERATURE_MAX:g}, got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise SamplingConfigError("top_p", f"must be a number, got {self.top_p!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise SamplingConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingConfigError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingConfigError("stop", f"stop strings must be non-empty strings, got {s!r}")
            if unicode_problem(s) is not None:
                raise SamplingConfigError("stop", f"a stop string {unicode_problem(s)}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise SamplingConfigError("seed", f"must be an integer or None, got {self.seed!r}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise SamplingConfigError("seed", f"must be a signed 64-bit integer ({SEED_MIN} to {SEED_MAX}), got {self.seed}")

    @property
    def greedy(self) -> bool:
        """Whether the output is the argmax at every step (temperature about 0)."""
        return self.temperature < GREEDY_BELOW

    def merged(self, **overrides: Any) -> "SamplingConfig":
        """A copy with the given non-``None`` fields replaced."""
        known = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(known) - set(self.__dataclass_fields__)
        if unknown:
            name = sorted(unknown)[0]
            raise SamplingConfigError(name, "is not a sampling option")
        return replace(self, **known)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise SamplingConfigError(sorted(unknown)[0], "is not a sampling option")
        return cls(**d)
