"""Shared helpers of the engine tests: run requests on a torch engine and
compare their tokens, and the random-cancel load the fuzz tests drive."""

from __future__ import annotations

import contextlib

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


def paged_prefill_case(device: str, dtype, past: int, n: int, *, block_size: int = 16, kv_heads: int = 2,
                       q_heads: int = 8, dim: int = 32, seed: int = 0, kernels=contextlib.nullcontext):
    """``paged_prefill_attention`` for ``n`` new tokens after ``past`` cached
    ones in shuffled pool blocks (run inside ``kernels()``, e.g. one SDPA
    backend allowed), and dense causal attention over the whole sequence's
    last ``n`` rows (the reference), as float32 on the CPU."""
    import torch
    import torch.nn.functional as F

    from parrot.backends.attention import paged_prefill_attention

    g = torch.Generator().manual_seed(seed)
    total = past + n
    q = torch.randn(total, q_heads, dim, generator=g)
    k = torch.randn(total, kv_heads, dim, generator=g)
    v = torch.randn(total, kv_heads, dim, generator=g)
    num_blocks = -(-total // block_size) + 3
    blocks = torch.randperm(num_blocks, generator=g)[: -(-total // block_size)]
    key_cache = torch.zeros(num_blocks, block_size, kv_heads, dim)
    value_cache = torch.zeros_like(key_cache)
    slots = blocks.repeat_interleave(block_size)[:total] * block_size + torch.arange(total) % block_size
    key_cache.view(-1, kv_heads, dim)[slots] = k
    value_cache.view(-1, kv_heads, dim)[slots] = v
    put = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    with kernels():
        got = paged_prefill_attention(put(q[past:]), put(k[past:]), put(v[past:]), put(key_cache),
                                      put(value_cache), blocks.to(device), past, 1 / dim ** 0.5)
    group = q_heads // kv_heads
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1), v.repeat_interleave(group, 1).transpose(0, 1),
        is_causal=True, scale=1 / dim ** 0.5,
    ).transpose(0, 1)[past:]
    return got.float().cpu(), ref

