"""LLMLingua-family compression: throughput and a planted-fact (needle) task.

    python -m benchmarks.compression [--device cpu] [--model PATH] [--json out.json]

Two parts, on one scoring model and device:

* **throughput**: compress a long generated text at 3x; compression tokens/s
  (input tokens per second) for the full method (coarse segment dropping,
  then iterative token-level) and for the token-level pass alone, beside one
  plain scoring pass over the same tokens (every token scored once, nothing
  iterated: the cost floor of token-level compression; the full method can
  beat it because the coarse pass drops segments before they are scored
  token by token).
* **needle**: facts such as "The access code for vault 17 is 4821." or "The
  night courier for route 9 is Lindqvist this season." are planted in long
  filler text generated here (seeded). Each text is compressed 2x, 3x, 5x
  and we count the planted facts whose key (the code, the name) survives in
  the compressed context. Methods side by side: LLMLingua (coarse segment
  dropping + iterative token-level), LongLLMLingua (question-aware, one
  question per asked fact), token-level only, token-level with no forced
  tokens, and random token dropping (seeded) to the same token count as
  LLMLingua's output.

With the embedded test model (or ``--random-model``) the weights are random:
the figures then show the mechanism (budgets met, forced tokens kept,
segments ranked), not the quality of a trained scorer. The report and the
JSON say which weights were used.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import progress, resolve_model, write_json

FILLER_WORDS = (
    "the a of and to in over under across beside river stone market quiet lantern morning silver garden "
    "paper window small bright harbor road winter bread table letter field north slowly mountain evening "
    "old green narrow wooden distant warm cold soft early late along through near tower bridge orchard "
    "meadow village cart wheel rope basket kettle candle shadow cloud rain wind salt honey copper"
).split()
NAMES = (
    "Lindqvist Okonkwo Vasquez Nakamura Oyelaran Castellanos Ferreira Halvorsen Abernathy Tremblay "
    "Kowalczyk Mbeki Sorensen Quispe Delacroix Yamamoto Petrakis Achterberg Iwasaki Montague"
).split()


# -- the needle task ------------------------------------------------------------
# Prose filler: grammatical sentences from a few templates, so that a trained
# model finds the filler as predictable as ordinary text (word salad is the
# most surprising text there is, which hides what a trained scorer does).
_PROSE_SUBJECTS = ("the old bridge", "a quiet market", "the morning train", "the village school", "our small garden",
                   "the north road", "the harbor office", "a wooden cart", "the evening light", "the town library",
                   "the river path", "a narrow street", "the copper kettle", "the winter wind", "the bakery")
_PROSE_VERBS = ("stood near", "looked over", "was close to", "ran along", "faced", "was built beside", "led past",
                "opened onto", "was quiet after", "seemed far from", "was painted like", "waited beside")
_PROSE_OBJECTS = ("the river", "the hills", "the main square", "the station", "the old church", "the fields",
                  "the harbor", "the market hall", "the forest", "the town gate", "the meadow", "the mill")
_PROSE_TAILS = ("", "", " in the spring", " for many years", " on most days", " after the rain", " in the evening",
                " during the long summer", ", as people in the town often said", ", which visitors liked")


def _sentence(rng: random.Random, filler: str = "prose") -> str:
    if filler == "prose":
        text = f"{rng.choice(_PROSE_SUBJECTS)} {rng.choice(_PROSE_VERBS)} {rng.choice(_PROSE_OBJECTS)}{rng.choice(_PROSE_TAILS)}"
        return text[0].upper() + text[1:] + "."
    words = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(8, 16))]
    return " ".join(words).capitalize() + "."


def make_needle_text(
    rng: random.Random, *, paragraphs: int, sentences: int, facts: int, filler: str = "prose"
) -> tuple[list[str], list[dict[str, str]]]:
    """Filler paragraphs (``filler``: ``"prose"`` or ``"salad"``) with ``facts``
    planted facts (each in its own paragraph when possible)."""
    paras = [[_sentence(rng, filler) for _ in range(sentences)] for _ in range(paragraphs)]
    where = rng.sample(range(paragraphs), k=min(facts, paragraphs)) + [rng.randrange(paragraphs) for _ in range(max(0, facts - paragraphs))]
    planted: list[dict[str, str]] = []
    used_ids: set[int] = set()
    names = rng.sample(NAMES, k=min(len(NAMES), facts))
    for k, p in enumerate(where):
        ident = rng.choice([i for i in range(2, 99) if i not in used_ids])
        used_ids.add(ident)
        if k % 2 == 0:
            key = str(rng.randint(1000, 9999))
            fact = f"The access code for vault {ident} is {key}."
            question = f"What is the access code for vault {ident}?"
        else:
            key = names[k % len(names)]
            fact = f"The night courier for route {ident} is {key} this season."
            question = f"Who is the night courier for route {ident}?"
        paras[p].insert(rng.randint(1, len(paras[p])), fact)
        planted.append({"fact": fact, "key": key, "question": question, "paragraph": str(p)})
    return [" ".join(s) for s in paras], planted


def _random_drop(rng: random.Random, ids: list[int], keep: int) -> list[int]:
    chosen = sorted(rng.sample(range(len(ids)), k=min(keep, len(ids))))
    return [ids[i] for i in chosen]


_WORDS = re.compile(r"\w+")


def glued_words(original: str, compressed: str) -> list[str]:
    """Words of ``compressed`` that are two words of ``original`` run together
    ("every12" from "every 12"): what a reader would misread."""
    known = set(_WORDS.findall(original))
    glued = []
    for w in _WORDS.findall(compressed):
        if w in known:
            continue
        if any(w[:k] in known and w[k:] in known for k in range(1, len(w))):
            glued.append(w)
    return glued


METHODS = ("llmlingua", "llmlingua, perplexity coarse", "llmlingua, peak coarse", "longllmlingua",
           "token-level only", "token-level, no forcing", "random drop")


def run_needle(compressor: Any, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    drop_rng = random.Random(args.seed + 1)
    methods = [m for m in METHODS if m not in args.skip_method]
    stats: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in methods}
    texts = [make_needle_text(rng, paragraphs=args.paragraphs, sentences=args.sentences, facts=args.facts,
                              filler=args.filler) for _ in range(args.trials)]
    token_counts = [compressor.count_tokens("\n\n".join(d)) for d, _ in texts]
    progress(f"needle: {args.trials} texts of {min(token_counts)}-{max(token_counts)} tokens, {args.facts} facts each")
    for factor in args.rates:
        rate = 1.0 / factor
        label = f"{factor:g}x"
        acc: dict[str, dict[str, list[Any]]] = {m: {"hits": [], "ratio": [], "glued": []} for m in methods}

        def record(method: str, result: Any, facts: list[dict[str, str]], original: str) -> None:
            acc[method]["hits"] += [f["key"] in result.context for f in facts]
            acc[method]["ratio"].append(result.ratio)
            acc[method]["glued"] += glued_words(original, result.context)

        for t, (docs, facts) in enumerate(texts):
            original = "\n\n".join(docs)
            plain = compressor.compress(docs, rate=rate)
            if "llmlingua" in acc:
                record("llmlingua", plain, facts, original)
            for crit in ("perplexity", "peak"):
                if f"llmlingua, {crit} coarse" in acc:
                    record(f"llmlingua, {crit} coarse", compressor.compress(docs, rate=rate, coarse_criterion=crit),
                           facts, original)
            if "token-level only" in acc:
                record("token-level only", compressor.compress(docs, rate=rate, coarse=False), facts, original)
            if "token-level, no forcing" in acc:
                record("token-level, no forcing", compressor.compress(
                    docs, rate=rate, coarse=False, force_numbers=False, force_names=False), facts, original)
            if "random drop" in acc:
                kept = _random_drop(drop_rng, list(plain.original_token_ids), len(plain.kept_token_ids))
                text = compressor.scorer.decode(kept)
                acc["random drop"]["hits"] += [f["key"] in text for f in facts]
                acc["random drop"]["ratio"].append(plain.original_tokens / max(1, len(kept)))
            if "longllmlingua" in acc:
                for f in facts[: args.questions]:
                    q = compressor.compress(docs, rate=rate, question=f["question"])
                    record("longllmlingua", q, [f], original)
            progress(f"needle {label}: text {t + 1}/{len(texts)} done")
        for m in methods:
            hits = acc[m]["hits"]
            stats[m][label] = {
                "retention": sum(hits) / len(hits) if hits else None,
                "facts": len(hits),
                "ratio": statistics.mean(acc[m]["ratio"]) if acc[m]["ratio"] else None,
                "glued_words": len(acc[m]["glued"]),
                "glued_examples": sorted(set(acc[m]["glued"]))[:8],
            }
    return {"methods": methods, "results": stats, "token_counts": token_counts}


# -- throughput -----------------------------------------------------------------
def run_throughput(compressor: Any, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed + 2)
    docs: list[str] = []
    while compressor.count_tokens("\n\n".join(docs)) < args.throughput_tokens:
        more, _ = make_needle_text(rng, paragraphs=4, sentences=args.sentences, facts=2)
        docs.extend(more)
    text = "\n\n".join(docs)
    ids = compressor.scorer.encode(text)
    rate = 1.0 / 3.0
    progress(f"throughput: {len(ids)} tokens, warm-up")
    compressor.compress(text, rate=rate)
    compressor.compress(text, rate=rate, coarse=False)
    compressor.scorer.surprisal(ids)
    comp_s, fine_s, pass_s, result, fine = [], [], [], None, None
    for r in range(args.repeats):
        # Alternate the contenders and their floor so drift hits all alike.
        _sync(compressor)
        start = time.perf_counter()
        result = compressor.compress(text, rate=rate)
        _sync(compressor)
        comp_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        fine = compressor.compress(text, rate=rate, coarse=False)
        _sync(compressor)
        fine_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        compressor.scorer.surprisal(ids)
        _sync(compressor)
        pass_s.append(time.perf_counter() - start)
        progress(f"throughput: round {r + 1}/{args.repeats}")
    assert result is not None and fine is not None
    c, f, p = statistics.median(comp_s), statistics.median(fine_s), statistics.median(pass_s)
    return {
        "input_tokens": len(ids),
        "output_tokens": result.compressed_tokens,
        "ratio": result.ratio,
        "compress_s": c,
        "compress_tokens_per_s": len(ids) / c,
        "token_level_output_tokens": fine.compressed_tokens,
        "token_level_s": f,
        "token_level_tokens_per_s": len(ids) / f,
        "one_pass_s": p,
        "one_pass_tokens_per_s": len(ids) / p,
        "compress_over_one_pass": c / p,
        "token_level_over_one_pass": f / p,
        "runs_compress_s": comp_s,
        "runs_token_level_s": fine_s,
        "runs_one_pass_s": pass_s,
    }


def _sync(compressor: Any) -> None:
    import torch

    if compressor.device.type == "cuda":
        torch.cuda.synchronize(compressor.device)


# -- report ---------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_report(payload: dict[str, Any]) -> str:
    ctx = payload["context"]
    out = [
        f"model: {ctx['model_path']}",
        f"weights: {ctx['weights']}",
        f"device: {ctx['device']} ({ctx['device_name']}), dtype {ctx['dtype']}, torch {ctx['torch']}, "
        f"{ctx['cpu_threads']} CPU threads, load average {ctx.get('load_average_at_start')} -> "
        f"{ctx.get('load_average_at_end')}",
    ]
    if ctx["weights_kind"] == "random":
        out.append("NOTE: weights are random -- these figures show the mechanism (budgets, forced tokens, "
                   "ranking), not the quality of what a trained scorer would keep.")
    tp = payload.get("throughput")
    if tp:
        out += ["", "throughput (compress 3x, median of repeats)",
                _table(["what", "tokens in", "tokens out", "seconds", "tokens/s"], [
                    ["compress (coarse + iterative)", str(tp["input_tokens"]), str(tp["output_tokens"]),
                     f"{tp['compress_s']:.3f}", f"{tp['compress_tokens_per_s']:,.0f}"],
                    ["compress (token-level only)", str(tp["input_tokens"]), str(tp["token_level_output_tokens"]),
                     f"{tp['token_level_s']:.3f}", f"{tp['token_level_tokens_per_s']:,.0f}"],
                    ["one scoring pass (baseline)", str(tp["input_tokens"]), "-", f"{tp['one_pass_s']:.3f}",
                     f"{tp['one_pass_tokens_per_s']:,.0f}"],
                ]),
                f"time / one scoring pass: full {tp['compress_over_one_pass']:.2f}x, "
                f"token-level only {tp['token_level_over_one_pass']:.2f}x"]
    nd = payload.get("needle")
    if nd:
        labels = [f"{f:g}x" for f in payload["options"]["rates"]]
        rows = []
        for m in nd["methods"]:
            cells = [m]
            for label in labels:
                r = nd["results"][m][label]
                glued = f", {r['glued_words']} glued" if r.get("glued_words") else ""
                cells.append("-" if r["retention"] is None else f"{100 * r['retention']:.0f}% ({r['ratio']:.2f}x{glued})")
            rows.append(cells)
        out += ["", "needle: planted facts whose key survives (achieved compression ratio)",
                _table(["method", *labels], rows)]
    return "\n".join(out)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compression", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="scoring model folder (default: the embedded tiny test model)")
    g.add_argument("--random-model", metavar="SHAPE", choices=("llama3-8b", "llama3.2-1b", "tiny"),
                   help="a real architecture with seeded random weights (timing only)")
    g.add_argument("--random-model-dir", metavar="DIR", help="cache folder for --random-model checkpoints")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--window", type=int, default=256, metavar="N", help="iterative window in tokens (default 256)")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    t = p.add_argument_group("task")
    t.add_argument("--rates", default="2,3,5", help="compression factors, comma-separated (default 2,3,5)")
    t.add_argument("--trials", type=int, default=4, metavar="N", help="needle texts (default 4)")
    t.add_argument("--paragraphs", type=int, default=16, metavar="N", help="paragraphs per needle text (default 16)")
    t.add_argument("--sentences", type=int, default=5, metavar="N", help="filler sentences per paragraph (default 5)")
    t.add_argument("--facts", type=int, default=6, metavar="N", help="facts planted per text (default 6)")
    t.add_argument("--questions", type=int, default=2, metavar="N",
                   help="facts asked per text for the question-aware method (default 2)")
    t.add_argument("--throughput-tokens", type=int, default=4096, metavar="N", help="throughput text size (default 4096)")
    t.add_argument("--repeats", type=int, default=3, metavar="N", help="throughput repeats (default 3)")
    t.add_argument("--filler", choices=("prose", "salad"), default="prose",
                   help="needle filler: grammatical sentences (default) or word salad")
    t.add_argument("--skip-method", choices=METHODS, action="append", default=[], help="leave a needle method out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--skip", choices=("throughput", "needle"), action="append", default=[], help="skip a part")
    p.add_argument("--json", metavar="PATH", help="write every figure and its context to PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.rates = [float(x) for x in args.rates.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--rates: expected numbers like 2,3,5, got {args.rates!r}") from None
    if not args.rates or any(f < 1 for f in args.rates):
        raise SystemExit("--rates: compression factors must be >= 1")
    import torch
    import transformers

    from parrot.compression import Compressor

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads: must be at least 1")
        torch.set_num_threads(args.threads)

    path, weights = resolve_model(args)
    weights_kind = "checkpoint" if args.model else "random"
    progress(f"loading {path}")
    compressor = Compressor(path, device=args.device, window_tokens=args.window)
    model = compressor.scorer.model
    context = {
        "model_path": str(path),
        "weights": weights,
        "weights_kind": weights_kind,
        "model_config": {k: v for k, v in vars(model.config).items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(compressor.device),
        "device_name": _device_name(compressor.device),
        "dtype": str(compressor.scorer.dtype).replace("torch.", ""),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Other work on the machine changes absolute tokens/s; the ratios
        # against the one-pass baseline, run alternately, are what compare.
        "load_average_at_start": _load_average(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if compressor.device.type == "cuda" else None,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m benchmarks.compression", *(argv if argv is not None else sys.argv[1:])]),
    }
    payload: dict[str, Any] = {"benchmark": "compression", "context": context, "options": {
        "rates": args.rates, "trials": args.trials, "paragraphs": args.paragraphs, "sentences": args.sentences,
        "facts": args.facts, "questions": args.questions, "throughput_tokens": args.throughput_tokens,
        "repeats": args.repeats, "seed": args.seed, "window_tokens": args.window, "filler": args.filler,
    }}
    if "throughput" not in args.skip:
        payload["throughput"] = run_throughput(compressor, args)
    if "needle" not in args.skip:
        payload["needle"] = run_needle(compressor, args)
    context["load_average_at_end"] = _load_average()
    print(format_report(payload))
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
