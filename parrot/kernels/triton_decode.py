"""Triton kernels of paged decode attention, with a shared prefix read once per group.

Work is described as *items*: an item is one context in the paged cache (a
block table row and a length) and the query rows that attend to it. For
plain paged decode an item is one sequence and its one query token; for
shared-prefix decode the prefix of a group is one item whose rows are the
queries of every sequence in the group (so the prefix's keys and values are
read once for all of them, and the score tile is a real matrix product), and
each sequence's suffix is another item.

``_paged_partial_kernel`` computes, per (item, row tile, KV head, split of
the context), softmax-normalised partial outputs and their log2-sum-exp into
slots of a ``[B, Hq, slots, D]`` buffer; ``_merge_kernel`` combines the
slots of each (sequence, head) exactly. GQA: the rows of one program are
(member, query head of this KV head) pairs, so a KV tile serves every query
head that reads it. Importing this module needs triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .decode_plan import SharedPrefixPlan, plan_shared_prefix

_LOG2E = 1.4426950408889634
_BLOCK_N = 64  # keys per loop iteration
_NUM_WARPS = 4
_NUM_STAGES = 2


@triton.jit
def _paged_partial_kernel(
    Q, K, V, PART_O, PART_LSE,
    ITEM_BT, ITEM_LEN, ITEM_ROW_START, ITEM_ROW_COUNT, ROW_SEQ,
    qk_scale, tokens_per_split, slot_base, m_tiles,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    item = tl.program_id(0) // m_tiles
    tile = tl.program_id(0) % m_tiles
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    n_rows = tl.load(ITEM_ROW_COUNT + item) * GROUP
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < n_rows
    seq = tl.load(ROW_SEQ + tl.load(ITEM_ROW_START + item) + r // GROUP, mask=row_ok, other=0)
    head = kvh * GROUP + r % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + seq[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    length = tl.load(ITEM_LEN + item)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, length)
    end = tl.where(tile * BLOCK_M < n_rows, end, start)  # tiles past this item's rows do nothing

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = ITEM_BT + item * stride_bt
    for s0 in range(start, end, BLOCK_N):
        pos = s0 + offs_n
        ok = pos < end
        page = tl.load(table + pos // PAGE, mask=ok, other=0).to(tl.int64)
        k_off = page * stride_kb + (pos % PAGE) * stride_ks + kvh * stride_kh
        v_off = page * stride_vb + (pos % PAGE) * stride_vs + kvh * stride_vh
        k = tl.load(K + k_off[None, :] + offs_d[:, None], mask=ok[None, :], other=0.0)
        s = tl.dot(q, k) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_off[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    slot = slot_base + split
    tl.store(
        PART_O + seq[:, None] * stride_pb + head[:, None] * stride_ph + slot * stride_ps + offs_d[None, :],
        out, mask=row_ok[:, None],
    )
    tl.store(PART_LSE + seq * stride_lb + head * stride_lh + slot, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    PART_O, PART_LSE, OUT, n_slots,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SLOTS)
    s_ok = s < n_slots
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(PART_LSE + b * stride_lb + h * stride_lh + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    o = tl.load(PART_O + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


@dataclass(frozen=True)
class _Items:
    """Contexts to attend to, and which sequences' queries attend to each."""

    block_tables: torch.Tensor  # int32 [items, max_blocks]
    lens: torch.Tensor  # int32 [items]
    row_start: torch.Tensor  # int32 [items]
    row_count: torch.Tensor  # int32 [items]
    row_seq: torch.Tensor  # int32 [sum(row_count)]
    max_rows: int  # host-side bound on row_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # triton's interpreter (TRITON_INTERPRET=1) on CPU tensors
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_partial(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    items: _Items,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    slot_base: int,
    splits: int,
    tokens_per_split: int,
    scale: float,
) -> None:
    hq, d = query.shape[1], query.shape[2]
    hkv = key_cache.shape[2]
    group = hq // hkv
    block_m = min(128, max(16, triton.next_power_of_2(items.max_rows * group)))
    m_tiles = max(1, -(-items.max_rows * group // block_m))
    bt = items.block_tables
    grid = (items.lens.shape[0] * m_tiles, hkv, splits)
    _paged_partial_kernel[grid](
        query, key_cache, value_cache, part_o, part_lse,
        bt, items.lens, items.row_start, items.row_count, items.row_seq,
        scale * _LOG2E, tokens_per_split, slot_base, m_tiles,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        bt.stride(0), part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        GROUP=group, HEAD_DIM=d, PAGE=key_cache.shape[1], BLOCK_M=block_m, BLOCK_N=_BLOCK_N,
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )


def _splits(items: int, m_tiles: int, hkv: int, max_len: int, sms: int) -> tuple[int, int]:
    """Split long contexts so that about two programs run per multiprocessor."""
    programs = max(1, items * m_tiles * hkv)
    chunks = max(1, -(-max_len // _BLOCK_N))
    splits = max(1, min(-(-2 * sms // programs), chunks))
    per_split = -(-chunks // splits) * _BLOCK_N
    return -(-max(max_len, 1) // per_split), per_split


def _check(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("query and the KV cache need a contiguous last dimension")


def _run(query, key_cache, value_cache, parts: list[_Items], scale: float | None) -> torch.Tensor:
    _check(query, key_cache, value_cache)
    b, hq, d = query.shape
    hkv, page = key_cache.shape[2], key_cache.shape[1]
    sc = (1.0 / math.sqrt(d)) if scale is None else float(scale)
    sms = _num_sms(query.device)
    group = hq // hkv
    plans = []
    for items in parts:
        block_m = min(128, max(16, triton.next_power_of_2(items.max_rows * group)))
        m_tiles = max(1, -(-items.max_rows * group // block_m))
        plans.append(_splits(items.lens.shape[0], m_tiles, hkv, items.block_tables.shape[1] * page, sms))
    slots = sum(s for s, _ in plans)
    part_o = torch.empty(b, hq, slots, d, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(b, hq, slots, dtype=torch.float32, device=query.device)
    base = 0
    for items, (splits, per_split) in zip(parts, plans):
        _launch_partial(query, key_cache, value_cache, items, part_o, part_lse, base, splits, per_split, sc)
        base += splits
    out = torch.empty_like(query)
    _merge_kernel[(b, hq)](
        part_o, part_lse, out, slots,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, SLOTS=triton.next_power_of_2(slots), num_warps=4,
    )
    return out


def _per_sequence_items(block_tables: torch.Tensor, lens: torch.Tensor) -> _Items:
    b = lens.shape[0]
    rows = torch.arange(b, dtype=torch.int32, device=lens.device)
    return _Items(
        block_tables.to(torch.int32), lens.to(torch.int32), rows, torch.ones_like(rows), rows, 1
    )


def paged_decode_attention_triton(query, key_cache, value_cache, block_tables, context_lens, scale=None):
    """Paged decode attention, one item per sequence (see :func:`parrot.kernels.paged_decode_attention`)."""
    return _run(query, key_cache, value_cache, [_per_sequence_items(block_tables, context_lens)], scale)


def shared_prefix_decode_attention_triton(
    query, key_cache, value_cache, prefix_block_tables, prefix_lens, seq_group, suffix_block_tables, suffix_lens,
    scale=None, plan: SharedPrefixPlan | None = None,
):
    """Decode attention reading each group's prefix once (see :func:`parrot.kernels.shared_prefix_decode_attention`)."""
    if plan is None:
        plan = plan_shared_prefix(seq_group, prefix_block_tables.shape[0])
    prefix = _Items(
        prefix_block_tables.to(torch.int32), prefix_lens.to(torch.int32),
        plan.row_start, plan.row_count, plan.row_seq, plan.max_members,
    )
    suffix = _per_sequence_items(suffix_block_tables, suffix_lens)
    return _run(query, key_cache, value_cache, [prefix, suffix], scale)
