"""What constrained decoding costs: grammar mask work per token, and JSON-schema
decoding throughput against unconstrained decoding, side by side.

    python -m benchmarks.constraints [--device cpu] [--batches 1 64] [--json PATH]
                                     [--model PATH | --random-model SHAPE] [--compare-llguidance]

1. **Mask cost per token** (the engine's tokenizer, no model): a random walk
   through each grammar (a JSON schema, a regex, a choice among strings)
   picks an allowed token at every step; timed are what a constrained row
   adds to a step: filling the token bitmask (xgrammar's matcher alone,
   ``fill``), the engine's whole mask step for the row (fill, copy to
   ``--device``, apply to a logits row: ``mask``), and advancing the matcher
   by the sampled token (``accept``).
   With ``--compare-llguidance`` (if installed) the same walks are timed with
   llguidance's matcher: the measurement the library choice rests on.
2. **Decoding throughput**: one torch engine on the model; at each batch size
   ``--batches`` requests generate at temperature 1 under a JSON schema
   (bounded fields, so each object ends), and the same requests free, each
   generating exactly as many tokens as its constrained twin (so both runs
   have the same batch shape at every step); ``--repeats`` rounds
   alternating the order (A B, B A, ...) after a warm-up. Figures: output
   tokens per second (median) and the ratio constrained / free.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.harness import describe_context, progress, resolve_model, write_json
from parrot.backends.constraints import apply_masks, compiler_for, fill_masks
from parrot.backends.engine import Fill, Gen, GenerationRequest
from parrot.backends.torch_engine import TorchEngine, TorchEngineConfig
from parrot.semantic_vars import Constraint, SamplingConfig

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 24},
        "email": {"type": "string", "maxLength": 32},
        "role": {"enum": ["admin", "editor", "viewer", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
        "active": {"type": "boolean"},
        "score": {"type": "integer", "minimum": -1000, "maximum": 1000},
    },
    "required": ["id", "name", "email", "role", "tags", "active", "score"],
    "additionalProperties": False,
}
WALKS = {
    "json_schema": Constraint.json_schema(SCHEMA),
    "regex": Constraint.regex(r"[0-9]{3}-[a-z]{2,12}( [A-Z][a-z]{1,10}){0,4}"),
    "choices": Constraint.choices([f"option number {i}" for i in range(32)]),
}


def _allowed(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = ((bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
    return bits.nonzero().flatten().tolist()


def mask_cost(engine: TorchEngine, walks: int, max_steps: int) -> list[dict[str, Any]]:
    """Microseconds per token of fill, the engine's mask step and accept, per grammar kind (xgrammar)."""
    import xgrammar as xgr

    vocab = engine.model.config.vocab_size
    compiler = compiler_for(engine.tokenizer, vocab)
    logits = torch.zeros(1, vocab, device=engine.device)
    rows = []
    for kind, constraint in WALKS.items():
        t = time.perf_counter()
        compiler.compile(constraint)
        compile_ms = (time.perf_counter() - t) * 1e3
        fill, apply, accept = [], [], []
        for seed in range(walks):
            rng = random.Random(seed)
            row = compiler.matcher(constraint)
            for _ in range(max_steps):
                if row.matcher.is_terminated():
                    break
                bitmask = xgr.allocate_token_bitmask(1, vocab)
                t = time.perf_counter()
                row.matcher.fill_next_token_bitmask(bitmask, 0)
                fill.append(time.perf_counter() - t)
                t = time.perf_counter()
                apply_masks(logits, fill_masks([row], vocab))
                if engine.device.type == "cuda":
                    torch.cuda.synchronize(engine.device)
                apply.append(time.perf_counter() - t)
                token = rng.choice(_allowed(bitmask[0], vocab))
                t = time.perf_counter()
                row.accept(token)
                accept.append(time.perf_counter() - t)
        rows.append({"library": "xgrammar", "kind": kind, "compile_ms": compile_ms, "tokens": len(fill),
                     "fill_us": statistics.mean(fill) * 1e6, "fill_p50_us": statistics.median(fill) * 1e6,
                     "mask_us": statistics.mean(apply) * 1e6, "accept_us": statistics.mean(accept) * 1e6})
    return rows


def mask_cost_llguidance(engine: TorchEngine, walks: int, max_steps: int) -> list[dict[str, Any]]:
    """The same walks through llguidance's matcher (fill and accept; its masks have the same layout)."""
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    from parrot.backends.constraints import choices_grammar

    vocab = engine.model.config.vocab_size
    lltok = llguidance.hf.from_tokenizer(engine.tokenizer.hf, n_vocab=vocab)
    grammars = {
        "json_schema": llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False}),
        "regex": llguidance.LLMatcher.grammar_from_regex(WALKS["regex"].spec),
        "choices": llguidance.LLMatcher.grammar_from_lark(
            "start: " + choices_grammar(WALKS["choices"].spec).removeprefix("root ::= ")),
    }
    rows = []
    for kind, grammar in grammars.items():
        t = time.perf_counter()
        probe = llguidance.LLMatcher(lltok, grammar)
        compile_ms = (time.perf_counter() - t) * 1e3
        if probe.is_error():
            raise RuntimeError(f"llguidance rejects the {kind} grammar: {probe.get_error()}")
        fill, accept = [], []
        for seed in range(walks):
            rng = random.Random(seed)
            m = llguidance.LLMatcher(lltok, grammar)
            bitmask = lt.allocate_token_bitmask(1, vocab)
            for _ in range(max_steps):
                if m.is_stopped():
                    break
                t = time.perf_counter()
                lt.fill_next_token_bitmask(m, bitmask, 0)
                fill.append(time.perf_counter() - t)
                token = rng.choice(_allowed(bitmask[0], vocab))
                t = time.perf_counter()
                m.consume_token(token)
                accept.append(time.perf_counter() - t)
        rows.append({"library": "llguidance", "kind": kind, "compile_ms": compile_ms, "tokens": len(fill),
                     "fill_us": statistics.mean(fill) * 1e6, "fill_p50_us": statistics.median(fill) * 1e6,
                     "mask_us": None, "accept_us": statistics.mean(accept) * 1e6})
    return rows


def _run(engine: TorchEngine, requests: list[GenerationRequest]) -> tuple[float, list[int]]:
    """Wall time of the batch and the decode steps (generated tokens, EOS included) of each request."""
    async def go() -> tuple[float, list[int]]:
        t = time.perf_counter()
        streams = [engine.submit(r) for r in requests]
        steps = []
        for s in streams:
            _, stats = await s.results()
            steps.append(stats.generated_tokens)
        return time.perf_counter() - t, steps

    return asyncio.run(go())


def throughput(engine: TorchEngine, batch: int, max_tokens: int, repeats: int) -> dict[str, Any]:
    """Output tokens per second, JSON-schema-constrained vs free, alternating rounds.

    Request ``i`` has the same prompt and seed in every run, so its
    constrained output (which ends where the grammar does) has the same
    length every time; its free twin generates exactly that many tokens.
    Both modes then run the same batch shape step by step, and the ratio is
    what the constraint adds per token.
    """
    tok = engine.tokenizer
    prompts = [tuple(tok.encode(f"Record {i} as JSON:", add_bos=True)) for i in range(batch)]

    def requests(lengths: list[int] | None) -> list[GenerationRequest]:
        out = []
        for i, prompt in enumerate(prompts):
            if lengths is None:
                sampling = SamplingConfig(max_tokens=max_tokens, temperature=1.0, seed=i, constraint=WALKS["json_schema"])
            else:
                sampling = SamplingConfig(max_tokens=lengths[i], temperature=1.0, seed=i)
            out.append(GenerationRequest([Fill(prompt), Gen(sampling)]))
        return out

    _, lengths = _run(engine, requests(None))  # warm-up; the grammar compiles here
    _run(engine, requests(lengths))
    runs: dict[str, list[float]] = {"free": [], "json_schema": []}
    for r in range(repeats):
        order = ("free", "json_schema") if r % 2 == 0 else ("json_schema", "free")
        for mode in order:
            wall, steps = _run(engine, requests(lengths if mode == "free" else None))
            runs[mode].append(sum(steps) / wall)
    free, constrained = statistics.median(runs["free"]), statistics.median(runs["json_schema"])
    return {"batch": batch, "max_tokens": max_tokens, "tokens_per_run": sum(lengths), "free_tok_s": free,
            "json_schema_tok_s": constrained, "ratio_json_over_free": constrained / free, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="PATH", help="local HF checkpoint folder (default: the embedded tiny test model)")
    p.add_argument("--random-model", metavar="SHAPE", choices=("llama3-8b", "llama3.2-1b", "tiny"),
                   help="a checkpoint of this architecture with seeded random bf16 weights (timing only)")
    p.add_argument("--random-model-dir", metavar="DIR", help="where --random-model checkpoints are cached")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64], metavar="B", help="batch sizes (default 1 64)")
    p.add_argument("--max-tokens", type=int, default=96, help="output budget per request (default 96)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds per batch size (default 3)")
    p.add_argument("--walks", type=int, default=20, help="random walks per grammar for the mask cost (default 20)")
    p.add_argument("--compare-llguidance", action="store_true", help="also time the walks with llguidance")
    p.add_argument("--json", metavar="PATH", help="write every figure and its context to PATH")
    args = p.parse_args(argv)
    path, weights = resolve_model(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = TorchEngine.from_pretrained(path, device=device, config=TorchEngineConfig(max_running=max(args.batches)))
    try:
        progress("mask cost per token")
        masks = mask_cost(engine, args.walks, 200)
        if args.compare_llguidance:
            masks += mask_cost_llguidance(engine, args.walks, 200)
        decode = []
        for b in args.batches:
            progress(f"throughput at batch {b}")
            decode.append(throughput(engine, b, args.max_tokens, args.repeats))
        context = describe_context([engine], model_path=path, weights=weights)
    finally:
        engine.close()
    print(f"mask cost per token on {context['device_name']} (vocab {engine.model.config.vocab_size})")
    print(f"{'library':<11} {'kind':<12} {'compile ms':>10} {'fill us':>9} {'fill p50':>9} {'mask us':>9} {'accept us':>9}")
    for m in masks:
        apply = f"{m['mask_us']:9.1f}" if m["mask_us"] is not None else f"{'-':>9}"
        print(f"{m['library']:<11} {m['kind']:<12} {m['compile_ms']:10.2f} {m['fill_us']:9.1f} {m['fill_p50_us']:9.1f} {apply} {m['accept_us']:9.1f}")
    print("\ndecoding throughput, output tokens/s (median), free vs JSON schema")
    print(f"{'batch':>5} {'free':>10} {'json_schema':>12} {'ratio':>7}")
    for d in decode:
        print(f"{d['batch']:>5} {d['free_tok_s']:10.1f} {d['json_schema_tok_s']:12.1f} {d['ratio_json_over_free']:7.3f}")
    if args.json:
        write_json(args.json, {"benchmark": "constraints", "context": context, "mask_cost": masks, "throughput": decode})
    return 0


if __name__ == "__main__":
    sys.exit(main())
