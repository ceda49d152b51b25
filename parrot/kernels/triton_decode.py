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
slots of each (sequence, head) exactly; when the last pass (one item per
sequence) is not split, its programs fold the earlier passes' slots in
themselves and write the output, and no merge kernel runs. Rows that no
item of a pass covers (a sequence in no prefix group) find that pass's
slots at -inf. GQA: the rows of one program are
(member, query head of this KV head) pairs, so a KV tile serves every query
head that reads it. Importing this module needs triton.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .decode_plan import SharedPrefixPlan, plan_shared_prefix

_log = logging.getLogger(__name__)
_LOG2E = 1.4426950408889634
_BLOCK_N = 64  # keys per loop iteration
_NUM_WARPS = 4
_NUM_STAGES = 2


# Integer arguments that change from step to step (split sizes, slot
# offsets, strides of buffers sized by the step) are not specialized on:
# Triton would otherwise compile a variant per value class (== 1, multiple
# of 16, other), and each compile stalls a served step for about a second.
@triton.jit(do_not_specialize=["tokens_per_split", "slot_base", "m_tiles", "stride_bt", "stride_pb", "stride_ph",
                               "stride_ps", "stride_lb", "stride_lh"])
def _paged_partial_kernel(
    Q, K, V, PART_O, PART_LSE, OUT,
    ITEM_BT, ITEM_LEN, ITEM_ROW_START, ITEM_ROW_COUNT, ROW_SEQ,
    qk_scale, tokens_per_split, slot_base, m_tiles,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MERGE: tl.constexpr,
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
    if MERGE:
        # This program saw the rows' whole context of this pass (one split):
        # fold in the ``slot_base`` partial slots of the passes before it
        # and write the final output (no merge kernel).
        run_m = lse
        run_w = tl.where(empty, 0.0, 1.0)
        run_o = out * run_w[:, None]
        for slot in range(0, slot_base):
            lse_s = tl.load(PART_LSE + seq * stride_lb + head * stride_lh + slot, mask=row_ok, other=float("-inf"))
            new_m = tl.maximum(run_m, lse_s)
            safe = tl.where(new_m == float("-inf"), 0.0, new_m)
            a = tl.exp2(run_m - safe)
            b = tl.exp2(lse_s - safe)
            filled = row_ok & (lse_s != float("-inf"))
            o_s = tl.load(PART_O + seq[:, None] * stride_pb + head[:, None] * stride_ph + slot * stride_ps
                          + offs_d[None, :], mask=filled[:, None], other=0.0)
            run_o = run_o * a[:, None] + o_s * b[:, None]
            run_w = run_w * a + b
            run_m = new_m
        final = run_o / tl.where(run_w == 0.0, 1.0, run_w)[:, None]
        tl.store(OUT + seq[:, None] * stride_ob + head[:, None] * stride_oh + offs_d[None, :],
                 final.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    else:
        slot = slot_base + split
        tl.store(
            PART_O + seq[:, None] * stride_pb + head[:, None] * stride_ph + slot * stride_ps + offs_d[None, :],
            out, mask=row_ok[:, None],
        )
        tl.store(PART_LSE + seq * stride_lb + head * stride_lh + slot, lse, mask=row_ok)


@triton.jit(do_not_specialize=["n_slots", "stride_pb", "stride_ph", "stride_ps", "stride_lb", "stride_lh"])
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
    # A slot no program wrote (a row outside every prefix group) has lse -inf and no output.
    filled = s_ok & (lse != float("-inf"))
    o = tl.load(PART_O + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + offs_d[None, :], mask=filled[:, None], other=0.0)
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


@dataclass(frozen=True)
class _Launch:
    """One partial pass: its items and how the grid covers them."""

    items: _Items
    block_m: int  # query rows per program
    m_tiles: int  # programs along an item's rows
    splits: int  # programs along an item's context
    per_split: int  # context positions per split (a multiple of _BLOCK_N)
    slot_base: int  # first partial slot of this pass
    num_warps: int
    num_stages: int


def _plan(parts: list[_Items], group: int, hkv: int, page: int, sms: int, programs_per_sm: float = 2.0,
          max_block_m: int = 128, wide_warps: int = 8, wide_stages: int = _NUM_STAGES, wide_programs_per_sm: float = 1.0,
          ) -> tuple[list[_Launch], int]:
    """Grid of every pass and the partial slots they fill. Long contexts are
    split so that about ``programs_per_sm`` programs run per multiprocessor.
    Programs of 64 or more query rows (a group's prefix: compute-heavy, one
    resident per multiprocessor) run with ``wide_warps`` warps and
    ``wide_stages`` stages, split to at most ``wide_programs_per_sm`` per
    multiprocessor so that they run in whole waves (measured on the H200:
    see the README's Kernels section)."""
    launches, base = [], 0
    for items in parts:
        rows = items.max_rows * group
        block_m = min(max_block_m, max(16, triton.next_power_of_2(rows)))
        m_tiles = max(1, -(-rows // block_m))
        programs = max(1, items.lens.shape[0] * m_tiles * hkv)
        max_len = items.block_tables.shape[1] * page
        chunks = max(1, -(-max_len // _BLOCK_N))
        wide = block_m >= 64
        if wide:
            splits = max(1, min(int(wide_programs_per_sm * sms) // programs, chunks))
        else:
            splits = max(1, min(-(-int(programs_per_sm * sms) // programs), chunks))
        per_split = -(-chunks // splits) * _BLOCK_N
        splits = -(-max(max_len, 1) // per_split)
        launches.append(_Launch(items, block_m, m_tiles, splits, per_split, base,
                                wide_warps if wide else _NUM_WARPS, wide_stages if wide else _NUM_STAGES))
        base += splits
    return launches, base


def _launch_partial(query, key_cache, value_cache, launch: _Launch, part_o, part_lse, out, scale: float,
                    merge: bool) -> None:
    d = query.shape[2]
    hkv = key_cache.shape[2]
    group = query.shape[1] // hkv
    items, bt = launch.items, launch.items.block_tables
    grid = (items.lens.shape[0] * launch.m_tiles, hkv, launch.splits)
    _paged_partial_kernel[grid](
        query, key_cache, value_cache, part_o, part_lse, out,
        bt, items.lens, items.row_start, items.row_count, items.row_seq,
        scale * _LOG2E, launch.per_split, launch.slot_base, launch.m_tiles,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        bt.stride(0), part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=d, PAGE=key_cache.shape[1], BLOCK_M=launch.block_m, BLOCK_N=_BLOCK_N, MERGE=merge,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )


def _launch_merge(part_o, part_lse, out, slots: int) -> None:
    b, hq, d = out.shape
    _merge_kernel[(b, hq)](
        part_o, part_lse, out, slots,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, SLOTS=triton.next_power_of_2(slots), num_warps=4,
    )


def _check(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("query and the KV cache need a contiguous last dimension")


def _passes(query, key_cache, value_cache, parts: list[_Items], scale: float | None, covers_some_rows: bool = False,
            merge_in_last_pass: bool = True, **plan_options):
    """The passes of one decode attention as callables, in order, sharing
    their buffers; the last returns the output. ``covers_some_rows``: a
    pass's items may leave rows out (shared-prefix groups).
    ``merge_in_last_pass``: an unsplit last pass merges (else a merge kernel does)."""
    _check(query, key_cache, value_cache)
    b, hq, d = query.shape
    hkv, page = key_cache.shape[2], key_cache.shape[1]
    sc = (1.0 / math.sqrt(d)) if scale is None else float(scale)
    launches, slots = _plan(parts, hq // hkv, hkv, page, _num_sms(query.device), **plan_options)
    launches = [launch for launch in launches if launch.items.lens.shape[0]]
    # The last pass is one item per sequence (every row once); unsplit, it
    # folds the earlier passes' slots in itself and writes the output.
    fused = merge_in_last_pass and launches[-1].splits == 1 and launches[-1].items.max_rows == 1
    if fused:
        slots = launches[-1].slot_base
    # At least one slot: the kernels take the buffers' pointers even when no pass writes them.
    part_o = torch.empty(b, hq, max(slots, 1), d, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(b, hq, max(slots, 1), dtype=torch.float32, device=query.device)
    if covers_some_rows and slots:  # rows that no item of a pass covers must read as empty there
        part_lse.fill_(float("-inf"))
    out = torch.empty_like(query)
    passes = [lambda launch=launch: _launch_partial(query, key_cache, value_cache, launch, part_o, part_lse, out, sc,
                                                    False)
              for launch in (launches[:-1] if fused else launches)]
    if fused:
        def last() -> torch.Tensor:
            _launch_partial(query, key_cache, value_cache, launches[-1], part_o, part_lse, out, sc, True)
            return out

        return [*passes, last]

    def merge() -> torch.Tensor:
        _launch_merge(part_o, part_lse, out, slots)
        return out

    return [*passes, merge]


def _run(query, key_cache, value_cache, parts: list[_Items], scale: float | None,
         covers_some_rows: bool = False) -> torch.Tensor:
    *partials, merge = _passes(query, key_cache, value_cache, parts, scale, covers_some_rows)
    for run in partials:
        run()
    return merge()


def compile_decode_kernels(q_heads: int, kv_heads: int, head_dim: int, page: int, dtype: torch.dtype,
                           device: torch.device | str, *, max_slots: int = 512) -> int:
    """Compile every variant of the decode kernels a model of these heads can
    launch, on dummy inputs: a pass of each query-row tile width ``_plan``
    picks, with and without the in-place merge, and the merge kernel for each
    slot count up to ``max_slots``. A served engine calls it at start, so no
    step waits for a JIT compile (Triton keeps the binaries on disk, so later
    starts only load them). Returns the number of launches."""
    device = torch.device(device)
    group = q_heads // kv_heads
    i32 = dict(dtype=torch.int32, device=device)
    query = torch.zeros(1, q_heads, head_dim, dtype=dtype, device=device)
    key_cache = torch.zeros(1, page, kv_heads, head_dim, dtype=dtype, device=device)
    part_o = torch.zeros(1, q_heads, max_slots, head_dim, dtype=torch.float32, device=device)
    part_lse = torch.full((1, q_heads, max_slots), float("-inf"), dtype=torch.float32, device=device)
    out = torch.empty_like(query)
    zero, one = torch.zeros(1, **i32), torch.ones(1, **i32)
    widths: dict[int, _Launch] = {}
    rows = 1
    while True:  # one member, then more, until the widest tile
        items = _Items(torch.zeros(1, 1, **i32), one, zero, one, zero, rows)
        (launch,), _ = _plan([items], group, kv_heads, page, _num_sms(device))
        widths.setdefault(launch.block_m, launch)
        if launch.block_m >= 128 or rows * group >= 1024:
            break
        rows *= 2
    runs = [lambda launch=launch, merge=merge: _launch_partial(query, key_cache, key_cache, launch, part_o,
                                                               part_lse, out, 1.0, merge)
            for launch in widths.values() for merge in (False, True)]
    runs += [lambda slots=1 << i: _launch_merge(part_o, part_lse, out, slots)
             for i in range(max_slots.bit_length()) if 1 << i <= max_slots]
    launches = 0
    for run in runs:
        try:
            run()
            launches += 1
        except Exception as exc:  # a variant that does not compile here fails where it is used, not at start
            _log.warning("decode kernel warm-up: a variant did not compile: %s", exc)
    torch.cuda.synchronize(device)
    return launches


def _per_sequence_items(block_tables: torch.Tensor, lens: torch.Tensor) -> _Items:
    b = lens.shape[0]
    rows = torch.arange(b, dtype=torch.int32, device=lens.device)
    return _Items(
        block_tables.to(torch.int32), lens.to(torch.int32), rows, torch.ones_like(rows), rows, 1
    )


def paged_decode_attention_triton(query, key_cache, value_cache, block_tables, context_lens, scale=None):
    """Paged decode attention, one item per sequence (see :func:`parrot.kernels.paged_decode_attention`)."""
    return _run(query, key_cache, value_cache, [_per_sequence_items(block_tables, context_lens)], scale)


def _shared_prefix_parts(prefix_block_tables, prefix_lens, seq_group, suffix_block_tables, suffix_lens,
                         plan: SharedPrefixPlan | None) -> list[_Items]:
    if plan is None:
        plan = plan_shared_prefix(seq_group, prefix_block_tables.shape[0])
    prefix = _Items(
        prefix_block_tables.to(torch.int32), prefix_lens.to(torch.int32),
        plan.row_start, plan.row_count, plan.row_seq, plan.max_members,
    )
    return [prefix, _per_sequence_items(suffix_block_tables, suffix_lens)]


def shared_prefix_decode_attention_triton(
    query, key_cache, value_cache, prefix_block_tables, prefix_lens, seq_group, suffix_block_tables, suffix_lens,
    scale=None, plan: SharedPrefixPlan | None = None,
):
    """Decode attention reading each group's prefix once (see :func:`parrot.kernels.shared_prefix_decode_attention`)."""
    parts = _shared_prefix_parts(prefix_block_tables, prefix_lens, seq_group, suffix_block_tables, suffix_lens, plan)
    return _run(query, key_cache, value_cache, parts, scale, covers_some_rows=True)


def shared_prefix_decode_passes(
    query, key_cache, value_cache, prefix_block_tables, prefix_lens, seq_group, suffix_block_tables, suffix_lens,
    scale=None, plan: SharedPrefixPlan | None = None, merge_in_last_pass: bool = True, **plan_options,
):
    """For profiling (``benchmarks/kernels.py``): the passes of
    :func:`shared_prefix_decode_attention_triton` as callables to run in
    order (prefix, suffix and merge, or prefix and suffix-with-merge; the
    last returns the output); ``merge_in_last_pass`` and ``plan_options``
    (the keywords of ``_plan``) change the launches."""
    parts = _shared_prefix_parts(prefix_block_tables, prefix_lens, seq_group, suffix_block_tables, suffix_lens, plan)
    return _passes(query, key_cache, value_cache, parts, scale, True, merge_in_last_pass, **plan_options)
