"""The dataflow graph: chaining, fan-out/fan-in readiness, rejection of bad calls."""

import pytest

from parrot.dataflow import DataflowGraph
from parrot.semantic_vars import (
    Call,
    DataflowCycleError,
    FunctionSpec,
    InvalidArgumentError,
    SamplingConfig,
    UnknownVariableError,
    VariableAlreadySetError,
)

S = "session-1"
UNARY = FunctionSpec("f", "{{input:x}} -> {{output:y}}", {"y": SamplingConfig()})
BINARY = FunctionSpec("g", "{{input:a}} + {{input:b}} -> {{output:y}}", {"y": SamplingConfig()})


def call(call_id, fn=UNARY, inputs=None, constants=None, outputs=None):
    return Call(call_id, fn, inputs or {}, constants or {}, outputs or {"y": f"{call_id}.out"})


def snapshot(g: DataflowGraph):
    return (
        sorted(g.graph.nodes), sorted(g.graph.edges), sorted(g.calls),
        {k: (v.value, v.producer) for k, v in g.variables.items()},
    )


def test_chain_becomes_ready_step_by_step():
    g = DataflowGraph()
    a = g.add_call(S, call("a", constants={"x": "doc"}))
    b = g.add_call(S, call("b", inputs={"x": "a.out"}))
    c = g.add_call(S, call("c", inputs={"x": "b.out"}))
    assert (a.state, b.state, c.state) == ("ready", "waiting", "waiting")
    assert g.set_value("a.out", "A") == [b]
    assert c.state == "waiting"
    assert g.set_value("b.out", "B") == [c]
    assert [u.id for u in g.upstream_calls(c)] == ["b"]


def test_fan_out_fan_in_waits_for_every_input():
    g = DataflowGraph()
    g.add_variable("doc", "doc", S, "text")
    maps = [g.add_call(S, call(f"m{i}", inputs={"x": "doc"})) for i in range(2)]
    reduce_ = g.add_call(S, call("r", fn=BINARY, inputs={"a": "m0.out", "b": "m1.out"}))
    assert [m.state for m in maps] == ["ready", "ready"]
    assert g.set_value("m1.out", "one") == []
    assert reduce_.state == "waiting"
    assert g.set_value("m0.out", "zero") == [reduce_]
    assert g.input_values(reduce_) == {"a": "zero", "b": "one"}


def test_cycle_through_predeclared_variables_is_rejected_and_nothing_changes():
    g = DataflowGraph()
    g.add_variable("x", "x", S)
    g.add_variable("y", "y", S)
    g.add_call(S, call("first", inputs={"x": "x"}, outputs={"y": "y"}))
    before = snapshot(g)
    with pytest.raises(DataflowCycleError):
        g.add_call(S, call("second", inputs={"x": "y"}, outputs={"y": "x"}))
    with pytest.raises(DataflowCycleError):
        g.add_call(S, call("self", inputs={"x": "x"}, outputs={"y": "x"}))
    assert snapshot(g) == before


@pytest.mark.parametrize(
    "bad, error",
    [
        (call("u", inputs={"x": "missing"}), UnknownVariableError),
        (call("u", constants={"x": "1"}, outputs={"z": "v"}), InvalidArgumentError),
        (call("u"), InvalidArgumentError),  # input x not bound
        (call("u", constants={"x": "1", "w": "2"}), InvalidArgumentError),
        (call("u", inputs={"x": "doc"}, constants={"x": "1"}), InvalidArgumentError),
        (call("u", constants={"x": "1"}, outputs={"y": "doc"}), VariableAlreadySetError),
        (call("dup", constants={"x": "1"}), InvalidArgumentError),  # call id reused
    ],
)
def test_invalid_calls_are_rejected_without_side_effects(bad, error):
    g = DataflowGraph()
    g.add_variable("doc", "doc", S, "text")
    g.add_call(S, call("dup", constants={"x": "0"}, outputs={"y": "dup.y"}))
    before = snapshot(g)
    with pytest.raises(error):
        g.add_call(S, bad)
    assert snapshot(g) == before


def test_a_variable_is_set_once():
    g = DataflowGraph()
    g.add_variable("v", "v", S)
    g.set_value("v", "1")
    with pytest.raises(VariableAlreadySetError):
        g.set_value("v", "2")
    assert g.variables["v"].value == "1"


def test_failure_propagates_downstream():
    g = DataflowGraph()
    g.add_call(S, call("a", constants={"x": "doc"}))
    g.add_call(S, call("b", inputs={"x": "a.out"}))
    lost = g.fail_call("a", "boom")
    assert {v.id for v in lost} == {"a.out", "b.out"}
    assert g.calls["b"].state == "failed"
    late = g.add_call(S, call("c", inputs={"x": "b.out"}))
    assert late.state == "failed" and "boom" in (late.error or "")


def test_perf_annotation_is_recorded_latency_wins():
    g = DataflowGraph()
    g.add_variable("v", "v", S)
    g.annotate_get("v", "throughput")
    assert g.variables["v"].perf == "throughput"
    g.annotate_get("v", "latency")
    g.annotate_get("v", "throughput")
    assert g.variables["v"].perf == "latency"
