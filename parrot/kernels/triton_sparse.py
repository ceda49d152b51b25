"""Triton kernel of sparse prefill: FlashAttention over the blocks and columns of a SparseIndex.

One program per (query block, query head). It loads its query tile once,
then runs the online softmax first over the listed key blocks (tiles of
``block_n`` contiguous keys), then over the listed single columns gathered
``block_n`` at a time; both are masked to causal and to the prompt length.
Importing this module needs triton; :mod:`parrot.kernels` imports it only on
the CUDA path.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .sparse_index import SparseIndex

_LOG2E = 1.4426950408889634


@triton.jit
def _sparse_prefill_kernel(
    Q, K, V, O,
    BLOCK_COUNT, BLOCK_IDX, COL_COUNT, COL_IDX,
    seq_len, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_bch, stride_bih, stride_bim, stride_cch, stride_cih, stride_cim,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    num_qb = tl.num_programs(0)
    qb = num_qb - 1 - tl.program_id(0)  # heavy (late) query blocks first
    h = tl.program_id(1)
    kvh = h // GROUP
    # int64 positions: at 1M tokens, position * token stride overflows int32.
    offs_m = (qb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q = tl.load(Q + offs_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh

    n_blocks = tl.load(BLOCK_COUNT + h * stride_bch + qb)
    blocks = BLOCK_IDX + h * stride_bih + qb * stride_bim
    for i in range(n_blocks):
        start = tl.load(blocks + i).to(tl.int64) * BLOCK_N
        cols = start + offs_n
        col_ok = cols < seq_len
        k = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, k) * qk_scale
        s = tl.where(col_ok[None, :] & (cols[None, :] <= offs_m[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    n_cols = tl.load(COL_COUNT + h * stride_cch + qb)
    col_list = COL_IDX + h * stride_cih + qb * stride_cim
    for c0 in range(0, n_cols, BLOCK_N):
        listed = (c0 + offs_n) < n_cols
        cols = tl.load(col_list + c0 + offs_n, mask=listed, other=0).to(tl.int64)
        k = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=listed[None, :], other=0.0)
        s = tl.dot(q, k) * qk_scale
        s = tl.where(listed[None, :] & (cols[None, :] <= offs_m[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=listed[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])


def sparse_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of ``q [T, Hq, D]`` over exactly the keys ``index`` lists (see SparseIndex)."""
    t, hq, d = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a contiguous last dimension")
    sc = (1.0 / math.sqrt(d)) if scale is None else float(scale)
    out = torch.empty_like(q)
    bc, bi = index.block_count.contiguous(), index.block_idx.contiguous()
    cc, ci = index.column_count.contiguous(), index.column_idx.contiguous()
    grid = (index.num_query_blocks, hq)
    _sparse_prefill_kernel[grid](
        q, k, v, out, bc, bi, cc, ci,
        t, sc * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        bc.stride(0), bi.stride(0), bi.stride(1), cc.stride(0), ci.stride(0), ci.stride(1),
        GROUP=hq // k.shape[1], HEAD_DIM=d, BLOCK_M=index.block_m, BLOCK_N=index.block_n,
        num_warps=4, num_stages=2,
    )
    return out
