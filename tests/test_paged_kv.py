"""The paged KV cache through the engine: block sharing, namespaces,
preemption under a tiny pool, cancellation, and block accounting under
random load. Outputs are compared with an engine whose cache is off."""

from __future__ import annotations

import asyncio
import random

import pytest

from parrot.backends import Fill, Gen, GenerationRequest, TokenDelta
from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig
from parrot.semantic_vars import EngineError, SamplingConfig

from engine_runs import paged_prefill_case, per_block, run, run_with_cancels, tokens_of

TEXT = (
    "Engines keep the keys and values of every token in fixed-size blocks, and requests that share "
    "a prompt prefix share its blocks instead of computing them again."
)


def req(ids, max_tokens: int = 8, namespace: str = "") -> GenerationRequest:
    return GenerationRequest([Fill(tuple(ids)), Gen(SamplingConfig(max_tokens=max_tokens))], namespace=namespace)


def make(path, **config) -> TorchEngine:
    return TorchEngine.from_pretrained(path, device="cpu", config=TorchEngineConfig(**config))


def assert_all_free(engine: TorchEngine) -> None:
    """With nothing running and no hinted entry stored, every block is free."""
    blocks = engine.block_manager
    assert not any(blocks.refcount) and blocks.num_free == blocks.num_blocks
    blocks.check()


@pytest.fixture(scope="module")
def baseline(tiny_llama_dir):
    engine = make(tiny_llama_dir, prefix_cache=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ids(tiny_llama_dir):
    from parrot.backends.tokenizer import Tokenizer

    tok = Tokenizer(tiny_llama_dir)
    return tok.encode(TEXT, add_bos=True)


def test_identical_prompts_share_blocks_and_give_the_same_text(tiny_llama_dir, baseline, ids):
    prompts = [ids, ids + [7, 8], ids[:40], ids]
    expected = tokens_of(run(baseline, *(req(p) for p in prompts)))
    engine = make(tiny_llama_dir)
    try:
        [(first, stats)] = run(engine, req(ids))
        assert first[0].token_ids == expected[0] and stats.cached_tokens == 0
        together = run(engine, *(req(p) for p in prompts))
        assert tokens_of(together) == expected
        # Each reuses the full blocks of its prompt (always leaving one token to feed).
        assert [s.cached_tokens for _, s in together] == [(len(p) - 1) // 16 * 16 for p in prompts]
        assert engine.stats()["block_hits"] > 0
        assert_all_free(engine)
    finally:
        engine.close()


def test_namespaces_do_not_share_blocks(tiny_llama_dir, ids):
    engine = make(tiny_llama_dir)
    try:
        [(a, _)] = run(engine, req(ids, namespace="tenant-a"))
        [(b, stats_b)] = run(engine, req(ids, namespace="tenant-b"))
        [(a2, stats_a2)] = run(engine, req(ids, namespace="tenant-a"))
        assert a[0].token_ids == b[0].token_ids == a2[0].token_ids
        assert stats_b.cached_tokens == 0 and stats_a2.cached_tokens > 0
    finally:
        engine.close()


def test_preempted_requests_resume_with_the_same_text(tiny_llama_dir, baseline, ids):
    # Room for one request of 64 tokens (plus a spare): six long requests
    # cannot all hold their blocks, so decoders preempt the newest ones.
    prompts = [ids[:12], ids[3:20], ids[5:30], ids[:8], ids[10:25], ids[1:14]]
    expected = tokens_of(run(baseline, *(req(p, max_tokens=30) for p in prompts)))
    for cache in (True, False):
        engine = make(tiny_llama_dir, prefix_cache=cache, max_model_len=64, kv_cache_bytes=per_block(baseline) * 6)
        try:
            assert engine.capacity().total_blocks == 6
            got = tokens_of(run(engine, *(req(p, max_tokens=30) for p in prompts)))
            assert got == expected
            assert engine.counters.preemptions > 0
            if cache:
                engine.prefix_cache.evict(0)
            assert_all_free(engine)
        finally:
            engine.close()


def test_cancel_frees_blocks(tiny_llama_dir, ids):
    engine = make(tiny_llama_dir, prefix_cache=False)
    try:
        async def main():
            stream = engine.submit(req(ids, max_tokens=400))
            async for event in stream:
                if isinstance(event, TokenDelta):
                    assert engine.block_manager.num_free < engine.block_manager.num_blocks
                    stream.cancel()
            # A fresh request completing proves the loop moved past the cancel.
            await engine.submit(req([1, 2, 3], max_tokens=1)).results()

        asyncio.run(main())
        assert engine.counters.requests_cancelled == 1
        assert_all_free(engine)
    finally:
        engine.close()


def test_pool_too_small_for_one_request_is_a_clear_error(tiny_llama_dir, baseline, ids):
    with pytest.raises(EngineError, match="max_model_len=512 tokens needs 33"):
        make(tiny_llama_dir, kv_cache_bytes=per_block(baseline) * 10)
    engine = make(tiny_llama_dir, kv_cache_bytes=per_block(baseline) * 10, max_model_len=64)
    try:
        async def submit():
            return engine.submit(req(list(range(3, 80))))

        with pytest.raises(EngineError, match="exceeds"):
            asyncio.run(submit())
        [(results, _)] = run(engine, req(ids[:20], max_tokens=10))
        # Generation that reaches max_model_len ends there with reason "length",
        # as at max_tokens (unless the model ends it first).
        [([result], stats)] = run(engine, GenerationRequest(
            [Fill(tuple(ids[:60])), Gen(SamplingConfig(max_tokens=30, stop=("@@@",)))]))
        if result.finish_reason != "eos":
            assert result.finish_reason == "length" and len(ids[:60]) + len(result.token_ids) == 64
        # A program whose later Fill would not fit fails that request only.
        with pytest.raises(EngineError, match="max_model_len"):
            run(engine, GenerationRequest([Fill(tuple(ids[:30])), Gen(SamplingConfig(max_tokens=2, stop=("@@@",))),
                                           Fill(tuple(ids[:34])), Gen(SamplingConfig(max_tokens=2))]))
        assert_all_free_or_cached(engine)
    finally:
        engine.close()


def assert_all_free_or_cached(engine: TorchEngine) -> None:
    engine.prefix_cache.evict(0)
    assert_all_free(engine)


def test_fuzz_block_accounting_under_random_load(tiny_llama_dir, baseline, ids):
    rng = random.Random(11)
    engine = make(
        tiny_llama_dir, max_running=6, max_step_tokens=20, max_model_len=96, kv_cache_bytes=per_block(baseline) * 7
    )
    try:
        for _ in range(5):
            batch = []
            for _ in range(rng.randrange(3, 9)):
                start = rng.randrange(0, 20)
                prompt = ids[start : start + rng.randrange(2, 40)] + [rng.randrange(3, 900) for _ in range(rng.randrange(0, 4))]
                batch.append((req(prompt, max_tokens=rng.randrange(1, 40), namespace=rng.choice("ab")),
                              rng.random() < 0.3))
            expected = tokens_of(run(baseline, *(r for r, _ in batch)))
            got = tokens_of(run_with_cancels(engine, batch, rng))
            run(engine, req([1, 2, 3], max_tokens=1))  # a fresh request completing: the cancels have landed
            assert got == [e for e, (_, cancel) in zip(expected, batch) if not cancel]
            blocks = engine.block_manager
            assert not any(blocks.refcount)  # no hints: nothing holds a block when idle
            blocks.check()
        assert engine.counters.preemptions > 0 and engine.stats()["block_hits"] > 0
        assert_all_free_or_cached(engine)
    finally:
        engine.close()


def test_a_request_whose_loop_closed_is_cancelled_and_frees_its_blocks(tiny_llama_dir, ids):
    engine = make(tiny_llama_dir, prefix_cache=False)
    try:
        async def abandon():
            engine.submit(req(ids, max_tokens=300))  # nobody reads it; the loop closes at once

        asyncio.run(abandon())
        # The engine's next event for it finds the loop closed and cancels it.
        [(results, _)] = run(engine, req(ids[:10], max_tokens=3))
        run(engine, req([1, 2], max_tokens=1))  # one more step boundary for the cancel to land
        assert len(results[0].token_ids) == 3
        assert engine.counters.requests_cancelled == 1
        assert_all_free(engine)
    finally:
        engine.close()


def sparse_config(engine: TorchEngine, pattern: dict, min_length: int):
    from parrot.kernels import HeadPattern, SparseAttentionConfig

    c = engine.model.config
    head = HeadPattern.from_dict(pattern)
    return SparseAttentionConfig(layers=[(head,) * c.num_heads] * c.num_layers, block_m=16, block_n=16,
                                 last_q=16, min_length=min_length)


def test_sparse_prefill_takes_a_long_prompt_in_one_chunk_and_matches_dense(tiny_llama_dir, baseline):
    long_ids = baseline.tokenizer.encode(TEXT * 3, add_bos=True)
    assert len(long_ids) > 100
    dense = make(tiny_llama_dir, prefix_cache=False, max_running=4, max_step_tokens=32)
    # Dense head patterns keep every key: the sparse path must give the dense text.
    sparse = make(tiny_llama_dir, prefix_cache=False, max_running=4, max_step_tokens=32,
                  sparse_prefill=sparse_config(baseline, {"kind": "dense"}, min_length=64))
    try:
        want, got = tokens_of(run(dense, req(long_ids))), tokens_of(run(sparse, req(long_ids)))
        assert got == want
        # Chunked dense prefill needs ceil(len/32) steps before the first token; sparse one.
        decode_steps = 8 - 1
        assert dense.counters.steps - decode_steps >= -(-len(long_ids) // 32)
        assert sparse.counters.steps - decode_steps == 1
        # A short prompt stays on the dense chunked path.
        short = long_ids[:40]
        assert tokens_of(run(sparse, req(short))) == tokens_of(run(dense, req(short)))
    finally:
        dense.close()
        sparse.close()


def test_sparse_prefill_with_a_narrow_pattern_runs_and_a_mismatched_config_is_refused(tiny_llama_dir, baseline, tmp_path):
    long_ids = baseline.tokenizer.encode(TEXT * 3, add_bos=True)
    path = tmp_path / "patterns.json"
    sparse_config(baseline, {"kind": "a_shape", "sink": 16, "window": 32}, min_length=64).save(path)
    engine = make(tiny_llama_dir, prefix_cache=False, sparse_prefill=str(path))
    try:
        (results,) = tokens_of(run(engine, req(long_ids)))
        assert len(results) == 8
    finally:
        engine.close()
    bad = sparse_config(baseline, {"kind": "dense"}, min_length=64)
    bad.layers = bad.layers[:1]
    with pytest.raises(EngineError, match="sparse_prefill config has 1 layers"):
        make(tiny_llama_dir, sparse_prefill=bad)


@pytest.mark.parametrize("past,n", [(0, 20), (1, 1), (5, 30), (16, 16), (37, 50), (64, 3)])
def test_prefill_after_cached_positions_matches_dense_causal_attention(past, n):
    """The new tokens of a prompt whose first ``past`` positions are in the
    pool (a prefix-cache hit, or a later chunk) see exactly the positions at
    or before their own, through the grouped KV heads."""
    import torch

    got, ref = paged_prefill_case("cpu", torch.float32, past, n)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
