"""What a benchmark needs to configure a request-level baseline honestly:
`parrot serve --max-step-tokens / --no-prefix-cache`, and ``ignore_eos``
(fixed output lengths) in the SDK, the engine and the OpenAI routes."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from parrot.semantic_vars import SamplingConfig
from parrot.semantic_vars.errors import SamplingConfigError


def _eos(default_model_dir) -> int:
    from parrot.backends.tokenizer import Tokenizer

    return min(Tokenizer(default_model_dir).eos_token_ids)


def test_ignore_eos_is_a_checked_sampling_option():
    assert SamplingConfig(ignore_eos=True).to_dict()["ignore_eos"] is True
    assert SamplingConfig.from_dict({"ignore_eos": True}).ignore_eos
    with pytest.raises(SamplingConfigError) as e:
        SamplingConfig(ignore_eos="yes")  # type: ignore[arg-type]
    assert e.value.field == "ignore_eos"
    with pytest.raises(SamplingConfigError) as e:
        SamplingConfig(ignore_eos=True, constraint={"choices": ["a", "b"]})
    assert e.value.field == "ignore_eos"


def test_engine_generates_max_tokens_past_eos_with_ignore_eos(default_engine, default_model_dir):
    from parrot.backends.engine import Fill, Gen, GenerationRequest

    eos = _eos(default_model_dir)
    prompt = tuple(default_engine.tokenizer.encode("The crew logged the repair", add_bos=default_engine.tokenizer.prompt_bos))

    async def run(ignore: bool):
        # A bias that makes EOS the greedy choice at every step.
        sampling = SamplingConfig(max_tokens=7, temperature=0.0, logit_bias={eos: 100.0}, ignore_eos=ignore)
        results, _ = await default_engine.submit(GenerationRequest([Fill(prompt), Gen(sampling)])).results()
        return results[0]

    stopped, forced = asyncio.run(run(False)), asyncio.run(run(True))
    assert stopped.finish_reason == "eos" and stopped.token_ids == ()
    assert forced.finish_reason == "length" and forced.token_ids == (eos,) * 7


def test_openai_completions_accept_ignore_eos(live_server, default_model_dir):
    eos = _eos(default_model_dir)
    key = live_server.new_tenant("ignore-eos")
    with live_server.client(key) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "Status of the depot:", "max_tokens": 5, "temperature": 0,
                "logit_bias": {str(eos): 100}}
        stopped = client.post("/v1/completions", json=body).json()
        assert stopped["choices"][0]["text"] == "" and stopped["choices"][0]["finish_reason"] == "stop"
        forced = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()
        assert forced["usage"]["completion_tokens"] == 5 and forced["choices"][0]["finish_reason"] == "length"
        bad = client.post("/v1/completions", json={**body, "ignore_eos": "yes"})
        assert bad.status_code == 422 and "ignore_eos" in bad.text


def test_sdk_over_http_sends_ignore_eos(live_server, default_model_dir):
    import parrot as P
    from parrot.semantic_vars.http_runtime import HttpRuntime

    eos = _eos(default_model_dir)
    seen: list[str] = []

    async def hook(request: httpx.Request) -> None:  # the runtime's event hooks see every request
        seen.append(request.method)

    runtime = HttpRuntime(live_server.url, api_key=live_server.new_tenant("ignore-eos-sdk"),
                          client_options={"event_hooks": {"request": [hook]}})
    fn = P.SemanticFunction("Report:{{output:r}}", name="forced",
                            defaults=SamplingConfig(max_tokens=4, logit_bias={eos: 100.0}, ignore_eos=True))
    try:
        with P.Session(runtime) as s:
            out = fn()
            out.get()
            sid = s.id
        with live_server.client(runtime.api_key) as client:
            calls = client.get(f"/api/v1/sessions/{sid}/dag").json()["calls"]
    finally:
        runtime.close()
    assert [c["generated_tokens"] for c in calls] == [4]
    assert "POST" in seen and "GET" in seen


def test_serve_flags_configure_the_torch_engines(monkeypatch, default_model_dir):
    from parrot.cli import build_parser
    from parrot.server.serve import ServerSettings

    args = build_parser().parse_args(["serve", "--max-step-tokens", "512", "--no-prefix-cache", "--max-running", "8"])
    assert args.max_step_tokens == 512 and args.no_prefix_cache
    with pytest.raises(ValueError, match="max_step_tokens"):
        ServerSettings.from_env(max_running=64, max_step_tokens=16)
    monkeypatch.setenv("PARROT_PREFIX_CACHE", "0")
    monkeypatch.setenv("PARROT_MAX_STEP_TOKENS", "256")
    settings = ServerSettings.from_env(model=str(default_model_dir), device="cpu", engine_process=False, max_running=8)
    spec = settings.engine_specs()[0]
    assert (spec.max_step_tokens, spec.prefix_cache) == (256, False)
    engine = spec.build()
    try:
        assert engine.config.max_step_tokens == 256 and engine.config.max_running == 8
        assert engine.prefix_cache is None
    finally:
        engine.close()
    monkeypatch.delenv("PARROT_PREFIX_CACHE")
    assert ServerSettings.from_env().engine_specs()[0].prefix_cache
