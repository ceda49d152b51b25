"""The torch engine against transformers, and its batching, stops and sampling."""

from __future__ import annotations

import asyncio

import pytest
import torch

from parrot.backends import Fill, Gen, GenerationRequest, GenResult, TokenDelta
from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig
from parrot.semantic_vars import EngineError, SamplingConfig

PROMPTS = [
    "Summarize the passage below in one sentence.",
    "The scheduler places calls on engines by objective.",
    "A",
    "Many users share one long system prompt, so its cache is computed once and kept.",
]


def run(engine: TorchEngine, *requests: GenerationRequest) -> list[tuple[list[GenResult], object, list[TokenDelta]]]:
    """Submit all requests at once (so they batch) and collect their events."""

    async def one(stream):
        results, deltas, stats = [], [], None
        async for event in stream:
            if isinstance(event, GenResult):
                results.append(event)
            elif isinstance(event, TokenDelta):
                deltas.append(event)
            else:
                stats = event.stats
        return results, stats, deltas

    async def main():
        streams = [engine.submit(r) for r in requests]
        return await asyncio.gather(*(one(s) for s in streams))

    return asyncio.run(main())


def greedy(max_tokens: int, **kw) -> SamplingConfig:
    return SamplingConfig(max_tokens=max_tokens, **kw)


def hf_greedy(path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), pad_token_id=0,
    )
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_engine(request, tiny_llama_dir, tiny_qwen2_dir):
    path = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    engine = TorchEngine.from_pretrained(path, device="cpu", name=request.param)
    yield path, engine
    engine.close()


def test_greedy_text_matches_transformers_generate(hf_engine):
    path, engine = hf_engine
    for prompt in PROMPTS[:2]:
        ids = engine.tokenizer.encode(prompt, add_bos=True)
        expected = hf_greedy(path, ids, 24)
        [(results, stats, _)] = run(engine, GenerationRequest([Fill(tuple(ids)), Gen(greedy(24))]))
        eos = engine.tokenizer.eos_token_ids
        cut = next((i for i, t in enumerate(expected) if t in eos), len(expected))
        assert list(results[0].token_ids) == expected[:cut]
        assert results[0].finish_reason == ("eos" if cut < len(expected) else "length")
        assert results[0].text == engine.tokenizer.decode(expected[:cut])
        assert stats.prefill_tokens == len(ids)


def test_concurrent_requests_batch_to_the_same_tokens_as_alone(tiny_llama_dir):
    # A small step budget forces chunked prefill interleaved with decoding.
    engine = TorchEngine.from_pretrained(
        tiny_llama_dir, device="cpu", config=TorchEngineConfig(max_running=3, max_step_tokens=8)
    )
    try:
        requests = [
            GenerationRequest([Fill(tuple(engine.tokenizer.encode(p, add_bos=True))), Gen(greedy(12))])
            for p in PROMPTS
        ]
        alone = [run(engine, r)[0][0][0].token_ids for r in requests]
        together = [res[0][0].token_ids for res in run(engine, *requests)]
        assert together == alone
        assert engine.counters.steps > 0 and engine.capacity().running == 0
    finally:
        engine.close()


def test_multi_output_program_continues_from_the_generated_text(tiny_llama_dir):
    engine = TorchEngine.from_pretrained(tiny_llama_dir, device="cpu")
    try:
        tok = engine.tokenizer
        first = tuple(tok.encode("Question: what is Parrot?\nAnswer:", add_bos=True))
        second = tuple(tok.encode("\nConfidence:"))
        [(results, _, _)] = run(
            engine, GenerationRequest([Fill(first), Gen(greedy(6), "a"), Fill(second), Gen(greedy(5), "b")])
        )
        assert [r.name for r in results] == ["a", "b"]
        # The second output is what the model says after prompt + first output + filler.
        context = list(first) + list(results[0].token_ids) + list(second)
        expected = hf_greedy(tiny_llama_dir, context, 5)
        cut = next((i for i, t in enumerate(expected) if t in tok.eos_token_ids), len(expected))
        assert list(results[1].token_ids) == expected[:cut]
    finally:
        engine.close()


def test_stop_string_truncates_output_and_is_never_streamed(default_engine):
    tok = default_engine.tokenizer
    prompt = (Fill(tuple(tok.encode("Write a long story about engines.", add_bos=True))),)
    [(results, _, _)] = run(default_engine, GenerationRequest([*prompt, Gen(greedy(30))]))
    full = results[0].text
    assert len(full) > 12, full
    stop = full[8:11]
    [(results, _, deltas)] = run(default_engine, GenerationRequest([*prompt, Gen(greedy(30, stop=(stop,)))]))
    assert results[0].finish_reason == "stop"
    assert results[0].text == full[: full.index(stop)]
    assert "".join(d.text for d in deltas) == results[0].text
    assert all(stop not in d.text for d in deltas)


def test_max_tokens_and_streaming_deltas_add_up(default_engine):
    tok = default_engine.tokenizer
    request = GenerationRequest([Fill(tuple(tok.encode("Hello", add_bos=True))), Gen(greedy(7))])
    [(results, stats, deltas)] = run(default_engine, request)
    assert len(results[0].token_ids) <= 7
    assert stats.generated_tokens == len(results[0].token_ids) + (results[0].finish_reason == "eos")
    assert "".join(d.text for d in deltas) == results[0].text


def test_seeded_sampling_is_reproducible_and_top_p_tiny_is_greedy(default_engine):
    tok = default_engine.tokenizer
    fill = Fill(tuple(tok.encode("Once upon a time", add_bos=True)))

    def tokens(sampling):
        return run(default_engine, GenerationRequest([fill, Gen(sampling)]))[0][0][0].token_ids

    a = tokens(SamplingConfig(max_tokens=16, temperature=1.0, seed=7))
    assert a == tokens(SamplingConfig(max_tokens=16, temperature=1.0, seed=7))
    others = {tokens(SamplingConfig(max_tokens=16, temperature=1.0, seed=s)) for s in (8, 9, 10)}
    assert any(o != a for o in others)
    assert tokens(SamplingConfig(max_tokens=16, temperature=1.0, top_p=1e-6, seed=1)) == tokens(greedy(16))


def test_cancel_frees_the_request(default_engine):
    tok = default_engine.tokenizer
    before = default_engine.counters.requests_cancelled

    async def main():
        stream = default_engine.submit(
            GenerationRequest([Fill(tuple(tok.encode("Go on forever", add_bos=True))), Gen(greedy(4000))])
        )
        async for event in stream:
            if isinstance(event, TokenDelta):
                stream.cancel()
        return stream

    asyncio.run(main())

    async def idle():
        # The engine drops the request at its next step boundary; a fresh
        # request completing proves the loop has moved past it.
        await default_engine.submit(GenerationRequest([Fill((1, 2, 3)), Gen(greedy(1))])).results()

    asyncio.run(idle())
    assert default_engine.counters.requests_cancelled == before + 1
    assert default_engine.capacity().running == 0


def test_bad_programs_raise_engine_errors(default_engine):
    async def submit(program):
        return default_engine.submit(GenerationRequest(program))

    with pytest.raises(EngineError, match="non-empty prompt"):
        asyncio.run(submit([Gen(greedy(3))]))
    limit = default_engine.model.config.max_position_embeddings
    with pytest.raises(EngineError, match="exceeds"):
        asyncio.run(submit([Fill(tuple([5] * (limit + 1))), Gen(greedy(3))]))


def test_shared_prefix_groups_find_rows_that_share_leading_blocks():
    from parrot.backends.model_runner import shared_prefix_groups

    tables = [[7, 8, 9, 20], [7, 8, 9, 21], [7, 8, 30], [40, 41]]
    # Rows 0-2 share blocks 7, 8 (row 2's new token sits in block 30, so 9 is not common).
    assert shared_prefix_groups(tables, [60, 60, 40, 20], 16, 16) == [([0, 1, 2], 2)]
    assert shared_prefix_groups(tables, [60, 60, 40, 20], 16, 64) == []  # below the threshold
    # A block that holds a row's new token is never part of the shared prefix.
    assert shared_prefix_groups([[5, 6], [5, 6]], [20, 20], 16, 16) == [([0, 1], 1)]


def test_cascade_decode_gives_the_same_greedy_text(tiny_llama_dir):
    """Sequences sharing a long prefix decode through the shared-prefix path
    (the reference twin on CPU) to the same greedy tokens as the paged path;
    unrelated sequences in the same batch are untouched."""
    from parrot.backends import PrefixHint

    shared = tuple(range(5, 5 + 90))
    prompts = [shared + (100 + i, 200 + i, 300 + i) for i in range(4)] + [tuple(range(400, 430))]

    def texts(cascade: bool) -> tuple[list[tuple[int, ...]], int]:
        engine = TorchEngine.from_pretrained(tiny_llama_dir, device="cpu", config=TorchEngineConfig(
            cascade_decode=cascade, cascade_min_prefix_tokens=32))
        try:
            hint = PrefixHint("shared", len(shared))
            requests = [GenerationRequest([Fill(p), Gen(greedy(12))], prefix_hint=hint if i < 4 else None)
                        for i, p in enumerate(prompts)]
            out = run(engine, *requests)
            assert (engine.counters.cascade_steps > 0) == cascade
            return [r[0][0].token_ids for r in out], engine.counters.prefix_hits
        finally:
            engine.close()

    with_cascade, hits = texts(True)
    assert hits == 3  # the four share the prefix's blocks, so the cascade path ran
    assert with_cascade == texts(False)[0]


def test_step_trace_writes_one_line_per_step(tiny_llama_dir, tmp_path, monkeypatch):
    """PARROT_STEP_TRACE: one JSON line per engine step, naming each request and its tokens."""
    import json

    monkeypatch.setenv("PARROT_STEP_TRACE", str(tmp_path / "trace"))
    engine = TorchEngine.from_pretrained(tiny_llama_dir, name="traced")
    try:
        req = GenerationRequest([Fill(tuple(range(5, 45))), Gen(SamplingConfig(max_tokens=5))], request_id="r-1")
        run(engine, req)
        steps = engine.counters.steps
    finally:
        engine.close()
    (path,) = tmp_path.glob("trace-traced-*.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == steps
    assert lines[0]["prefill"] == 40 and lines[0]["decode"] == 0
    assert all(line["reqs"][0][0] == "r-1" for line in lines)
    assert sum(line["decode"] for line in lines) == 4  # the prompt's step gives the first token
    assert all(a["t"] <= b["t"] for a, b in zip(lines, lines[1:]))
