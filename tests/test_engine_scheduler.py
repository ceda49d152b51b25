"""The engine scheduler on its own: admission by objective, the latency
reserve and the per-step token cap. Pure Python (no forward): each test
drives steps by hand, feeding what the plan says and sampling a fixed token."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from parrot.backends.engine import Fill, Gen, GenerationRequest
from parrot.backends.engine_request import EngineRequest
from parrot.backends.engine_scheduler import EngineScheduler
from parrot.backends.kv_manager import KVManager
from parrot.backends.sequence import Sequence
from parrot.backends.tokenizer import Tokenizer
from parrot.semantic_vars import SamplingConfig


def _counters():
    return SimpleNamespace(requests_finished=0, requests_cancelled=0, preemptions=0,
                           prefix_hits=0, prefix_misses=0, prefix_tokens_saved=0)


class Harness:
    """A scheduler over a real KV manager and real sequences."""

    def __init__(self, tokenizer, **limits) -> None:
        self.counters = _counters()
        self.kv = KVManager(512, 16, prefix_cache=False, counters=self.counters)
        self.scheduler = EngineScheduler(self.kv, self.counters, threading.Condition(), max_model_len=4096, **limits)
        self.tokenizer = tokenizer
        self.events: dict[str, list] = {}

    def submit(self, name: str, prompt_tokens: int, objective, max_tokens: int = 6, namespace: str = "") -> EngineRequest:
        request = GenerationRequest([Fill(tuple(range(10, 10 + prompt_tokens))), Gen(SamplingConfig(max_tokens=max_tokens))],
                                    request_id=name, objective=objective, namespace=namespace)
        events = self.events.setdefault(name, [])
        seq = Sequence(request, self.kv.new_table(), self.tokenizer, events.append, 4096)
        r = EngineRequest(seq, None, "cpu")  # type: ignore[arg-type]  # no stream: nothing here fails
        seq.before_finish = lambda: self.scheduler.finish(r)
        self.scheduler.waiting.push(r)
        return r

    def step(self) -> int:
        """Admit, plan, then do what the model runner would: advance the
        tables and sample token 7 for every request at its context's end."""
        s = self.scheduler
        s.admit(now=0.0)
        plan = s.plan(list(s.running))
        for item in plan.items:
            item.request.table.length += item.tokens
        for item in plan.items:
            seq = item.request.seq
            if seq.kv.length == len(seq.tokens) and seq.generating:
                seq.accept(7)
        s.sweep()
        return sum(item.tokens for item in plan.items)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return Tokenizer(default_model_dir)


def test_a_latency_request_starts_at_the_next_step_under_a_full_throughput_batch(tokenizer):
    h = Harness(tokenizer, max_running=2, max_step_tokens=64, latency_reserve=1, latency_step_tokens=8)
    bulk = [h.submit(f"bulk{i}", 100, "throughput", max_tokens=20) for i in range(3)]
    h.step()
    assert [r.request_id for r in h.scheduler.running] == ["bulk0", "bulk1"]
    urgent = h.submit("urgent", 5, "latency")
    plain = h.submit("plain", 5, None)
    h.step()
    running = [r.request_id for r in h.scheduler.running]
    # The reserve takes the latency request, not the unannotated or the throughput one.
    assert running == ["bulk0", "bulk1", "urgent"] and plain.seq.stats.started_at is None
    assert bulk[2].seq.stats.started_at is None
    # While it decodes, every step stays inside the latency budget.
    while not urgent.seq.finished:
        decoding = urgent.seq.is_decoding
        fed = h.step()
        if decoding:
            assert fed <= 8
    assert h.events["urgent"]


def test_without_latency_work_steps_use_the_full_budget(tokenizer):
    h = Harness(tokenizer, max_running=2, max_step_tokens=64, latency_reserve=1, latency_step_tokens=8)
    h.submit("a", 100, "throughput")
    h.submit("b", 100, None)
    assert h.step() == 64
    h.submit("c", 5, "throughput")
    h.step()
    assert sorted(r.request_id for r in h.scheduler.running) == ["a", "b"]  # no reserve for throughput work


def test_admission_order_is_latency_then_unannotated_then_throughput(tokenizer):
    h = Harness(tokenizer, max_running=1, max_step_tokens=64)
    for name, objective in [("t", "throughput"), ("n", None), ("l", "latency")]:
        h.submit(name, 4, objective, max_tokens=2)
    order = []
    while h.scheduler.waiting or h.scheduler.running:
        h.step()
        for r in h.scheduler.running:
            if r.request_id not in order:
                order.append(r.request_id)
    assert order == ["l", "n", "t"]
    assert h.counters.requests_finished == 3 and h.kv.num_free == 512


def _admission_order(h: Harness) -> list[str]:
    order: list[str] = []
    while h.scheduler.waiting or h.scheduler.running:
        h.step()
        order += [r.request_id for r in h.scheduler.running if r.request_id not in order]
    return order


def test_tenants_take_turns_within_a_rank(tokenizer):
    """A tenant's backlog does not stall another tenant's request of the same
    rank: it is admitted at the next free place, not after the backlog."""
    h = Harness(tokenizer, max_running=1, max_step_tokens=64)
    for i in range(10):
        h.submit(f"flood{i}", 4, "throughput", max_tokens=2, namespace="tenant-a")
    h.submit("quiet0", 4, "throughput", max_tokens=2, namespace="tenant-b")
    h.submit("quiet1", 4, "throughput", max_tokens=2, namespace="tenant-b")
    assert [r.request_id for r in h.scheduler.waiting][:5] == ["flood0", "quiet0", "flood1", "quiet1", "flood2"]
    order = _admission_order(h)
    assert order[:5] == ["flood0", "quiet0", "flood1", "quiet1", "flood2"]
    assert order[5:] == [f"flood{i}" for i in range(3, 10)]  # each tenant's own order is kept


def test_a_preempted_request_resumes_before_later_arrivals(tokenizer):
    h = Harness(tokenizer, max_running=1, max_step_tokens=64)
    queue = h.scheduler.waiting
    a0 = h.submit("a0", 4, None, max_tokens=2, namespace="tenant-a")
    assert queue.pop() is a0  # admitted
    h.submit("b0", 4, None, max_tokens=2, namespace="tenant-b")
    h.submit("a1", 4, None, max_tokens=2, namespace="tenant-a")
    queue.push_front(a0)  # preempted: back to the head of its tenant, whose turn is next
    assert [r.request_id for r in queue] == ["a0", "b0", "a1"]
    assert [queue.pop().request_id for _ in range(3)] == ["a0", "b0", "a1"] and not queue


def test_aging_admits_long_waiting_throughput_work_before_a_stream_of_latency_work():
    """Rank order holds work back at most ``max_wait_s``: then the longest
    waiting head leaves first, whatever its rank."""
    from dataclasses import dataclass

    from parrot.backends.admission import AdmissionQueue

    @dataclass
    class Item:
        name: str
        rank: int
        namespace: str = "t"
        queued_tokens: int = 1

    queue: AdmissionQueue[Item] = AdmissionQueue(max_wait_s=5.0)
    queue.push(Item("bulk", rank=2), now=0.0)
    for t in range(8):
        queue.push(Item(f"chat{t}", rank=0), now=float(t))
    assert queue.pop(now=1.0).name == "chat0"  # within the bound: rank order
    assert queue.head(now=5.0).name == "bulk" and queue.pop(now=5.0).name == "bulk"
    assert [queue.pop(now=9.0).name for _ in range(len(queue))] == [f"chat{t}" for t in range(1, 8)]
    plain: AdmissionQueue[Item] = AdmissionQueue()  # no bound: rank order however long it waits
    plain.push(Item("bulk", rank=2), now=0.0)
    plain.push(Item("chat", rank=0), now=1.0)
    assert plain.pop(now=1e9).name == "chat"
