"""The dataflow layer: the DAG of calls and variables, readiness, dispatch."""

from .graph import CallNode, CallState, DataflowGraph, VariableNode
from .program import build_request
from .runtime import LocalRuntime, default_local_runtime, default_model_dir
from .scheduler import LeastLoadedScheduler, Scheduler

__all__ = [
    "CallNode", "CallState", "DataflowGraph", "LeastLoadedScheduler", "LocalRuntime", "Scheduler",
    "VariableNode", "build_request", "default_local_runtime", "default_model_dir",
]
