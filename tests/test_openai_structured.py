"""Structured outputs and the fuller OpenAI surface, driven by the official
``openai`` client against a real server on the embedded random model:
``response_format`` json_schema / json_object, ``tools`` with every
``tool_choice``, ``n``, ``logprobs`` and ``cached_tokens``. The shapes hold
because the engine constrains the decoding, not because the model is good."""

from __future__ import annotations

import json
import math
import uuid

import jsonschema
import openai
import pytest

from structured_schema import SCHEMA

import parrot as P

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^UTC[+-][0-9]{1,2}$"}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time", "parameters": TIME}},
]


@pytest.fixture(scope="module")
def client(live_server):
    key = live_server.new_tenant("openai-structured")
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_json_schema_responses_validate_for_20_seeds(client, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    contents = []
    for seed in (0, 10):  # n=10 twice: choice i samples with seed + i
        r = client.chat.completions.create(model=model, messages=MESSAGES, response_format=fmt, temperature=1.0,
                                           seed=seed, n=10, max_tokens=120)
        assert [c.index for c in r.choices] == list(range(10))
        for c in r.choices:
            assert c.finish_reason == "stop", c
            contents.append(c.message.content)
    for text in contents:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(contents)) > 1  # twenty seeds, not one answer twenty times


def test_json_object_response_is_an_object(client, model):
    # A bare {"type": "object"} lets strings run on; a short budget often ends
    # one mid-string ("length"), but an answer that stopped is an object.
    r = client.chat.completions.create(model=model, messages=MESSAGES, response_format={"type": "json_object"},
                                       temperature=0, max_tokens=60)
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}},
                                         {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_have_arguments_that_validate(client, model, tool_choice):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                       tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=3, n=3, max_tokens=60)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for choice in r.choices:
        msg = choice.message
        assert msg.content is None and len(msg.tool_calls) == 1
        call = msg.tool_calls[0]
        assert call.type == "function" and call.id
        if isinstance(tool_choice, dict):
            assert call.function.name == tool_choice["function"]["name"]
            assert choice.finish_reason == "stop"
        else:
            assert choice.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_tool_calls_stream_and_a_tool_turn_continues_the_chat(client, model):
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather?"}],
                                                 tools=TOOLS, tool_choice=named, temperature=0, max_tokens=60, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    args = json.loads(calls[0].function.arguments)
    jsonschema.validate(args, WEATHER)
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0].id, "type": "function", "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content is not None
    # tool_choice "auto" with the random model: free text, a tool call only if it writes one.
    r = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_n_gives_n_choices(client, model):
    r = client.chat.completions.create(model=model, messages=MESSAGES, n=3, temperature=1.0, seed=1, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1, 2]
    # Choice i samples with seed + i: it is what a single request with that seed gives.
    singles = [client.chat.completions.create(model=model, messages=MESSAGES, temperature=1.0, seed=1 + i, max_tokens=6)
               for i in range(3)]
    assert [c.message.content for c in r.choices] == [s.choices[0].message.content for s in singles]
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once
    streamed = list(client.completions.create(model=model, prompt="Count:", n=3, max_tokens=4, temperature=0, stream=True))
    texts = ["".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)]
    plain = client.completions.create(model=model, prompt="Count:", n=3, max_tokens=4, temperature=0)
    assert texts == [c.text for c in plain.choices] and len(set(texts)) == 1  # greedy: three equal choices


def test_chat_logprobs_are_finite_and_consistent(client, model):
    r = client.chat.completions.create(model=model, messages=MESSAGES, logprobs=True, top_logprobs=3, temperature=0, max_tokens=8)
    choice = r.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert math.isfinite(e.logprob) and e.logprob <= 0
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-6
        # Greedy: the chosen token is the most likely one.
        assert e.token == e.top_logprobs[0].token and e.logprob == pytest.approx(tops[0], abs=1e-6)
        assert bytes(e.bytes).decode() == e.token
    # Sampled at temperature 1, the logprobs are still the model's (before temperature).
    hot = client.chat.completions.create(model=model, messages=MESSAGES, logprobs=True, temperature=1.0, seed=5, max_tokens=8)
    assert all(math.isfinite(e.logprob) and e.top_logprobs == [] for e in hot.choices[0].logprobs.content)


def test_completion_logprobs(client, model):
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert math.isfinite(value) and len(top) <= 2 and max(top.values()) == pytest.approx(value, abs=1e-6)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model=model, prompt="x", max_tokens=2, logprobs=6)
    assert e.value.body["field"] == "logprobs"


def test_cached_tokens_are_the_engines_cached_prefix(live_server, model):
    # A tenant of its own and a prompt nobody sent: the first request finds
    # nothing cached; the second finds every full KV block of the prompt
    # (16-token blocks), less the last position when the prompt fills whole
    # blocks (generating needs its logits, so it is always fed again).
    key = live_server.new_tenant("openai-cache")
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key=key, max_retries=0)
    prompt = f"{uuid.uuid4().hex} " + "a long shared system prompt about parrots " * 12
    first = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    n = first.usage.prompt_tokens
    assert n > 64 and again.usage.prompt_tokens == n
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == min(n // 16 * 16, n - 1)


def test_native_api_takes_constraints(live_server):
    key = live_server.new_tenant("native-constraints")
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        fn = {"template": "Colour: {{output:c}} Code: {{output:k}}", "sampling": {"temperature": 1.0, "seed": 4},
              "output_sampling": {"c": {"constraint": {"choices": ["red", "blue"]}},
                                  "k": {"constraint": {"regex": "[0-9]{4}"}, "max_tokens": 10}}}
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [{"function": fn}]})
        assert r.status_code == 201, r.text
        outs = r.json()["calls"][0]["outputs"]
        values = {name: c.get(f"/api/v1/sessions/{sid}/variables/{vid}", params={"timeout": 60}).json()["value"]
                  for name, vid in outs.items()}
        assert values["c"] in ("red", "blue") and len(values["k"]) == 4 and values["k"].isdigit()
        bad = {"template": "{{output:c}}", "sampling": {"constraint": {"choices": ["a"], "regex": "b"}}}
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [{"function": bad}]})
        assert r.status_code == 422 and r.json()["error"]["type"] == "ConstraintError", r.text


def test_logit_bias_and_penalties(client, model, default_model_dir):
    from parrot.backends.tokenizer import Tokenizer

    tok = Tokenizer(default_model_dir)
    token = tok.encode(" parrot")[0]
    r = client.completions.create(model=model, prompt="Say it:", max_tokens=5, temperature=1.0, seed=2,
                                  logit_bias={str(token): 100}, logprobs=0)
    # +100 outweighs any logit of the model: every token is the biased one
    # (the logprobs are the model's own, before the bias).
    assert r.choices[0].text == tok.decode([token] * 5)
    assert r.choices[0].logprobs.token_logprobs[0] < 0
    # Two tokens biased alike, greedy. Without penalties the model's own
    # preference picks between them; with penalties (2 per use and 2 once)
    # a token used k times more than the other loses 2k + 2, more than any
    # gap the model keeps between the two over six steps: both are used.
    other = tok.encode(" tree")[0]
    both = {str(token): 100, str(other): 100}
    turns = client.completions.create(model=model, prompt="Say it:", max_tokens=6, temperature=0, logit_bias=both,
                                      frequency_penalty=2.0, presence_penalty=2.0, logprobs=0)
    ids = [tok.encode(t)[0] if t.strip() else None for t in turns.choices[0].logprobs.tokens]
    assert set(ids) == {token, other} and len(ids) == 6, turns.choices[0].logprobs.tokens


def test_sdk_over_http_keeps_constraints_and_parses(live_server):
    from parrot.semantic_vars.http_runtime import HttpRuntime

    runtime = HttpRuntime(live_server.url, api_key=live_server.new_tenant("sdk-structured"))

    @P.semantic_function(temperature=1.0, max_tokens=80)
    def pick(topic: P.Input, colour: P.Output(choices=["red", "blue"]), record: P.Output(schema=WEATHER)):
        """Topic: {{input:topic}} Colour: {{output:colour}} Record: {{output:record|seed=3}}"""

    with P.Session(runtime):
        outs = [pick(f"t{i}") for i in range(4)]
        for colour, record in outs:
            assert colour.get() in ("red", "blue")
            jsonschema.validate(record.get_parsed(), WEATHER)
    # A regex Python accepts but the grammar library does not: the server's
    # typed error at submit, naming the output.
    look = P.SemanticFunction("Say: {{output:x}}", output_options={"x": {"constraint": {"regex": "(?=a)a"}}})
    with pytest.raises(P.ConstraintError) as e:
        with P.Session(runtime) as s:
            look()
            s.flush()
    assert e.value.field == "calls.0.function.output_sampling.x.constraint.regex"
    assert "Lookahead" in str(e.value)


def test_streamed_chat_logprobs_cover_the_content(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, logprobs=True, top_logprobs=2,
                                                 temperature=0, max_tokens=6, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert "".join(e.token for e in entries) == content and all(len(e.top_logprobs) == 2 for e in entries)


def test_a_schema_the_grammar_library_rejects_is_a_4xx(client, model):
    # A valid JSON schema (for the metaschema) that no output can satisfy.
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, response_format=fmt, max_tokens=4)
    assert e.value.body["field"] == "response_format.json_schema" and "minimum greater than maximum" in e.value.body["message"]


def _engine_tokens(live_server) -> dict[str, float]:
    import re

    with live_server.admin() as admin:
        text = admin.get("/metrics").text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'parrot_engine_tokens_total\{engine="[^"]+",kind="(\w+)"\} ([0-9.e+]+)', text)}


def test_n_choices_prefill_the_prompt_once(live_server, client, model):
    prompt = f"{uuid.uuid4().hex} " + "one prompt for every choice " * 16
    before = _engine_tokens(live_server)
    r = client.completions.create(model=model, prompt=prompt, n=4, max_tokens=2, temperature=1.0, seed=7)
    after = _engine_tokens(live_server)
    n_prompt = r.usage.prompt_tokens
    # The first choice prefills the prompt; the other three take its KV from
    # the cache (each feeds the last prompt position again for its logits).
    assert after["prefill"] - before["prefill"] <= n_prompt + 3
    assert after["cached"] - before["cached"] >= 3 * (n_prompt - 1)
