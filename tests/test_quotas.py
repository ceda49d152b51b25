"""Quotas hold against the worst case: ``tokens_per_minute`` reserves each
call's prompt plus its ``max_tokens`` at admission (and settles on what was
used), a chat request without ``max_tokens`` counts, and
``max_prompt_tokens`` counts text that arrives through a variable."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest


def _client(live_server, key):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(live_server):
    return _client(live_server, live_server.new_tenant("quota-probe")).models.list().data[0].id


def test_concurrent_completions_stay_within_tokens_per_minute(live_server, model):
    client = _client(live_server, live_server.new_tenant("tpm", tokens_per_minute=3000))

    def one(i: int):
        try:
            r = client.completions.create(model=model, prompt=f"Story {i}:", max_tokens=200, temperature=0.8, seed=i)
            return r.usage.total_tokens
        except openai.RateLimitError as e:
            assert e.response.headers.get("retry-after")
            assert e.body["field"] == "tokens_per_minute"
            return None

    with ThreadPoolExecutor(60) as pool:
        results = list(pool.map(one, range(60)))
    used = [n for n in results if n is not None]
    assert used and len(used) < 60  # some admitted, the rest refused
    assert sum(used) <= 3000


def test_a_chat_request_without_max_tokens_counts_against_the_limit(live_server, model):
    client = _client(live_server, live_server.new_tenant("tpm-chat", tokens_per_minute=600))
    messages = [{"role": "user", "content": "Tell me everything."}]
    r = client.chat.completions.create(model=model, messages=messages, temperature=0.8, seed=1)
    assert r.usage.total_tokens <= 600
    # Its reservation (or what it used) leaves no room for another such request now.
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=model, messages=messages, max_tokens=600 - r.usage.prompt_tokens)
    # A request that can never fit is told so.
    with pytest.raises(openai.RateLimitError, match="lower max_tokens"):
        client.completions.create(model=model, prompt="hi", max_tokens=601)


def test_max_prompt_tokens_counts_text_from_variables(live_server):
    key = live_server.new_tenant("small-prompts", max_prompt_tokens=200)
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        c.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": "var-big", "name": "big"})
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
            {"function": {"template": "Sum up: {{input:x}} {{output:y|max_tokens=2}}"}, "inputs": {"x": "var-big"},
             "outputs": {"y": "var-big-out"}},
            {"function": {"template": "Sum up: {{input:x}} {{output:y|max_tokens=2}}"}, "constants": {"x": "short"},
             "outputs": {"y": "var-small-out"}}]})
        assert r.status_code == 201, r.text
        assert c.put(f"/api/v1/sessions/{sid}/variables/var-big", json={"value": "many words here " * 300}).status_code == 200
        big = c.get(f"/api/v1/sessions/{sid}/variables/var-big-out", params={"timeout": 60}).json()
        small = c.get(f"/api/v1/sessions/{sid}/variables/var-small-out", params={"timeout": 60}).json()
    assert not big["ready"] and "PromptTooLongError" in big["error"] and "200" in big["error"]
    assert small["ready"]  # only the call over the limit failed
