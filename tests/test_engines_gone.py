"""When no engine can run a call it fails with an error that says so, instead
of staying ``ready`` forever: at once when every engine is gone for good (a
Ray actor with no restarts left), after ``engine_wait_s`` when engines are
only unhealthy (an unreachable server that may come back)."""

from __future__ import annotations

import socket

import pytest

import parrot as P
from parrot.backends.remote_engine import RemoteEngine
from parrot.dataflow import LocalRuntime


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ASK = P.SemanticFunction("{{input:q}}\nAnswer: {{output:a|max_tokens=2}}")


def test_calls_fail_clearly_when_no_engine_is_healthy_for_the_bounded_wait():
    down = RemoteEngine(f"http://127.0.0.1:{_closed_port()}", model="m", name="down", probe_interval_s=0.1)
    runtime = LocalRuntime([down], engine_wait_s=0.5)
    try:
        with P.Session(runtime) as s:
            answer = ASK("question")
            with pytest.raises(P.CallFailedError, match="none has been healthy for 0.5 s"):
                answer.get(timeout=60)  # a failure, not a timeout
            # While the engine stays down, later calls fail at once rather than wait again.
            with pytest.raises(P.CallFailedError, match="no engine can run it"):
                ASK("another").get(timeout=60)
        assert {c.state for c in runtime.graph.session_calls(s.id)} == {"failed"}
    finally:
        runtime.portal.call(runtime.shutdown())


def test_calls_fail_at_once_when_every_engine_is_gone_for_good(default_model_dir):
    ray = pytest.importorskip("ray")
    from parrot.backends.ray_engine import EngineSpec, start_engines

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        (engine,) = start_engines([EngineSpec(name="last", model=str(default_model_dir), device="cpu")],
                                  num_cpus=1, max_restarts=0)
        engine.close()  # killed with no restart: gone for good
        assert engine.gone() and not engine.healthy()
        runtime = LocalRuntime([engine])  # the default wait (minutes) does not apply: nothing can come back
        with P.Session(runtime) as s:
            with pytest.raises(P.CallFailedError, match="gone for good"):
                ASK("question").get(timeout=60)
    finally:
        ray.shutdown()
