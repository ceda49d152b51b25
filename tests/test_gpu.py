"""GPU checks of the torch engine (run on a CUDA machine with `pytest -m gpu`)."""

from __future__ import annotations

import asyncio

import pytest
import torch

import parrot as P
from parrot import workflows
from parrot.backends import Fill, Gen, GenerationRequest, PrefixHint
from parrot.backends.checkpoint import load_model
from parrot.backends.kv_cache import AttentionBatch, SequenceKV, SequenceSlice
from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig
from parrot.dataflow import LocalRuntime
from parrot.semantic_vars import SamplingConfig

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def prefill_logits(model, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    cfg = model.config
    kv = SequenceKV(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=next(model.parameters()).dtype, device=device)
    kv.reserve(len(ids))
    batch = AttentionBatch([SequenceSlice(kv, 0, len(ids))])
    with torch.inference_mode():
        hidden = model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device), batch)
        return model.compute_logits(hidden).float().cpu()


@needs_cuda
def test_bf16_cuda_forward_matches_fp32_cpu(tiny_llama_dir):
    cpu = load_model(tiny_llama_dir, device="cpu")
    gpu = load_model(tiny_llama_dir, device="cuda")
    assert next(gpu.parameters()).dtype == torch.bfloat16
    ids = list(range(5, 300, 7))
    ref, got = prefill_logits(cpu, ids), prefill_logits(gpu, ids)
    scale = ref.abs().max()
    assert (got - ref).abs().max() / scale < 0.05
    # bf16 rounding may swap near-ties, but nearly every argmax agrees.
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@needs_cuda
def test_engine_serves_a_workflow_on_cuda(default_model_dir):
    engine = TorchEngine.from_pretrained(default_model_dir, device="cuda", name="cuda-0")
    runtime = LocalRuntime([engine])
    try:
        with P.Session(runtime) as s:
            partial, merged = workflows.map_reduce_summary(["one", "two", "three", "four"])
            assert isinstance(merged.get(), str)
        assert all(c.state == "done" for c in runtime.graph.session_calls(s.id))
        assert engine.device.type == "cuda"

        async def batch():
            tok = engine.tokenizer
            streams = [
                engine.submit(GenerationRequest([Fill(tuple(tok.encode(f"prompt {i}", add_bos=True))), Gen(SamplingConfig(max_tokens=16, temperature=0.8, seed=i))]))
                for i in range(8)
            ]
            return [await st.results() for st in streams]

        results = asyncio.run(batch())
        assert len(results) == 8 and all(r[0][0].finish_reason in ("length", "eos") for r in results)
    finally:
        runtime.portal.call(runtime.shutdown())


def _run(engine, requests):
    async def main():
        streams = [engine.submit(r) for r in requests]
        return await asyncio.gather(*(s.results() for s in streams))

    return asyncio.run(main())


@needs_cuda
def test_paged_engine_on_cuda_shares_prefixes_and_preempts_with_the_same_outputs(tiny_llama_dir):
    """float32 on the GPU: the cache, sharing, preemption and CUDA graphs
    (against an eager engine) must not change a token."""
    base = TorchEngine.from_pretrained(tiny_llama_dir, device="cuda", dtype=torch.float32,
                                       config=TorchEngineConfig(prefix_cache=False, cuda_graph_max_batch=0))
    cfg = base.model.config
    per_block = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * 16
    small = TorchEngine.from_pretrained(
        tiny_llama_dir, device="cuda", dtype=torch.float32,
        config=TorchEngineConfig(max_model_len=128, kv_cache_bytes=per_block * 12, max_step_tokens=32),
    )
    try:
        prefix = tuple(range(5, 75))
        requests = lambda: [  # noqa: E731
            GenerationRequest([Fill(prefix), Fill((100 + i, 7)), Gen(SamplingConfig(max_tokens=40))],
                              prefix_hint=PrefixHint("sys", len(prefix)))
            for i in range(6)
        ]
        want = [r[0][0].token_ids for r in _run(base, requests())]
        got = [r[0][0].token_ids for r in _run(small, requests())]
        assert got == want
        assert small.counters.prefix_hits == 5 and small.counters.preemptions > 0
        assert small._graphs is not None and small._graphs.num_graphs > 0 and base._graphs is None
        again = _run(small, requests()[:2])
        assert [r[0][0].token_ids for r in again] == want[:2]
        assert max(stats.cached_tokens for _, stats in again) == len(prefix)
        small.prefix_cache.evict(0)
        assert small.block_manager.num_free == small.block_manager.num_blocks - small.reserved_blocks
    finally:
        base.close()
        small.close()
