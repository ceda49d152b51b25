"""Engines: the interface the dataflow layer uses, and the torch engine.

Importing this package is cheap; the torch engine and the model are
imported from their modules (``parrot.backends.torch_engine``).
"""

from .engine import (
    Engine,
    EngineCapacity,
    Fill,
    Gen,
    GenerationRequest,
    GenResult,
    PrefixHint,
    RequestFinished,
    RequestStats,
    RequestStream,
    TokenDelta,
)

__all__ = [
    "Engine", "EngineCapacity", "Fill", "Gen", "GenResult", "GenerationRequest", "PrefixHint",
    "RequestFinished", "RequestStats", "RequestStream", "TokenDelta",
]
