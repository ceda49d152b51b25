"""One tenant cannot break another: a request that is out of range is refused
alone, and one that is in range but numerically hostile (a temperature of
1e-300) runs without failing the calls batched with it."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture(scope="module")
def model(live_server):
    key = live_server.new_tenant("isolation-probe")
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=key, max_retries=0).models.list().data[0].id


def _running_call(live_server, key: str) -> dict:
    with live_server.client(key) as c:
        (session,) = c.get("/api/v1/sessions").json()["sessions"]
        (call,) = c.get(f"/api/v1/sessions/{session['session_id']}/dag").json()["calls"]
    return call


def test_a_poisoned_request_does_not_fail_another_tenants_running_call(live_server, model):
    key_a, key_b = live_server.new_tenant("victim"), live_server.new_tenant("poisoner")
    victim = openai.OpenAI(base_url=live_server.url + "/v1", api_key=key_a, max_retries=0, timeout=120)
    poisoner = openai.OpenAI(base_url=live_server.url + "/v1", api_key=key_b, max_retries=0, timeout=120)
    stream = victim.completions.create(model=model, prompt="Tell a long story", max_tokens=1500, temperature=0.7,
                                       seed=3, stream=True)
    chunks = iter(stream)
    first = next(chunks)  # the victim's call is generating on the engine now
    # In range but numerically hostile: these sample greedily instead of dividing by ~0.
    for temperature in (1e-300, 1e-40, 1e-7):
        r = poisoner.completions.create(model=model, prompt="hi", max_tokens=4, temperature=temperature)
        assert r.choices[0].finish_reason in ("stop", "length")
    assert _running_call(live_server, key_a)["state"] == "running"  # so the two shared batches
    # Out of range: refused at the door, naming the field.
    for kwargs, field in [({"seed": 2**70}, "seed"), ({"seed": -(2**70)}, "seed"), ({"temperature": 2.5}, "temperature"),
                          ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises(openai.UnprocessableEntityError) as e:
            poisoner.completions.create(model=model, prompt="hi", **{"max_tokens": 4, **kwargs})
        assert e.value.body["field"] == field, e.value.body
    rest = list(chunks)
    assert rest and rest[-1].choices[0].finish_reason in ("stop", "length")
    assert first.choices[0].text + "".join(c.choices[0].text for c in rest)
    assert _running_call(live_server, key_a)["state"] == "done"


def test_native_api_sampling_bounds_come_from_one_schema(live_server):
    from parrot.semantic_vars.sampling import SEED_MAX, TEMPERATURE_MAX

    key = live_server.new_tenant("bounds")
    fn = {"template": "Q: {{input:q}} A: {{output:a}}"}
    with live_server.client(key) as c:
        sid = c.post("/api/v1/sessions").json()["session_id"]
        for sampling, field in [({"seed": SEED_MAX + 1}, "seed"), ({"temperature": TEMPERATURE_MAX + 0.1}, "temperature"),
                                ({"max_tokens": "10"}, "max_tokens"), ({"temperature": True}, "temperature")]:
            r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
                {"function": {**fn, "sampling": sampling}, "constants": {"q": "x"}}]})
            assert r.status_code == 422 and r.json()["error"]["field"].endswith(field), r.text
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
            {"function": {**fn, "sampling": {"seed": SEED_MAX, "temperature": 1e-300, "max_tokens": 2}},
             "constants": {"q": "x"}}]})
        assert r.status_code == 201, r.text
        var = r.json()["calls"][0]["outputs"]["a"]
        assert c.get(f"/api/v1/sessions/{sid}/variables/{var}", params={"timeout": 60}).json()["ready"]
        # A template's own options are checked by the same schema.
        r = c.post(f"/api/v1/sessions/{sid}/calls", json={"calls": [
            {"function": {"template": "{{output:a|temperature=5}}"}}]})
        assert r.status_code == 422, r.text


def test_sampler_keeps_each_rows_trouble_to_itself():
    import torch

    from parrot.backends.sampler import make_generator, sample
    from parrot.semantic_vars import SamplingConfig

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 7] = float("nan")
    logits[2, :] = float("inf")
    configs = [SamplingConfig(temperature=1.0, seed=1), SamplingConfig(temperature=0.5, seed=2),
               SamplingConfig(temperature=1.0, top_p=0.5, seed=3), SamplingConfig(temperature=1e-300)]
    gens = [make_generator(c, torch.device("cpu")) for c in configs]
    tokens = sample(logits, configs, gens)
    assert all(0 <= t < 50 for t in tokens)
    assert tokens[3] == int(logits[3].argmax())  # a vanishing temperature is greedy
    alone = sample(logits[:1], configs[:1], [make_generator(configs[0], torch.device("cpu"))])
    assert alone[0] == tokens[0]  # the healthy row samples as it would alone
