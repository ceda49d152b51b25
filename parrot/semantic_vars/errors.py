"""Typed errors shared by every layer.

They live here because ``semantic_vars`` is imported by all layers and
imports none of them, so the SDK, the dataflow and the service raise the same
classes and a user catches one name whichever runtime they use.
"""

from __future__ import annotations


class ParrotError(Exception):
    """Base class of every error Parrot raises on purpose."""


class TemplateError(ParrotError, ValueError):
    """A prompt template does not parse or does not match its function.

    ``position`` is the character offset in the template where the problem
    was found (``None`` when it concerns the template as a whole).
    """

    def __init__(self, message: str, *, position: int | None = None, template: str | None = None) -> None:
        self.position = position
        self.template = template
        if position is not None and template is not None:
            line = template.count("\n", 0, position) + 1
            column = position - (template.rfind("\n", 0, position) + 1) + 1
            message = f"{message} (line {line}, column {column})"
        super().__init__(message)


class InvalidArgumentError(ParrotError, ValueError):
    """An argument has an invalid value; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class SamplingConfigError(InvalidArgumentError):
    """A sampling option has an invalid value; ``field`` names it."""


class ConstraintError(SamplingConfigError):
    """An output constraint (choices, regex, JSON schema, grammar) is invalid
    or cannot be compiled for the model's tokenizer; ``field`` names it.

    It pickles (an engine process's submit raises it for one request)."""

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        prefix = f"{self.field}: "
        text = str(self)
        return type(self), (self.field, text[len(prefix):] if text.startswith(prefix) else text)


class OutputParseError(InvalidArgumentError):
    """An output's text does not parse under its schema; ``field`` names the output."""


class NoActiveSessionError(ParrotError, RuntimeError):
    """A semantic function was called outside ``with Session():``."""


class SessionClosedError(ParrotError, RuntimeError):
    """The session was closed; it takes no new calls or variables."""


class UnknownVariableError(ParrotError, KeyError):
    """A call or request names a Semantic Variable the runtime does not know;
    ``field`` names the request field that carried the id, when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownSessionError(UnknownVariableError):
    """A request names a session the runtime does not know (or does not own)."""


class DataflowCycleError(ParrotError, ValueError):
    """Submitting the call would make the dataflow graph cyclic."""


class VariableAlreadySetError(ParrotError, ValueError):
    """A variable that already has a value (or a producer) would be set again."""


class CallFailedError(ParrotError, RuntimeError):
    """The call that produces a variable failed; the cause is chained."""


class EngineError(ParrotError, RuntimeError):
    """An engine could not run a request (bad prompt, out of memory, crash)."""


class EngineUnavailableError(EngineError):
    """The engine died or cannot be reached; the call may run on another one."""


class ParrotTimeoutError(ParrotError, TimeoutError):
    """A value did not arrive within the caller's timeout (the call may
    still finish; read the variable again to wait longer). A
    :class:`TimeoutError`, so code catching that still works."""


class ContextLengthError(InvalidArgumentError):
    """A prompt (with its ``max_tokens``) does not fit the model's context
    (HTTP 400, as OpenAI answers it); ``field`` names the request field."""


class AuthenticationError(ParrotError):
    """No API key, or one that no tenant has (HTTP 401)."""


class QuotaExceededError(ParrotError):
    """A tenant is over one of its quotas (HTTP 429). ``field`` names the
    quota; ``retry_after`` is in seconds."""

    def __init__(self, message: str, *, field: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.field = field
        self.retry_after = retry_after


class PromptTooLongError(ParrotError):
    """A prompt is longer than the tenant's ``max_prompt_tokens`` (HTTP 413)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
