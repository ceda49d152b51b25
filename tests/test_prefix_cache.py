"""Prefix hints: a shared prefix is prefilled once per engine and its KV reused.

The store is tested on its own (LRU, pins, byte budget), then through real
engines on the tiny Llama: greedy outputs must be identical with the hint,
without it and with the store off, while the prefill counters show the
prefix was computed once.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from parrot.backends import Fill, Gen, GenerationRequest, PrefixHint, TokenDelta
from parrot.backends.block_manager import BlockManager, BlockTable
from parrot.backends.prefix_cache import PrefixCache
from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig
from parrot.semantic_vars import SamplingConfig

from engine_runs import per_block, run, run_with_cancels, tokens_of

TEXT = (
    "You are a careful assistant for a company that builds serving systems for large language "
    "models. Answer every question in one short sentence, cite the relevant component by name, "
    "never invent numbers, and prefer plain words over jargon. The system has a scheduler, a "
    "dataflow graph of calls and variables, engines that run the model forward with continuous "
    "batching, and a cache of shared prompt prefixes that many users reuse across their calls. "
    "When a question is unclear, say which part is unclear and stop there."
)
SUFFIXES = [
    "Question: what does the scheduler do?\nAnswer:",
    "Question: why share prefixes?\nAnswer:",
    "Q: engines?\nA:",
    "Question: what is a semantic variable, and who fills it?\nAnswer:",
]


def greedy(max_tokens: int) -> SamplingConfig:
    return SamplingConfig(max_tokens=max_tokens)


def request(prefix, suffix, key: str | None = "sys", max_tokens: int = 8) -> GenerationRequest:
    program = [Fill(tuple(prefix)), Fill(tuple(suffix)), Gen(greedy(max_tokens))] if suffix else [
        Fill(tuple(prefix)), Gen(greedy(max_tokens))
    ]
    hint = PrefixHint(key, len(prefix)) if key is not None else None
    return GenerationRequest(program, prefix_hint=hint)


@pytest.fixture(scope="module")
def prompts(tiny_llama_dir):
    from parrot.backends.tokenizer import Tokenizer

    tok = Tokenizer(tiny_llama_dir)
    prefix = tok.encode(TEXT, add_bos=True)[:100]
    assert len(prefix) == 100
    suffixes = [tok.encode(s) for s in SUFFIXES]
    return prefix, suffixes


@pytest.fixture(scope="module")
def baseline(tiny_llama_dir):
    """The request-level baseline: hints ignored, every prompt prefilled whole."""
    engine = TorchEngine.from_pretrained(
        tiny_llama_dir, device="cpu", name="no-prefix", config=TorchEngineConfig(prefix_cache=False)
    )
    yield engine
    engine.close()


def make_engine(path, **config) -> TorchEngine:
    return TorchEngine.from_pretrained(path, device="cpu", config=TorchEngineConfig(**config))


def assert_no_refs(engine: TorchEngine) -> None:
    """Every reference is released by the time a request's last event arrives."""
    store = engine.prefix_cache
    assert store is not None
    for key in store.keys():
        assert store.refcount(key) == 0, key
    assert not engine.kv.computing and not engine.kv.parked
    assert engine.capacity().running == 0 and engine.capacity().waiting == 0
    # The only block references left are the stored entries' own.
    blocks = engine.block_manager
    expected = [0] * blocks.num_blocks
    for key in store.keys():
        for b in store.get(key).blocks:
            expected[b] += 1
    assert blocks.refcount == expected
    blocks.check()


# -- the store alone ---------------------------------------------------------
def test_block_digests_publish_match_and_namespaces():
    blocks = BlockManager(num_blocks=8, block_size=4)
    cache = PrefixCache(blocks)
    tokens = list(range(10, 21))  # 11 tokens: two full blocks and a partial one
    table = BlockTable(blocks)
    assert table.prepare_append(len(tokens)) == []
    table.length = len(tokens)
    cache.publish("a", tokens, table.blocks, table.digests, table.length)
    assert len(table.digests) == 2 and blocks.num_cached == 2
    assert cache.match("a", tokens, len(tokens)) == (table.blocks[:2], table.digests)
    assert cache.match("a", tokens, 7) == (table.blocks[:1], table.digests[:1])  # only whole blocks
    assert cache.match("b", tokens, len(tokens)) == ([], [])  # another tenant sees nothing
    other = tokens[:4] + [99] + tokens[5:]
    assert cache.match("a", other, len(other))[0] == table.blocks[:1]  # the chain stops at the change
    assert cache.block_hits == 4 and cache.block_misses == 2
    table.release()
    # Free but still findable, until the pool needs the blocks.
    assert blocks.num_free == 8 and blocks.num_cached_free == 2
    assert cache.match("a", tokens, len(tokens))[0] != []
    grab = [blocks.allocate() for _ in range(8)]
    assert None not in grab and blocks.allocate() is None and blocks.num_cached == 0
    assert cache.match("a", tokens, len(tokens)) == ([], [])
    for b in grab:
        blocks.decref(b)
    blocks.check()


def test_block_table_shares_and_copies_on_write():
    blocks = BlockManager(num_blocks=6, block_size=4)
    a = BlockTable(blocks)
    a.prepare_append(6)
    a.length = 6  # one full block and a half-filled one
    b = BlockTable(blocks)
    b.attach(a.blocks, 6)
    assert [blocks.refcount[x] for x in a.blocks] == [2, 2]
    assert b.blocks_needed(1) == 1  # the shared partial block must be copied first
    copies = b.prepare_append(3)
    assert copies == [(a.blocks[1], b.blocks[1])] and b.blocks[0] == a.blocks[0]
    assert blocks.refcount[a.blocks[1]] == 1 and blocks.refcount[b.blocks[1]] == 1
    b.length = 9
    assert len(b.blocks) == 3
    b.truncate(5)
    assert len(b.blocks) == 2 and blocks.num_free == 6 - 3  # blocks 0 (shared), a's 1, b's copy
    assert b.room(blocks.num_free) == (2 + 3) * 4 - 5
    a.release(), b.release()
    assert blocks.num_free == 6 and not any(blocks.refcount)
    blocks.check()


def test_hint_entries_pin_evict_lru_and_release_blocks():
    blocks = BlockManager(num_blocks=8, block_size=4)
    cache = PrefixCache(blocks)
    owners = {}
    for key in "abc":
        t = BlockTable(blocks)
        t.prepare_append(6)
        t.length = 6
        owners[key] = t
        assert cache.insert(key, tuple(range(6)), t.blocks) is not None
        t.release()  # the entry keeps the blocks alive
    assert blocks.num_free == 8 - 6 and cache.keys() == {"a", "b", "c"}
    assert cache.lookup("a", tuple(range(6))) is not None and cache.hits == 1  # "b" is now LRU
    assert cache.lookup("a", tuple(range(1, 7))) is None and cache.misses == 1
    pinned = cache.get("b")
    cache.acquire(pinned)
    assert cache.insert("b", tuple(range(1, 7)), [0, 1]) is None  # pinned: never replaced
    assert not cache.can_insert("b", (9,)) and cache.can_insert("b", tuple(range(6)))
    assert cache.evict_one() and cache.keys() == {"a", "b"}  # "c" is LRU among unpinned
    assert cache.evict(0) == 1 and cache.keys() == {"b"}
    cache.release(pinned)
    with pytest.raises(ValueError, match="without a reference"):
        cache.release(pinned)
    assert cache.evict(0) == 1 and blocks.num_free == 8 and cache.evictions == 3
    blocks.check()


# -- through the engine ------------------------------------------------------
def test_group_prefills_its_prefix_once_with_identical_outputs(tiny_llama_dir, prompts, baseline):
    prefix, suffixes = prompts
    n, p, extra = len(suffixes), len(prefix), sum(len(s) for s in suffixes)
    base_before = baseline.counters.prefill_tokens
    expected = tokens_of(run(baseline, *(request(prefix, s) for s in suffixes)))
    assert baseline.counters.prefill_tokens - base_before == n * p + extra  # hints ignored
    assert baseline.capacity().cached_prefixes == frozenset()

    # A small step budget: the prefix takes several steps while the group waits.
    engine = make_engine(tiny_llama_dir, max_step_tokens=32)
    try:
        before = engine.counters.prefill_tokens
        together = run(engine, *(request(prefix, s) for s in suffixes))  # all in the same step
        assert tokens_of(together) == expected
        c = engine.counters
        assert c.prefill_tokens - before == p + extra  # not n * p
        assert (c.prefix_hits, c.prefix_misses, c.prefix_tokens_saved) == (n - 1, 1, (n - 1) * p)
        # The first admitted computes the prefix; the others wait for it and copy it.
        assert [stats.cached_tokens for _, stats in together] == [0] + [p] * (n - 1)
        assert [stats.prefill_tokens for _, stats in together] == [p + len(suffixes[0])] + [
            len(s) for s in suffixes[1:]
        ]
        assert engine.capacity().cached_prefixes == frozenset({"sys"})

        before = engine.counters.prefill_tokens
        fed = 0
        for s, want in zip(suffixes, expected):  # one after another, after the group
            [(results, stats)] = run(engine, request(prefix, s))
            # The hinted prefix, or the longer run of full blocks the group published for this very prompt
            # (all of it cached: its last position is fed again for the logits).
            ctx = p + len(s)
            blocks = ctx // 16 * 16
            assert results[0].token_ids == want and stats.cached_tokens == max(p, blocks if blocks < ctx else ctx - 1)
            fed += ctx - stats.cached_tokens
        assert engine.counters.prefill_tokens - before == fed < extra
        assert engine.counters.prefix_hits == (n - 1) + n
        assert_no_refs(engine)
        # Unhinted, the same prompts reuse the published full blocks of the prefix.
        engine.prefix_cache.evict(0)
        assert tokens_of(run(engine, *(request(prefix, s, key=None) for s in suffixes))) == expected
        assert_no_refs(engine)
    finally:
        engine.close()


def test_sequential_first_request_then_hits(tiny_llama_dir, prompts, baseline):
    prefix, suffixes = prompts
    expected = tokens_of(run(baseline, *(request(prefix, s) for s in suffixes)))
    engine = make_engine(tiny_llama_dir)
    try:
        got = [run(engine, request(prefix, s))[0][0][0].token_ids for s in suffixes]
        assert got == expected
        c = engine.counters
        assert (c.prefix_hits, c.prefix_misses) == (len(suffixes) - 1, 1)
        assert c.prefill_tokens == len(prefix) + sum(len(s) for s in suffixes)
        # The whole context is the prefix: its last position is fed again for the logits.
        [(results, stats)] = run(engine, request(prefix, [], max_tokens=6))
        [(want, _)] = run(baseline, request(prefix, [], max_tokens=6))
        assert results[0].token_ids == want[0].token_ids
        assert stats.cached_tokens == len(prefix) - 1 and stats.prefill_tokens == 1
        assert_no_refs(engine)
    finally:
        engine.close()


def test_a_hinted_request_takes_published_blocks_past_its_hint(tiny_llama_dir, prompts, baseline):
    """A hit on a short hinted prefix does not stop a request from reusing
    the longer run of full blocks an earlier request with the same
    continuation published (a multi-agent round reading the same file again)."""
    prefix, suffixes = prompts
    head, body = prefix[:40], prefix[40:]  # the hint covers 40 positions, the context shares 100
    first = request(head, body + suffixes[0], key="head")
    again = request(head, body + suffixes[1], key="head")
    expected = tokens_of(run(baseline, first, again))
    engine = make_engine(tiny_llama_dir)
    try:
        [(one, _)] = run(engine, first)
        [(two, stats)] = run(engine, again)
        assert [one[0].token_ids, two[0].token_ids] == expected
        assert stats.cached_tokens == 96  # the 6 full blocks of the shared 100 positions, not the hint's 40
        assert engine.counters.prefix_hits == 1  # the hint was found, and pinned while the request ran
        assert_no_refs(engine)
    finally:
        engine.close()


def test_same_key_with_other_tokens_is_a_miss(tiny_llama_dir, prompts, baseline):
    prefix, suffixes = prompts
    other = list(prefix)
    other[50] = (other[50] + 1) % 1000 + 3  # same key, one token differs
    expected = tokens_of(run(baseline, request(prefix, suffixes[0]), request(other, suffixes[1])))
    engine = make_engine(tiny_llama_dir, max_step_tokens=32)
    try:
        [(first, _)] = run(engine, request(prefix, suffixes[0]))
        [(second, stats)] = run(engine, request(other, suffixes[1]))
        assert [first[0].token_ids, second[0].token_ids] == expected
        # A hint miss; the full blocks before the changed token still come from the cache.
        assert stats.cached_tokens == 50 // 16 * 16 and engine.counters.prefix_hits == 0
        assert engine.counters.prefix_misses == 2
        # Unpinned, the entry was replaced by the tokens of the later request.
        assert engine.prefix_cache.get("sys").tokens == tuple(other)
        # Arriving together, the one with other tokens must not wait for the first one's prefix.
        together = run(engine, request(prefix, suffixes[0]), request(other, suffixes[1]))
        assert tokens_of(together) == expected
        assert engine.counters.prefix_hits == 1  # only `other` matches what is stored now
        assert_no_refs(engine)
    finally:
        engine.close()


def test_entries_are_evicted_lru_when_the_pool_runs_short(tiny_llama_dir, prompts, baseline):
    prefix, suffixes = prompts
    # Distinct 40-token prefixes (three blocks each) and a pool of 14 blocks.
    prefixes = {k: [prefix[0]] + [(t + i * 7) % 900 + 3 for t in prefix[1:40]] for i, k in enumerate("abcdefg")}
    engine = make_engine(tiny_llama_dir, kv_cache_bytes=per_block(baseline) * 14, max_model_len=128)
    assert engine.capacity().total_blocks == 14
    used: list[str] = []
    try:
        def use(key):
            [(results, _)] = run(engine, request(prefixes[key], suffixes[2], key=key, max_tokens=4))
            [(want, _)] = run(baseline, request(prefixes[key], suffixes[2], key=key, max_tokens=4))
            assert results[0].token_ids == want[0].token_ids
            used.append(key)
            stored = engine.capacity().cached_prefixes
            # What is stored is always the most recently used keys (plus pinned ones).
            recent = [k for k in dict.fromkeys(reversed(used)) if k not in pinned_keys]
            assert set(recent[: len(stored - pinned_keys)]) == stored - pinned_keys, (used, stored)

        pinned_keys: set[str] = set()
        for key in "abac":
            use(key)
        pinned = engine.prefix_cache.get("a")
        engine.prefix_cache.acquire(pinned)  # as a running member of a's group would
        pinned_keys.add("a")
        for key in "defg":
            use(key)
        assert "a" in engine.capacity().cached_prefixes
        assert engine.prefix_cache.evictions > 0
        engine.prefix_cache.release(pinned)
        pinned_keys.clear()
        use("b")  # evicted long ago: a miss that still answers right
        assert engine.counters.prefix_hits == 1
        assert_no_refs(engine)
    finally:
        engine.close()


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.0005)


def test_cancel_parked_computing_and_running_requests_leaks_nothing(tiny_llama_dir, prompts, baseline):
    prefix, suffixes = prompts
    tok_prefix = (prefix * 4)[:320]  # a long prefix in steps of 4 tokens: ~80 steps to compute
    expected = tokens_of(run(baseline, *(request(tok_prefix, s) for s in suffixes[1:3])))
    engine = make_engine(tiny_llama_dir, max_running=4, max_step_tokens=4)
    try:
        async def main():
            computer = engine.submit(request(tok_prefix, suffixes[0], max_tokens=4))
            waiters = [engine.submit(request(tok_prefix, s)) for s in suffixes[1:]]
            await _wait_for(lambda: engine.capacity().running == 4)
            assert "sys" not in engine.prefix_cache, "the prefix was computed before the cancels"
            waiters[2].cancel()  # a parked request
            computer.cancel()  # the one computing: a waiter takes over
            results = await asyncio.gather(*(w.results() for w in waiters[:2]))
            return results

        results = asyncio.run(main())
        assert tokens_of(results) == expected
        c = engine.counters
        assert c.requests_cancelled == 2
        assert (c.prefix_hits, c.prefix_misses) == (1, 2)
        # The waiter that took over reuses whatever full blocks the cancelled one published.
        low, high = sorted(stats.cached_tokens for _, stats in results)
        assert high == len(tok_prefix) and low % 16 == 0 and low < len(tok_prefix)
        assert_no_refs(engine)

        # Cancel a running hit (it holds a reference while it generates).
        async def running_hit():
            stream = engine.submit(request(tok_prefix, suffixes[3], max_tokens=100))
            async for event in stream:
                if isinstance(event, TokenDelta):
                    assert engine.prefix_cache.refcount("sys") == 1
                    stream.cancel()
            await engine.submit(request(tok_prefix, suffixes[1], max_tokens=1)).results()

        asyncio.run(running_hit())
        assert engine.counters.requests_cancelled == 3
        assert_no_refs(engine)
    finally:
        engine.close()


def test_fuzz_random_groups_cancels_and_evictions(tiny_llama_dir, prompts, baseline):
    prefix, suffixes = prompts
    rng = random.Random(7)
    keys = {
        k: [prefix[0]] + [rng.randrange(3, 900) for _ in range(rng.randrange(4, 60))] for k in ("x", "y", "z")
    }
    engine = make_engine(
        tiny_llama_dir, max_running=5, max_step_tokens=24, kv_cache_bytes=per_block(baseline) * 12, max_model_len=128
    )
    try:
        for _ in range(6):
            batch = []
            for _ in range(rng.randrange(2, 8)):
                key = rng.choice(list(keys))
                suffix = [rng.randrange(3, 900) for _ in range(rng.randrange(0, 12))]
                batch.append((request(keys[key], suffix, key=key, max_tokens=rng.randrange(1, 5)),
                              rng.random() < 0.3))
            expected = tokens_of(run(baseline, *(r for r, _ in batch)))
            got = tokens_of(run_with_cancels(engine, batch, rng))
            assert got == [e for e, (_, cancel) in zip(expected, batch) if not cancel]
            # Let cancellations land: a fresh request completing proves the loop moved past them.
            run(engine, request(keys["x"], [5], key="x", max_tokens=1))
            assert_no_refs(engine)
        assert engine.counters.prefix_hits > 0 and engine.prefix_cache.evictions > 0
        engine.prefix_cache.evict(0)
        assert engine.block_manager.num_free == engine.block_manager.num_blocks
    finally:
        engine.close()


def test_hint_longer_than_the_context_is_an_engine_error(tiny_llama_dir, baseline):
    from parrot.semantic_vars import EngineError

    engine = make_engine(tiny_llama_dir)
    try:
        bad = GenerationRequest([Fill((1, 5, 6)), Gen(greedy(2))], prefix_hint=PrefixHint("k", 4))

        async def submit(e):
            return e.submit(bad)

        with pytest.raises(EngineError, match="covers 4 tokens"):
            asyncio.run(submit(engine))
        asyncio.run(submit(baseline))  # with the store off, hints are ignored
    finally:
        engine.close()


def test_requests_arriving_together_compute_an_uncached_prefix_once(tiny_llama_dir):
    """No hints: four requests sharing a 96-token prefix, submitted at once.
    With in-flight dedup the prefix is prefilled once (the others wait for
    its blocks), and the greedy text is the same as without."""
    import asyncio

    from parrot.backends import Fill, Gen, GenerationRequest
    from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig
    from parrot.semantic_vars import SamplingConfig

    shared = tuple(range(7, 7 + 96))
    prompts = [shared + (200 + i, 300 + i, 400 + i) for i in range(4)]

    def run(dedup: bool, min_tokens: int = 64, prompts=prompts) -> tuple[list[tuple[int, ...]], int]:
        engine = TorchEngine.from_pretrained(tiny_llama_dir, device="cpu", config=TorchEngineConfig(
            max_step_tokens=32, dedup_inflight_prefixes=dedup, dedup_min_prefix_tokens=min_tokens))

        async def main():
            with engine.scheduler.lock:  # all four are queued before the engine admits any
                streams = [engine.submit(GenerationRequest([Fill(p), Gen(SamplingConfig(max_tokens=6))]))
                           for p in prompts]
            return await asyncio.gather(*(s.results() for s in streams))

        try:
            out = asyncio.run(main())
            assert not engine.kv.inflight and not engine.kv.block_waiters
            engine.prefix_cache.evict(0)
            engine.block_manager.check()
            return [results[0].token_ids for results, _ in out], engine.counters.prefill_tokens
        finally:
            engine.close()

    with_dedup, prefilled = run(True)
    without, prefilled_without = run(False)
    assert with_dedup == without
    assert prefilled_without >= 4 * 99  # each computed the whole prefix
    assert prefilled <= 99 + 3 * (99 - 96 + 16)  # the prefix once; the others their tails (and a re-fed block edge)
    # A shared head shorter than dedup_min_prefix_tokens, before long distinct
    # bodies, is not worth a wait: each request computes it.
    heads = [shared[:32] + tuple(range(500 + 64 * i, 564 + 64 * i)) for i in range(4)]
    short, prefilled_short = run(True, min_tokens=256, prompts=heads)
    assert short == run(False, prompts=heads)[0] and prefilled_short == 4 * 96
    _, prefilled_waiting = run(True, min_tokens=16, prompts=heads)
    assert prefilled_waiting < 4 * 96  # every shared block awaited: the head computed once
