"""The torch engine against the hardware limit and against transformers.

Figures (../shared/BENCHMARKS.md, "engine" row), on one model built in
memory with seeded random bf16 weights (speed does not depend on values):

* decode at batch 1, 8 and 64: seconds per step, and the bytes a step must
  read (weights + the KV of every context) over the measured device copy
  bandwidth (MBU: 100 % is the memory limit);
* prefill of one 8K-token prompt: FLOP/s over the peak dense bf16 rate (MFU);
* time to first token of a request whose 4K-token prefix is cached (prefix
  hint hit) against the same engine with the prefix cache off;
* end-to-end generation throughput against ``transformers`` ``generate()``
  on the same weights, same device, side by side.

    python -m benchmarks.engine [--shape llama3-8b] [--json PATH] [--quick]

EOS is disabled (every request generates exactly its ``max_tokens``), so
random weights cannot end a request early.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import time
from typing import Any, Iterator

import torch

from benchmarks.random_model import SEED, shape_config
from parrot.backends import Fill, Gen, GenerationRequest, PrefixHint
from parrot.backends.model import LlamaFamilyModel, ModelConfig
from parrot.backends.tokenizer import Tokenizer
from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig
from parrot.semantic_vars import SamplingConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device name fragment.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_models(shape: str, device: torch.device, with_hf: bool) -> tuple[LlamaFamilyModel, Any, dict[str, Any]]:
    """Our model and (optionally) transformers' on the same random weights."""
    hf_config = shape_config(shape)
    ours = LlamaFamilyModel(ModelConfig.from_hf_dict(hf_config), dtype=torch.bfloat16, device=device)
    torch.manual_seed(SEED)
    if with_hf:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**{k: v for k, v in hf_config.items() if k not in ("torch_dtype", "dtype", "architectures")})
        with torch.device(device):
            hf = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        ours.load_state_dict_hf(hf.state_dict())
        return ours, hf, hf_config
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return ours, None, hf_config


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = 1 << 30 if device.type == "cuda" else 1 << 26
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync()
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t)
    return 2 * n / min(times[1:])


@contextlib.contextmanager
def bench_engine(model: LlamaFamilyModel, tok: Any, **config: Any) -> Iterator[TorchEngine]:
    """A torch engine over the shared model, closed on exit and its GPU
    memory (KV pool, graphs) handed back before the next one starts."""
    engine = TorchEngine(model, tok, config=TorchEngineConfig(**config))
    try:
        yield engine
    finally:
        engine.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_all(engine: TorchEngine, requests: list[GenerationRequest]) -> tuple[float, list[Any]]:
    """Submit together, wait for all; wall seconds and each request's stats."""

    async def main():
        streams = [engine.submit(r) for r in requests]
        return await asyncio.gather(*(s.results() for s in streams))

    t = time.perf_counter()
    out = asyncio.run(main())
    return time.perf_counter() - t, [stats for _, stats in out]


def prompt(rng: torch.Generator, n: int) -> tuple[int, ...]:
    return tuple(torch.randint(3, 4000, (n,), generator=rng).tolist())


def request(ids: tuple[int, ...], max_tokens: int, hint: PrefixHint | None = None) -> GenerationRequest:
    return GenerationRequest([Fill(ids), Gen(SamplingConfig(max_tokens=max_tokens))], prefix_hint=hint)


def bench_decode(model, tok, cfg: dict[str, Any], bw: float, batches: list[int], prompt_len: int, gen: int) -> list[dict]:
    """Seconds per decode step from (full run - prefill-only run) / (gen - 1)."""
    rows = []
    c = model.config
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "embed_weight")
    if c.tie_word_embeddings:
        weight_bytes += model.embed_weight.numel() * model.embed_weight.element_size()
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2
    rng = torch.Generator().manual_seed(1)
    for b in batches:
        with bench_engine(model, tok, max_running=max(b, 1), max_step_tokens=max(8192, b), prefix_cache=False,
                          **cfg) as engine:
            prompts = [prompt(rng, prompt_len) for _ in range(b)]
            run_all(engine, [request(p, 4) for p in prompts])  # warm-up
            prefill_s = min(run_all(engine, [request(p, 1) for p in prompts])[0] for _ in range(2))
            full_s = min(run_all(engine, [request(p, gen) for p in prompts])[0] for _ in range(2))
        step = (full_s - prefill_s) / (gen - 1)
        mean_ctx = prompt_len + gen / 2
        step_bytes = weight_bytes + b * mean_ctx * kv_per_token
        rows.append({
            "batch": b, "prompt_tokens": prompt_len, "new_tokens": gen, "step_ms": step * 1e3,
            "tokens_per_s": b / step, "bytes_per_step": step_bytes, "mbu": step_bytes / step / bw,
            "floor_ms": step_bytes / bw * 1e3,
        })
        say(f"decode batch {b}: {step * 1e3:.2f} ms/step ({rows[-1]['mbu']:.1%} of copy bandwidth, "
            f"floor {rows[-1]['floor_ms']:.2f} ms)")
    return rows


def bench_prefill(model, tok, cfg: dict[str, Any], n: int, peak: float | None) -> dict:
    c = model.config
    params = sum(p.numel() for name, p in model.named_parameters() if name not in ("embed_weight", "lm_head_weight"))
    flops = 2 * n * params + 2 * c.num_layers * c.num_heads * c.head_dim * n * n  # causal attention: half of 4*T^2*H*D
    engine = TorchEngine(model, tok, config=TorchEngineConfig(max_running=1, max_step_tokens=n, prefix_cache=False, **cfg))
    rng = torch.Generator().manual_seed(2)
    try:
        run_all(engine, [request(prompt(rng, n), 1)])
        times = [run_all(engine, [request(prompt(rng, n), 1)])[0] for _ in range(3)]
    finally:
        engine.close()
    t = min(times)
    row = {"tokens": n, "seconds": t, "tflops": flops / t / 1e12, "mfu": (flops / t / peak) if peak else None}
    say(f"prefill {n} tokens: {t * 1e3:.1f} ms, {row['tflops']:.0f} TFLOP/s"
        + (f" ({row['mfu']:.1%} of peak)" if peak else ""))
    return row


def bench_ttft(model, tok, cfg: dict[str, Any], prefix_len: int, suffix_len: int, repeats: int) -> dict:
    """Time to first token with the 4K prefix cached (hint hit) vs cache off."""
    rng = torch.Generator().manual_seed(3)
    prefix = prompt(rng, prefix_len)
    suffixes = [prompt(rng, suffix_len) for _ in range(repeats + 1)]
    out: dict[str, Any] = {"prefix_tokens": prefix_len, "suffix_tokens": suffix_len}
    for label, cache in (("cached", True), ("cache_off", False)):
        engine = TorchEngine(model, tok, config=TorchEngineConfig(
            max_running=4, max_step_tokens=prefix_len + suffix_len, prefix_cache=cache, **cfg))
        try:
            hint = PrefixHint("bench-prefix", prefix_len)
            run_all(engine, [request(prefix + suffixes[0], 1, hint)])  # warm-up; fills the cache
            ttfts = []
            phases: dict[str, float] = {}
            _time_phases(engine, phases)
            for s in suffixes[1:]:
                _, [stats] = run_all(engine, [request(prefix + s, 1, hint)])
                ttfts.append(stats.first_token_at - stats.submitted_at)
                if cache:
                    assert stats.cached_tokens == prefix_len, stats
            out[f"{label}_ttft_ms"] = statistics.median(ttfts) * 1e3
            out[f"{label}_phases_ms"] = {k: v / len(ttfts) * 1e3 for k, v in phases.items()}  # mean, not median
            say(f"  {label}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in out[f"{label}_phases_ms"].items()))
        finally:
            engine.close()
    out["speedup"] = out["cache_off_ttft_ms"] / out["cached_ttft_ms"]
    say(f"TTFT with a cached {prefix_len}-token prefix: {out['cached_ttft_ms']:.1f} ms vs "
        f"{out['cache_off_ttft_ms']:.1f} ms cache off ({out['speedup']:.1f}x)")
    return out


def bench_cascade(model, tok, cfg: dict[str, Any], n: int, prefix_len: int, suffix_len: int, gen: int) -> dict:
    """Decode step time of ``n`` sequences after one shared (hinted, cached)
    prefix: cascade decode (the prefix read once per step) vs the paged path
    (read once per sequence, inside CUDA graphs), side by side."""
    rng = torch.Generator().manual_seed(4)
    prefix = prompt(rng, prefix_len)
    suffixes = [prompt(rng, suffix_len) for _ in range(n)]
    hint = PrefixHint("bench-shared", prefix_len)
    out: dict[str, Any] = {"sequences": n, "prefix_tokens": prefix_len, "suffix_tokens": suffix_len, "new_tokens": gen}
    for label, cascade in (("cascade", True), ("paged", False)):  # explicit: the default is on for CUDA
        with bench_engine(model, tok, max_running=n, max_step_tokens=max(8192, n * (suffix_len + 1)),
                          cascade_decode=cascade, **cfg) as engine:
            reqs = lambda tokens: [request(prefix + s, tokens, hint) for s in suffixes]  # noqa: E731
            run_all(engine, reqs(4))  # warm-up: caches the prefix, captures graphs
            prefill_s = min(run_all(engine, reqs(1))[0] for _ in range(2))
            full_s = min(run_all(engine, reqs(gen))[0] for _ in range(2))
            out[f"{label}_step_ms"] = (full_s - prefill_s) / (gen - 1) * 1e3
            out[f"{label}_cascade_steps"] = engine.counters.cascade_steps
            # Where a step goes: host phases of one more run (minus a prefill-only run), and the
            # captured graph's GPU time alone.
            phases: dict[str, float] = {}
            _time_phases(engine, phases)
            run_all(engine, reqs(gen))
            full = dict(phases)
            phases.clear()
            run_all(engine, reqs(1))
            out[f"{label}_host_ms_per_step"] = {k: (full[k] - phases.get(k, 0.0)) / (gen - 1) * 1e3 for k in full}
            context = prefix_len + suffix_len + gen // 2
            out[f"{label}_graph_replay_ms"] = _graph_replay_ms(
                engine, n, context, shared_blocks=prefix_len // engine.config.block_size if cascade else 0)
    out["speedup"] = out["paged_step_ms"] / out["cascade_step_ms"]
    say(f"decode of {n} sequences after a shared {prefix_len}-token prefix: cascade {out['cascade_step_ms']:.2f} ms/step"
        f" vs paged {out['paged_step_ms']:.2f} ms ({out['speedup']:.2f}x); graph alone "
        f"{out['cascade_graph_replay_ms'] or 0:.2f} vs {out['paged_graph_replay_ms'] or 0:.2f} ms; host per step "
        + ", ".join(f"{k} {v:.2f}" for k, v in out["cascade_host_ms_per_step"].items()))
    return out


def bench_priority(model, tok, cfg: dict[str, Any], batch: int, waiting: int, prompt_len: int, gen: int,
                   probe_len: int) -> dict:
    """TTFT of a latency-critical request arriving while ``batch`` throughput
    requests decode and ``waiting`` more queue: priorities on (the requests
    carry their objectives) vs off (no objective anywhere: arrival order),
    in one engine each, side by side."""
    rng = torch.Generator().manual_seed(7)
    background = [prompt(rng, prompt_len) for _ in range(batch + waiting)]
    probe_ids = prompt(rng, probe_len)
    out: dict[str, Any] = {"running": batch, "waiting": waiting, "prompt_tokens": prompt_len, "new_tokens": gen,
                           "probe_prompt_tokens": probe_len}
    for label, on in (("priorities_on", True), ("priorities_off", False)):
        with bench_engine(model, tok, max_running=batch, **cfg) as engine:
            run_all(engine, [request(prompt(rng, 64), 8) for _ in range(4)])  # warm-up

            async def main() -> tuple[float, float]:
                reqs = [request(ids, gen) for ids in background]
                for r in reqs:
                    r.objective = "throughput" if on else None
                streams = [engine.submit(r) for r in reqs]
                while engine.counters.decode_tokens < batch * 8:  # the batch is decoding (polled, not slept on)
                    await asyncio.sleep(0.005)
                probe = request(probe_ids, 4)
                probe.objective = "latency" if on else None
                t = time.monotonic()
                first = await engine.submit(probe).results()
                ttft = first[1].first_token_at - t
                await asyncio.gather(*(s.results() for s in streams))
                return ttft, first[1].finished_at - t

            ttft, total = asyncio.run(main())
            out[f"{label}_ttft_ms"] = ttft * 1e3
            out[f"{label}_probe_total_ms"] = total * 1e3
    out["ttft_ratio_off_over_on"] = out["priorities_off_ttft_ms"] / out["priorities_on_ttft_ms"]
    say(f"latency-critical request under {batch} running + {waiting} waiting throughput requests: TTFT "
        f"{out['priorities_on_ttft_ms']:.0f} ms with priorities vs {out['priorities_off_ttft_ms']:.0f} ms without "
        f"({out['ttft_ratio_off_over_on']:.1f}x)")
    return out


_KERNEL_KINDS = (
    ("attention", ("paged_partial", "_merge_kernel", "flash", "fmha", "attention")),
    ("layer ops", ("add_rms_norm", "rotary", "silu_mul")),
    ("gemm", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "cublas", "xmma", "splitk")),
    ("copy", ("memcpy", "memset", "copy", "index")),
)


def _kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in _KERNEL_KINDS if any(k in low for k in keys)), "other elementwise")


def _kernel_times(prof) -> tuple[dict[str, float], int, dict[str, tuple[float, int]]]:
    """GPU ms by kind, the kernel count, and ms/count per kernel name of one profile."""
    kinds: dict[str, float] = {}
    names: dict[str, tuple[float, int]] = {}
    count = 0
    for ev in prof.key_averages():
        # key_averages mixes CPU ops (whose device time is their kernels') with the kernels; keep kernels.
        if getattr(ev.device_type, "name", "") != "CUDA":
            continue
        ms = ev.device_time_total / 1e3
        kinds[_kernel_kind(ev.key)] = kinds.get(_kernel_kind(ev.key), 0.0) + ms
        names[ev.key[:90]] = (ms, ev.count)
        count += ev.count
    return kinds, count, names


@torch.inference_mode()  # the graphs' buffers are inference tensors
def _graph_replay_ms(engine: TorchEngine, batch: int, context: int, shared_blocks: int = 0) -> float | None:
    """GPU time of one captured decode forward (CUDA events over back-to-back
    replays, no host work between them): the step's floor in this engine.
    ``shared_blocks``: every row's table starts with the same blocks, read
    once per step (a cascade graph)."""
    graphs = engine.runner.graphs
    if graphs is None or not graphs.accepts(batch):
        return None
    bs = engine.config.block_size
    scratch = graphs.scratch_block
    blocks = -(-context // bs)
    total = engine.kv.blocks.num_blocks
    tables = [[j if j < shared_blocks else (i * blocks + j) % total for j in range(blocks)] for i in range(batch)]
    groups = [(list(range(batch)), shared_blocks)] if shared_blocks else None
    args = ([0] * batch, [context - 1] * batch, [scratch * bs] * batch, [context] * batch, tables, groups)
    graphs.run(*args)  # captures the bucket if the run did not
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graphs.run(*args)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 20


def _time_phases(engine: TorchEngine, phases: dict[str, float]) -> None:
    """Add the seconds spent in each engine phase to ``phases`` (wraps the
    engine's scheduler, runner and KV manager methods; benchmark only)."""

    def timed(obj, attr: str, label: str) -> None:
        fn = getattr(obj, attr)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t

        setattr(obj, attr, wrapper)

    timed(engine.scheduler, "plan", "plan")
    timed(engine.runner, "forward", "forward: host work and launches")
    timed(engine.runner, "sample", "sample: waits for the GPU, then host")
    timed(engine.kv, "after_forward", "kv after_forward")


def bench_profile(model, tok, cfg: dict[str, Any], batches: list[int], prompt_len: int, gen: int) -> list[dict]:
    """Where a decode step's time goes, decode steps only (a prefill-only run
    is subtracted): host phases (timed around the engine's scheduler, runner
    and KV manager calls, no profiler), GPU kernels by kind (torch.profiler,
    a separate pair of runs), and the GPU time of the captured graph alone."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    rng = torch.Generator().manual_seed(5)
    for b in batches:
        engine = TorchEngine(model, tok, config=TorchEngineConfig(
            max_running=b, max_step_tokens=max(8192, b), prefix_cache=False, **cfg))
        phases: dict[str, float] = {}
        def measured(tokens: int, profiled: bool):
            phases.clear()
            steps0 = engine.counters.steps
            reqs = [request(p, tokens) for p in prompts]
            if profiled:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    wall, _ = run_all(engine, reqs)
                return wall, dict(phases), engine.counters.steps - steps0, _kernel_times(prof)
            wall, _ = run_all(engine, reqs)
            return wall, dict(phases), engine.counters.steps - steps0, None

        try:
            prompts = [prompt(rng, prompt_len) for _ in range(b)]
            run_all(engine, [request(p, 4) for p in prompts])  # warm-up: graphs captured
            _time_phases(engine, phases)
            base = measured(1, False)
            full = measured(gen, False)
            base_p = measured(1, True)
            full_p = measured(gen, True)
            replay_ms = _graph_replay_ms(engine, b, prompt_len + gen // 2)
        finally:
            engine.close()
            del engine
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        steps = full[2] - base[2]
        wall_ms = (full[0] - base[0]) / steps * 1e3
        host = {k: (full[1].get(k, 0.0) - base[1].get(k, 0.0)) / steps * 1e3 for k in full[1]}
        host["engine loop, rest"] = wall_ms - sum(host.values())
        (kf, cf, nf), (kb, cb, nb) = full_p[3], base_p[3]
        psteps = full_p[2] - base_p[2]
        kinds = {k: (kf[k] - kb.get(k, 0.0)) / psteps for k in kf}
        top = sorted(((ms - nb.get(n, (0.0, 0))[0]) / psteps, n, (c - nb.get(n, (0.0, 0))[1]) / psteps)
                     for n, (ms, c) in nf.items())[::-1][:15]
        row = {
            "batch": b, "decode_steps": steps, "step_ms": wall_ms, "graph_replay_gpu_ms": replay_ms,
            "host_ms_per_step": host, "gpu_ms_per_step_profiled": kinds,
            "kernels_per_step": (cf - cb) / psteps,
            "top_kernels": [{"name": n, "ms_per_step": ms, "per_step": c} for ms, n, c in top],
        }
        rows.append(row)
        say(f"profile batch {b}: {wall_ms:.2f} ms/step; graph replay alone {replay_ms or float('nan'):.2f} ms GPU;"
            f" {row['kernels_per_step']:.0f} kernels/step; GPU "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
            + " | host " + ", ".join(f"{k} {v:.2f}" for k, v in host.items()))
    return rows


def bench_vs_hf(model, hf, tok, cfg: dict[str, Any], batches: list[int], prompt_len: int, gen: int) -> list[dict]:
    rows = []
    rng = torch.Generator().manual_seed(4)
    for b in batches:
        prompts = [prompt(rng, prompt_len) for _ in range(b)]
        engine = TorchEngine(model, tok, config=TorchEngineConfig(
            max_running=b, max_step_tokens=max(8192, b), prefix_cache=False, **cfg))
        try:
            run_all(engine, [request(p, 4) for p in prompts])
            ours = min(run_all(engine, [request(p, gen) for p in prompts])[0] for _ in range(2))
        finally:
            engine.close()
        ids = torch.tensor(prompts, device=model.embed_weight.device)
        mask = torch.ones_like(ids)

        def generate(n: int) -> float:
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)
            sync()
            return time.perf_counter() - t

        generate(4)
        theirs = min(generate(gen) for _ in range(2))
        rows.append({
            "batch": b, "prompt_tokens": prompt_len, "new_tokens": gen,
            "parrot_tokens_per_s": b * gen / ours, "hf_tokens_per_s": b * gen / theirs, "ratio": theirs / ours,
        })
        say(f"generate batch {b}: parrot {b * gen / ours:.0f} tok/s, transformers {b * gen / theirs:.0f} tok/s "
            f"({theirs / ours:.2f}x)")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", help="llama3-8b | llama3.2-1b | tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kv-gib", type=float, default=12.0, help="KV pool of each engine")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU smoke run)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--parts", default="decode,prefill,ttft,cascade,hf",
                        help="comma-separated: decode, prefill, ttft, cascade, priority, hf, profile")
    parser.add_argument("--compare-layer-ops", action="store_true",
                        help="also run decode, prefill and ttft with the torch twins of the fused layer ops"
                             " (PARROT_LAYER_OPS=torch), side by side")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - {"decode", "prefill", "ttft", "cascade", "priority", "hf", "profile"}
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}")
    device = torch.device(args.device)
    from parrot.backends.default_model import default_model_path

    model, hf, hf_config = build_models(args.shape, device, with_hf=not args.no_hf and "hf" in parts)
    tok = Tokenizer(default_model_path())
    tok.eos_token_ids = frozenset()  # random weights: never stop early
    cfg = {"kv_cache_bytes": int(args.kv_gib * 2**30), "max_model_len": min(16384, model.config.max_position_embeddings)}
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if device.type == "cuda" else None
    say(f"{name}: copy bandwidth {bw / 1e9:.0f} GB/s")
    q = args.quick
    result: dict[str, Any] = {
        "benchmark": "engine", "device": name, "torch": torch.__version__, "shape": args.shape,
        "weights": f"random bf16 (seed {SEED})", "copy_bandwidth_gbs": bw / 1e9, "peak_bf16_tflops": peak and peak / 1e12,
        "model_config": {k: hf_config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "num_key_value_heads", "vocab_size")},
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    from parrot.kernels import layer_ops

    for backend in ("auto", "torch") if args.compare_layer_ops else (layer_ops.LAYER_OPS_BACKEND,):
        layer_ops.LAYER_OPS_BACKEND = backend  # read at each call: a new engine captures new graphs
        suffix = "" if backend == "auto" else "_torch_layer_ops"
        if backend != "auto":
            say("-- with the torch twins of the layer ops")
        if "decode" in parts:
            result["decode" + suffix] = bench_decode(model, tok, cfg, bw, [1, 8] if q else [1, 8, 64],
                                                     64 if q else 512, 8 if q else 64)
        if "prefill" in parts:
            result["prefill" + suffix] = bench_prefill(model, tok, cfg, 256 if q else 8192, peak)
        if "ttft" in parts:
            result["ttft_prefix_cache" + suffix] = bench_ttft(model, tok, cfg, 256 if q else 4096, 32, 2 if q else 5)
        if "profile" in parts:
            result["profile" + suffix] = bench_profile(model, tok, cfg, [1, 8] if q else [1, 8, 64],
                                                       64 if q else 512, 8 if q else 32)
    layer_ops.LAYER_OPS_BACKEND = "auto"
    if "cascade" in parts:
        result["cascade_decode"] = bench_cascade(model, tok, cfg, 4 if q else 64, 256 if q else 4096, 16,
                                                 8 if q else 32)
        if not q:  # small groups and short prefixes: what turning it on by default costs there
            result["cascade_decode_small"] = [bench_cascade(model, tok, cfg, n, prefix, 16, 32)
                                              for n, prefix in ((2, 256), (8, 512), (64, 512), (16, 4096))]
    if "priority" in parts:
        result["priority_ttft"] = bench_priority(model, tok, cfg, 8 if q else 64, 4 if q else 64, 64 if q else 1024,
                                                 16 if q else 256, 32 if q else 512)
    if hf is not None:
        result["vs_transformers"] = bench_vs_hf(model, hf, tok, cfg, [1, 8] if q else [1, 8, 64], 32 if q else 512,
                                                8 if q else 128)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
