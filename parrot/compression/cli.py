"""Command line: compress a text file and print it with statistics.

    python -m parrot.compression FILE [--rate R | --target-tokens N] [--question Q]
                                      [--instruction I] [--model PATH] [--device D] [--force S ...]

The compressed text goes to stdout, the statistics table to stderr (so the
text can be piped); ``--json`` prints one JSON object to stdout instead.
``FILE`` may be ``-`` for stdin. :func:`main` takes ``argv`` so that a
``parrot compress`` subcommand can delegate to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from parrot.semantic_vars.errors import InvalidArgumentError


def build_parser(prog: str = "python -m parrot.compression") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compress a prompt context with LLMLingua-family compression (coarse segment "
        "dropping + iterative token-level compression) scored by a Parrot model.",
    )
    p.add_argument("file", metavar="FILE", help="text file to compress ('-' reads stdin)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--rate", type=float, help="fraction of tokens to keep, in (0, 1] (default 0.5)")
    budget.add_argument("--target-tokens", type=int, metavar="N", help="token budget for the whole prompt")
    p.add_argument("--question", default="", help="question the context should answer (LongLLMLingua ranking)")
    p.add_argument("--instruction", default="", help="instruction placed before the context (kept whole)")
    p.add_argument("--force", action="append", default=[], metavar="S", help="a string to always keep (repeatable)")
    p.add_argument("--no-force-numbers", action="store_true", help="do not force-keep numbers")
    p.add_argument("--no-force-names", action="store_true", help="do not force-keep capitalised names")
    p.add_argument("--no-coarse", action="store_true", help="skip segment (paragraph) dropping")
    p.add_argument("--no-fine", action="store_true", help="skip token-level compression")
    p.add_argument("--model", metavar="PATH", help="scoring model folder (default: the embedded tiny test model)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--window", type=int, default=256, metavar="N", help="tokens per iterative window (default 256)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text and statistics) instead")
    p.add_argument("--quiet", action="store_true", help="print the text only, no statistics")
    return p


def format_stats(result, *, device: str) -> str:
    rows = [
        ("original tokens", f"{result.original_tokens}"),
        ("compressed tokens", f"{result.compressed_tokens}"),
        ("target tokens", f"{result.target_tokens}"),
        ("ratio", f"{result.ratio:.2f}x (kept {100 * result.rate:.1f}%)"),
        ("segments kept", f"{len(result.kept_segments)}/{result.segments}"),
        ("forced tokens kept", f"{result.forced_tokens}"),
        ("time", f"{result.seconds:.3f} s"),
        ("throughput", f"{result.tokens_per_second:,.0f} tokens/s"),
        ("model", result.model),
        ("device", device),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    rate = args.rate
    if rate is None and args.target_tokens is None:
        rate = 0.5
    try:
        from parrot.compression.compressor import Compressor, _check_rate

        # Check the budget before loading a model for nothing.
        if rate is not None:
            _check_rate("rate", rate)
        if args.target_tokens is not None and args.target_tokens < 1:
            raise InvalidArgumentError("target_tokens", f"must be a positive number of tokens, got {args.target_tokens}")
        compressor = Compressor(args.model, device=args.device, window_tokens=args.window)
        result = compressor.compress(
            text, rate=rate, target_tokens=args.target_tokens, instruction=args.instruction,
            question=args.question, force=args.force, force_numbers=not args.no_force_numbers,
            force_names=not args.no_force_names, coarse=not args.no_coarse, fine=not args.no_fine,
        )
    except InvalidArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = str(compressor.device)
    if args.json:
        d = result.as_dict()
        d.pop("kept_token_ids")
        d.pop("original_token_ids")
        d["device"] = device
        print(json.dumps(d, indent=2, ensure_ascii=False))
        return 0
    sys.stdout.write(result.text)
    if not result.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        print("\n" + format_stats(result, device=device), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
