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
``$PARROT_MODEL`` or the embedded test model. Importing ``parrot`` loads no
model and imports no service library.
"""

from parrot.semantic_vars import (
    CallFailedError,
    DataflowCycleError,
    EngineError,
    Input,
    InvalidArgumentError,
    NoActiveSessionError,
    Output,
    ParrotError,
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


def _default_runtime() -> Runtime:
    from parrot.dataflow import default_local_runtime

    return default_local_runtime()


set_default_runtime_factory(_default_runtime)

__all__ = [
    "CallFailedError", "DataflowCycleError", "EngineError", "Input", "InvalidArgumentError",
    "NoActiveSessionError", "Output", "ParrotError", "Runtime", "SamplingConfig", "SamplingConfigError",
    "SemanticFunction", "SemanticVariable", "Session", "SessionClosedError", "TemplateError",
    "UnknownVariableError", "VariableAlreadySetError", "semantic_function", "set_default_runtime_factory",
]
