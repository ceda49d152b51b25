"""The Parrot language: templates, Semantic Variables, semantic functions, sessions.

This package imports no other part of Parrot; every other layer imports it.
"""

from .errors import (
    AuthenticationError,
    CallFailedError,
    ConstraintError,
    ContextLengthError,
    DataflowCycleError,
    EngineError,
    EngineUnavailableError,
    InvalidArgumentError,
    NoActiveSessionError,
    OutputParseError,
    ParrotError,
    ParrotTimeoutError,
    PromptTooLongError,
    QuotaExceededError,
    SamplingConfigError,
    SessionClosedError,
    TemplateError,
    UnknownSessionError,
    UnknownVariableError,
    VariableAlreadySetError,
)
from .constraint import Constraint
from .function import Input, Output, SemanticFunction, semantic_function
from .portal import Portal
from .runtime import PERF_VALUES, Call, FunctionSpec, Perf, Runtime, check_perf, new_id
from .sampling import SamplingConfig
from .session import Session, current_session, default_runtime, set_default_runtime_factory
from .template import Placeholder, Template, Text
from .variable import SemanticVariable

__all__ = [
    "AuthenticationError", "ContextLengthError", "ParrotTimeoutError", "PromptTooLongError", "QuotaExceededError",
    "CallFailedError", "Call", "Constraint", "ConstraintError", "DataflowCycleError", "EngineError", "EngineUnavailableError", "FunctionSpec", "Input",
    "InvalidArgumentError", "NoActiveSessionError", "Output", "OutputParseError", "PERF_VALUES", "ParrotError", "Perf",
    "Placeholder", "Portal", "Runtime", "SamplingConfig", "SamplingConfigError", "SemanticFunction",
    "SemanticVariable", "Session", "SessionClosedError", "Template", "TemplateError", "Text",
    "UnknownSessionError", "UnknownVariableError", "VariableAlreadySetError", "check_perf",
    "current_session", "default_runtime", "new_id", "semantic_function", "set_default_runtime_factory",
]
