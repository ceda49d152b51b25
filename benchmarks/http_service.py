"""Added latency of the HTTP service over the same calls in-process.

    python -m benchmarks.http_service [--clients 1 50 200] [--calls-per-client 4] [--json PATH]

C concurrent clients each run R one-call programs (open a session, submit
one short call, read its output with a long-poll, close). The contender is
the HTTP path: `parrot serve` in its own process on loopback, with tenancy,
quotas and the store in the way. The baseline is the same calls on an
in-process LocalRuntime over an engine of the same model, in the benchmark's
process, alternating with the HTTP runs (so both share the machine alike). Figures: p50/p99 per-call latency of each
path and the added latency (HTTP minus in-process) at each concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import statistics
import time
from typing import Any, Awaitable, Callable, Sequence

from benchmarks.harness import describe_context, progress, resolve_model, write_json

CALL = {"name": "echo", "template": "Q: {{input:q}}\nA: {{output:a}}", "sampling": {"max_tokens": 2}}


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def in_process_call(runtime: Any, i: int) -> None:
    from parrot.semantic_vars import Call, FunctionSpec, SamplingConfig

    spec = FunctionSpec("echo", CALL["template"], {"a": SamplingConfig(max_tokens=2)})
    sid = await runtime.open_session()
    await runtime.submit_calls(sid, [Call(f"call-b{i}-{time.monotonic_ns()}", spec, {}, {"q": f"question {i}"},
                                              {"a": f"var-b{i}-{time.monotonic_ns()}"})])
    out = runtime.graph.session_calls(sid)[0].outputs["a"]
    await runtime.get_variable(sid, out)
    await runtime.close_session(sid)


def http_call_factory(client: Any) -> Callable[[int], Awaitable[None]]:
    async def call(i: int) -> None:
        sid = (await client.post("/api/v1/sessions")).json()["session_id"]
        r = await client.post(f"/api/v1/sessions/{sid}/calls",
                              json={"calls": [{"function": CALL, "constants": {"q": f"question {i}"}}]})
        r.raise_for_status()
        var = r.json()["calls"][0]["outputs"]["a"]
        state = (await client.get(f"/api/v1/sessions/{sid}/variables/{var}", params={"timeout": 120})).json()
        assert state["ready"], state
        await client.delete(f"/api/v1/sessions/{sid}")

    return call


async def run_clients(call: Callable[[int], Awaitable[None]], clients: int, per_client: int) -> list[float]:
    latencies: list[float] = []

    async def client(c: int) -> None:
        for r in range(per_client):
            t0 = time.perf_counter()
            await call(c * per_client + r)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(client(c) for c in range(clients)))
    return latencies


class ServerProcess:
    """`parrot serve` in a child process on a free loopback port."""

    def __init__(self, model_path: Any, device: str, admin_key: str, ready_timeout_s: float = 300,
                 extra_args: Sequence[str] = (), extra_env: dict[str, str] | None = None) -> None:
        import httpx

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PARROT_ADMIN_KEY": admin_key, **(extra_env or {})}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="parrot-serve-", suffix=".log", delete=False)
        progress(f"parrot serve on {self.url}, its log: {self.log.name}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parrot.cli", "serve", "--model", str(model_path), "--device", device,
             "--host", "127.0.0.1", "--port", str(port), *extra_args], env=env,
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout_s
        while True:  # startup only: poll readiness until the model is loaded
            if self.proc.poll() is not None:
                raise RuntimeError(f"parrot serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("parrot serve did not become ready")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 50, 200], help="concurrency levels")
    parser.add_argument("--calls-per-client", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of each path")
    parser.add_argument("--model", help="local HF folder (default: the embedded tiny test model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine-in-process", action="store_true",
                        help="serve with `parrot serve --engine-in-process` (default: the engine in its own process)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    import httpx

    from parrot.backends.torch_engine import TorchEngine
    from parrot.dataflow import LocalRuntime

    model_path, weights = resolve_model(args)
    engine = TorchEngine.from_pretrained(model_path, device=args.device, name="inproc-0")
    admin_key = "pa-bench"
    server = ServerProcess(model_path, args.device, admin_key,
                           extra_args=["--engine-in-process"] if args.engine_in_process else [])
    key = httpx.post(server.url + "/admin/v1/tenants", json={"name": "bench"},
                     headers={"Authorization": f"Bearer {admin_key}"}).json()["api_key"]
    rows: list[dict[str, Any]] = []

    async def measure() -> None:
        runtime = LocalRuntime([engine])
        # No connection reuse: uvicorn closes connections idle for 5 s, and on
        # a loaded machine a client reusing one races that close. A fresh
        # loopback connection per request costs well under a millisecond.
        limits = httpx.Limits(max_connections=max(args.clients) + 10, max_keepalive_connections=0)

        def http_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"},
                                     timeout=300, limits=limits)

        async def run_http(clients: int, per_client: int) -> list[float]:
            async with http_client() as client:
                return await run_clients(http_call_factory(client), clients, per_client)

        async def run_in_process(clients: int, per_client: int) -> list[float]:
            return await run_clients(lambda i: in_process_call(runtime, i), clients, per_client)

        await run_http(2, 2)  # warm-up of both paths
        await run_in_process(2, 2)
        for clients in args.clients:
            lat: dict[str, list[float]] = {"http": [], "in_process": []}
            for rep in range(args.repeats):
                for path, run in (("http", run_http), ("in_process", run_in_process)):
                    progress(f"{clients} clients, {path}, round {rep + 1}/{args.repeats}")
                    lat[path] += await run(clients, args.calls_per_client)
            row = {"clients": clients, "calls": len(lat["http"])}
            for path, values in lat.items():
                row[f"{path}_p50_ms"] = 1000 * statistics.median(values)
                row[f"{path}_p99_ms"] = 1000 * percentile(values, 0.99)
            row["added_p50_ms"] = row["http_p50_ms"] - row["in_process_p50_ms"]
            row["added_p99_ms"] = row["http_p99_ms"] - row["in_process_p99_ms"]
            rows.append(row)

    try:
        asyncio.run(measure())
    finally:
        server.stop()
        engine.close()
    header = f"{'clients':>7} {'calls':>6} {'in-proc p50':>12} {'http p50':>10} {'added p50':>10} {'in-proc p99':>12} {'http p99':>10} {'added p99':>10}"
    print(header)
    for r in rows:
        print(f"{r['clients']:>7} {r['calls']:>6} {r['in_process_p50_ms']:>10.1f}ms {r['http_p50_ms']:>8.1f}ms "
              f"{r['added_p50_ms']:>8.1f}ms {r['in_process_p99_ms']:>10.1f}ms {r['http_p99_ms']:>8.1f}ms {r['added_p99_ms']:>8.1f}ms")
    if args.json:
        write_json(args.json, {"benchmark": "http_service", "rows": rows,
                               "engine": "in the API process" if args.engine_in_process else "in its own process",
                               "context": describe_context([engine], model_path=model_path, weights=weights)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
