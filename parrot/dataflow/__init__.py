"""The dataflow layer: the DAG of calls and variables, readiness, dispatch."""

from .graph import CallNode, CallState, DataflowGraph, SessionView, TaskGroup, VariableNode
from .program import build_request
from .runtime import LocalRuntime, default_local_runtime
from .analysis import ObjectiveAnalyzer
from .prefix import PrefixIndex
from .scheduler import AppScheduler, FifoScheduler, Scheduler

__all__ = [
    "AppScheduler", "CallNode", "CallState", "DataflowGraph", "FifoScheduler", "LocalRuntime",
    "ObjectiveAnalyzer", "PrefixIndex", "Scheduler", "SessionView", "TaskGroup", "VariableNode", "build_request", "default_local_runtime",
]
