"""A shared-context benchmark in the manner of SCBench: one long context, many queries.

    python -m benchmarks.shared_context --model DIR [--device cpu] [--json out.json]

Tasks are generated here (seeded), each a context and several queries with
exact answers:

* ``kv``: a list of ``key: value`` pairs; "what is the value of key K?";
* ``prefix_suffix``: a list of random strings; "which one starts with P and ends with S?";
* ``multi_hop``: variable assignments chained through other variables
  (``VAR QX = VAR BT``) among distractor chains; "what is the value of VAR Z?";
* ``many_shot``: labelled examples of a keyword rule (topics); "label this text";
* ``report``: a prose report with planted facts; a question about one fact.

Two modes, as SCBench: **multi-turn** (one chat session: the context with
the first query, then follow-up queries as later turns, each turn after
the previous answer) and **multi-request** (every query its own request
on the same context, submitted together). Settings, each on alone:
``full`` (no prefix cache, dense prefill, no compression: the baseline),
``prefix_cache``, ``sparse_prefill`` (a per-head config from
:mod:`parrot.backends.sparse_calibration`; searched on the first context
when ``--sparse-config`` is not given) and ``compression`` (the context
compressed once, question-agnostic, so every query can still share it).

Figures per (setting, mode, task): accuracy (the answer string appears in
the model's reply), prefill tokens computed and saved by the engine, and
wall time. Greedy decoding throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import string
import sys
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import host_context, progress, resolve_model, write_json

TASKS = ("kv", "prefix_suffix", "multi_hop", "many_shot", "report")
SETTINGS = ("full", "prefix_cache", "sparse_prefill", "compression")
MODES = ("multi_turn", "multi_request")


@dataclass
class Task:
    """One context and its queries, each with the exact answer expected."""

    name: str
    context: str
    queries: list[tuple[str, str]]


# -- task generators ------------------------------------------------------------
def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def kv_task(rng: random.Random, size: int, queries: int) -> Task:
    pairs = {}
    while len(pairs) < size:
        pairs[_word(rng, 6)] = str(rng.randint(100000, 999999))
    lines = "\n".join(f"{k}: {v}" for k, v in pairs.items())
    asked = rng.sample(list(pairs), queries)
    return Task("kv", "Here is a list of keys and their values.\n" + lines,
                [(f"What is the value of key {k}? Reply with the number only.", pairs[k]) for k in asked])


def prefix_suffix_task(rng: random.Random, size: int, queries: int) -> Task:
    items = list({_word(rng, 10) for _ in range(size)})
    asked = rng.sample(items, queries)
    return Task("prefix_suffix", "Here is a list of strings.\n" + "\n".join(items),
                [(f"Which string in the list starts with '{s[:4]}' and ends with '{s[-3:]}'? Reply with the string only.",
                  s) for s in asked])


def multi_hop_task(rng: random.Random, size: int, queries: int) -> Task:
    names = list({"".join(rng.choice(string.ascii_uppercase) for _ in range(3)) for _ in range(size * 5)})
    rng.shuffle(names)
    chains: list[tuple[list[str], str]] = []
    by_chain: list[list[str]] = []
    for i in range(max(queries, size // 4)):
        chain = names[4 * i:4 * i + 4]
        if len(chain) < 4:
            break
        value = str(rng.randint(10000, 99999))
        chains.append((chain, value))
        by_chain.append([f"VAR {chain[0]} = {value}", *(f"VAR {b} = VAR {a}" for a, b in zip(chain, chain[1:]))])
    # Each chain's lines keep their order; chains interleave.
    mixed: list[str] = []
    while any(by_chain):
        c = rng.choice([c for c in by_chain if c])
        mixed.append(c.pop(0))
    asked = rng.sample(chains, queries)
    return Task("multi_hop", "Variables are assigned in order:\n" + "\n".join(mixed),
                [(f"What is the value of VAR {chain[-1]}? Reply with the number only.", value) for chain, value in asked])


_TOPICS = {
    "sports": ("match", "goal", "team", "coach", "league", "stadium", "referee", "season"),
    "weather": ("rain", "storm", "forecast", "cloud", "wind", "snow", "temperature", "sunny"),
    "food": ("recipe", "bread", "soup", "kitchen", "flavor", "dinner", "oven", "spice"),
}
_NEUTRAL = ("the", "a", "today", "people", "said", "after", "was", "very", "new", "local", "again", "with")


def _topic_text(rng: random.Random, topic: str) -> str:
    words = rng.sample(_TOPICS[topic], 3) + rng.sample(_NEUTRAL, 5)
    rng.shuffle(words)
    return " ".join(words)


def many_shot_task(rng: random.Random, size: int, queries: int) -> Task:
    topics = list(_TOPICS)
    shots = [(t, _topic_text(rng, t)) for t in (rng.choice(topics) for _ in range(size))]
    lines = "\n".join(f"Text: {x}\nLabel: {t}" for t, x in shots)
    asked = [rng.choice(topics) for _ in range(queries)]
    return Task("many_shot", "Examples of texts and their labels (sports, weather or food):\n" + lines,
                [(f"Label this text: {_topic_text(rng, t)}\nReply with the label only.", t) for t in asked])


def report_task(rng: random.Random, size: int, queries: int) -> Task:
    from benchmarks.compression import make_needle_text

    docs, facts = make_needle_text(rng, paragraphs=max(2, size // 5), sentences=4, facts=max(queries, 2))
    asked = facts[:queries]
    return Task("report", "Report:\n" + "\n\n".join(docs),
                [(f["question"] + " Reply briefly.", f["key"]) for f in asked])


GENERATORS = {"kv": kv_task, "prefix_suffix": prefix_suffix_task, "multi_hop": multi_hop_task,
              "many_shot": many_shot_task, "report": report_task}


def make_tasks(seed: int, size: int, queries: int, names: list[str]) -> list[Task]:
    """One task per name, each with ``queries`` queries; ``size`` scales the context."""
    rng = random.Random(seed)
    return [GENERATORS[n](rng, size, queries) for n in names]


# -- running --------------------------------------------------------------------
def _prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages), special=True)


async def _generate(engine: Any, prompts: list[list[int]], max_tokens: int) -> list[str]:
    from parrot.backends import Fill, Gen, GenerationRequest
    from parrot.semantic_vars import SamplingConfig

    streams = [engine.submit(GenerationRequest([Fill(tuple(p)), Gen(SamplingConfig(max_tokens=max_tokens))]))
               for p in prompts]
    outs = await asyncio.gather(*(s.results() for s in streams))
    return [engine.tokenizer.decode(res[0].token_ids) for res, _ in outs]


def run_task(engine: Any, task: Task, context: str, mode: str, max_tokens: int) -> list[str]:
    """The replies to every query of ``task`` over ``context`` in ``mode``."""
    tok = engine.tokenizer
    if mode == "multi_request":
        prompts = [_prompt(tok, [{"role": "user", "content": f"{context}\n\n{q}"}]) for q, _ in task.queries]
        return asyncio.run(_generate(engine, prompts, max_tokens))
    messages: list[dict[str, str]] = []
    replies = []
    for i, (q, _) in enumerate(task.queries):
        messages.append({"role": "user", "content": f"{context}\n\n{q}" if i == 0 else q})
        (reply,) = asyncio.run(_generate(engine, [_prompt(tok, messages)], max_tokens))
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply.strip()})
    return replies


def correct(reply: str, answer: str) -> bool:
    return answer.lower() in reply.lower()


def build_engine(path: Any, device: str | None, setting: str, sparse: Any) -> Any:
    from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig

    config = TorchEngineConfig(max_model_len=4096, prefix_cache=setting == "prefix_cache",
                               sparse_prefill=sparse if setting == "sparse_prefill" else None)
    return TorchEngine.from_pretrained(path, device=device, config=config)


def measure(args: argparse.Namespace, path: Any, tasks: list[Task]) -> dict[str, Any]:
    from parrot.compression import Compressor

    results: dict[str, Any] = {}
    sparse = None
    if "sparse_prefill" in args.settings:
        sparse = _sparse_config(args, path, tasks)
    for setting in args.settings:
        engine = build_engine(path, args.device, setting, sparse)
        try:
            contexts = {t.name: t.context for t in tasks}
            compression: dict[str, Any] = {}
            if setting == "compression":
                comp = Compressor(engine)
                for t in tasks:
                    r = comp.compress(t.context, rate=args.compress_rate)
                    contexts[t.name] = r.context
                    compression[t.name] = {"original_tokens": r.original_tokens, "compressed_tokens": r.compressed_tokens,
                                           "seconds": round(r.seconds, 3)}
            for mode in args.modes:
                per_task = {}
                for t in tasks:
                    c0 = engine.counters
                    before = (c0.prefill_tokens, c0.prefix_tokens_saved)
                    start = time.perf_counter()
                    replies = run_task(engine, t, contexts[t.name], mode, args.max_tokens)
                    seconds = time.perf_counter() - start
                    c1 = engine.counters
                    hits = [correct(r, a) for r, (_, a) in zip(replies, t.queries)]
                    per_task[t.name] = {
                        "accuracy": sum(hits) / len(hits), "queries": len(hits),
                        "prefill_tokens": c1.prefill_tokens - before[0],
                        "prefix_tokens_saved": c1.prefix_tokens_saved - before[1],
                        "seconds": round(seconds, 3),
                        "replies": [r[:80] for r in replies], "answers": [a for _, a in t.queries],
                    }
                    if compression:
                        per_task[t.name]["compression"] = compression[t.name]
                    progress(f"{setting} {mode} {t.name}: {sum(hits)}/{len(hits)} correct, "
                             f"{per_task[t.name]['prefill_tokens']} prefill tokens, {seconds:.1f} s")
                results.setdefault(setting, {})[mode] = per_task
        finally:
            engine.close()
    return results


def _sparse_config(args: argparse.Namespace, path: Any, tasks: list[Task]) -> Any:
    from parrot.kernels import SparseAttentionConfig

    if args.sparse_config:
        config = SparseAttentionConfig.load(args.sparse_config)
    else:
        from parrot.backends.sparse_calibration import calibrate, calibration_ids

        engine = build_engine(path, args.device, "full", None)
        try:
            ids = calibration_ids(engine.tokenizer, tasks[-1].context, min(1024, len(
                engine.tokenizer.encode(tasks[-1].context))))
            progress(f"sparse prefill: searching per-head patterns on {len(ids)} tokens of the {tasks[-1].name} context")
            config = calibrate(engine.model, [ids], min_recall=args.sparse_recall, rows=None)
        finally:
            engine.close()
    # Patterns apply from this prompt length on: every context here is long enough.
    config.min_length = args.sparse_min_length
    return config


def format_report(payload: dict[str, Any]) -> str:
    res = payload["results"]
    out = [f"model: {payload['context']['model_path']} ({payload['context']['weights']})",
           f"device: {payload['context']['device']} ({payload['context']['device_name']}), "
           f"{payload['context']['cpu_threads']} threads", ""]
    names = payload["options"]["tasks"]
    header = ["setting", "mode", *names, "all", "prefill tok", "saved tok", "seconds"]
    rows = []
    for setting, modes in res.items():
        for mode, per in modes.items():
            acc = [per[n]["accuracy"] for n in names]
            total_q = sum(per[n]["queries"] for n in names)
            overall = sum(per[n]["accuracy"] * per[n]["queries"] for n in names) / max(1, total_q)
            rows.append([setting, mode, *(f"{100 * a:.0f}%" for a in acc), f"{100 * overall:.0f}%",
                         str(sum(per[n]["prefill_tokens"] for n in names)),
                         str(sum(per[n]["prefix_tokens_saved"] for n in names)),
                         f"{sum(per[n]['seconds'] for n in names):.1f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out += [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shared_context", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="PATH", help="model folder (default: the embedded tiny test model)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)} (default all)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--size", type=int, default=40, metavar="N", help="items per context (pairs, strings, ...; default 40)")
    p.add_argument("--queries", type=int, default=3, metavar="N", help="queries per context (default 3)")
    p.add_argument("--max-tokens", type=int, default=12, metavar="N", help="reply tokens (default 12)")
    p.add_argument("--compress-rate", type=float, default=1 / 3, help="kept fraction for compression (default 1/3)")
    p.add_argument("--sparse-config", metavar="PATH", help="per-head pattern JSON (default: searched on a context)")
    p.add_argument("--sparse-recall", type=float, default=0.95, help="recall target when searching (default 0.95)")
    p.add_argument("--sparse-min-length", type=int, default=256, metavar="N",
                   help="prompt length from which sparse prefill applies (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every figure and its context to PATH")
    return p


def _choices(raw: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [x.strip() for x in raw.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: expected some of {', '.join(allowed)}, got {raw!r}")
    return items


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.tasks = _choices(args.tasks, TASKS, "--tasks")
    args.settings = _choices(args.settings, SETTINGS, "--settings")
    args.modes = _choices(args.modes, MODES, "--modes")
    if args.size < 4 or args.queries < 1 or args.max_tokens < 1:
        raise SystemExit("--size must be >= 4, --queries and --max-tokens >= 1")
    if not 0 < args.compress_rate <= 1:
        raise SystemExit("--compress-rate must be in (0, 1]")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    path, weights = resolve_model(args)
    tasks = make_tasks(args.seed, args.size, args.queries, args.tasks)
    from parrot.backends.tokenizer import Tokenizer

    tok = Tokenizer(path)
    lengths = {t.name: len(tok.encode(t.context)) for t in tasks}
    progress(f"context tokens: {lengths}")
    results = measure(args, path, tasks)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    payload = {
        "benchmark": "shared_context",
        "context": {**host_context(device), "model_path": str(path), "weights": weights,
                    "command": " ".join(["python -m benchmarks.shared_context", *(argv if argv is not None else sys.argv[1:])])},
        "options": {"tasks": args.tasks, "settings": args.settings, "modes": args.modes, "size": args.size,
                    "queries": args.queries, "max_tokens": args.max_tokens, "compress_rate": args.compress_rate,
                    "sparse_config": args.sparse_config, "sparse_min_length": args.sparse_min_length,
                    "seed": args.seed, "context_tokens": lengths},
        "results": results,
    }
    print(format_report(payload))
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
