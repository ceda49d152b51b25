"""Offline search of sparse prefill patterns: per layer and head, the pattern and budget
that keep the most attention mass on sample prompts.

For every head of a layer and every candidate :class:`HeadPattern`, the
index the pattern would build online is built from the sample's ``q``/``k``
and scored by *attention-mass recall*: the share of the dense causal softmax
mass (averaged over query rows) that falls on keys the index visits. Among
the candidates whose computed fraction of the causal score matrix stays
within ``max_fraction`` the best recall wins (ties: the cheaper). With a
recall target (``min_recall``) the choice is the other way round, as
MInference's offline search: the *cheapest* candidate whose recall reaches
the target (ties: the better recall); a head no sparse candidate serves
well enough falls back to ``dense``. Recall is
averaged over the samples given. The result is a
:class:`SparseAttentionConfig`, saved as JSON with ``config.save(path)``.

Budgets are absolute (tokens, columns, diagonals, blocks), so search on
samples about as long as the prompts the config will serve.

Use it from Python, with each layer's post-RoPE ``q``/``k`` recorded from real
forward passes of the model on sample prompts::

    config = search_config(samples, max_fraction=0.1)   # samples[s][layer] = (q, k)
    config.save("sparse.json")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .patterns import HeadPattern, LayerPatterns, SparseAttentionConfig
from .prefill import build_layer_index


def attention_mass_recall(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Per query head, the mean over query rows of the dense causal softmax mass inside ``mask``.

    ``q [T, Hq, D]``, ``k [T, Hkv, D]``; ``mask [Hq, R, T]`` (True = visited)
    covers the last ``R`` queries (``R = T`` for all of them; see
    :meth:`SparseIndex.dense_mask`). Heads are processed one at a time to
    bound memory.
    """
    out = torch.empty(q.shape[1], dtype=torch.float64)
    for h, s, causal, _ in _head_scores(q, k, mask.shape[1], scale):
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        out[h] = (p * mask[h]).sum(-1).mean().double()
    return out


def _head_scores(q: torch.Tensor, k: torch.Tensor, rows: int, scale: float | None):
    """Per query head ``h``: ``(h, scaled float32 scores of the last rows
    queries [rows, T], their causal mask, h's KV head)``, one head at a time."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    first = t - rows
    causal = torch.ones(rows, t, dtype=torch.bool, device=q.device).tril(first)
    for h in range(hq):
        yield h, (q[first:, h].float() @ k[:, h // group].float().T) * sc, causal, h // group


def attention_output_error(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Per query head, ``||sparse - dense|| / ||dense||`` of the attention output
    over the last ``R`` query rows that ``mask [Hq, R, T]`` covers (as
    :func:`attention_mass_recall`); ``v [T, Hkv, D]``."""
    out = torch.empty(q.shape[1], dtype=torch.float64)
    for h, s, causal, kv_head in _head_scores(q, k, mask.shape[1], scale):
        vv = v[:, kv_head].float()
        dense = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1) @ vv
        sparse = torch.softmax(s.masked_fill(~(causal & mask[h]), float("-inf")), dim=-1).nan_to_num(0.0) @ vv
        out[h] = (torch.linalg.vector_norm(sparse - dense) / torch.linalg.vector_norm(dense).clamp_min(1e-12)).double()
    return out


def default_candidates(length: int) -> list[HeadPattern]:
    """A small grid of budgets for each pattern, scaled to the sample length."""
    cands = []
    for frac in (1 / 32, 1 / 16, 1 / 8, 1 / 4):
        cands.append(HeadPattern("a_shape", sink=64, window=max(64, int(length * frac))))
        cands.append(HeadPattern("block_sparse", top_k=max(2, int(length * frac) // 64)))
    for v, s in ((64, 64), (128, 64), (256, 128), (512, 256), (1024, 512), (2048, 1024)):
        cands.append(HeadPattern("vertical_slash", vertical=min(v, length), slash=min(s, length)))
    return cands


def search_layer(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    candidates: Sequence[HeadPattern],
    *,
    max_fraction: float = 0.1,
    block_m: int = 64,
    block_n: int = 64,
    last_q: int = 64,
    scale: float | None = None,
    rows: int | None = None,
    min_recall: float | None = None,
) -> tuple[tuple[HeadPattern, ...], dict]:
    """Best pattern per head of one layer from sample ``(q, k)`` pairs; also each head's scores.

    Without ``min_recall``: the best recall within ``max_fraction``. With it:
    the least computed fraction whose recall reaches ``min_recall`` (a
    ``dense`` candidate is added, so every head is served)."""
    if min_recall is not None and not any(c.kind == "dense" for c in candidates):
        candidates = [*candidates, HeadPattern("dense")]
    hq = samples[0][0].shape[1]
    recall = torch.zeros(len(candidates), hq, dtype=torch.float64)
    fraction = torch.zeros(len(candidates), hq, dtype=torch.float64)
    for q, k in samples:
        t = q.shape[0]
        for c, cand in enumerate(candidates):
            layer = LayerPatterns.uniform(cand, hq, block_m=block_m, block_n=block_n, last_q=last_q, min_length=1)
            index = build_layer_index(q, k, layer, scale)
            mask = index.dense_mask(t, first_row=0 if rows is None else max(0, t - rows))
            recall[c] += attention_mass_recall(q, k, mask, scale)
            fraction[c] += torch.tensor(index.computed_fraction(t, per_head=True), dtype=torch.float64)
    recall /= len(samples)
    fraction /= len(samples)
    chosen, stats = [], []
    for h in range(hq):
        if min_recall is not None:
            good = [c for c in range(len(candidates)) if recall[c, h] >= min_recall]
            if not good:
                good = [max(range(len(candidates)), key=lambda c: float(recall[c, h]))]
            best = min(good, key=lambda c: (float(fraction[c, h]), -float(recall[c, h])))
            chosen.append(candidates[best])
            stats.append({"recall": float(recall[best, h]), "fraction": float(fraction[best, h])})
            continue
        fits = [c for c in range(len(candidates)) if fraction[c, h] <= max_fraction]
        if not fits:  # nothing fits the budget: the cheapest candidate
            fits = [int(fraction[:, h].argmin())]
        best = max(fits, key=lambda c: (float(recall[c, h]), -float(fraction[c, h])))
        chosen.append(candidates[best])
        stats.append({"recall": float(recall[best, h]), "fraction": float(fraction[best, h])})
    return tuple(chosen), {"heads": stats}


def search_config(
    samples: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
    candidates: Sequence[HeadPattern] | None = None,
    *,
    max_fraction: float = 0.1,
    block_m: int = 64,
    block_n: int = 64,
    last_q: int = 64,
    min_length: int = 16384,
    rows: int | None = 1024,
    min_recall: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SparseAttentionConfig:
    """Search every layer. ``samples[s][layer]`` is the ``(q, k)`` of layer ``layer`` on sample ``s``
    (extra tensors after ``k``, such as ``v``, are ignored). ``min_recall``:
    see :func:`search_layer`; ``progress(layer_done, layers)`` after each layer."""
    if not samples:
        raise ValueError("need at least one sample")
    num_layers = len(samples[0])
    length = min(s[0][0].shape[0] for s in samples)
    cands = list(candidates) if candidates is not None else default_candidates(length)
    layers, meta = [], []
    for layer in range(num_layers):
        heads, stats = search_layer(
            [tuple(s[layer][:2]) for s in samples], cands, max_fraction=max_fraction,
            block_m=block_m, block_n=block_n, last_q=last_q, rows=rows, min_recall=min_recall,
        )
        layers.append(heads)
        meta.append(stats)
        if progress is not None:
            progress(layer + 1, num_layers)
    return SparseAttentionConfig(
        layers, block_m, block_n, last_q, min_length,
        meta={"max_fraction": max_fraction, "min_recall": min_recall, "sample_length": length,
              "samples": len(samples), "layers": meta},
    )
