"""The torch engine in its own process (ProcessEngine): real child processes
on the embedded tiny model, compared with the in-process engine."""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

import parrot as P
from parrot.backends.engine import Fill, Gen, GenerationRequest, GenResult, RequestFinished, TokenDelta
from parrot.backends.process_engine import ProcessEngine
from parrot.semantic_vars import EngineError, EngineUnavailableError, InvalidArgumentError, SamplingConfig

BOUND_S = 120  # every wait is bounded: a hang fails the test instead of stalling the suite


def greedy(n: int) -> SamplingConfig:
    return SamplingConfig(max_tokens=n, temperature=0.0)


@pytest.fixture(scope="module")
def process_engine(default_model_dir):
    engine = ProcessEngine(default_model_dir, device="cpu", name="proc-0")
    yield engine
    engine.close()


def _exited(pid: int, timeout_s: float) -> bool:
    """True once process ``pid`` (any process, not only a child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        return bool(ready)
    finally:
        os.close(fd)


def _requests(tok, rng: random.Random, n: int) -> list[GenerationRequest]:
    words = "the a river stone parrot blue seven over under quickly green map light".split()
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
        program: list[Fill | Gen] = [Fill(tuple(tok.encode(prompt, add_bos=True))), Gen(greedy(rng.randint(1, 24)), "a")]
        if rng.random() < 0.3:  # a second output continuing from the first
            program += [Fill(tuple(tok.encode(" and then"))), Gen(greedy(rng.randint(1, 12)), "b")]
        out.append(GenerationRequest(program, request_id=f"fuzz-{i}"))
    return out


async def _collect(engine, request, cancel_after: int | None):
    """Stream ``request``; cancel after ``cancel_after`` deltas (None: run to the end)."""
    stream = engine.submit(request)
    deltas: dict[int, str] = {}
    results: list[GenResult] = []
    finished = False
    if cancel_after == 0:
        stream.cancel()
        return deltas, results, finished, True
    seen = 0
    async for event in stream:
        if isinstance(event, TokenDelta):
            deltas[event.gen_index] = deltas.get(event.gen_index, "") + event.text
            seen += 1
            if cancel_after is not None and seen >= cancel_after:
                stream.cancel()
                return deltas, results, finished, True
        elif isinstance(event, GenResult):
            results.append(event)
        elif isinstance(event, RequestFinished):
            finished = True
    return deltas, results, finished, False


def test_fuzz_concurrent_streams_with_cancels_match_the_in_process_engine(process_engine, default_engine):
    rng = random.Random(22)
    requests = _requests(default_engine.tokenizer, rng, 48)
    cancels = [rng.choice([None, None, None, 0, 1, 2, 5]) for _ in requests]

    async def reference():
        return await asyncio.gather(*(_collect(default_engine, r, None) for r in requests))

    async def through_process():
        return await asyncio.wait_for(
            asyncio.gather(*(_collect(process_engine, r, c) for r, c in zip(requests, cancels))), BOUND_S)

    expected = asyncio.run(reference())
    got = asyncio.run(through_process())
    assert sum(c is not None for c in cancels) >= 8 and sum(c is None for c in cancels) >= 16
    for (want_deltas, want, _, _), (deltas, results, finished, cancelled), c in zip(expected, got, cancels):
        if c is None:
            assert not cancelled and finished
            assert [(r.name, r.text, r.token_ids, r.finish_reason) for r in results] == \
                   [(r.name, r.text, r.token_ids, r.finish_reason) for r in want]
            assert deltas == want_deltas  # every streamed piece crossed, in order
        else:
            for index, text in deltas.items():  # what streamed before the cancel is the same text
                assert want_deltas[index].startswith(text)

    async def settle():
        # A fresh request finishing proves the child has moved past every cancel.
        await asyncio.wait_for(process_engine.submit(GenerationRequest([Fill((1, 2, 3)), Gen(greedy(1))])).results(),
                               BOUND_S)

    asyncio.run(settle())
    cap = process_engine.capacity()
    assert (cap.running, cap.waiting) == (0, 0)
    assert cap.free_blocks == cap.total_blocks - cap.cached_blocks or cap.free_blocks > 0
    stats = process_engine.stats()
    assert stats["requests_finished"] >= sum(c is None for c in cancels)
    assert stats["decode_tokens"] > 0


def test_engine_facts_cross_the_boundary(process_engine, default_engine):
    assert process_engine.model_id == default_engine.model_id
    assert process_engine.max_model_len == default_engine.max_model_len
    assert process_engine.tokenizer.eos_token_ids == default_engine.tokenizer.eos_token_ids
    assert process_engine.runs_model_jobs and process_engine.healthy()
    assert process_engine.capacity().max_running == default_engine.capacity().max_running


def _model_positions(engine) -> int:
    return engine.model.config.max_position_embeddings


def _raise_bad_field(engine) -> None:
    raise InvalidArgumentError("rate", "not a rate")


def test_model_jobs_run_in_the_engine_process(process_engine, default_engine):
    assert process_engine.run_model_job(_model_positions) == _model_positions(default_engine)
    with pytest.raises(EngineError, match="InvalidArgumentError: rate: not a rate"):
        process_engine.run_model_job(_raise_bad_field)  # an exception that does not unpickle still arrives


def test_bad_programs_fail_their_stream_only(process_engine):
    limit = process_engine.max_model_len

    async def main():
        bad = process_engine.submit(GenerationRequest([Fill(tuple([5] * (limit + 1))), Gen(greedy(3))]))
        unpicklable = GenerationRequest([Fill((1, 2)), Gen(greedy(2))])
        unpicklable.note = lambda: None  # a field that cannot cross a process boundary
        stuck = process_engine.submit(unpicklable)
        good = process_engine.submit(GenerationRequest([Fill((1, 2, 3)), Gen(greedy(2))]))
        with pytest.raises(EngineError, match="exceeds"):
            await asyncio.wait_for(bad.results(), BOUND_S)
        with pytest.raises(EngineError, match="cannot cross"):
            await asyncio.wait_for(stuck.results(), BOUND_S)
        results, _ = await asyncio.wait_for(good.results(), BOUND_S)
        return results

    assert len(asyncio.run(main())[0].token_ids) == 2


def test_constraints_logprobs_and_penalties_cross_the_boundary(process_engine, default_engine):
    """What the structured-output paths put on a Gen (a constraint, logprobs,
    penalties, a logit bias) reaches the child, and the logprobs come back on
    GenResult, equal to the in-process engine's."""
    from parrot.semantic_vars import Constraint, ConstraintError

    tok = default_engine.tokenizer
    prompt = tuple(tok.encode("Pick a colour:", add_bos=True))
    configs = [
        SamplingConfig(max_tokens=12, temperature=0.0, constraint=Constraint.choices(["red", "blue"]), logprobs=2),
        SamplingConfig(max_tokens=12, temperature=0.0, constraint=Constraint.regex(r"[0-9]{3}"), logprobs=0),
        SamplingConfig(max_tokens=6, temperature=0.0, frequency_penalty=2.0, presence_penalty=1.0,
                       logit_bias=((tok.encode(" parrot")[0], 5.0),), logprobs=1),
    ]

    async def run(engine):
        streams = [engine.submit(GenerationRequest([Fill(prompt), Gen(c, "a")])) for c in configs]
        return [(await asyncio.wait_for(s.results(), BOUND_S))[0][0] for s in streams]

    want, got = asyncio.run(run(default_engine)), asyncio.run(run(process_engine))
    assert got[0].text in ("red", "blue") and len(got[1].text) == 3 and got[1].text.isdigit()
    for w, g, c in zip(want, got, configs):
        assert (g.text, g.token_ids) == (w.text, w.token_ids)
        assert g.logprobs is not None and len(g.logprobs) == len(g.token_ids)
        assert [len(lp.top) for lp in g.logprobs] == [c.logprobs] * len(g.token_ids)
        assert [lp.token_id for lp in g.logprobs] == list(g.token_ids)
        assert [lp.logprob for lp in g.logprobs] == pytest.approx([lp.logprob for lp in w.logprobs], abs=1e-4)

    # Python's re accepts a lookahead, xgrammar does not: the child's submit
    # refuses it, and the error arrives typed, naming the field.
    broken = SamplingConfig(max_tokens=4, constraint=Constraint.regex(r"(?=a)ab"))

    async def bad():
        await asyncio.wait_for(process_engine.submit(GenerationRequest([Fill(prompt), Gen(broken)])).results(), BOUND_S)

    with pytest.raises(ConstraintError) as e:
        asyncio.run(bad())
    assert e.value.field == "constraint.regex"


def test_killed_child_fails_in_flight_streams_then_restarts(default_model_dir):
    engine = ProcessEngine(default_model_dir, device="cpu", name="proc-kill", max_restarts=1)
    try:
        tok = engine.tokenizer

        async def in_flight():
            streams = [engine.submit(GenerationRequest([Fill(tuple(tok.encode(f"go on {i}", add_bos=True))),
                                                        Gen(greedy(4000))])) for i in range(4)]
            for s in streams:  # each is running: its first token arrived
                async for event in s:
                    assert isinstance(event, TokenDelta)
                    break
            os.kill(engine.pid, signal.SIGKILL)
            errors = []
            for s in streams:
                with pytest.raises(EngineUnavailableError, match="died") as info:
                    await asyncio.wait_for(s.results(), BOUND_S)
                errors.append(info.value)
            return errors

        first_pid = engine.pid
        assert len(asyncio.run(in_flight())) == 4
        assert engine.wait_healthy(BOUND_S)  # a new child took over
        assert engine.pid != first_pid and engine.restarts == 1

        async def after_restart():
            return await asyncio.wait_for(
                engine.submit(GenerationRequest([Fill((1, 2, 3)), Gen(greedy(3))])).results(), BOUND_S)

        assert len(asyncio.run(after_restart())[0][0].token_ids) == 3
        assert engine.healthy()

        # No restarts left: the next death fails calls with a clear error.
        async def dies_for_good():
            stream = engine.submit(GenerationRequest([Fill((1, 2, 3)), Gen(greedy(4000))]))
            async for _ in stream:
                break
            os.kill(engine.pid, signal.SIGKILL)
            with pytest.raises(EngineError, match="no restarts left") as info:
                await asyncio.wait_for(stream.results(), BOUND_S)
            assert not isinstance(info.value, EngineUnavailableError)

        asyncio.run(dies_for_good())
        assert engine.dead and not engine.healthy()

        async def submit():
            return engine.submit(GenerationRequest([Fill((1,)), Gen(greedy(1))]))

        with pytest.raises(EngineError, match="no restarts left"):
            asyncio.run(submit())
    finally:
        engine.close()


@P.semantic_function(max_tokens=48)
def story(topic: P.Input, text: P.Output):
    """Tell a long story about {{input:topic}}: {{output:text}}"""


def test_runtime_requeues_a_call_whose_engine_process_died(default_model_dir, runtime):
    from parrot.dataflow import LocalRuntime

    with P.Session(runtime):
        want = story("parrots").get(timeout=BOUND_S)
    engine = ProcessEngine(default_model_dir, device="cpu", name="proc-requeue", max_restarts=1)
    try:
        rt = LocalRuntime([engine])
        streamed = threading.Event()
        rt.subscribe(lambda e: e["type"] == "token" and streamed.set())
        with P.Session(rt) as s:
            out = story("parrots")
            s.flush()  # submit now, not at the first get
            assert streamed.wait(BOUND_S)  # the call runs on the child now
            os.kill(engine.pid, signal.SIGKILL)
            got = out.get(timeout=BOUND_S)  # re-queued, run again on the restarted child
        assert got == want
        assert engine.restarts == 1
        assert [c.requeues for c in rt.graph.session_calls(s.id)] == [1]
    finally:
        engine.close()


def test_close_stops_the_child_and_fails_what_is_in_flight(default_model_dir):
    engine = ProcessEngine(default_model_dir, device="cpu", name="proc-close")
    pid = engine.pid

    async def main():
        stream = engine.submit(GenerationRequest([Fill((1, 2, 3)), Gen(greedy(4000))]))
        async for _ in stream:
            break
        await asyncio.to_thread(engine.close)
        with pytest.raises(EngineError, match="closed"):
            await asyncio.wait_for(stream.results(), BOUND_S)
        with pytest.raises(EngineError, match="closed"):
            engine.submit(GenerationRequest([Fill((1,)), Gen(greedy(1))]))

    asyncio.run(main())
    assert _exited(pid, 0)
    assert not engine.healthy()


def test_child_exits_when_the_api_process_dies(default_model_dir):
    script = textwrap.dedent(f"""
        import sys
        from parrot.backends.process_engine import ProcessEngine
        if __name__ == "__main__":
            engine = ProcessEngine({str(default_model_dir)!r}, device="cpu")
            print(engine.pid, flush=True)
            sys.stdin.read()  # until killed
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    api = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                           text=True)
    try:
        line = api.stdout.readline()
        assert line.strip().isdigit(), "the API process did not start its engine"
        child = int(line)
        assert not _exited(child, 0)
        api.send_signal(signal.SIGKILL)
        api.wait(timeout=BOUND_S)
        assert _exited(child, BOUND_S), "the engine process outlived the API process"
    finally:
        api.kill()
        api.wait()


def test_parrot_serve_runs_torch_engines_in_their_own_process_by_default(monkeypatch, default_model_dir):
    from parrot.cli import build_parser
    from parrot.server.serve import ServerSettings

    monkeypatch.delenv("PARROT_ENGINE_PROCESS", raising=False)
    assert [s.process for s in ServerSettings.from_env(engines=2).engine_specs()] == [True, True]
    assert not ServerSettings.from_env(ray_address="local").engine_specs()[0].process  # actors are processes already
    monkeypatch.setenv("PARROT_ENGINE_PROCESS", "0")
    assert not ServerSettings.from_env().engine_specs()[0].process
    monkeypatch.delenv("PARROT_ENGINE_PROCESS")
    args = build_parser().parse_args(["serve", "--engine-in-process", "--max-running", "7"])
    assert args.engine_in_process and args.max_running == 7
    with pytest.raises(ValueError, match="max_running"):
        ServerSettings.from_env(max_running=0)
    spec = ServerSettings.from_env(model=str(default_model_dir), device="cpu", max_running=5).engine_specs()[0]
    engine = spec.build()
    try:
        assert isinstance(engine, ProcessEngine) and engine.capacity().max_running == 5
    finally:
        engine.close()
