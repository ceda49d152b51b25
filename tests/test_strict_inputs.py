"""Smaller hardening: strict JSON types, OpenAI's 400 for prompts longer than
the model, one clear line from the CLI when there is no server, the service
errors importable from ``parrot``, and a typed timeout from ``get``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest

import parrot as P

ROOT = Path(__file__).resolve().parents[1]


def test_strings_are_not_numbers_and_booleans_are_not_integers(live_server):
    key = live_server.new_tenant("strict")
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
            {"function": {"template": "{{output:a}}", "sampling": {"max_tokens": "10"}}}]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "calls.0.function.sampling.max_tokens", r.text
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": "10"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "max_tokens", r.text
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "temperature": "0.5"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "temperature", r.text
    with live_server.admin() as admin:
        for quota in ("tokens_per_minute", "max_concurrent_calls", "max_prompt_tokens"):
            r = admin.post("/admin/v1/tenants", json={"name": "t", quota: True})
            assert r.status_code == 422 and r.json()["error"]["field"] == quota, r.text


def test_a_prompt_longer_than_the_model_is_a_400_as_openai_answers(live_server):
    key = live_server.new_tenant("too-long")
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key=key, max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    long = "lorem ipsum dolor " * 3000
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=long, max_tokens=2)
    assert e.value.status_code == 400 and e.value.body["field"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": long}], max_tokens=2)
    assert e.value.body["field"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # fits, but not with its max_tokens
        client.completions.create(model=model, prompt="hi", max_tokens=10**4 * 6)
    assert e.value.body["field"] == "max_tokens"


def test_tenant_create_without_a_server_prints_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once it is closed
    r = subprocess.run([sys.executable, "-m", "parrot.cli", "tenant", "create", "--url", f"http://127.0.0.1:{port}",
                        "--admin-key", "k", "someone"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the server" in lines[0] and str(port) in lines[0], r.stderr


def test_service_errors_are_importable_from_parrot_and_are_what_the_sdk_raises(live_server):
    from parrot.semantic_vars.http_runtime import HttpRuntime
    from parrot.server import tenancy

    assert tenancy.AuthenticationError is P.AuthenticationError
    assert tenancy.QuotaExceededError is P.QuotaExceededError
    assert issubclass(P.ParrotTimeoutError, TimeoutError) and issubclass(P.ParrotTimeoutError, P.ParrotError)
    runtime = HttpRuntime(live_server.url, api_key="pk-not-a-key")
    with pytest.raises(P.AuthenticationError):
        with P.Session(runtime) as s:
            s.variable("x", "y")


def test_get_with_a_timeout_raises_a_typed_error_naming_the_variable(runtime):
    fn = P.SemanticFunction("Echo {{input:x}}: {{output:y|max_tokens=2}}")
    with P.Session(runtime) as s:
        never = s.variable("never")
        out = fn(x=never)
        with pytest.raises(P.ParrotTimeoutError, match="no value after") as e:
            out.get(timeout=0.05)
        assert isinstance(e.value, TimeoutError) and out.id in str(e.value)
        never.set("now")  # the call was not harmed by the timeout: it still runs
        assert isinstance(out.get(timeout=120), str)
