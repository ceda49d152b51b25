"""Per-head sparse prefill patterns searched on a model's real attention.

MInference chooses a pattern and budget per attention head offline, on a
calibration text, and serves with that choice. This module does the same
for any Parrot model:

1. :func:`record_qkv` runs the model once over a calibration text and keeps
   each layer's post-RoPE queries and keys (and values) -- exactly what the
   engine's sparse prefill builds its index from;
2. :func:`calibrate` hands them to :func:`parrot.kernels.pattern_search.search_config`
   with a recall target: per head, the cheapest candidate (A-shape,
   vertical-slash, block-sparse, or dense as the fallback) whose attention-
   mass recall reaches the target;
3. :func:`evaluate` measures a config per layer on *held-apart* text: recall,
   computed fraction and relative output error of attention.

The config is saved as JSON (``config.save(path)``) and loaded by the engine
(``TorchEngineConfig(sparse_prefill=path)``, ``parrot serve --sparse-config``).

Command line::

    python -m parrot.backends.sparse_calibration --model DIR --calibration text.txt \\
        --tokens 4096 --recall 0.95 --out sparse.json [--held-out other.txt]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from parrot.kernels import HeadPattern, SparseAttentionConfig
from parrot.kernels.pattern_search import attention_mass_recall, attention_output_error, search_config
from parrot.kernels.prefill import build_layer_index

from .kv_cache import AttentionBatch, SequenceKV, SequenceSlice

__all__ = ["calibrate", "evaluate", "record_qkv"]

LayerQKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _RecordingBatch(AttentionBatch):
    """An attention batch that keeps each layer's ``q``/``k``/``v`` as attention sees them."""

    def __init__(self, sequences: list[SequenceSlice]) -> None:
        super().__init__(sequences)
        self.recorded: list[LayerQKV] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.recorded.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return super().attend(layer, q, k, v)


@torch.inference_mode()
def record_qkv(model: Any, ids: Sequence[int]) -> list[LayerQKV]:
    """Each layer's post-RoPE ``(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D])``
    for one forward of ``model`` (a :class:`~parrot.backends.model.LlamaFamilyModel`)
    over ``ids``, in one chunk (as sparse prefill runs a long prompt)."""
    c = model.config
    if not ids:
        raise ValueError("need at least one token to record")
    if len(ids) > c.max_position_embeddings:
        raise ValueError(f"{len(ids)} tokens exceed the model's {c.max_position_embeddings} positions")
    first = next(model.parameters())
    kv = SequenceKV(c.num_layers, c.num_kv_heads, c.head_dim, dtype=first.dtype, device=first.device,
                    initial_capacity=len(ids))
    kv.reserve(len(ids))
    batch = _RecordingBatch([SequenceSlice(kv, 0, len(ids))])
    input_ids = torch.tensor(list(ids), dtype=torch.long, device=first.device)
    positions = torch.arange(len(ids), dtype=torch.long, device=first.device)
    model(input_ids, positions, batch)
    return batch.recorded


def calibration_ids(tokenizer: Any, text: str, tokens: int) -> list[int]:
    """The first ``tokens`` token ids of ``text`` (BOS first when the model has
    one), the text repeated when it is shorter."""
    ids = tokenizer.encode(text, add_bos=False)
    if not ids:
        raise ValueError("the calibration text has no tokens")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = list(bos)
    while len(out) < tokens:
        out.extend(ids)
    return out[:tokens]


def calibrate(
    model: Any,
    samples: Sequence[Sequence[int]],
    *,
    min_recall: float = 0.95,
    candidates: Sequence[HeadPattern] | None = None,
    block_m: int = 64,
    block_n: int = 64,
    last_q: int = 64,
    min_length: int | None = None,
    rows: int | None = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> SparseAttentionConfig:
    """Search a per-head config on ``model``'s attention over each token
    sequence of ``samples``: per head the cheapest pattern with attention-mass
    recall >= ``min_recall`` on the last ``rows`` query rows (all with
    ``None``), among ``candidates`` (default: :func:`~parrot.kernels.pattern_search.default_candidates`
    for the sample length, plus ``dense``). ``min_length`` (default: the shortest sample) is the prompt
    length from which the engine uses the config; shorter prompts stay dense."""
    if not samples:
        raise ValueError("need at least one calibration sample")
    recorded = [record_qkv(model, ids) for ids in samples]
    length = min(len(s) for s in samples)
    config = search_config(
        recorded, candidates, max_fraction=1.0, block_m=block_m, block_n=block_n, last_q=last_q,
        min_length=min_length if min_length is not None else length, rows=rows, min_recall=min_recall,
        progress=progress,
    )
    config.meta["calibration_tokens"] = [len(s) for s in samples]
    return config


def evaluate(
    model: Any, config: SparseAttentionConfig, ids: Sequence[int], *, rows: int | None = 1024
) -> list[dict[str, float]]:
    """Per layer on ``ids`` (held-apart text): mean and worst head recall of
    attention mass, computed fraction of the causal score matrix, and the
    mean relative error of the attention output, over the last ``rows`` query rows."""
    out = []
    for layer, (q, k, v) in enumerate(record_qkv(model, ids)):
        t = q.shape[0]
        index = build_layer_index(q, k, config.layer(layer))
        mask = index.dense_mask(t, first_row=0 if rows is None else max(0, t - rows))
        recall = attention_mass_recall(q, k, mask)
        error = attention_output_error(q, k, v, mask)
        fraction = index.computed_fraction(t, per_head=True)
        out.append({
            "layer": layer,
            "recall_mean": float(recall.mean()),
            "recall_min": float(recall.min()),
            "fraction": float(sum(fraction) / len(fraction)),
            "output_error": float(error.mean()),
            "output_error_max": float(error.max()),
            "kinds": sorted({h.kind for h in config.layers[layer]}),
        })
    return out


def _load(model_dir: str | None, device: str | None) -> tuple[Any, Any, str]:
    from parrot.backends.checkpoint import load_model
    from parrot.backends.tokenizer import Tokenizer

    if model_dir is None:
        from parrot.backends.default_model import default_model_path

        folder = Path(default_model_path())
    else:
        folder = Path(model_dir).expanduser()
    model = load_model(folder, device=torch.device(device or "cpu"))
    return model, Tokenizer(folder), str(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parrot.backends.sparse_calibration",
                                description="Search per-head sparse prefill patterns on a model's real attention.")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the default model)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--calibration", metavar="FILE", required=True, help="calibration text (UTF-8)")
    p.add_argument("--held-out", metavar="FILE", help="text to evaluate the config on (not searched on)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per sample (default 4096)")
    p.add_argument("--recall", type=float, default=0.95, help="per-head recall target (default 0.95)")
    p.add_argument("--rows", type=int, default=1024, help="query rows scored, the last ones (default 1024; 0: all)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", metavar="PATH", required=True, help="where to write the config JSON")
    p.add_argument("--report", metavar="PATH", help="per-layer held-out figures as JSON")
    args = p.parse_args(argv)
    if not 0.0 < args.recall <= 1.0:
        p.error("--recall must be in (0, 1]")
    if args.tokens < 128:
        p.error("--tokens must be at least 128")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, folder = _load(args.model, args.device)
    if args.tokens > model.config.max_position_embeddings:
        p.error(f"--tokens {args.tokens} exceeds the model's {model.config.max_position_embeddings} positions")
    rows = args.rows or None
    ids = calibration_ids(tokenizer, Path(args.calibration).read_text(encoding="utf-8"), args.tokens)
    config = calibrate(model, [ids], min_recall=args.recall, rows=rows,
                       progress=lambda d, n: print(f"searched layer {d}/{n}", file=sys.stderr, flush=True))
    config.meta["model"] = folder
    config.save(args.out)
    print(f"wrote {args.out}")
    if args.held_out:
        held = calibration_ids(tokenizer, Path(args.held_out).read_text(encoding="utf-8"), args.tokens)
        layers = evaluate(model, config, held, rows=rows)
        for r in layers:
            print(f"layer {r['layer']:2d}  recall mean {r['recall_mean']:.3f} min {r['recall_min']:.3f}  "
                  f"fraction {r['fraction']:.3f}  output error {r['output_error']:.3f}  {','.join(r['kinds'])}")
        if args.report:
            Path(args.report).write_text(json.dumps({"model": folder, "tokens": args.tokens, "recall_target": args.recall,
                                                     "rows": rows, "layers": layers}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
