"""Checkpoints of real Llama architectures with seeded random weights, for timing.

Speed does not depend on weight values, so a benchmark may run a real shape
(Llama-3-8B, Llama-3.2-1B) filled with seeded random numbers and say so next
to its figures (../shared/BENCHMARKS.md). The folder gets the architecture's
real ``config.json`` and the embedded test model's tokenizer files (a
4096-token vocabulary: every token id stays below the 128256 rows of the
embedding, which is all the forward needs), plus bf16 weights written shard
by shard: each tensor is drawn on the chosen device and the host holds at
most one shard (``shard_bytes``) at a time.

    python -m benchmarks.random_model llama3.2-1b [--out DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from parrot.backends.default_model import hf_weight_shapes

SHAPES = ("llama3-8b", "llama3.2-1b", "tiny")
SEED = 20240611
INIT_STD = 0.02
DEFAULT_SHARD_BYTES = 2 * 2**30
_COMPLETE = ".complete"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

# Llama 3.1's RoPE scaling (the "llama3" rope type) with its real constants.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}


def shape_config(shape: str) -> dict[str, Any]:
    """``config.json`` of ``shape`` with the embedded tokenizer's special token ids."""
    from parrot.backends.default_model import default_model_config

    tiny = default_model_config()
    special = {k: tiny[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if shape == "tiny":
        config = dict(tiny)
    elif shape == "llama3-8b":
        config = {
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": dict(_LLAMA3_ROPE),
            "rope_parameters": dict(_LLAMA3_ROPE), "tie_word_embeddings": False,
        }
    elif shape == "llama3.2-1b":
        rope = {**_LLAMA3_ROPE, "factor": 32.0}
        config = {
            "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": dict(rope),
            "rope_parameters": dict(rope), "tie_word_embeddings": True,
        }
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if shape != "tiny":
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "initializer_range": INIT_STD, "attention_bias": False,
            "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "use_cache": True,
            **config, **special,
        }
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    return config


def parameter_count(shape: str) -> int:
    total = 0
    for dims in hf_weight_shapes(shape_config(shape)).values():
        n = 1
        for d in dims:
            n *= d
        total += n
    return total


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def write_random_model(
    shape: str,
    dest: str | Path,
    *,
    seed: int = SEED,
    device: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a ``shape`` checkpoint with seeded random bf16 weights into ``dest``.

    Matrices are N(0, 0.02), RMSNorm scales ones. Tensor ``i`` (in sorted
    name order) is drawn from a generator seeded ``seed + i`` on ``device``
    (default: cuda if available, else cpu), so the weights are reproducible
    for a given device kind. Shards of at most ``shard_bytes`` (one tensor
    larger than that gets a shard of its own) plus
    ``model.safetensors.index.json``.
    """
    import torch
    from safetensors.torch import save_file

    from parrot.backends.default_model import default_model_path

    say = progress or (lambda m: None)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    gen_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = shape_config(shape)
    shapes = hf_weight_shapes(config)
    names = sorted(shapes)
    # Plan the shards first: file names carry the shard count.
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = 2 * _numel(shapes[name])
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    started = time.perf_counter()
    index = {name: i for i, name in enumerate(names)}
    for k, members in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name in members:
            dims = shapes[name]
            if name.endswith("norm.weight"):
                t = torch.ones(dims, dtype=torch.bfloat16)
            else:
                g = torch.Generator(device=gen_device).manual_seed(seed + index[name])
                t = torch.empty(dims, dtype=torch.float32, device=gen_device).normal_(0.0, INIT_STD, generator=g)
                t = t.to(torch.bfloat16).cpu()
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, str(dest / file), metadata={"format": "pt"})
        del tensors
        say(f"wrote {file} ({len(members)} tensors, {total / 2**30:.2f} GiB so far, {time.perf_counter() - started:.0f} s)")
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    source = default_model_path()
    for name in _TOKENIZER_FILES:
        shutil.copy(source / name, dest / name)
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (dest / "README.md").write_text(
        f"# random {shape}\n\nThe {shape} architecture with **seeded random bf16 weights** (seed {seed}, "
        f"drawn on {gen_device.type}), written by `benchmarks.random_model` for timing only. The tokenizer is "
        "Parrot's embedded test tokenizer (4096 tokens). Its text is not meaningful.\n"
    )
    return dest


def random_model_path(
    shape: str,
    *,
    root: str | Path | None = None,
    device: str | None = None,
    seed: int = SEED,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The cached folder of ``shape`` under ``root`` (default: Parrot's cache
    dir / bench-random-models), written atomically on first use."""
    import torch

    from parrot.backends.default_model import cache_dir

    say = progress or (lambda m: None)
    base = Path(root).expanduser() if root else cache_dir() / "bench-random-models"
    gen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    final = base / f"{shape}-seed{seed}-{gen}"
    if (final / _COMPLETE).exists():
        return final
    base.mkdir(parents=True, exist_ok=True)
    say(f"writing a random-weight {shape} checkpoint ({parameter_count(shape) / 1e9:.2f} B parameters) into {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=base))
    try:
        write_random_model(shape, tmp, seed=seed, device=device, progress=say)
        (tmp / _COMPLETE).write_text("")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Flush the gigabytes just written now, not while the benchmark is timing.
    os.sync()
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.random_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=SHAPES)
    parser.add_argument("--out", metavar="DIR", help="write here (default: the cache folder the benchmarks use)")
    parser.add_argument("--device", help="where to draw the weights (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--shard-gib", type=float, default=DEFAULT_SHARD_BYTES / 2**30)
    args = parser.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.out:
        path = write_random_model(args.shape, args.out, seed=args.seed, device=args.device,
                                  shard_bytes=int(args.shard_gib * 2**30), progress=say)
    else:
        path = random_model_path(args.shape, device=args.device, seed=args.seed, progress=say)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
