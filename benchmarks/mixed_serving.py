"""Many map-reduce applications and background chat on one served engine:
Parrot's SDK against a request-level client of the same server.

    python -m benchmarks.mixed_serving [--apps 6 --maps 8 --chunk-tokens 1800] [--json PATH]

One `parrot serve` process (its own process, on loopback). Each run starts
``--apps`` map-reduce applications at once (each: ``--maps`` maps over
chunks of about ``--chunk-tokens`` tokens, ``--output-tokens`` each, greedy;
one reduce over the map outputs), while short chat completions arrive
through ``/v1/completions`` as a Poisson process at ``--chat-rate`` per
second for the whole run. Two clients take turns on the same server:

* ``parrot``: each application is one SDK session over HTTP; it submits its
  whole DAG and reads the maps with ``perf="throughput"`` and the reduce
  with ``perf="latency"``;
* ``request-level``: each application sends its maps to ``/v1/completions``
  in parallel, waits for all of them, then sends the reduce (what a
  competent user of a request-level API writes).

A warm-up run of each mode comes first, then ``--rounds`` rounds that
alternate the order (A B, B A, ...). Every run uses fresh chunk texts, so no
run is served from an earlier run's prefix cache. Figures per run: job
completion time (JCT) of the applications (mean, p50, max), chat latency per
output token (p50, p99) and, for Parrot, where the maps waited, from the
server's DAG: placement (ready until the scheduler gave it to the engine)
and engine queue (until the engine admitted it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from benchmarks.app_workloads import _report_sentence, make_text
from benchmarks.harness import host_context, progress, resolve_model, write_json

MODES = ("parrot", "request-level")
MAP_TEMPLATE = ("You read one part of a long inspection report and list its most important findings.\n"
                "Part:\n{{input:chunk}}\nFindings:{{output:findings}}")
_CHAT_WORDS = ("the a tram line crew signal depot night shift report repair track switch platform wire brake "
               "door sensor schedule delay passenger spare part winter check").split()


def reduce_template(maps: int) -> str:
    notes = "\n".join(f"Findings of part {i + 1}:{{{{input:part{i}}}}}" for i in range(maps))
    return f"Merge the findings of every part of an inspection report into one summary.\n{notes}\nSummary:{{{{output:summary}}}}"


def fill(template: str, values: dict[str, str]) -> str:
    """The prompt a request-level client sends: the template's text up to its output."""
    text = template.split("{{output:")[0]
    for name, value in values.items():
        text = text.replace("{{input:" + name + "}}", value)
    return text


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class RunResult:
    mode: str
    round: int  # 0: warm-up
    jct_s: list[float]
    chat_ms_per_token: list[float]
    chat_requests: int
    map_placement_s: list[float] = field(default_factory=list)
    map_engine_queue_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "round": self.round, "wall_s": round(self.wall_s, 3),
            "jct_mean_s": statistics.fmean(self.jct_s), "jct_p50_s": percentile(self.jct_s, 0.5),
            "jct_max_s": max(self.jct_s), "chat_requests": self.chat_requests,
            "chat_ms_per_token_p50": percentile(self.chat_ms_per_token, 0.5),
            "chat_ms_per_token_p99": percentile(self.chat_ms_per_token, 0.99),
            "map_placement_s_max": max(self.map_placement_s, default=None),
            "map_placement_s_mean": statistics.fmean(self.map_placement_s) if self.map_placement_s else None,
            "map_engine_queue_s_mean": statistics.fmean(self.map_engine_queue_s) if self.map_engine_queue_s else None,
        }


class Workload:
    """Texts and sizes of one run, fresh per run (a new seed)."""

    def __init__(self, args: argparse.Namespace, count: Any, seed: int, model: str) -> None:
        rng = random.Random(seed)
        self.args = args
        self.model = model  # the served model's id, for /v1/completions
        self.apps = [[make_text(rng, args.chunk_tokens, count, _report_sentence) for _ in range(args.maps)]
                     for _ in range(args.apps)]
        self.chat_rng = random.Random(seed + 1)

    def chat_prompt(self) -> str:
        words = " ".join(self.chat_rng.choice(_CHAT_WORDS) for _ in range(self.args.chat_words))
        return f"Question from a crew member: {words}\nAnswer:"


async def chat_load(client: Any, work: Workload, stop: asyncio.Event, out: list[float]) -> int:
    """Poisson chat arrivals until ``stop``; returns how many were sent."""
    args = work.args
    tasks: list[asyncio.Task[None]] = []

    async def one(prompt: str) -> None:
        t0 = time.perf_counter()
        r = await client.post("/v1/completions", json={"model": work.model, "prompt": prompt, "temperature": 0,
                                                       "max_tokens": args.chat_tokens})
        r.raise_for_status()
        tokens = r.json()["usage"]["completion_tokens"]
        if tokens:
            out.append(1000 * (time.perf_counter() - t0) / tokens)

    while not stop.is_set():
        tasks.append(asyncio.create_task(one(work.chat_prompt())))
        try:  # the next arrival, or the end of the run, whichever comes first
            await asyncio.wait_for(stop.wait(), timeout=random.expovariate(args.chat_rate))
        except asyncio.TimeoutError:
            pass
    await asyncio.gather(*tasks)
    return len(tasks)


async def parrot_app(runtime: Any, client: Any, chunks: list[str], args: argparse.Namespace,
                     placement: list[float], engine_queue: list[float]) -> float:
    import parrot as P
    from parrot.semantic_vars import SamplingConfig

    sampling = SamplingConfig(max_tokens=args.output_tokens, temperature=0.0)
    mapper = P.SemanticFunction(MAP_TEMPLATE, name="map_findings", defaults=sampling)
    reducer = P.SemanticFunction(reduce_template(len(chunks)), name=f"reduce_{len(chunks)}", defaults=sampling)
    t0 = time.perf_counter()
    async with P.Session(runtime) as s:
        parts = [mapper(c) for c in chunks]
        merged = reducer(*parts)
        await asyncio.gather(*(p.aget(perf="throughput") for p in parts), merged.aget(perf="latency"))
        jct = time.perf_counter() - t0
    dag = (await client.get(f"/api/v1/sessions/{s.id}/dag")).json()
    for call in dag["calls"]:
        t = call.get("timings") or {}
        if call["function"] == "map_findings" and t.get("placement_s") is not None:
            placement.append(t["placement_s"])
            engine_queue.append(t.get("engine_queue_s") or 0.0)
    return jct


async def request_level_app(client: Any, model: str, chunks: list[str], args: argparse.Namespace) -> float:
    async def complete(prompt: str) -> str:
        r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0,
                                                       "max_tokens": args.output_tokens})
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    t0 = time.perf_counter()
    outputs = await asyncio.gather(*(complete(fill(MAP_TEMPLATE, {"chunk": c})) for c in chunks))
    await complete(fill(reduce_template(len(chunks)), {f"part{i}": o for i, o in enumerate(outputs)}))
    return time.perf_counter() - t0


async def one_run(mode: str, round_no: int, work: Workload, url: str, key: str, args: argparse.Namespace) -> RunResult:
    import httpx

    from parrot.semantic_vars.http_runtime import HttpRuntime

    # A fresh loopback connection per request (see benchmarks.http_service).
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=600) as client:
        stop = asyncio.Event()
        chat_latencies: list[float] = []
        chat = asyncio.create_task(chat_load(client, work, stop, chat_latencies))
        placement: list[float] = []
        engine_queue: list[float] = []
        t0 = time.perf_counter()
        if mode == "parrot":
            # Not P.connect(): that would also make it the process's default runtime.
            runtime = HttpRuntime(url, api_key=key)
            try:
                jct = await asyncio.gather(*(parrot_app(runtime, client, chunks, args, placement, engine_queue)
                                             for chunks in work.apps))
            finally:
                runtime.close()
        else:
            jct = await asyncio.gather(*(request_level_app(client, work.model, chunks, args) for chunks in work.apps))
        wall = time.perf_counter() - t0
        stop.set()
        sent = await chat
    return RunResult(mode, round_no, list(jct), chat_latencies, sent, placement, engine_queue, wall)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mixed_serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", type=int, default=3, help="map-reduce applications per run (issue size: 6)")
    parser.add_argument("--maps", type=int, default=4, help="maps per application (issue size: 8)")
    parser.add_argument("--chunk-tokens", type=int, default=200, help="tokens per map chunk (issue size: 1800)")
    parser.add_argument("--output-tokens", type=int, default=16, help="max_tokens of maps and reduce (issue: 50)")
    parser.add_argument("--chat-rate", type=float, default=2.0, help="chat arrivals per second")
    parser.add_argument("--chat-words", type=int, default=120, help="words in a chat prompt")
    parser.add_argument("--chat-tokens", type=int, default=16, help="max_tokens of a chat completion (issue: 50)")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds after the warm-up (each runs both modes)")
    parser.add_argument("--model", metavar="PATH", help="local HF folder (default: the embedded tiny test model)")
    parser.add_argument("--random-model", metavar="SHAPE", help="seeded random weights of a named shape (e.g. llama3-8b)")
    parser.add_argument("--random-model-dir", metavar="PATH", help="where random checkpoints are cached")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `parrot serve` (repeatable)")
    parser.add_argument("--json", metavar="PATH")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import httpx

    from benchmarks.http_service import ServerProcess
    from parrot.backends.tokenizer import Tokenizer

    model_path, weights = resolve_model(args)
    tokenizer = Tokenizer(model_path)
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    admin_key = "pa-bench"
    server = ServerProcess(model_path, args.device, admin_key, extra_args=args.server_arg)
    results: list[RunResult] = []
    try:
        key = httpx.post(server.url + "/admin/v1/tenants", json={"name": "bench"},
                         headers={"Authorization": f"Bearer {admin_key}"}).json()["api_key"]
        model_id = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"][0]["id"]
        schedule = [(0, list(MODES))] + [(r, list(reversed(MODES)) if r % 2 else list(MODES))
                                          for r in range(1, args.rounds + 1)]
        seed = 0
        for round_no, modes in schedule:
            for mode in modes:
                seed += 1
                work = Workload(args, count, seed, model_id)
                progress(f"round {round_no} ({'warm-up' if round_no == 0 else 'measured'}): {mode}")
                result = asyncio.run(one_run(mode, round_no, work, server.url, key, args))
                s = result.summary()
                progress(f"  JCT mean {s['jct_mean_s']:.2f} s, chat p50 {s['chat_ms_per_token_p50'] or 0:.1f} ms/token"
                         + (f", map placement max {s['map_placement_s_max']:.3f} s" if s['map_placement_s_max'] is not None else ""))
                results.append(result)
    finally:
        server.stop()

    measured = [r for r in results if r.round > 0]
    per_mode = {}
    for mode in MODES:
        runs = [r.summary() for r in measured if r.mode == mode]
        per_mode[mode] = {k: statistics.median(v for v in (run[k] for run in runs) if v is not None)
                          for k in ("jct_mean_s", "jct_p50_s", "jct_max_s", "chat_ms_per_token_p50", "chat_ms_per_token_p99")
                          if any(run[k] is not None for run in runs)}
    p, b = per_mode["parrot"], per_mode["request-level"]
    payload = {
        "benchmark": "mixed_serving", **host_context(args.device), "model": str(model_path), "weights": weights,
        "model_config": json.loads((model_path / "config.json").read_text()),
        "server_args": args.server_arg,
        "sizes": {k: getattr(args, k) for k in ("apps", "maps", "chunk_tokens", "output_tokens", "chat_rate",
                                               "chat_words", "chat_tokens", "rounds")},
        "runs": [r.summary() for r in results], "medians": per_mode,
        "speedup_jct": b["jct_mean_s"] / p["jct_mean_s"],
        "chat_latency_ratio": (b.get("chat_ms_per_token_p50") or 0) / (p.get("chat_ms_per_token_p50") or 1),
        "raw": [asdict(r) for r in results],
    }
    print(format_table(results, payload))
    if args.json:
        write_json(args.json, payload)
    return payload


def format_table(results: Sequence[RunResult], payload: dict[str, Any]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| round | mode | JCT mean s | JCT p50 s | JCT max s | chat ms/token p50 | p99 | chats | map placement max s | map engine queue mean s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = r.summary()
        lines.append(f"| {'warm-up' if r.round == 0 else r.round} | {r.mode} | {s['jct_mean_s']:.2f} | {s['jct_p50_s']:.2f} | "
                     f"{s['jct_max_s']:.2f} | {fmt(s['chat_ms_per_token_p50'], '.1f')} | {fmt(s['chat_ms_per_token_p99'], '.1f')} | "
                     f"{s['chat_requests']} | {fmt(s['map_placement_s_max'], '.3f')} | {fmt(s['map_engine_queue_s_mean'], '.3f')} |")
    lines.append("")
    lines.append(f"request-level JCT / Parrot JCT (medians of measured rounds): {payload['speedup_jct']:.2f}x; "
                 f"chat ms/token p50, request-level run / Parrot run: {payload['chat_latency_ratio']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
