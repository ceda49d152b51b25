"""How much of the engine's speed reaches a client of `parrot serve`.

    python -m benchmarks.served_engine [--clients 1 4 16] [--prompt-tokens 64] [--output-tokens 16]
        [--model FOLDER | --random-model llama3-8b] [--device cuda] [--max-running N] [--json PATH]

At each concurrency C, C clients at once each send one `/v1/completions`
request (a distinct prompt of about ``--prompt-tokens`` tokens, greedy,
``--output-tokens`` tokens out) and wait for its answer. Three paths run the
same requests:

* ``engine``: the torch engine in the benchmark's process, the requests
  submitted to it directly (the baseline: no HTTP, no dataflow runtime);
* ``process``: `parrot serve` with the engine in its own process (the default);
* ``in_process``: `parrot serve --engine-in-process` (the engine's thread in
  the API process).

Figures per path and C: output tokens/s (all tokens over the wall time of
the burst), per-token latency (median over requests of request time / its
output tokens), request p50/p99, and each served path's tokens/s as a
fraction of the engine's. Outputs are compared with the engine's (greedy:
the same text on every path).

On CPU the paths take turns burst by burst (all open at once, so a machine
shared with other work slows each alike); on CUDA each path runs alone on
the device, one after the other (``--interleave`` / ``--no-interleave``).
The best of ``--repeats`` bursts is kept.

Defaults are CI-sized on CPU (1/4/16 clients, 64+16 tokens) and the
issue's shape on CUDA (1/16/64/256 clients, 512+128 tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
from typing import Any, Awaitable, Callable, Sequence

from benchmarks.harness import describe_context, progress, resolve_model, write_json
from benchmarks.http_service import ServerProcess, percentile

PATHS = ("engine", "process", "in_process")
WORDS = ("river stone parrot blue seven over under quickly green map light orchard engine harbor lantern "
         "winter copper meadow signal thunder velvet pocket island garden").split()


def make_prompts(tokenizer: Any, count: int, tokens: int, seed: int = 22) -> list[str]:
    """``count`` distinct prompts of about ``tokens`` tokens each (no shared prefix beyond BOS)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        words = [f"item{i}:"]
        while len(tokenizer.encode(" ".join(words))) < tokens:
            words.append(rng.choice(WORDS))
        prompts.append(" ".join(words))
    return prompts


def summarize(latencies: list[float], tokens: list[int], wall: float) -> dict[str, float]:
    per_token = [lat / n for lat, n in zip(latencies, tokens) if n]
    return {
        "tokens_per_s": sum(tokens) / wall,
        "ms_per_token_p50": 1000 * statistics.median(per_token),
        "request_p50_ms": 1000 * statistics.median(latencies),
        "request_p99_ms": 1000 * percentile(latencies, 0.99),
        "wall_s": wall,
        "output_tokens": sum(tokens),
    }


async def engine_burst(engine: Any, prompts: Sequence[str], output_tokens: int) -> tuple[dict[str, float], list[str]]:
    from parrot.backends.engine import Fill, Gen, GenerationRequest
    from parrot.semantic_vars import SamplingConfig

    sampling = SamplingConfig(max_tokens=output_tokens, temperature=0.0)
    requests = [GenerationRequest([Fill(tuple(engine.tokenizer.encode(p, add_bos=engine.tokenizer.prompt_bos))), Gen(sampling)])
                for p in prompts]

    async def one(request: Any) -> tuple[float, int, str]:
        t0 = time.perf_counter()
        results, _ = await engine.submit(request).results()
        return time.perf_counter() - t0, len(results[0].token_ids), results[0].text

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(r) for r in requests))
    wall = time.perf_counter() - t0
    return summarize([d[0] for d in done], [d[1] for d in done], wall), [d[2] for d in done]


async def http_burst(url: str, key: str, model: str, prompts: Sequence[str],
                     output_tokens: int) -> tuple[dict[str, float], list[str]]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                                 limits=limits) as client:
        async def one(prompt: str) -> tuple[float, int, str]:
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                           "max_tokens": output_tokens, "temperature": 0})
            r.raise_for_status()
            body = r.json()
            return time.perf_counter() - t0, body["usage"]["completion_tokens"], body["choices"][0]["text"]

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    return summarize([d[0] for d in done], [d[1] for d in done], wall), [d[2] for d in done]


def best(runs: list[tuple[dict[str, float], list[str]]]) -> tuple[dict[str, float], list[str]]:
    """The repeat with the highest tokens/s (least disturbed by the machine)."""
    return max(runs, key=lambda r: r[0]["tokens_per_s"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.served_engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", help="concurrency levels (default: CPU 1 4 16, CUDA 1 16 64 256)")
    parser.add_argument("--prompt-tokens", type=int, help="tokens per prompt (default: CPU 64, CUDA 512)")
    parser.add_argument("--output-tokens", type=int, help="output tokens per request (default: CPU 16, CUDA 128)")
    parser.add_argument("--max-running", type=int, help="engine batch limit on every path (default: the largest --clients)")
    parser.add_argument("--repeats", type=int, default=2, help="bursts per level and path; the best is kept")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--model", help="local HF folder (default: the embedded tiny test model)")
    parser.add_argument("--random-model", choices=("llama3-8b", "llama3.2-1b", "tiny"),
                        help="a cached checkpoint of this shape with seeded random bf16 weights")
    parser.add_argument("--random-model-dir", help="where --random-model checkpoints are cached")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="all paths open at once, taking turns burst by burst (default: on CPU; "
                             "on CUDA each path runs alone on the device)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    import httpx
    import torch

    from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    clients = args.clients or ([1, 16, 64, 256] if cuda else [1, 4, 16])
    prompt_tokens = args.prompt_tokens or (512 if cuda else 64)
    output_tokens = args.output_tokens or (128 if cuda else 16)
    max_running = args.max_running or max(clients)
    model_path, weights = resolve_model(args)

    from parrot.backends.tokenizer import Tokenizer

    prompts = make_prompts(Tokenizer(model_path), max(clients), prompt_tokens)
    results: dict[str, dict[int, dict[str, float]]] = {}
    texts: dict[str, dict[int, list[str]]] = {}
    context: dict[str, Any] = {}

    def record(path: str, level: int, runs: list[tuple[dict[str, float], list[str]]]) -> None:
        figures, outputs = best(runs)
        results.setdefault(path, {})[level] = figures
        texts.setdefault(path, {})[level] = outputs
        progress(f"{path:>10} {level:>4} clients: {figures['tokens_per_s']:.1f} tok/s, "
                 f"{figures['ms_per_token_p50']:.2f} ms/token")

    # A path is opened (engine loaded or server started), run at every
    # level, and closed. Interleaved (the CPU default), all paths are open at
    # once and take turns burst by burst, so a machine shared with other work
    # slows each alike; sequential (the CUDA default), each path has the
    # device to itself (KV pools are sized from free memory).
    interleave = (not cuda) if args.interleave is None else args.interleave
    runs: dict[tuple[str, int], list[tuple[dict[str, float], list[str]]]] = {}
    Burst = Callable[[Sequence[str]], Awaitable[tuple[dict[str, float], list[str]]]]

    def open_engine(stack: contextlib.ExitStack) -> Burst:
        nonlocal context
        engine = TorchEngine.from_pretrained(model_path, device=args.device, name="bench-engine",
                                             config=TorchEngineConfig(max_running=max_running))

        def close() -> None:
            engine.close()
            if cuda:
                torch.cuda.empty_cache()  # the served paths size their KV pools from free memory

        stack.callback(close)
        context = context or describe_context([engine], model_path=model_path, weights=weights)
        return lambda batch: engine_burst(engine, batch, output_tokens)

    def open_server(path: str, stack: contextlib.ExitStack) -> Burst:
        extra = ["--max-running", str(max_running)] + (["--engine-in-process"] if path == "in_process" else [])
        admin_key = "pa-bench"
        server = ServerProcess(model_path, args.device, admin_key, ready_timeout_s=1800, extra_args=extra)
        stack.callback(server.stop)
        key = httpx.post(server.url + "/admin/v1/tenants", json={"name": "bench"},
                         headers={"Authorization": f"Bearer {admin_key}"}).json()["api_key"]
        model = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"][0]["id"]
        return lambda batch: http_burst(server.url, key, model, batch, output_tokens)

    def open_path(path: str, stack: contextlib.ExitStack) -> Burst:
        return open_engine(stack) if path == "engine" else open_server(path, stack)

    async def run(paths: Sequence[str], bursts: dict[str, Any]) -> None:
        for path in paths:
            await bursts[path](prompts[:2])  # warm-up
        for level in clients:
            for _ in range(args.repeats):
                for path in paths:
                    runs.setdefault((path, level), []).append(await bursts[path](prompts[:level]))
            for path in paths:
                record(path, level, runs[(path, level)])

    if interleave:
        with contextlib.ExitStack() as stack:
            bursts = {path: open_path(path, stack) for path in args.paths}
            asyncio.run(run(args.paths, bursts))
    else:
        for path in args.paths:
            with contextlib.ExitStack() as stack:
                burst = open_path(path, stack)
                asyncio.run(run([path], {path: burst}))

    rows = []
    for level in clients:
        row: dict[str, Any] = {"clients": level}
        base = results.get("engine", {}).get(level)
        for path in args.paths:
            fig = results[path][level]
            row[path] = fig
            if base is not None and path != "engine":
                row[f"{path}_over_engine"] = fig["tokens_per_s"] / base["tokens_per_s"]
                row[f"{path}_outputs_identical"] = texts[path][level] == texts["engine"][level]
        rows.append(row)

    print(f"{'clients':>7} " + " ".join(f"{p + ' tok/s':>17} {p + ' ms/tok':>18}" for p in args.paths)
          + ("  served/engine (process, in-process)" if "engine" in args.paths else ""))
    for row in rows:
        line = f"{row['clients']:>7} " + " ".join(
            f"{row[p]['tokens_per_s']:>17.1f} {row[p]['ms_per_token_p50']:>18.2f}" for p in args.paths)
        ratios = [f"{row[k]:.2f}" for k in ("process_over_engine", "in_process_over_engine") if k in row]
        print(line + ("  " + ", ".join(ratios) if ratios else ""))
    if args.json:
        write_json(args.json, {
            "benchmark": "served_engine", "rows": rows,
            "settings": {"clients": clients, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
                         "max_running": max_running, "repeats": args.repeats, "paths": args.paths,
                         "interleaved": interleave},
            "context": context or {"device": args.device, "model_path": str(model_path), "weights": weights},
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
