"""One tenant flooding the service must not stall another's small requests.

    python -m benchmarks.tenant_fairness [--quiet-clients 10] [--flood-clients 190] [--json PATH]

One `parrot serve` (its own process, loopback, CPU and the embedded tiny
model by default), two tenants. The *quiet* tenant's clients each run
``--requests`` one-call programs in turn (open a session, submit one short
call, long-poll its output, close). It runs twice in the same server, in
alternating rounds: *alone*, and *under flood*, while the *flooding*
tenant's clients (200 clients in all by default) each submit batches of
``--flood-batch`` calls back to back, optionally after one huge batch of
``--big-batch`` calls. Figures: the quiet tenant's p50/p99 latency under flood
against alone (the ratio; the target is p99 within 2x), where the server
spent it (waiting for an engine: placement and engine queue; on the engine:
prefill and decode, from each call's DAG timings), and the calls the flood
got done meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any, Sequence

from benchmarks.harness import host_context, progress, resolve_model, write_json
from benchmarks.http_service import ServerProcess, percentile

ADMIN_KEY = "pa-bench-fairness"


def _function(max_tokens: int) -> dict[str, Any]:
    return {"name": "ask", "template": "Q: {{input:q}}\nA: {{output:a}}", "sampling": {"max_tokens": max_tokens}}


async def one_program(client: Any, calls: int, max_tokens: int, tag: str, sessions: set[str] | None = None,
                      timings: list[dict[str, Any]] | None = None) -> None:
    """Open a session, submit ``calls`` calls in one batch, read the last output, close;
    with ``timings``, append the last call's server-side timings (from its DAG)."""
    r = await client.post("/api/v1/sessions")
    r.raise_for_status()
    sid = r.json()["session_id"]
    if sessions is not None:
        sessions.add(sid)
    body = {"calls": [{"function": _function(max_tokens), "constants": {"q": f"{tag} question {i}"}} for i in range(calls)]}
    r = await client.post(f"/api/v1/sessions/{sid}/calls", json=body)
    r.raise_for_status()
    last = r.json()["calls"][-1]
    var = last["outputs"]["a"]
    state = (await client.get(f"/api/v1/sessions/{sid}/variables/{var}", params={"timeout": 300})).json()
    if not state["ready"]:
        raise RuntimeError(f"the {tag} call was not answered: {state}")
    if timings is not None:
        timings.append((await client.get(f"/api/v1/sessions/{sid}/calls/{last['call_id']}")).json()["timings"])
    (await client.delete(f"/api/v1/sessions/{sid}")).raise_for_status()
    if sessions is not None:
        sessions.discard(sid)


async def quiet_round(client: Any, clients: int, requests: int, max_tokens: int,
                      timings: list[dict[str, Any]] | None = None) -> list[float]:
    latencies: list[float] = []

    async def one_client(c: int) -> None:
        for r in range(requests):
            t0 = time.perf_counter()
            await one_program(client, 1, max_tokens, f"quiet {c}.{r}", timings=timings)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    return latencies


class Flood:
    """The flooding tenant's clients, running until stopped."""

    def __init__(self, client: Any, clients: int, batch: int, max_tokens: int, big_batch: int) -> None:
        self.client, self.clients, self.batch, self.max_tokens, self.big_batch = client, clients, batch, max_tokens, big_batch
        self.calls_done = 0
        self.submitted = 0
        self.sessions: set[str] = set()
        self.started = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def _client(self, c: int) -> None:
        i = 0
        while True:
            self.submitted += self.batch
            if self.submitted >= self.clients * self.batch:
                self.started.set()
            await one_program(self.client, self.batch, self.max_tokens, f"flood {c}.{i}", self.sessions)
            self.calls_done += self.batch
            i += 1

    async def _big(self) -> None:
        await one_program(self.client, self.big_batch, self.max_tokens, "big", self.sessions)
        self.calls_done += self.big_batch

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.big_batch:
            self.tasks.append(loop.create_task(self._big()))
        self.tasks += [loop.create_task(self._client(c)) for c in range(self.clients)]

    async def stop(self) -> None:
        """Stop the clients and cancel what they left running on the server."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for sid in list(self.sessions):
            await self.client.delete(f"/api/v1/sessions/{sid}", params={"cancel": "true"})
        self.sessions.clear()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tenant_fairness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet-clients", type=int, default=10, help="clients of the quiet tenant (default 10)")
    parser.add_argument("--flood-clients", type=int, default=190, help="clients of the flooding tenant (default 190)")
    parser.add_argument("--requests", type=int, default=4, help="programs per quiet client per round (default 4)")
    parser.add_argument("--quiet-tokens", type=int, default=4, help="max_tokens of a quiet call (default 4)")
    parser.add_argument("--flood-batch", type=int, default=4, help="calls per flooding request (default 4)")
    parser.add_argument("--flood-tokens", type=int, default=16, help="max_tokens of a flooding call (default 16)")
    parser.add_argument("--big-batch", type=int, default=0,
                        help="one batch of this many calls submitted when each flood starts (default 0; the issue's case: 10000)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating alone / under-flood rounds (default 2)")
    parser.add_argument("--model", help="local HF folder (default: the embedded tiny test model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra `parrot serve` argument (repeatable), e.g. --serve-arg=--max-running=16")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    import httpx

    model_path, weights = resolve_model(args)
    server = ServerProcess(model_path, args.device, ADMIN_KEY, extra_args=args.serve_arg)
    try:
        keys = {}
        for name in ("quiet", "flood"):
            r = httpx.post(server.url + "/admin/v1/tenants", json={"name": name},
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            r.raise_for_status()
            keys[name] = r.json()["api_key"]

        async def measure() -> dict[str, Any]:
            # A fresh connection per request (see benchmarks.http_service).
            limits = httpx.Limits(max_connections=args.quiet_clients + args.flood_clients + 20, max_keepalive_connections=0)

            def client(name: str) -> httpx.AsyncClient:
                return httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {keys[name]}"},
                                         timeout=600, limits=limits)

            lat: dict[str, list[float]] = {"alone": [], "flood": []}
            timings: dict[str, list[dict[str, Any]]] = {"alone": [], "flood": []}
            flood_calls, flood_s = 0, 0.0
            async with client("quiet") as quiet, client("flood") as flooder:
                await quiet_round(quiet, 2, 1, args.quiet_tokens)  # warm-up
                for rnd in range(args.rounds):
                    progress(f"round {rnd + 1}/{args.rounds}: quiet tenant alone")
                    lat["alone"] += await quiet_round(quiet, args.quiet_clients, args.requests, args.quiet_tokens,
                                                      timings["alone"])
                    progress(f"round {rnd + 1}/{args.rounds}: quiet tenant under a flood of {args.flood_clients} clients")
                    flood = Flood(flooder, args.flood_clients, args.flood_batch, args.flood_tokens, args.big_batch)
                    flood.start()
                    await flood.started.wait()  # every flooding client has a request in
                    t0 = time.perf_counter()
                    try:
                        lat["flood"] += await quiet_round(quiet, args.quiet_clients, args.requests, args.quiet_tokens,
                                                          timings["flood"])
                    finally:
                        flood_s += time.perf_counter() - t0
                        flood_calls += flood.calls_done
                        await flood.stop()
            out: dict[str, Any] = {"calls_per_round": args.quiet_clients * args.requests}
            for phase, values in lat.items():
                out[f"{phase}_p50_ms"] = 1000 * statistics.median(values)
                out[f"{phase}_p99_ms"] = 1000 * percentile(values, 0.99)
                # Where the server spent it (the call's DAG timings): waiting
                # for an engine (placement + engine queue), and on the engine.
                for part, parts in (("wait", ("placement_s", "engine_queue_s")), ("engine", ("prefill_s", "decode_s"))):
                    ms = [1000 * sum(t[k] or 0.0 for k in parts) for t in timings[phase]]
                    out[f"{phase}_{part}_p50_ms"] = statistics.median(ms)
                    out[f"{phase}_{part}_p99_ms"] = percentile(ms, 0.99)
            out["p50_ratio"] = out["flood_p50_ms"] / out["alone_p50_ms"]
            out["p99_ratio"] = out["flood_p99_ms"] / out["alone_p99_ms"]
            out["flood_calls_per_s"] = flood_calls / flood_s if flood_s else 0.0
            return out

        figures = asyncio.run(measure())
    finally:
        server.stop()
    print(f"quiet tenant, {args.quiet_clients} clients x {args.requests} calls x {args.rounds} rounds; "
          f"flood: {args.flood_clients} clients x {args.flood_batch}-call batches"
          + (f" after a {args.big_batch}-call batch" if args.big_batch else ""))
    print(f"{'':>12} {'p50':>10} {'p99':>10}   server side: {'wait p50':>9} {'wait p99':>9} {'engine p50':>10} {'engine p99':>10}")
    for phase, label in (("alone", "alone"), ("flood", "under flood")):
        f = {k[len(phase) + 1:]: v for k, v in figures.items() if k.startswith(phase + "_")}
        print(f"{label:>12} {f['p50_ms']:>8.1f}ms {f['p99_ms']:>8.1f}ms   {'':>12} {f['wait_p50_ms']:>7.1f}ms "
              f"{f['wait_p99_ms']:>7.1f}ms {f['engine_p50_ms']:>8.1f}ms {f['engine_p99_ms']:>8.1f}ms")
    print(f"{'ratio':>12} {figures['p50_ratio']:>9.2f}x {figures['p99_ratio']:>9.2f}x   "
          f"(flood: {figures['flood_calls_per_s']:.1f} calls/s)")
    result = {"benchmark": "tenant_fairness", "settings": vars(args), **figures,
              "context": {**host_context(args.device), "model": str(model_path), "weights": weights}}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
