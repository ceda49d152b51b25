"""What running an engine as a Ray actor costs, against the same engine in-process.

    python -m benchmarks.ray_overhead [--calls 40] [--max-tokens 1 8] [--repeats 3] [--json PATH]

The contender is a :class:`RayEngine` (the engine in an actor on a local Ray
cluster, events streamed back through a Ray streaming generator); the
baseline is a :class:`TorchEngine` on the same model in this process, with
the same number of torch threads as the actor has CPUs. Both serve the same
one-call programs one at a time (the per-call cost, not throughput),
alternating A B / B A every round after a warm-up. Figures: the median
seconds per call of each, their ratio (Ray over in-process) and difference
(the added cost per call); the median of a bare actor ping; and the one-off
set-up costs: ``ray.init`` and an actor's start until its engine is loaded,
next to loading the engine in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any, Sequence

from benchmarks.harness import describe_context, progress, resolve_model, write_json

PROMPT = "Q: Name a colour.\nA:"


async def _one_call(engine: Any, max_tokens: int) -> float:
    from parrot.backends.engine import Fill, Gen, GenerationRequest
    from parrot.semantic_vars import SamplingConfig

    request = GenerationRequest([Fill(tuple(engine.tokenizer.encode(PROMPT, add_bos=True))),
                                 Gen(SamplingConfig(max_tokens=max_tokens))])
    t0 = time.perf_counter()
    results, _ = await engine.submit(request).results()
    assert results, "no output"
    return time.perf_counter() - t0


async def _calls(engine: Any, n: int, max_tokens: int) -> list[float]:
    return [await _one_call(engine, max_tokens) for _ in range(n)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=40, help="sequential calls per round and path (default 40)")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1, 8], help="generated tokens per call")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--actor-cpus", type=int, default=1, help="CPUs (torch threads) of the actor and the baseline")
    parser.add_argument("--model", help="local HF folder (default: the embedded tiny test model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    from parrot.backends.ray_engine import start_engines
    from parrot.backends.spec import EngineSpec
    from parrot.backends.torch_engine import TorchEngine

    torch.set_num_threads(args.actor_cpus)  # the actor gets OMP_NUM_THREADS = its CPUs from Ray
    model_path, weights = resolve_model(args)
    t0 = time.perf_counter()
    local = TorchEngine.from_pretrained(model_path, device=args.device, name="in-process")
    load_in_process_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.init(num_cpus=args.actor_cpus + 1, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    [remote] = start_engines([EngineSpec(name="actor", model=str(model_path), device=args.device)],
                             num_cpus=args.actor_cpus)
    actor_start_s = time.perf_counter() - t0
    progress(f"ray.init {ray_init_s:.1f} s, actor start {actor_start_s:.1f} s, in-process load {load_in_process_s:.1f} s")
    rows: list[dict[str, Any]] = []

    async def measure() -> float:
        for engine in (local, remote):  # warm-up of both paths
            await _calls(engine, 3, max(args.max_tokens))
        pings = []
        for _ in range(max(20, args.calls)):
            t = time.perf_counter()
            await remote.actor.ping.remote()
            pings.append(time.perf_counter() - t)
        for max_tokens in args.max_tokens:
            times: dict[str, list[float]] = {"in_process": [], "ray": []}
            for rep in range(args.repeats):
                order = [("in_process", local), ("ray", remote)]
                for name, engine in order if rep % 2 == 0 else order[::-1]:
                    progress(f"max_tokens={max_tokens} {name} round {rep + 1}/{args.repeats}")
                    times[name] += await _calls(engine, args.calls, max_tokens)
            base, ray_s = statistics.median(times["in_process"]), statistics.median(times["ray"])
            rows.append({"max_tokens": max_tokens, "calls": len(times["ray"]),
                         "in_process_ms": 1000 * base, "ray_ms": 1000 * ray_s,
                         "ratio_ray_over_in_process": ray_s / base, "added_ms_per_call": 1000 * (ray_s - base)})
        return statistics.median(pings)

    try:
        ping_s = asyncio.run(measure())
    finally:
        remote.close()
        ray.shutdown()
        local.close()
    print(f"set-up: ray.init {ray_init_s:.2f} s; actor start (engine loaded) {actor_start_s:.2f} s; "
          f"in-process engine load {load_in_process_s:.2f} s; actor ping {1000 * ping_s:.2f} ms")
    print(f"{'max_tokens':>10} {'calls':>6} {'in-process':>11} {'ray actor':>10} {'ratio':>7} {'added/call':>11}")
    for r in rows:
        print(f"{r['max_tokens']:>10} {r['calls']:>6} {r['in_process_ms']:>9.2f}ms {r['ray_ms']:>8.2f}ms "
              f"{r['ratio_ray_over_in_process']:>6.2f}x {r['added_ms_per_call']:>9.2f}ms")
    if args.json:
        write_json(args.json, {
            "benchmark": "ray_overhead", "rows": rows,
            "setup_s": {"ray_init": ray_init_s, "actor_start": actor_start_s, "in_process_load": load_in_process_s},
            "actor_ping_ms": 1000 * ping_s,
            "context": describe_context([local], model_path=model_path, weights=weights,
                                        extra={"ray": ray.__version__, "actor_cpus": args.actor_cpus}),
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
