"""Kernel benchmarks: sparse prefill vs torch SDPA (flash), shared-prefix decode vs per-sequence paged decode.

Method (../shared/BENCHMARKS.md): contender and baseline run in the same
process on the same device, alternating, after a warm-up; figures are
medians of CUDA-event timings; ratios are baseline / contender.

* Sparse prefill: one layer, ``--heads`` heads (MHA), head dim 128, bf16.
  The contender's time includes building the index online from q/k (on the
  GPU). The baseline is ``F.scaled_dot_product_attention(is_causal=True)``
  restricted to the flash backend. Inputs are synthetic (labelled so in the
  output): random q/k/v plus a RoPE-rotated shared component (attention
  that decays with distance: slashes), sink tokens and a few heavy key
  columns (verticals). Recall and error are therefore figures about these
  inputs, not about a trained model.
* Decode: a 4K-token shared prefix and 128-token suffixes per sequence, N
  sequences in one group; block size 16. Contender:
  ``shared_prefix_decode_attention`` (group plan built once per step,
  outside the timing, as an engine reuses it for every layer). Baseline:
  ``paged_decode_attention`` (the same Triton code, one item per
  sequence) over each sequence's joined block table, which holds the same
  physical prefix blocks. Both are captured in CUDA graphs and replayed so
  launch overhead does not dominate microsecond kernels.

* Cached prefill (``--parts cached-prefill``): one layer of the 8B shape
  (32 query heads, 8 KV heads, head dim 128, bf16, block size 16), ``n`` new
  tokens after ``past`` positions already in the paged pool (a prefix-cache
  hit, or a prompt's later chunk). Contender: the engine's
  ``paged_prefill_attention`` (a lower-right causal bias, so SDPA keeps its
  flash kernel). Baseline: the same gather with an explicit boolean mask
  (what the engine did before). Floor: flash attention over the new tokens
  alone (no past).

Run on a CUDA machine: ``python -m benchmarks.kernels --json benchmarks/results/kernels-h100.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import parrot.kernels as K
from parrot.kernels import sparse_index as S
from parrot.kernels.pattern_search import attention_mass_recall

BUDGETS = {  # patterns timed at every length (uniform over heads)
    "a_shape": K.HeadPattern("a_shape", sink=128, window=4096),
    "vertical_slash": K.HeadPattern("vertical_slash", vertical=1024, slash=128),
    "block_sparse": K.HeadPattern("block_sparse", top_k=64),
}
RECALL_BUDGETS = [  # patterns and budgets whose recall/error vs dense is reported
    K.HeadPattern("a_shape", sink=128, window=1024),
    K.HeadPattern("a_shape", sink=128, window=4096),
    K.HeadPattern("vertical_slash", vertical=1024, slash=128),
    K.HeadPattern("vertical_slash", vertical=2048, slash=512),
    K.HeadPattern("block_sparse", top_k=16),
    K.HeadPattern("block_sparse", top_k=64),
]


def progress(msg: str) -> None:
    print(f"[kernels] {msg}", file=sys.stderr, flush=True)


def synthetic_qkv(t: int, heads: int, d: int, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """Random q/k/v with structure real attention has: a local band, sinks, heavy columns (bf16).

    Built in chunks of positions so that 1M-token prompts need no float32 copy.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16
    half = d // 2
    c = torch.randn(heads, d, generator=g, device=device)
    rot = torch.cat([-c[:, half:], c[:, :half]], -1)
    inv = 1.0 / (10000 ** (torch.arange(half, device=device).float() / half))
    u = torch.randn(heads, d, generator=g, device=device)
    u = u / u.norm(dim=-1, keepdim=True) * math.sqrt(d)
    q = torch.empty(t, heads, d, dtype=dtype, device=device)
    k = torch.empty_like(q)
    v = torch.empty_like(q)
    step = 1 << 16
    for s0 in range(0, t, step):
        n = min(step, t - s0)
        ang = torch.arange(s0, s0 + n, device=device).float()[:, None] * inv[None, :]
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        band = c[None] * cos + rot[None] * sin  # a shared vector rotated by position (RoPE): q.k depends on i - j
        q[s0 : s0 + n] = torch.randn(n, heads, d, generator=g, device=device) + 1.2 * band + 0.5 * u[None]
        k[s0 : s0 + n] = torch.randn(n, heads, d, generator=g, device=device) + 1.2 * band
        v[s0 : s0 + n] = torch.randn(n, heads, d, generator=g, device=device)
    # Sinks and heavy columns: keys aligned with a direction every query carries.
    k[:4] += (1.5 * u[None]).to(dtype)
    cols = torch.randint(4, t, (heads, 16), generator=g, device=device)
    for h in range(heads):
        k[cols[h], h] += u[h].to(dtype)
    return q, k, v


def cuda_time(fn: Callable[[], object]) -> float:
    """Seconds of one call, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run alternately (order flipped every round)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else reversed(names):
            times[n].append(cuda_time(fns[n]))
    return {n: statistics.median(v) for n, v in times.items()}


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), is_causal=True
        )[0].transpose(0, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, a chunk of rows at a time (1M-token outputs are 8.6 GB each in bf16)."""
    num = den = 0.0
    for s0 in range(0, a.shape[0], 1 << 15):
        x, y = a[s0 : s0 + (1 << 15)].float(), b[s0 : s0 + (1 << 15)].float()
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return math.sqrt(num / den)


def bench_prefill(lengths: list[int], heads: int, reps: int) -> list[dict]:
    rows = []
    for t in lengths:
        progress(f"prefill T={t}")
        try:
            q, k, v = synthetic_qkv(t, heads, 128, seed=t, device="cuda")
        except torch.OutOfMemoryError:
            rows.append({"T": t, "error": "out of memory for inputs"})
            continue
        fns = {"dense": lambda: dense_sdpa(q, k, v)}
        layers = {name: K.LayerPatterns.uniform(p, heads, min_length=0) for name, p in BUDGETS.items()}
        for name, layer in layers.items():
            fns[name] = lambda layer=layer: K.sparse_prefill_attention(q, k, v, layer)
        big = t >= 512 * 1024
        try:
            if big:  # one dense call takes tens of seconds: warm only the sparse path (triton compiles)
                for name in layers:
                    fns[name]()
            times = alternate(fns, reps=1 if big else reps, warmup=0 if big else 1)
        except torch.OutOfMemoryError as exc:
            rows.append({"T": t, "error": f"out of memory: {exc}"[:200]})
            continue
        dense = dense_sdpa(q, k, v)
        for name, layer in layers.items():
            index_s = statistics.median(cuda_time(lambda: K.build_layer_index(q, k, layer)) for _ in range(1 if big else 3))
            idx = K.build_layer_index(q, k, layer)
            out = K.sparse_attention(q, k, v, idx)
            rows.append({
                "T": t, "pattern": name, "budget": BUDGETS[name].to_dict(),
                "dense_s": times["dense"], "sparse_s": times[name], "index_s": index_s,
                "speedup": times["dense"] / times[name],
                "computed_fraction": idx.computed_fraction(t),
                "output_rel_err_vs_dense": rel_err(out, dense),
            })
            del idx, out
        del q, k, v, dense
        torch.cuda.empty_cache()
    return rows


def bench_recall(lengths: list[int], heads: int, last_rows: int) -> list[dict]:
    """Attention-mass recall (last ``last_rows`` queries) and output error vs dense, per budget."""
    rows = []
    for t in lengths:
        progress(f"recall T={t}")
        q, k, v = synthetic_qkv(t, heads, 128, seed=t, device="cuda")
        dense = dense_sdpa(q, k, v)
        for pat in RECALL_BUDGETS:
            layer = K.LayerPatterns.uniform(pat, heads, min_length=0)
            idx = K.build_layer_index(q, k, layer)
            out = K.sparse_attention(q, k, v, idx)
            twin_err = None
            if t <= 8192:  # the twin needs a full mask: check the kernel against it where it fits
                sub = slice(0, 8)
                idx8 = K.build_layer_index(q[:, sub], k[:, sub], K.LayerPatterns.uniform(pat, 8, min_length=0))
                twin = K.sparse_attention(q[:, sub], k[:, sub], v[:, sub], idx8, backend="reference")
                twin_err = rel_err(K.sparse_attention(q[:, sub], k[:, sub], v[:, sub], idx8), twin)
            recall = attention_mass_recall(q, k, idx.dense_mask(t, first_row=t - last_rows))
            rows.append({
                "T": t, "budget": pat.to_dict(), "recall_mean": float(recall.mean()), "recall_min": float(recall.min()),
                "computed_fraction": idx.computed_fraction(t), "output_rel_err_vs_dense": rel_err(out, dense),
                "kernel_rel_err_vs_twin_8_heads": twin_err,
            })
        del q, k, v, dense
        torch.cuda.empty_cache()
    return rows


def graph_time(fn: Callable[[], object], reps: int, inner: int = 20) -> Callable[[], object]:
    """A callable replaying ``inner`` captured calls of ``fn`` (falls back to eager if capture fails)."""
    fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        return graph.replay
    except Exception as exc:  # noqa: BLE001 - report and time eagerly
        progress(f"graph capture failed ({exc}); timing eagerly")

        def eager():
            for _ in range(inner):
                fn()

        return eager


def decode_inputs(n: int, hkv: int, heads: int, prefix: int, suffix: int) -> dict:
    """N sequences after one shared ``prefix`` with ``suffix`` own tokens each,
    in a shuffled paged pool (block size 16, head dim 128, bf16)."""
    d, bs = 128, 16
    pb, sb = prefix // bs, -(-suffix // bs)
    nb = pb + n * sb + 8
    g = torch.Generator(device="cuda").manual_seed(n + hkv)
    kc = torch.randn(nb, bs, hkv, d, generator=g, device="cuda").to(torch.bfloat16)
    vc = torch.randn(nb, bs, hkv, d, generator=g, device="cuda").to(torch.bfloat16)
    perm = torch.randperm(nb, generator=g, device="cuda").to(torch.int32)
    prefix_tables = perm[:pb].view(1, pb)
    suffix_tables = perm[pb : pb + n * sb].view(n, sb)
    suffix_lens = torch.full((n,), suffix, dtype=torch.int32, device="cuda")
    seq_group = torch.zeros(n, dtype=torch.int32, device="cuda")
    return {
        "query": torch.randn(n, heads, d, generator=g, device="cuda").to(torch.bfloat16),
        "key_cache": kc, "value_cache": vc, "prefix_block_tables": prefix_tables,
        "prefix_lens": torch.tensor([prefix], dtype=torch.int32, device="cuda"), "seq_group": seq_group,
        "suffix_block_tables": suffix_tables, "suffix_lens": suffix_lens,
        "plan": K.plan_shared_prefix(seq_group, 1),
        "joined": torch.cat([prefix_tables.expand(n, -1), suffix_tables], 1).contiguous(),
        "joined_lens": suffix_lens + prefix,
    }


def bench_decode(ns: list[int], heads: int, kv_heads_list: list[int], prefix: int, suffix: int, reps: int) -> list[dict]:
    rows = []
    d, inner = 128, 20
    for hkv in kv_heads_list:
        for n in ns:
            progress(f"decode N={n} Hkv={hkv}")
            x = decode_inputs(n, hkv, heads, prefix, suffix)
            args = {k: x[k] for k in ("query", "key_cache", "value_cache", "prefix_block_tables", "prefix_lens",
                                      "seq_group", "suffix_block_tables", "suffix_lens")}
            shared = lambda: K.shared_prefix_decode_attention(**args, plan=x["plan"])  # noqa: E731
            paged = lambda: K.paged_decode_attention(  # noqa: E731
                x["query"], x["key_cache"], x["value_cache"], x["joined"], x["joined_lens"])
            err = rel_err(shared(), paged())
            times = alternate({"shared": graph_time(shared, reps, inner), "paged": graph_time(paged, reps, inner)}, reps)
            kv_bytes = 2 * hkv * d * 2  # K and V, bf16, per token
            bound = (n * (prefix + suffix)) / (prefix + n * suffix)  # ratio of KV bytes read
            rows.append({
                "N": n, "heads": heads, "kv_heads": hkv, "prefix": prefix, "suffix": suffix,
                "shared_us": times["shared"] / inner * 1e6, "paged_us": times["paged"] / inner * 1e6,
                "speedup": times["paged"] / times["shared"], "target": 0.7 * n, "kv_bytes_ratio_bound": bound,
                "shared_GBps": (prefix + n * suffix) * kv_bytes / (times["shared"] / inner) / 1e9,
                "paged_GBps": n * (prefix + suffix) * kv_bytes / (times["paged"] / inner) / 1e9,
                "rel_err_shared_vs_paged": err,
            })
            del x, args
            torch.cuda.empty_cache()
    return rows


def bench_decode_passes(ns: list[int], heads: int, hkv: int, prefix: int, suffix: int, reps: int,
                        options: list[dict]) -> list[dict]:
    """Where shared-prefix decode's time goes: the prefix pass, the suffix
    pass and the merge timed one by one (CUDA graphs), for each grid option."""
    from parrot.kernels.triton_decode import shared_prefix_decode_passes

    rows, inner = [], 20
    for n in ns:
        x = decode_inputs(n, hkv, heads, prefix, suffix)
        args = {k: x[k] for k in ("query", "key_cache", "value_cache", "prefix_block_tables", "prefix_lens",
                                  "seq_group", "suffix_block_tables", "suffix_lens")}
        want = K.paged_decode_attention(x["query"], x["key_cache"], x["value_cache"], x["joined"], x["joined_lens"])
        for opt in options:
            progress(f"decode passes N={n} Hkv={hkv} {opt}")
            passes = shared_prefix_decode_passes(**args, plan=x["plan"], **opt)

            def whole(passes=passes):
                for run in passes:
                    out = run()
                return out

            err = rel_err(whole(), want)
            names = ("prefix", "suffix", "merge") if len(passes) == 3 else ("prefix", "suffix")
            fns = {name: graph_time(run, reps, inner) for name, run in zip(names, passes)}
            fns["whole"] = graph_time(whole, reps, inner)
            times = alternate(fns, reps)
            kv_bytes = 2 * hkv * 128 * 2
            rows.append({"N": n, "heads": heads, "kv_heads": hkv, "merge_us": 0.0, **opt,
                         **{f"{k}_us": v / inner * 1e6 for k, v in times.items()},
                         "bytes_floor_us": (prefix + n * suffix) * kv_bytes / 4.2e12 * 1e6,
                         "rel_err_vs_paged": err})
        del x, args, want
        torch.cuda.empty_cache()
    return rows


def masked_prefill(query, key, value, key_cache, value_cache, blocks, past: int, scale: float) -> torch.Tensor:
    """The baseline of ``--parts cached-prefill``: the cached context gathered,
    then SDPA with an explicit boolean causal mask (the engine before the
    lower-right bias; SDPA has no flash kernel for a tensor mask)."""
    n = query.shape[0]
    _, block_size, kv_heads, dim = key_cache.shape
    q_heads = query.shape[1]
    group = q_heads // kv_heads
    total = past + n
    used = blocks[: -(-total // block_size)].long()
    keys = key_cache[used].view(-1, kv_heads, dim)[:total].transpose(0, 1)
    values = value_cache[used].view(-1, kv_heads, dim)[:total].transpose(0, 1)
    key_pos = torch.arange(total, device=query.device)
    mask = key_pos[None, :] <= key_pos[past:, None]
    q = query.transpose(0, 1).reshape(1, kv_heads, group * n, dim)
    out = F.scaled_dot_product_attention(q, keys[None], values[None], attn_mask=mask.repeat(group, 1), scale=scale)
    return out.reshape(q_heads, n, dim).transpose(0, 1)


def bench_cached_prefill(cases: list[tuple[int, int]], reps: int) -> list[dict]:
    from parrot.backends.attention import paged_prefill_attention

    rows = []
    hq, hkv, d, bs = 32, 8, 128, 16
    scale = 1 / math.sqrt(d)
    for past, n in cases:
        progress(f"cached prefill past={past} n={n}")
        total = past + n
        nblocks = -(-total // bs)
        g = torch.Generator(device="cuda").manual_seed(past * 7 + n)
        key_cache = torch.randn(nblocks + 64, bs, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
        value_cache = torch.randn_like(key_cache)
        blocks = torch.randperm(nblocks + 64, device="cuda", generator=g)[:nblocks].to(torch.int32)
        q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16), torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
        args = (q, k, v, key_cache, value_cache, blocks, past, scale)
        fns = {"bias": lambda: paged_prefill_attention(*args), "mask": lambda: masked_prefill(*args),
               "no_past": lambda: paged_prefill_attention(q, k, v, key_cache, value_cache, blocks, 0, scale)}
        times = alternate(fns, reps=max(reps, 20))
        err = rel_err(paged_prefill_attention(*args), masked_prefill(*args))
        rows.append({"past": past, "n": n, "bias_s": times["bias"], "mask_s": times["mask"],
                     "no_past_s": times["no_past"], "speedup": times["mask"] / times["bias"],
                     "rel_err_vs_mask": err})
        del key_cache, value_cache
        torch.cuda.empty_cache()
    return rows


def environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "inputs": "synthetic (random + RoPE band + sinks + heavy columns), bf16",
    }


def print_tables(result: dict) -> None:
    print(f"\n# {result['env']['device']}  torch {result['env']['torch']}  triton {result['env']['triton']}")
    if result.get("cached_prefill"):
        print("\n## prefill after cached positions, one layer (32/8 heads, d 128, bf16)")
        print(f"{'past':>6} {'n':>6} {'bias us':>9} {'mask us':>9} {'no past us':>11} {'speedup':>8} {'rel err':>8}")
        for r in result["cached_prefill"]:
            print(f"{r['past']:>6} {r['n']:>6} {r['bias_s'] * 1e6:>9.1f} {r['mask_s'] * 1e6:>9.1f} "
                  f"{r['no_past_s'] * 1e6:>11.1f} {r['speedup']:>7.2f}x {r['rel_err_vs_mask']:>8.1e}")
    if result.get("decode_passes"):
        print("\n## shared-prefix decode pass by pass (prefix 4096, suffix 128, bf16, CUDA graphs)")
        print(f"{'N':>4} {'options':>48} {'prefix us':>10} {'suffix us':>10} {'merge us':>9} {'whole us':>9} {'floor us':>9}")
        for r in result["decode_passes"]:
            opts = {k: r[k] for k in ("merge_in_last_pass", "wide_programs_per_sm", "wide_warps") if k in r}
            print(f"{r['N']:>4} {json.dumps(opts):>48} {r['prefix_us']:>10.1f} {r['suffix_us']:>10.1f} "
                  f"{r['merge_us']:>9.1f} {r['whole_us']:>9.1f} {r['bytes_floor_us']:>9.1f}")
    if result.get("prefill"):
        print("\n## sparse prefill vs SDPA flash (1 layer, %d heads, d=128, bf16; index building included)" % result["heads"])
        print(f"{'T':>8} {'pattern':>15} {'dense ms':>10} {'sparse ms':>10} {'index ms':>9} {'speedup':>8} {'computed':>9} {'rel err':>8}")
    for r in result.get("prefill", []):
        if "error" in r:
            print(f"{r['T']:>8} {r['error']}")
            continue
        print(f"{r['T']:>8} {r['pattern']:>15} {r['dense_s']*1e3:>10.2f} {r['sparse_s']*1e3:>10.2f} {r['index_s']*1e3:>9.2f} "
              f"{r['speedup']:>7.2f}x {r['computed_fraction']:>9.4f} {r['output_rel_err_vs_dense']:>8.4f}")
    if result.get("recall"):
        print("\n## attention-mass recall (last queries) and output error vs dense")
        print(f"{'T':>8} {'budget':>52} {'recall':>7} {'min':>6} {'computed':>9} {'rel err':>8} {'vs twin':>8}")
    for r in result.get("recall", []):
        twin = "-" if r["kernel_rel_err_vs_twin_8_heads"] is None else f"{r['kernel_rel_err_vs_twin_8_heads']:.1e}"
        print(f"{r['T']:>8} {json.dumps(r['budget']):>52} {r['recall_mean']:>7.3f} {r['recall_min']:>6.3f} "
              f"{r['computed_fraction']:>9.4f} {r['output_rel_err_vs_dense']:>8.4f} {twin:>8}")
    if result.get("decode"):
        print("\n## shared-prefix decode vs per-sequence paged decode (prefix 4096, suffix 128, bf16, CUDA graphs)")
        print(f"{'N':>4} {'Hq/Hkv':>7} {'shared us':>10} {'paged us':>9} {'speedup':>8} {'target':>7} {'bytes bound':>11} {'shared GB/s':>11} {'paged GB/s':>10}")
    for r in result.get("decode", []):
        print(f"{r['N']:>4} {r['heads']:>3}/{r['kv_heads']:<3} {r['shared_us']:>10.1f} {r['paged_us']:>9.1f} {r['speedup']:>7.2f}x "
              f"{r['target']:>7.1f} {r['kv_bytes_ratio_bound']:>10.1f}x {r['shared_GBps']:>11.0f} {r['paged_GBps']:>10.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 131072])
    ap.add_argument("--recall-lengths", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--decode-n", type=int, nargs="*", default=[8, 32, 128])
    ap.add_argument("--kv-heads", type=int, nargs="*", default=[32, 8])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cached-prefill", type=int, nargs="*", default=[16, 1100, 3072, 600, 512, 512, 4096, 4096],
                    help="cached-prefill cases as PAST N pairs (default: a 1-block hit, a multi-agent hit, "
                         "the latency and throughput configs' second chunk)")
    ap.add_argument("--parts", nargs="+", choices=("decode", "passes", "recall", "prefill", "cached-prefill"),
                    default=["decode", "recall", "prefill"],
                    help="passes: shared-prefix decode pass by pass over a sweep of grid options (GQA, --kv-heads' last)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.kernels needs a CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    result = {"env": environment(), "heads": args.heads, "command": " ".join(sys.argv)}
    if "decode" in args.parts:
        result["decode"] = bench_decode(args.decode_n, args.heads, args.kv_heads, 4096, 128, max(args.reps, 20))
    if "passes" in args.parts:
        # Defaults first, then the prefix pass's programs per SM and warps around them.
        options = [{"merge_in_last_pass": True}, {"merge_in_last_pass": False},
                   *({"wide_programs_per_sm": p, "wide_warps": w} for p, w in ((2.0, 8), (1.0, 4), (2.0, 4)))]
        result["decode_passes"] = bench_decode_passes(args.decode_n, args.heads, args.kv_heads[-1], 4096, 128,
                                                      max(args.reps, 20), options)
    if "recall" in args.parts:
        result["recall"] = bench_recall(args.recall_lengths, args.heads, last_rows=512)
    if "prefill" in args.parts:
        result["prefill"] = bench_prefill(args.lengths, args.heads, args.reps)
    if "cached-prefill" in args.parts:
        if len(args.cached_prefill) % 2:
            ap.error("--cached-prefill takes PAST N pairs")
        pairs = list(zip(args.cached_prefill[::2], args.cached_prefill[1::2]))
        result["cached_prefill"] = bench_cached_prefill(pairs, args.reps)
    result["wall_s"] = time.time() - t0
    print_tables(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
