"""Shared helpers of the engine tests: run requests on a torch engine and
compare their tokens, and the random-cancel load the fuzz tests drive."""

from __future__ import annotations

import asyncio
import random

from parrot.backends import GenerationRequest, GenResult
from parrot.backends.torch_engine import TorchEngine


def run(engine: TorchEngine, *requests: GenerationRequest) -> list[tuple[list[GenResult], object]]:
    """Submit all requests at once (so they batch) and collect their results."""

    async def main():
        streams = [engine.submit(r) for r in requests]
        return await asyncio.gather(*(s.results() for s in streams))

    return asyncio.run(main())


def tokens_of(results) -> list[tuple[int, ...]]:
    """The first output's token ids of each request's results."""
    return [res[0][0].token_ids for res in results]


def per_block(engine: TorchEngine) -> int:
    """Bytes of KV cache one block of ``engine`` takes (float32)."""
    c = engine.model.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * engine.config.block_size


def run_with_cancels(engine: TorchEngine, batch: list[tuple[GenerationRequest, bool]], rng: random.Random):
    """Submit every request of ``batch`` at once, cancel those marked True
    (half of them after a random moment, so cancels land at any stage:
    queued, prefilling, decoding), and return the results of the others."""

    async def main():
        streams = [engine.submit(r) for r, _ in batch]
        for s, (_, cancel) in zip(streams, batch):
            if cancel:
                if rng.random() < 0.5:
                    await asyncio.sleep(rng.random() * 0.01)  # a random cancel time, not a wait for anything
                s.cancel()
        return await asyncio.gather(*(s.results() for s, (_, cancel) in zip(streams, batch) if not cancel))

    return asyncio.run(main())
