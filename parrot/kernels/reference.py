"""PyTorch reference twins of the Triton kernels.

Every kernel in :mod:`parrot.kernels` has a twin here that computes the same
function with plain tensor operations, in float32, on any device. CPU tests
check the twins against naive dense attention; GPU tests check the Triton
kernels against the twins. The twins favour obviousness over speed: they
materialise full masks and gather whole contexts.

Shapes (the engine's conventions):

* decode: ``query [B, Hq, D]``; a layer's KV cache ``[num_blocks, block_size,
  Hkv, D]``; block tables ``int32 [rows, max_blocks]`` (entries past a
  sequence's length are never read); lengths ``int32 [rows]``.
* prefill: ``q [T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]``, causal.

``Hq`` must be a multiple of ``Hkv`` (grouped-query attention); query head
``h`` reads KV head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import math

import torch

from .sparse_index import SparseIndex


def _group(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    return num_q_heads // num_kv_heads


def _scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [M, Hq, D]`` over ``k``/``v`` ``[N, Hkv, D]`` where ``mask [Hq|1, M, N]`` allows.

    Returns ``(out [M, Hq, D] float32, lse [Hq, M] float32)``. A row with no
    allowed key outputs zeros and has ``lse = -inf`` (so it weighs nothing
    when merged).
    """
    group = _group(q.shape[1], k.shape[1])
    sc = _scale(scale, q.shape[-1])
    qf = q.float().transpose(0, 1)  # [Hq, M, D]
    kf = k.float().transpose(0, 1).repeat_interleave(group, 0)
    vf = v.float().transpose(0, 1).repeat_interleave(group, 0)
    scores = (qf @ kf.transpose(1, 2)) * sc
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, M]
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = probs @ vf
    return out.transpose(0, 1), lse


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Naive causal attention of one prompt (``q [T, Hq, D]``), output in ``q``'s dtype."""
    t = q.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril().unsqueeze(0)
    out, _ = masked_attention(q, k, v, causal, scale)
    return out.to(q.dtype)


def merge_attention_states(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Exact merge of partial attention results over disjoint key sets.

    ``outs[i] [..., D]`` is softmax-normalised over its own keys and
    ``lses[i] [...]`` is the log-sum-exp of its scores; the merge weighs each
    part by ``exp(lse_i - logsumexp(lse))``. Rows where every part is empty
    (``lse = -inf``) come out as zeros.
    """
    lse = torch.stack(lses, dim=0)
    total = torch.logsumexp(lse, dim=0)
    weights = torch.nan_to_num(torch.exp(lse - total.unsqueeze(0)), nan=0.0)
    return sum(w.unsqueeze(-1) * o for w, o in zip(weights, outs))


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions of one sequence from a paged cache: ``[length, Hkv, D]``."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_table.to(cache.device).long()[pos // block_size]
    return cache[blocks, pos % block_size]


def _paged_part(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    length: int,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [R, Hq, D], lse [R, Hq]) of ``R`` query rows over one paged context."""
    keys = gather_paged(key_cache, block_table, length)
    values = gather_paged(value_cache, block_table, length)
    mask = torch.ones(1, query.shape[0], length, dtype=torch.bool, device=query.device)
    out, lse = masked_attention(query, keys, values, mask, scale)
    return out, lse.transpose(0, 1)


def paged_decode_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Twin of :func:`parrot.kernels.paged_decode_attention`: one query token per sequence."""
    outs = []
    for b in range(query.shape[0]):
        out, _ = _paged_part(query[b : b + 1], key_cache, value_cache, block_tables[b], int(context_lens[b]), scale)
        outs.append(out[0])
    return torch.stack(outs).to(query.dtype)


def shared_prefix_decode_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    prefix_block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_group: torch.Tensor,
    suffix_block_tables: torch.Tensor,
    suffix_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Twin of :func:`parrot.kernels.shared_prefix_decode_attention`.

    Sequence ``b`` attends to its group's prefix (``prefix_block_tables[
    seq_group[b]]``, ``prefix_lens[seq_group[b]]`` tokens) followed by its
    own suffix; the two parts are computed separately and merged by their
    log-sum-exp. ``seq_group[b] == -1``: no shared prefix.
    """
    outs = []
    for b in range(query.shape[0]):
        g = int(seq_group[b])
        q = query[b : b + 1]
        suf = _paged_part(q, key_cache, value_cache, suffix_block_tables[b], int(suffix_lens[b]), scale)
        if g < 0:  # no shared prefix: the suffix is the whole context
            outs.append(suf[0][0])
            continue
        pre = _paged_part(q, key_cache, value_cache, prefix_block_tables[g], int(prefix_lens[g]), scale)
        outs.append(merge_attention_states([pre[0], suf[0]], [pre[1], suf[1]])[0])
    return torch.stack(outs).to(query.dtype)


def sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float | None = None
) -> torch.Tensor:
    """Twin of the sparse prefill kernel: causal attention over exactly the keys ``index`` lists."""
    mask = index.dense_mask(q.shape[0])
    out, _ = masked_attention(q, k, v, mask, scale)
    return out.to(q.dtype)
