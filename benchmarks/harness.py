"""The method every app benchmark follows (../shared/BENCHMARKS.md).

* Engines are built once; Parrot (``LocalRuntime(engines)``) and the
  request-level baseline (``LocalRuntime(engines, request_level=True)``) run
  on the *same* engine objects, each run with a fresh runtime (its own DAG).
* Each workload runs one warm-up of each mode, then ``repeats`` rounds of
  Parrot and baseline alternately, the order flipping every round (A B, B A,
  A B, ...), so drift on a noisy machine hits both alike. Figures are
  medians; ratios are taken between the medians.
* Every run starts with a cold prefix store (its unpinned entries evicted),
  unless ``keep_prefix_cache``: a run never profits from the previous one.
* Both modes run the same prompts with greedy sampling and the same
  ``max_tokens``, so they must produce the same text. The final outputs are
  compared across every run; on CPU (float32) a difference is an error, on
  GPU (bfloat16, where batch composition changes rounding) a warning.

Figures per run: end-to-end latency (program start until its final values are
read), wall time (until every call finished and the session closed),
throughput (calls or apps per second of wall time), prefill tokens computed
and saved by the prefix store (engine counter deltas), generated tokens.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

MODES = ("parrot", "baseline")
#: ``LocalRuntime`` options of each mode a benchmark may run: Parrot as
#: configured by default, the request-level baseline, and Parrot with early
#: prefill of waiting calls' heads forced on or off (its own comparison).
MODE_OPTIONS: dict[str, dict[str, Any]] = {
    "parrot": {}, "baseline": {"request_level": True},
    "early-on": {"early_prefill": True}, "early-off": {"early_prefill": False},
}
_COUNTERS = ("steps", "prefill_tokens", "decode_tokens", "prefix_hits", "prefix_misses", "prefix_tokens_saved")


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries only the table)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- workloads ----------------------------------------------------------------
@dataclass
class ProgramResult:
    """What one run of a workload's program returns."""

    outputs: list[str]  # the program's final values, in a fixed order
    latency_s: float  # program start until those values were read
    apps: int = 1
    app_latencies_s: list[float] = field(default_factory=list)  # per app, where there are several


class Workload(Protocol):
    name: str
    unit: str  # what throughput counts: "calls" or "apps"

    def sizes(self) -> dict[str, Any]:
        """Workload sizes for the report (counts, token lengths)."""

    def run(self, runtime: Any) -> ProgramResult:
        """Run the program once on ``runtime`` (a fresh LocalRuntime); blocks until done."""


# -- engines ------------------------------------------------------------------
def build_engines(
    model_path: str | Path,
    *,
    device: str | None,
    count: int,
    max_running: int,
    max_step_tokens: int,
) -> list[Any]:
    """``count`` torch engines on one model folder (each holds its own weights)."""
    from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig

    config = TorchEngineConfig(max_running=max_running, max_step_tokens=max_step_tokens)
    engines = []
    for i in range(count):
        started = time.perf_counter()
        engines.append(TorchEngine.from_pretrained(model_path, device=device, name=f"engine-{i}", config=config))
        progress(f"loaded engine-{i} on {engines[-1].device} in {time.perf_counter() - started:.1f} s")
    return engines


def close_engines(engines: Sequence[Any]) -> None:
    for engine in engines:
        engine.close()


def engine_counters(engines: Sequence[Any]) -> dict[str, int]:
    """Sums of the engines' counters (missing counters read as 0)."""
    return {name: sum(int(getattr(e.counters, name, 0)) for e in engines) for name in _COUNTERS}


def wait_idle(engines: Sequence[Any], timeout: float = 30.0) -> None:
    """Wait until no engine has a running or waiting request."""
    deadline = time.monotonic() + timeout
    while True:
        caps = [e.capacity() for e in engines]
        if all(c.running == 0 and c.waiting == 0 for c in caps):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"engines still busy after {timeout} s: {caps}")
        time.sleep(0.001)


def prefix_cache_of(engine: Any) -> Any | None:
    """The engine's prefix cache object (``None`` when it has none or it is off)."""
    for attr in ("prefix_cache", "prefix_store"):
        cache = getattr(engine, attr, None)
        if cache is not None and hasattr(cache, "evict"):
            return cache
    return None


def clear_prefix_caches(engines: Sequence[Any]) -> None:
    """Evict every unpinned prefix-cache entry (all of them, on idle engines)."""
    for engine in engines:
        cache = prefix_cache_of(engine)
        if cache is not None:
            cache.evict(0)
            if len(cache):
                raise RuntimeError(f"{engine.name}: {len(cache)} prefix entries are still pinned on an idle engine")


# -- runs ---------------------------------------------------------------------
@dataclass
class RunRecord:
    mode: str
    repeat: int  # -1: warm-up
    latency_s: float
    wall_s: float
    throughput: float  # units per second of wall time
    calls: int
    apps: int
    prefill_tokens: int  # computed by the engines
    prefix_tokens_saved: int  # not computed: served from the prefix store
    prefix_hits: int
    prefix_misses: int
    decode_tokens: int
    generated_tokens: int  # summed over the calls' stats
    engine_steps: int
    client_requests: dict[str, int]
    mean_app_latency_s: float | None = None
    # Heads of waiting calls prefilled early (their tokens are extra prompt
    # tokens: prefilled, or taken from the cache, once more than the calls').
    early_prefills: int = 0
    early_prefill_tokens: int = 0
    outputs_sha256: str = ""


def _digest(outputs: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(outputs).encode()).hexdigest()[:16]


def run_once(workload: Workload, engines: Sequence[Any], mode: str, *, repeat: int, keep_prefix_cache: bool) -> tuple[RunRecord, list[str]]:
    """One run of ``workload`` in ``mode`` on a fresh runtime over ``engines``."""
    from parrot.dataflow import LocalRuntime

    if mode not in MODE_OPTIONS:
        raise ValueError(f"mode must be one of {tuple(MODE_OPTIONS)}, got {mode!r}")
    wait_idle(engines)
    if not keep_prefix_cache:
        clear_prefix_caches(engines)
    gc.collect()
    runtime = LocalRuntime(list(engines), **MODE_OPTIONS[mode])
    before = engine_counters(engines)
    started = time.perf_counter()
    result = workload.run(runtime)
    wall = time.perf_counter() - started
    wait_idle(engines)
    after = engine_counters(engines)
    delta = {k: after[k] - before[k] for k in _COUNTERS}
    calls = list(runtime.graph.calls.values())
    failed = [c for c in calls if c.state != "done"]
    if failed:
        raise RuntimeError(f"{workload.name}/{mode}: {len(failed)} call(s) did not finish: {failed[0].state} {failed[0].error}")
    units = result.apps if workload.unit == "apps" else len(calls)
    record = RunRecord(
        mode=mode,
        repeat=repeat,
        latency_s=result.latency_s,
        wall_s=wall,
        throughput=units / wall,
        calls=len(calls),
        apps=result.apps,
        prefill_tokens=delta["prefill_tokens"],
        prefix_tokens_saved=delta["prefix_tokens_saved"],
        prefix_hits=delta["prefix_hits"],
        prefix_misses=delta["prefix_misses"],
        decode_tokens=delta["decode_tokens"],
        generated_tokens=sum(c.generated_tokens for c in calls),
        engine_steps=delta["steps"],
        client_requests=dict(runtime.client_requests),
        mean_app_latency_s=statistics.fmean(result.app_latencies_s) if result.app_latencies_s else None,
        outputs_sha256=_digest(result.outputs),
        early_prefills=runtime.early_prefill.counters.started if runtime.early_prefill else 0,
        early_prefill_tokens=runtime.early_prefill.counters.tokens if runtime.early_prefill else 0,
    )
    return record, result.outputs


_MEDIAN_FIELDS = (
    "latency_s", "wall_s", "throughput", "calls", "apps", "prefill_tokens", "prefix_tokens_saved",
    "prefix_hits", "prefix_misses", "decode_tokens", "generated_tokens", "engine_steps", "mean_app_latency_s",
    "early_prefills", "early_prefill_tokens",
)


def _medians(records: Sequence[RunRecord]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in _MEDIAN_FIELDS:
        values = [getattr(r, name) for r in records if getattr(r, name) is not None]
        out[name] = statistics.median(values) if values else None
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def measure(
    workload: Workload,
    engines: Sequence[Any],
    *,
    repeats: int = 3,
    warmup: bool = True,
    keep_prefix_cache: bool = False,
    strict_outputs: bool | None = None,
    modes: tuple[str, str] = MODES,
) -> dict[str, Any]:
    """Warm-up of each mode, then ``repeats`` alternating rounds; medians and ratios.

    ``modes`` is ``(candidate, reference)`` (names of :data:`MODE_OPTIONS`):
    Parrot and the request-level baseline by default. The ratio keys name
    them "parrot" and "baseline" whatever they are (> 1: the candidate is
    better); the result says which under ``modes``.

    ``strict_outputs`` (default: on CPU) raises ``AssertionError`` if any two
    runs' final outputs differ; otherwise a difference is a warning and is
    recorded as ``outputs_identical: false``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if strict_outputs is None:
        strict_outputs = all(e.device.type == "cpu" for e in engines)
    plan = [(-1, m) for m in modes] if warmup else []
    # A B, B A, A B, ...: alternating, and each mode goes first in half the
    # rounds, so a drift during the run (clocks, page-cache writeback) does not
    # always favour the mode that runs second.
    plan += [(i, m) for i in range(repeats) for m in (modes if i % 2 == 0 else modes[::-1])]
    records: dict[str, list[RunRecord]] = {m: [] for m in modes}
    warmups: list[RunRecord] = []
    reference: tuple[str, int, list[str]] | None = None
    mismatches: list[str] = []
    for repeat, mode in plan:
        record, outputs = run_once(workload, engines, mode, repeat=repeat, keep_prefix_cache=keep_prefix_cache)
        label = "warm-up" if repeat < 0 else f"repeat {repeat + 1}/{repeats}"
        progress(
            f"{workload.name:<13} {mode:<8} {label:<12} latency {record.latency_s:8.3f} s  wall {record.wall_s:8.3f} s  "
            f"prefill {record.prefill_tokens:>7}  saved {record.prefix_tokens_saved:>7}  generated {record.generated_tokens:>6}"
        )
        (records[mode] if repeat >= 0 else warmups).append(record)
        if reference is None:
            reference = (mode, repeat, outputs)
        elif outputs != reference[2]:
            first = next((i for i, (a, b) in enumerate(zip(outputs, reference[2])) if a != b), min(len(outputs), len(reference[2])))
            mismatches.append(
                f"{workload.name}: {mode} run {repeat} differs from {reference[0]} run {reference[1]} at output {first}"
            )
    if mismatches:
        message = "; ".join(mismatches)
        if strict_outputs:
            raise AssertionError(f"greedy outputs differ between runs (they must not on CPU): {message}")
        progress(f"WARNING: {message} (expected only where batching changes bf16 rounding)")
    med = {m: _medians(records[m]) for m in modes}
    p, b = med[modes[0]], med[modes[1]]
    return {
        "workload": workload.name,
        "unit": workload.unit,
        "modes": list(modes),
        "sizes": workload.sizes(),
        "repeats": repeats,
        "warmup": warmup,
        "keep_prefix_cache": keep_prefix_cache,
        "outputs_identical": not mismatches,
        "mismatches": mismatches,
        "final_outputs": len(reference[2]) if reference else 0,
        **{m: {"median": med[m], "runs": [asdict(r) for r in records[m]]} for m in modes},
        "warmup_runs": [asdict(r) for r in warmups],
        "ratios": {
            # > 1 means Parrot is better in every ratio below.
            "latency_baseline_over_parrot": _ratio(b["latency_s"], p["latency_s"]),
            "wall_baseline_over_parrot": _ratio(b["wall_s"], p["wall_s"]),
            "throughput_parrot_over_baseline": _ratio(p["throughput"], b["throughput"]),
            "prefill_tokens_baseline_over_parrot": _ratio(b["prefill_tokens"], p["prefill_tokens"]),
        },
    }


# -- report -------------------------------------------------------------------
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """An aligned table: one row per mode and a ratio row per workload."""
    header = ["workload", "mode", "latency s", "wall s", "throughput", "prefill tok", "saved tok", "generated tok"]
    rows: list[list[str]] = []
    for res in results:
        unit = res["unit"]
        modes = tuple(res.get("modes", MODES))
        for mode in modes:
            m = res[mode]["median"]
            rows.append([
                res["workload"] if mode == modes[0] else "",
                mode,
                _fmt(m["latency_s"], ".3f"),
                _fmt(m["wall_s"], ".3f"),
                _fmt(m["throughput"], ".2f", f" {unit}/s"),
                _fmt(m["prefill_tokens"], ".0f"),
                _fmt(m["prefix_tokens_saved"], ".0f"),
                _fmt(m["generated_tokens"], ".0f"),
            ])
        r = res["ratios"]
        rows.append([
            "",
            "base/parrot" if modes == MODES else f"{modes[1]}/{modes[0]}",
            _fmt(r["latency_baseline_over_parrot"], ".2f", "x"),
            _fmt(r["wall_baseline_over_parrot"], ".2f", "x"),
            _fmt(r["throughput_parrot_over_baseline"], ".2f", "x (P/B)"),
            _fmt(r["prefill_tokens_baseline_over_parrot"], ".2f", "x"),
            "",
            "same text" if res["outputs_identical"] else "TEXT DIFFERS",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    left = {0, 1}
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    return "\n".join(out)


def _cpu_name() -> str:
    try:
        for text_line in Path("/proc/cpuinfo").read_text().splitlines():
            if text_line.startswith("model name"):
                return text_line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    """Read-only git queries (commit, dirty flag) for the report."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def host_context(device: Any) -> dict[str, Any]:
    """The device, library versions and commit a figure was measured with."""
    import torch
    import transformers

    device = torch.device(device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_name()
    try:
        import triton  # type: ignore[import-not-found]

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    dirty = _git("status", "--porcelain")
    return {
        "device": str(device),
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe_context(engines: Sequence[Any], *, model_path: str | Path, weights: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Device, library versions, model shape and engine settings for the JSON report."""
    engine = engines[0]
    return {
        **host_context(engine.device),
        "model_path": str(model_path),
        "weights": weights,
        "model_config": asdict(engine.model.config),
        "parameters": sum(p.numel() for p in engine.model.parameters()),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "engines": len(engines),
        "engine_config": asdict(engine.config),
        **(extra or {}),
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    progress(f"wrote {path}")


# -- command line -------------------------------------------------------------
def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by the app benchmarks: model, device, engines, repeats, JSON."""
    g = parser.add_argument_group("model and engines")
    g.add_argument("--model", metavar="PATH", help="local HF checkpoint folder (default: the embedded tiny test model)")
    g.add_argument(
        "--random-model", metavar="SHAPE", choices=("llama3-8b", "llama3.2-1b", "tiny"),
        help="write (once, cached) and use a checkpoint of this real architecture with seeded random bf16 weights: "
        "llama3-8b | llama3.2-1b | tiny",
    )
    g.add_argument("--random-model-dir", metavar="DIR", help="where --random-model checkpoints are cached "
                   "(default: $PARROT_CACHE_DIR or ~/.cache/parrot, under bench-random-models/)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    g.add_argument("--engines", type=int, default=1, metavar="N", help="engines on the model (default 1)")
    g.add_argument("--max-running", type=int, default=32, metavar="N", help="engine batch size limit (default 32)")
    g.add_argument("--max-step-tokens", type=int, default=2048, metavar="N", help="engine tokens per step (default 2048)")
    m = parser.add_argument_group("method")
    m.add_argument("--repeats", type=int, default=3, metavar="N", help="alternating Parrot/baseline rounds (default 3)")
    m.add_argument("--no-warmup", action="store_true", help="skip the warm-up run of each mode")
    m.add_argument("--keep-prefix-cache", action="store_true",
                   help="keep the engines' prefix stores across runs (steady state) instead of starting each run cold")
    m.add_argument("--json", metavar="PATH", help="write every figure and its context to PATH")


def resolve_model(args: argparse.Namespace) -> tuple[Path, str]:
    """The model folder to load and a description of its weights (``args``
    may lack the random-model options: benchmarks that do not offer them)."""
    random_model = getattr(args, "random_model", None)
    if args.model and random_model:
        raise SystemExit("give --model or --random-model, not both")
    if random_model:
        from benchmarks.random_model import random_model_path

        path = random_model_path(random_model, root=getattr(args, "random_model_dir", None), device=args.device,
                                 progress=progress)
        return path, f"seeded random bf16 weights, {random_model} shape (timing only; text is not meaningful)"
    if args.model:
        return Path(args.model).expanduser(), "checkpoint weights from --model"
    from parrot.backends.default_model import default_model_path

    return default_model_path(progress=progress), "embedded tiny test model, seeded random weights (text is not meaningful)"
