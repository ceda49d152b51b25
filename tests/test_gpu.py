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
        # The short suffixes after the shared prefix prefilled inside the graphs.
        assert small.counters.graph_prefill_steps > 0 and base.counters.graph_prefill_steps == 0
        assert small.runner.graphs is not None and small.runner.graphs.num_graphs > 0 and base.runner.graphs is None
        again = _run(small, requests()[:2])
        assert [r[0][0].token_ids for r in again] == want[:2]
        assert max(stats.cached_tokens for _, stats in again) == len(prefix)
        small.prefix_cache.evict(0)
        assert small.block_manager.num_free == small.block_manager.num_blocks - small.reserved_blocks
    finally:
        base.close()
        small.close()


@needs_cuda
def test_triton_decode_and_sparse_prefill_in_the_bf16_engine(tiny_llama_dir, monkeypatch):
    """The engine's decode through parrot.kernels (Triton, inside CUDA graphs)
    gives the torch path's tokens; a long prompt takes the sparse prefill path."""
    from parrot.backends import attention
    from parrot.kernels import HeadPattern, SparseAttentionConfig

    assert attention._TRITON, "triton should be importable on the GPU machine"
    requests = lambda: [  # noqa: E731
        GenerationRequest([Fill(tuple(range(5 + i, 200 + i))), Gen(SamplingConfig(max_tokens=24))]) for i in range(4)
    ]
    triton_engine = TorchEngine.from_pretrained(tiny_llama_dir, device="cuda")
    try:
        got = [r[0][0].token_ids for r in _run(triton_engine, requests())]
        assert triton_engine.runner.graphs is not None and triton_engine.runner.graphs.num_graphs > 0
    finally:
        triton_engine.close()
    monkeypatch.setattr(attention, "_TRITON", False)
    torch_engine = TorchEngine.from_pretrained(tiny_llama_dir, device="cuda")
    try:
        want = [r[0][0].token_ids for r in _run(torch_engine, requests())]
    finally:
        torch_engine.close()
    monkeypatch.undo()
    # Token 1 comes from prefill, token 2 from the first decode step through
    # each kernel over the same cache. Later tokens may part ways: with random
    # weights the logits are nearly flat, and bf16 rounding differences between
    # the kernels flip near-ties (their numerical agreement is checked on
    # equal inputs in tests/test_kernels_gpu.py).
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert all(len(g) == 24 for g in got)

    c = load_model(tiny_llama_dir, device="cpu").config
    dense = HeadPattern.from_dict({"kind": "dense"})
    config = SparseAttentionConfig(layers=[(dense,) * c.num_heads] * c.num_layers, min_length=128)
    sparse = TorchEngine.from_pretrained(tiny_llama_dir, device="cuda",
                                         config=TorchEngineConfig(max_step_tokens=64, sparse_prefill=config))
    try:
        (result,) = _run(sparse, requests()[:1])
        assert len(result[0][0].token_ids) == 24
        assert sparse.counters.steps == 24  # one prefill step, then 23 decode steps
    finally:
        sparse.close()


@needs_cuda
def test_cascade_decode_on_cuda(tiny_llama_dir):
    """Sequences sharing a hinted prefix decode through the Triton
    shared-prefix kernel (bf16, inside CUDA graphs) with the paged path's
    first decode tokens, and through the reference twin (float32, eager) with
    exactly its tokens."""
    prefix = tuple(range(5, 5 + 300))
    requests = lambda: [  # noqa: E731
        GenerationRequest([Fill(prefix + (400 + i, 9)), Gen(SamplingConfig(max_tokens=16))],
                          prefix_hint=PrefixHint("sys", len(prefix)))
        for i in range(8)
    ]
    for dtype in (torch.bfloat16, torch.float32):
        runs = {}
        for cascade in (True, False):
            engine = TorchEngine.from_pretrained(tiny_llama_dir, device="cuda", dtype=dtype, config=TorchEngineConfig(
                cascade_decode=cascade, cascade_min_prefix_tokens=64))
            try:
                runs[cascade] = [r[0][0].token_ids for r in _run(engine, requests())]
                assert (engine.counters.cascade_steps > 0) == cascade
                # bf16 cascade steps replay CUDA graphs (the Triton kernels have no host sync).
                assert (engine.runner.graphs.num_cascade_graphs > 0) == (cascade and dtype == torch.bfloat16)
            finally:
                engine.close()
        if dtype == torch.float32:
            assert runs[True] == runs[False]
        else:  # bf16 kernels may flip near-ties of random weights after the first decode step
            assert [g[:2] for g in runs[True]] == [w[:2] for w in runs[False]]
            assert all(len(g) == 16 for g in runs[True])


@needs_cuda
def test_cascade_graphs_with_two_groups_and_lone_rows(tiny_llama_dir):
    """Two prefix groups, a request sharing nothing and a padded batch in one
    captured cascade step: the first decode step's log-probabilities match
    eager cascade decode and plain paged decode (bf16, random weights: tokens
    may flip at near-ties, so the distributions are compared), and every
    request generates its whole output."""
    a, b = tuple(range(5, 5 + 160)), tuple(range(900, 900 + 160))
    sampling = SamplingConfig(max_tokens=12, logprobs=5)
    requests = lambda: [  # noqa: E731
        *[GenerationRequest([Fill(a + (400 + i, 9)), Gen(sampling)], prefix_hint=PrefixHint("a", len(a)))
          for i in range(3)],
        *[GenerationRequest([Fill(b + (500 + i, 9)), Gen(sampling)], prefix_hint=PrefixHint("b", len(b)))
          for i in range(3)],
        GenerationRequest([Fill(tuple(range(2000, 2100))), Gen(sampling)]),
    ]
    runs = {}
    for label, cascade, graphs in (("graphs", True, 64), ("eager", True, 0), ("paged", False, 64)):
        engine = TorchEngine.from_pretrained(tiny_llama_dir, device="cuda", config=TorchEngineConfig(
            cascade_decode=cascade, cascade_min_prefix_tokens=64, cuda_graph_max_batch=graphs))
        try:
            runs[label] = [r[0][0] for r in _run(engine, requests())]
            assert (engine.counters.cascade_steps > 0) == cascade
            if label == "graphs":
                assert engine.runner.graphs.num_cascade_graphs > 0
        finally:
            engine.close()
    assert all(len(g.token_ids) == 12 for g in runs["graphs"])
    for i, got in enumerate(runs["graphs"]):
        step = dict(got.logprobs[1].top)  # the first decode step's five best tokens
        for other in ("eager", "paged"):
            want = dict(runs[other][i].logprobs[1].top)
            assert runs[other][i].token_ids[0] == got.token_ids[0]  # prefill: the same path
            shared = step.keys() & want.keys()
            assert len(shared) >= 4, (i, other, step, want)
            assert max(abs(step[t] - want[t]) for t in shared) < 0.1, (i, other, step, want)


@needs_cuda
@pytest.mark.parametrize("past,n", [(16, 300), (3072, 200), (512, 512)])
def test_prefill_after_cached_positions_runs_on_flash_and_matches_dense(past, n):
    """On CUDA the prefill of new tokens after cached ones keeps SDPA's flash
    kernel (flash alone is allowed here, so a fallback would raise) and
    agrees with dense float32 causal attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from engine_runs import paged_prefill_case

    got, ref = paged_prefill_case("cuda", torch.bfloat16, past, n, kv_heads=8, q_heads=32, dim=128,
                                  kernels=lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))
    assert (got - ref).abs().max() / ref.abs().max() < 0.03


def _compiled_variants(kernel) -> int:
    """Binaries a Triton kernel holds in this process (every specialization compiled or loaded)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(entry) for entry in kernel.cache.values())


@needs_cuda
def test_a_started_engine_compiles_no_decode_kernel_while_serving(tiny_llama_dir):
    """The engine compiles the decode kernels' variants at start: batches of
    new sizes, widths and shared-prefix groups (eager and in CUDA graphs)
    then find every variant they launch already compiled."""
    from parrot.kernels import triton_decode as td

    engine = TorchEngine.from_pretrained(tiny_llama_dir, device="cuda", config=TorchEngineConfig(
        cascade_min_prefix_tokens=64))
    try:
        before = {k: _compiled_variants(k) for k in (td._paged_partial_kernel, td._merge_kernel)}
        assert all(before.values()), "the engine should have compiled the decode kernels at start"
        prefix = tuple(range(5, 5 + 128))  # the tiny model holds 512 positions
        for width in (1, 3, 9, 20, 40):
            requests = [
                GenerationRequest([Fill((prefix if i % 2 else ()) + tuple(range(150 + i, 150 + i + 3 * width + i % 5))),
                                   Gen(SamplingConfig(max_tokens=5 + i % 7, ignore_eos=True))],
                                  prefix_hint=PrefixHint("sys", len(prefix)) if i % 2 else None)
                for i in range(width)
            ]
            assert all(r[0][0].token_ids for r in _run(engine, requests))
        assert engine.counters.cascade_steps > 0
        after = {k: _compiled_variants(k) for k in before}
        assert after == before
    finally:
        engine.close()
