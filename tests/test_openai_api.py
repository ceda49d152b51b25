"""The OpenAI-compatible endpoints against a real uvicorn server, driven by
the official ``openai`` client: models, completions and chat completions,
streamed and not, usage figures, stop strings, and OpenAI's error classes
for bad keys, unknown models, bad sampling and quotas."""

from __future__ import annotations

import openai
import pytest

MESSAGES = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Name three colours."},
]


@pytest.fixture(scope="module")
def key(live_server):
    return live_server.new_tenant("openai-tests")


@pytest.fixture(scope="module")
def client(live_server, key):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from parrot.backends.tokenizer import Tokenizer

    return Tokenizer(default_model_dir)


def test_models_list_the_served_model(client, default_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [default_model_dir.name]
    assert models[0].object == "model"
    assert client.models.retrieve(default_model_dir.name).id == default_model_dir.name


def test_completion_streamed_equals_non_streamed(client, model, tokenizer):
    prompt = "Once upon a time"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == model and r.id
    choice = r.choices[0]
    assert choice.index == 0 and choice.text
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt, add_bos=tokenizer.prompt_bos))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")

    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_chat_completion_streamed_equals_non_streamed(client, model, tokenizer, default_engine):
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    # The prompt is the model's own chat template, BOS once.
    templated = tokenizer.hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert templated.count(tokenizer.bos_token_id) == 1
    assert r.usage.prompt_tokens == len(templated)
    assert r.usage.completion_tokens <= 12

    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)

    # Chat is exactly greedy generation after the model's own template, BOS once.
    assert msg.content == _greedy_after(default_engine, templated, 12)


def _greedy_after(engine, ids, max_tokens):
    import asyncio

    from parrot.backends import Fill, Gen, GenerationRequest
    from parrot.semantic_vars import SamplingConfig

    async def run():
        request = GenerationRequest([Fill(tuple(ids)), Gen(SamplingConfig(max_tokens=max_tokens))])
        return await engine.submit(request).results()

    return asyncio.run(run())[0][0].text


def test_stop_strings_and_lengths(client, model):
    prompt = "The capital of France is"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0).choices[0].text
    assert len(full) >= 8
    stop = full[5:8]
    expected = full[: full.index(stop)]
    for stops in (stop, [stop, "never-appears"]):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0, stop=stops)
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected

    r = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0)
    if r.usage.completion_tokens == 3:
        assert r.choices[0].finish_reason == "length"
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + r.choices[0].text


def test_seeded_sampling_and_user_text_with_braces(client, model):
    kw = dict(model=model, prompt="A {{output:x}} and {{input:y}} here", max_tokens=8, temperature=0.9, seed=7)
    a = client.completions.create(**kw).choices[0].text
    assert a == client.completions.create(**kw).choices[0].text
    r = client.chat.completions.create(
        model=model, max_tokens=4, temperature=0, user="u1",
        messages=[{"role": "developer", "content": "{{ nope }}"},
                  {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    )
    assert r.choices[0].message.role == "assistant"


def test_wrong_key_is_authentication_error(live_server, model):
    bad = openai.OpenAI(base_url=live_server.url + "/v1", api_key="pk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=model, messages=MESSAGES)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert e.value.body["field"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias.x"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"stop": [""]}, "stop"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools.0.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
         "response_format.json_schema.schema.type"),
        ({"extra_body": {"top_k": 5}}, "top_k"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ],
)
def test_bad_requests_are_4xx_naming_the_field(client, model, kwargs, field):
    kwargs = {"model": model, "messages": MESSAGES, "max_tokens": 2, **kwargs}
    with pytest.raises((openai.BadRequestError, openai.UnprocessableEntityError)) as e:
        client.chat.completions.create(**kwargs)
    assert 400 <= e.value.status_code < 500
    assert e.value.body["field"] == field, e.value.body


def test_bad_completion_requests(client, model):
    for kwargs, field in [({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
                          ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "temperature": -1}, "temperature")]:
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.completions.create(model=model, max_tokens=2, **kwargs)
        assert e.value.body["field"] == field


def test_quota_is_rate_limit_error(live_server, model):
    key = live_server.new_tenant("openai-small", max_concurrent_calls=1)
    small = openai.OpenAI(base_url=live_server.url + "/v1", api_key=key, max_retries=0)
    with live_server.client(key) as c:
        # Hold the tenant's one call slot with a call waiting on a free variable.
        sid = c.post("/api/v1/sessions").json()["session_id"]
        late = c.post(f"/api/v1/sessions/{sid}/variables", json={"name": "late"}).json()["var_id"]
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
            {"function": {"template": "{{input:s}} {{output:t|max_tokens=2}}"}, "inputs": {"s": late}}]})
        assert r.status_code == 201, r.text
        with pytest.raises(openai.RateLimitError) as e:
            small.completions.create(model=model, prompt="hello", max_tokens=2)
        assert e.value.body["field"] == "max_concurrent_calls"
        with pytest.raises(openai.RateLimitError):
            small.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, stream=True)
        assert c.delete(f"/api/v1/sessions/{sid}", params={"cancel": True}).status_code == 200
    # The slot is free again, and the refused requests left no session open.
    r = small.completions.create(model=model, prompt="hello", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
    with live_server.client(key) as c:
        sessions = c.get("/api/v1/sessions").json()["sessions"]
    assert not [s for s in sessions if s["open"]]


def test_a_dropped_stream_cancels_its_call(live_server, model):
    key = live_server.new_tenant("openai-dropper")
    dropper = openai.OpenAI(base_url=live_server.url + "/v1", api_key=key, max_retries=0)
    stream = dropper.completions.create(model=model, prompt="Tell a long story", max_tokens=3000, temperature=0,
                                        stream=True)
    next(iter(stream))
    stream.close()
    with live_server.client(key) as c:
        (session,) = c.get("/api/v1/sessions").json()["sessions"]
        sid = session["session_id"]
        (call,) = c.get(f"/api/v1/sessions/{sid}/dag").json()["calls"]
        # A long-poll on the output ends when the cancel fails it (no sleep-polling).
        out = c.get(f"/api/v1/sessions/{sid}/variables/{call['outputs']['completion']}",
                    params={"timeout": 60}).json()
        assert not out["ready"] and out["error"]
        (session,) = c.get("/api/v1/sessions").json()["sessions"]
        assert not session["open"]  # closed before its call was cancelled
        (call,) = c.get(f"/api/v1/sessions/{sid}/dag").json()["calls"]
    assert call["state"] == "cancelled" and call["generated_tokens"] < 3000
