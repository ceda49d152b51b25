"""Slow work on large inputs stays off the service's event loop: while one
tenant registers a template of 10,000 outputs, the service goes on answering
other requests (ordering only, no timing asserted), and a batch of many calls
of one function parses that function once."""

from __future__ import annotations

import threading
import time

import httpx


def test_other_requests_are_answered_while_a_huge_template_is_parsed(live_server):
    key = live_server.new_tenant("huge-template")
    template = " ".join(f"{{{{output:o{i}|max_tokens=1}}}}" for i in range(10_000))
    answered: list[tuple[float, float]] = []  # (sent, answered) of each /healthz
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=live_server.url, timeout=120) as h:
            while not stop.is_set():
                sent = time.monotonic()
                assert h.get("/healthz").status_code == 200
                answered.append((sent, time.monotonic()))

    prober = threading.Thread(target=probe)
    with live_server.client(key) as c:
        prober.start()
        try:
            t0 = time.monotonic()
            r = c.post("/api/v1/functions", json={"name": "wide", "template": template})
            t1 = time.monotonic()
        finally:
            stop.set()
            prober.join()
    assert r.status_code == 201, r.text
    assert len(r.json()["outputs"]) == 10_000
    # A /healthz sent after the registration began was answered before it ended.
    assert any(t0 < sent and done < t1 for sent, done in answered), (t0, t1, answered[-3:])


def test_a_batch_of_one_function_parses_it_once():
    from parrot.server.models import FunctionBody
    from parrot.server.service import function_spec

    body = {"name": "f", "template": "Q: {{input:q}} A: {{output:a|max_tokens=2}}"}
    first = function_spec(FunctionBody.model_validate(body))
    again = function_spec(FunctionBody.model_validate(body))
    other = function_spec(FunctionBody.model_validate({**body, "name": "g"}))
    assert again is first and other is not first and other.name == "g"
