"""Sparse prefill of one layer: build the index its head patterns ask for, then attend.

Heads that share a kind are indexed together; the per-kind indexes are
merged into one :class:`SparseIndex` so a single kernel launch covers every
head of the layer.
"""

from __future__ import annotations

import torch

from .patterns import HeadPattern, LayerPatterns
from .sparse_index import (
    SparseIndex,
    a_shape_index,
    dense_index,
    estimate_block_sparse,
    estimate_vertical_slash,
    vertical_slash_index,
)


def build_layer_index(
    q: torch.Tensor, k: torch.Tensor, layer: LayerPatterns, scale: float | None = None
) -> SparseIndex:
    """The index of every query head of one layer for ``q [T, Hq, D]``, ``k [T, Hkv, D]``."""
    t, hq, _ = q.shape
    if len(layer.heads) != hq:
        raise ValueError(f"layer patterns list {len(layer.heads)} heads but q has {hq}")
    group = hq // k.shape[1]
    bm, bn = layer.block_m, layer.block_n
    by_kind: dict[tuple, list[int]] = {}
    for h, pat in enumerate(layer.heads):
        # Heads with identical settings share one builder call.
        by_kind.setdefault(_key(pat), []).append(h)
    parts = []
    for heads in by_kind.values():
        pat = layer.heads[heads[0]]
        if pat.kind == "a_shape":
            idx = a_shape_index(len(heads), t, pat.sink, pat.window, block_m=bm, block_n=bn, device=q.device)
        elif pat.kind == "dense":
            idx = dense_index(len(heads), t, block_m=bm, block_n=bn, device=q.device)
        elif pat.kind == "vertical_slash":
            qs, ks = _select_heads(q, k, heads, group)
            vert, slash = estimate_vertical_slash(qs, ks, pat.vertical, pat.slash, last_q=layer.last_q, scale=scale)
            idx = vertical_slash_index(vert, slash, t, block_m=bm, block_n=bn)
        else:  # block_sparse
            qs, ks = _select_heads(q, k, heads, group)
            idx = estimate_block_sparse(qs, ks, pat.top_k, block_m=bm, block_n=bn, scale=scale)
        parts.append((heads, idx))
    if len(parts) == 1 and parts[0][0] == list(range(hq)):
        return parts[0][1]
    return SparseIndex.merge_heads(parts, hq)


def _key(pat: HeadPattern) -> tuple:
    return tuple(sorted(pat.to_dict().items()))


def _select_heads(q: torch.Tensor, k: torch.Tensor, heads: list[int], group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` and ``k`` restricted to ``heads`` (GQA kept: each selected head gets its KV head)."""
    if len(heads) == q.shape[1]:
        return q, k
    hs = torch.tensor(heads, device=q.device)
    return q[:, hs], k[:, hs // group]
