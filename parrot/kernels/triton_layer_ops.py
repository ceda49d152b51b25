"""Triton kernels of :mod:`parrot.kernels.layer_ops` (importing this needs triton).

Each kernel is one program per token row (the SwiGLU gate also splits the
row), computes in float32 and rounds to the input dtype wherever the torch
twin holds an intermediate in that dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, R, W, OUT, n_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        total = (x + r).to(R.dtype.element_ty)  # the unfused add's rounding
        tl.store(R + row * n_cols + cols, total, mask=mask)
        x = total.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    normed = (x * tl.rsqrt(mean_sq + eps)).to(OUT.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * n_cols + cols, (normed.to(tl.float32) * w).to(OUT.dtype.element_ty), mask=mask)


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``, the sum written over
    ``residual``; with ``residual=None``, ``(rms_norm(x), x)``."""
    x = x.contiguous()
    n_rows, n_cols = x.shape
    if residual is not None and (not residual.is_contiguous() or residual.shape != x.shape):
        raise ValueError("residual must be a contiguous tensor shaped like x")
    out = torch.empty_like(x)
    block = triton.next_power_of_2(n_cols)
    if n_rows:
        _add_rms_norm_kernel[(n_rows,)](
            x, residual if residual is not None else x, weight, out, n_cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    return out, (residual if residual is not None else x)


@triton.jit
def _rotary_kernel(QK, P, INV_FREQ, row_stride, n_heads, half, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (cols < half)
    pos = tl.load(P + row).to(tl.float32)
    angle = pos * tl.load(INV_FREQ + cols, mask=cols < half, other=0.0)
    dtype = QK.dtype.element_ty
    cos = tl.cos(angle).to(dtype).to(tl.float32)
    sin = tl.sin(angle).to(dtype).to(tl.float32)
    first = QK + row * row_stride + heads * (2 * half) + cols
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    # The twin: round(round(x * cos) + roll(x) * signed_sin).
    out1 = ((x1 * cos).to(dtype).to(tl.float32) - x2 * sin).to(dtype)
    out2 = ((x2 * cos).to(dtype).to(tl.float32) + x1 * sin).to(dtype)
    tl.store(first, out1, mask=mask)
    tl.store(first + half, out2, mask=mask)


def rotary_triton_(qk: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``qk [N, heads, head_dim]`` in place (rows may be strided;
    heads and dims contiguous) at ``positions [N]``; returns ``qk``."""
    n_rows, n_heads, dim = qk.shape
    if qk.stride(2) != 1 or qk.stride(1) != dim or dim % 2:
        raise ValueError("qk must be [N, heads, head_dim] with contiguous heads and an even head_dim")
    half = dim // 2
    if n_rows:
        _rotary_kernel[(n_rows,)](
            qk, positions, inv_freq, qk.stride(0), n_heads, half,
            BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(half), num_warps=4,
        )
    return qk


@triton.jit
def _silu_mul_kernel(GU, OUT, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(GU + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GU + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = OUT.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(OUT + row * inter + cols, (act * up).to(dtype), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` ``[N, I]`` of a contiguous ``[N, 2I]``."""
    gate_up = gate_up.contiguous()
    n_rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((n_rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if n_rows:
        _silu_mul_kernel[(n_rows, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _store_kv_kernel(K, V, K_CACHE, V_CACHE, SLOTS, stride_k, stride_v, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    slot = tl.load(SLOTS + row).to(tl.int64)
    tl.store(K_CACHE + slot * width + cols, tl.load(K + row * stride_k + cols, mask=mask), mask=mask)
    tl.store(V_CACHE + slot * width + cols, tl.load(V + row * stride_v + cols, mask=mask), mask=mask)


def store_kv_triton(
    key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write ``key``/``value`` rows ``[N, Hkv, D]`` (heads and dims
    contiguous, rows may be strided) at flat ``slots`` of contiguous paged
    caches ``[num_blocks, block_size, Hkv, D]``, both in one launch."""
    n_rows, heads, dim = key.shape
    width = heads * dim
    for t in (key, value):
        if t.stride(2) != 1 or t.stride(1) != dim:
            raise ValueError("key and value need contiguous heads and dims")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
    if n_rows:
        _store_kv_kernel[(n_rows,)](
            key, value, key_cache, value_cache, slots, key.stride(0), value.stride(0), width,
            BLOCK=triton.next_power_of_2(width), num_warps=4,
        )


__all__ = ["add_rms_norm_triton", "rotary_triton_", "silu_mul_triton", "store_kv_triton"]
