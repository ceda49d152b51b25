"""Sampling options of one output variable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .constraint import Constraint
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
#: Most alternatives per token an output may ask log-probabilities for.
MAX_LOGPROBS = 20
#: Most tokens one ``logit_bias`` may name (OpenAI's limit).
MAX_LOGIT_BIAS = 300
#: ``frequency_penalty`` and ``presence_penalty`` lie in [-PENALTY_MAX, PENALTY_MAX].
PENALTY_MAX = 2.0
#: A ``logit_bias`` entry lies in [-LOGIT_BIAS_MAX, LOGIT_BIAS_MAX].
LOGIT_BIAS_MAX = 100.0


def _option(default: Any, description: str | None = None, **bounds: float) -> Any:
    """A sampling field: its default, what it means, and its bounds."""
    metadata: dict[str, Any] = dict(bounds)
    if description is not None:
        metadata["description"] = description
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SamplingConfig:
    """How one output is generated.

    ``temperature == 0`` (or below :data:`GREEDY_BELOW`) means greedy
    decoding; the highest is :data:`TEMPERATURE_MAX`. ``seed`` (a signed
    64-bit integer) makes sampling at a positive temperature reproducible. Generation stops at the first of:
    ``max_tokens`` tokens, the model's end-of-sequence token, or any string
    in ``stop`` (the stop string itself is not part of the output).

    ``constraint`` (a :class:`~parrot.semantic_vars.constraint.Constraint`,
    or its dict form) restricts the output to a shape: the engine masks the
    tokens that would leave it at every step. ``logprobs`` asks the engine for
    each generated token's log-probability under the model (before
    temperature and masks) and that many most likely alternatives (0: the
    sampled token's only).

    ``frequency_penalty`` and ``presence_penalty`` (in [-2, 2], OpenAI's
    meaning) lower the logit of each token by ``frequency * count +
    presence * (count > 0)``, counting the tokens this output generated so
    far; ``logit_bias`` adds a bias in [-100, 100] to the logits of the given
    token ids (pairs ``(token id, bias)``, or a mapping).

    ``ignore_eos`` keeps generating past the end-of-sequence token, so the
    output has exactly ``max_tokens`` tokens unless a stop string ends it
    (benchmarks use it to make every run do the same work; vLLM's option
    of that name). It cannot be combined with a ``constraint``, whose shape
    ends where the grammar lets the model stop.
    """

    # Each field's metadata holds its accepted bounds in pydantic's terms
    # (ge, gt, le, max_length) and a description: the HTTP models are
    # derived from these fields (parrot.server.models.SamplingBody).
    max_tokens: int = _option(128, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = _option(0.0, "0 is greedy", ge=0, le=TEMPERATURE_MAX)
    top_p: float = _option(1.0, gt=0, le=1)
    stop: tuple[str, ...] = _option((), max_length=MAX_STOP_STRINGS)
    seed: int | None = _option(None, ge=SEED_MIN, le=SEED_MAX)
    constraint: Constraint | None = _option(None, "constrained decoding of the output")
    logprobs: int | None = _option(None, "per-token logprobs and this many alternatives", ge=0, le=MAX_LOGPROBS)
    frequency_penalty: float = _option(0.0, ge=-PENALTY_MAX, le=PENALTY_MAX)
    presence_penalty: float = _option(0.0, ge=-PENALTY_MAX, le=PENALTY_MAX)
    logit_bias: tuple[tuple[int, float], ...] = _option(
        (), f"token id -> bias in [-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}]", max_length=MAX_LOGIT_BIAS
    )
    ignore_eos: bool = _option(False, "true: generate past end-of-sequence, exactly max_tokens")

    def __post_init__(self) -> None:
        bias = self.logit_bias
        if isinstance(bias, dict):
            bias = list(bias.items())
        if not isinstance(bias, (list, tuple)):
            raise SamplingConfigError("logit_bias", f"must map token ids to biases, got {type(bias).__name__}")
        try:
            pairs = tuple(sorted((int(t), float(b)) for t, b in bias))
        except (TypeError, ValueError):
            raise SamplingConfigError("logit_bias", "must map integer token ids to numbers") from None
        object.__setattr__(self, "logit_bias", pairs)
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            object.__setattr__(self, "constraint", Constraint.from_dict(self.constraint))  # ConstraintError names it
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
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise SamplingConfigError("logprobs", f"must be an integer between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -PENALTY_MAX <= value <= PENALTY_MAX:
                raise SamplingConfigError(name, f"must be a number between {-PENALTY_MAX:g} and {PENALTY_MAX:g}, got {value!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingConfigError("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
        for token, b in self.logit_bias:
            if token < 0:
                raise SamplingConfigError(f"logit_bias.{token}", "token ids are not negative")
            if not -LOGIT_BIAS_MAX <= b <= LOGIT_BIAS_MAX:  # also refuses nan
                raise SamplingConfigError(
                    f"logit_bias.{token}", f"a bias must be between {-LOGIT_BIAS_MAX:g} and {LOGIT_BIAS_MAX:g}, got {b}"
                )
        if len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            raise SamplingConfigError("logit_bias", "a token is given twice")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingConfigError("ignore_eos", f"must be true or false, got {self.ignore_eos!r}")
        if self.ignore_eos and self.constraint is not None:
            raise SamplingConfigError("ignore_eos", "cannot be combined with a constraint (the constraint decides where the output ends)")

    @property
    def penalized(self) -> bool:
        """True when penalties or a logit bias change the logits."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)

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
        d["constraint"] = self.constraint.to_dict() if self.constraint is not None else None
        d["logit_bias"] = {str(t): b for t, b in self.logit_bias}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise SamplingConfigError(sorted(unknown)[0], "is not a sampling option")
        return cls(**d)
