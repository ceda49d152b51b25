"""The ``parrot`` command line: ``demo``, ``serve``, ``tenant create``, ``dag export``, ``model``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence


def _say(message: str) -> None:
    print(message, flush=True)


def _resolve_model(arg: str | None) -> Path:
    from parrot.dataflow import default_model_dir

    if arg:
        path = Path(arg).expanduser()
        if not (path / "config.json").exists():
            raise SystemExit(f"parrot: --model {arg}: no config.json in that folder (a local Hugging Face model folder is expected)")
        return path
    return default_model_dir(progress=_say)


def _run_demo(args: argparse.Namespace) -> int:
    import parrot as P
    from parrot import workflows
    from parrot.backends.torch_engine import TorchEngine
    from parrot.dataflow import LocalRuntime

    started = time.perf_counter()
    model_dir = _resolve_model(args.model)
    _say(f"model: {model_dir}")
    if args.model is None and not os.environ.get("PARROT_MODEL"):
        _say("  (the embedded test model: seeded random weights, so its text is not meaningful)")
    engine = TorchEngine.from_pretrained(model_dir, device=args.device, name="engine-0")
    _say(f"engine: {engine.device}, {engine.dtype}, loaded in {time.perf_counter() - started:.1f} s")
    runtime = LocalRuntime([engine], request_level=args.request_level)
    if args.request_level:
        _say("mode: request-level baseline (the client fetches every input; FIFO; no prefix hints)")
    chunks = workflows.split_paragraphs(workflows.SAMPLE_DOCUMENT)

    def show(label: str, var: P.SemanticVariable, t0: float, perf: str) -> None:
        value = var.get(perf=perf)  # type: ignore[arg-type]
        _say(f"  [{time.perf_counter() - t0:6.2f} s] {label}: {value!r}")

    try:
        _say(f"\n== chain summary: {len(chunks)} chunks, each step refines the last ==")
        t0 = time.perf_counter()
        with P.Session(runtime) as session:
            steps = workflows.chain_summary(chunks)
            _say(f"  declared {len(steps)} calls in {1000 * (time.perf_counter() - t0):.1f} ms")
            for i, var in enumerate(steps):
                show(f"step {i}", var, t0, "latency")
        _say("  DAG:\n    " + runtime.describe(session.id).replace("\n", "\n    "))
        chain_s = time.perf_counter() - t0

        _say(f"\n== map-reduce summary: {len(chunks)} maps, one reduce ==")
        t0 = time.perf_counter()
        with P.Session(runtime) as session:
            partial, merged = workflows.map_reduce_summary(chunks)
            _say(f"  declared {len(partial) + 1} calls in {1000 * (time.perf_counter() - t0):.1f} ms")
            for i, var in enumerate(partial):
                show(f"map {i}", var, t0, "throughput")
            show("reduce", merged, t0, "latency")
        _say("  DAG:\n    " + runtime.describe(session.id).replace("\n", "\n    "))
        map_reduce_s = time.perf_counter() - t0

        calls = len(runtime.graph.calls)
        _say(
            f"\nran {calls} calls: chain {chain_s:.2f} s, map-reduce {map_reduce_s:.2f} s, "
            f"total {time.perf_counter() - started:.1f} s; "
            f"{engine.counters.prefill_tokens} prefill + {engine.counters.decode_tokens} decode tokens "
            f"in {engine.counters.steps} engine steps"
        )
    finally:
        runtime.portal.call(runtime.shutdown())
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from parrot.server.serve import ServerSettings, run
    except ImportError as exc:
        raise SystemExit(f"parrot serve needs the service's libraries ({exc.name}): pip install 'parrot-serve[server]'")
    try:
        settings = ServerSettings.from_env(
            host=args.host, port=args.port, model=args.model, device=args.device, engines=args.engines,
            redis_url=args.redis_url, ray_address=args.ray_address, engine_gpus=args.engine_gpus,
            remote_engines=args.remote_engine, remote_model=args.remote_model,
            engine_process=False if args.engine_in_process else None, max_running=args.max_running,
        )
    except ValueError as exc:
        raise SystemExit(f"parrot serve: {exc}")
    if settings.ray_address and settings.torch_engines:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SystemExit("parrot serve --ray-address needs Ray: pip install 'parrot-serve[ray]'")
    run(settings)
    return 0


def _run_tenant_create(args: argparse.Namespace) -> int:
    import httpx

    if not args.admin_key:
        raise SystemExit("parrot tenant create: give --admin-key or set PARROT_ADMIN_KEY")
    body = {"name": args.name}
    for quota in ("max_concurrent_calls", "tokens_per_minute", "max_prompt_tokens"):
        if getattr(args, quota) is not None:
            body[quota] = getattr(args, quota)
    r = httpx.post(f"{args.url.rstrip('/')}/admin/v1/tenants", json=body,
                   headers={"Authorization": f"Bearer {args.admin_key}"}, timeout=30)
    if r.status_code != 201:
        raise SystemExit(f"parrot tenant create: HTTP {r.status_code}: {r.text}")
    data = r.json()
    print(f"tenant {data['name']} ({data['tenant_id']})\nAPI key (shown once): {data['api_key']}")
    return 0


def _run_dag_export(args: argparse.Namespace) -> int:
    from parrot.dag_export import ExportError, fetch_dag, render

    if not args.api_key:
        raise SystemExit("parrot dag export: give --api-key or set PARROT_API_KEY")
    try:
        text = render(fetch_dag(args.url, args.api_key, args.session), args.format)
    except ExportError as exc:
        raise SystemExit(f"parrot dag export: {exc}")
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        _say(f"wrote {args.output} ({args.format})")
    return 0


def _run_model(args: argparse.Namespace) -> int:
    print(_resolve_model(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parrot", description="Parrot: application-level LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=os.environ.get("PARROT_MODEL"),
            help="local Hugging Face Llama/Mistral/Qwen2 folder (default: $PARROT_MODEL, else the embedded test model)",
        )

    demo = sub.add_parser("demo", help="run a chain-summary and a map-reduce workflow in-process")
    add_model_args(demo)
    demo.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    demo.add_argument(
        "--request-level",
        action="store_true",
        default=os.environ.get("PARROT_REQUEST_LEVEL", "") not in ("", "0", "false"),
        help="run as a request-level service would (the baseline Parrot is measured against)",
    )
    demo.set_defaults(func=_run_demo)

    serve = sub.add_parser("serve", help="run the multi-tenant HTTP service")
    add_model_args(serve)
    serve.add_argument("--host", default=os.environ.get("PARROT_HOST", "127.0.0.1"),
                       help="address to bind (default: $PARROT_HOST or 127.0.0.1; 0.0.0.0 in a container)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("PARROT_PORT", "8000")),
                       help="default: $PARROT_PORT or 8000")
    serve.add_argument("--device", default=os.environ.get("PARROT_DEVICE"))
    serve.add_argument("--engines", type=int, default=None,
                       help="torch engines (default: $PARROT_ENGINES, else 1, or 0 when --remote-engine is given)")
    serve.add_argument("--redis-url", default=None, help="keep state in Redis (default: $PARROT_REDIS_URL, else memory)")
    serve.add_argument("--ray-address", default=None,
                       help="run the torch engines as Ray actors: 'auto' (this node's cluster), 'local' (start one), "
                            "or a head address (default: $PARROT_RAY_ADDRESS, else in this process)")
    serve.add_argument("--engine-gpus", type=float, default=None,
                       help="GPUs per engine actor, 1 for one engine per GPU (default: $PARROT_ENGINE_GPUS or 0: "
                            "one CPU slot each, $PARROT_ENGINE_CPUS)")
    serve.add_argument("--remote-engine", action="append", default=[], metavar="URL",
                       help="an OpenAI-compatible server to use as an engine (repeatable; default: "
                            "$PARROT_REMOTE_ENGINES, comma-separated; key in $PARROT_REMOTE_API_KEY)")
    serve.add_argument("--remote-model", default=None,
                       help="model id the remote engines serve (default: $PARROT_REMOTE_MODEL, else the first listed)")
    serve.add_argument("--max-running", type=int, default=None, metavar="N",
                       help="batch limit of each torch engine (default: $PARROT_MAX_RUNNING, else 32)")
    serve.add_argument("--engine-in-process", action="store_true",
                       help="run the torch engines in the API process (default: each in its own process; "
                            "$PARROT_ENGINE_PROCESS=0 does the same)")
    serve.set_defaults(func=_run_serve)

    tenant = sub.add_parser("tenant", help="manage tenants of a running service")
    tenant_sub = tenant.add_subparsers(dest="tenant_command", required=True)
    create = tenant_sub.add_parser("create", help="create a tenant and print its first API key")
    create.add_argument("name")
    create.add_argument("--url", default=os.environ.get("PARROT_URL", "http://127.0.0.1:8000"))
    create.add_argument("--admin-key", default=os.environ.get("PARROT_ADMIN_KEY"))
    create.add_argument("--max-concurrent-calls", type=int, default=None)
    create.add_argument("--tokens-per-minute", type=int, default=None)
    create.add_argument("--max-prompt-tokens", type=int, default=None)
    create.set_defaults(func=_run_tenant_create)

    dag = sub.add_parser("dag", help="a session's DAG from a running service")
    dag_sub = dag.add_subparsers(dest="dag_command", required=True)
    export = dag_sub.add_parser("export", help="write a session's DAG as JSON, Graphviz DOT or SVG")
    export.add_argument("session", help="the session id (see the visualizer at /ui or GET /api/v1/sessions)")
    export.add_argument("--format", choices=("json", "dot", "svg"), default="dot",
                        help="json: the service's DAG JSON; dot: Graphviz source; svg: laid out by Graphviz `dot`")
    export.add_argument("--url", default=os.environ.get("PARROT_URL", "http://127.0.0.1:8000"),
                        help="the service (default: $PARROT_URL, else http://127.0.0.1:8000)")
    export.add_argument("--api-key", default=os.environ.get("PARROT_API_KEY"),
                        help="the tenant's API key (default: $PARROT_API_KEY)")
    export.add_argument("-o", "--output", default=None, help="file to write (default: standard output)")
    export.set_defaults(func=_run_dag_export)

    model = sub.add_parser("model", help="print the model folder that would be used (building the default one)")
    add_model_args(model)
    model.set_defaults(func=_run_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
