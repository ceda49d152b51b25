"""Attention over the KV caches, in torch: the one place kernels plug in.

The engine's paged pool stores keys and values per layer as
``[num_blocks, block_size, num_kv_heads, head_dim]``; a sequence's positions
are found through its block table. On CUDA with triton installed, decode
attention runs ``parrot.kernels``' Triton paged kernel (which reads the
blocks in place); elsewhere, or with ``PARROT_ATTENTION=torch``, the torch
version below gathers them. Long prompts prefilled from scratch may use
MInference-style sparse attention (:func:`sparse_prefill`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from parrot import kernels
from parrot.kernels import layer_ops

# "auto": Triton kernels on CUDA when triton is installed; "torch": never
# (the side-by-side baseline of benchmarks/engine.py).
ATTENTION_BACKEND = os.environ.get("PARROT_ATTENTION", "auto")
if ATTENTION_BACKEND not in ("auto", "torch"):
    raise ValueError(f"PARROT_ATTENTION must be 'auto' or 'torch', got {ATTENTION_BACKEND!r}")
_TRITON = ATTENTION_BACKEND == "auto" and kernels.triton_available()
_TRITON_DTYPES = (torch.bfloat16, torch.float16)  # what the kernels are tested in

# ``enable_gqa`` lets SDPA broadcast KV heads without copying the cache; it
# appeared in torch 2.5, older versions fall back to repeat_interleave.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def decode_kernels_capturable(dtype: torch.dtype) -> bool:
    """Whether decode attention on CUDA runs the Triton kernels for ``dtype``:
    then shared-prefix (cascade) decode has no host sync and CUDA graphs can
    capture it."""
    return _TRITON and dtype in _TRITON_DTYPES


def prepare_decode_kernels(q_heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                           device: torch.device) -> int:
    """Compile the decode kernels' variants now, where decode runs Triton
    kernels (see :func:`decode_kernels_capturable`), so that no served step
    waits for a JIT compile; the number of kernel launches (0: nothing to do)."""
    if device.type != "cuda" or not decode_kernels_capturable(dtype):
        return 0
    return kernels.compile_decode_kernels(q_heads, kv_heads, head_dim, block_size, dtype, device)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
    causal: bool = False, scale: float | None = None,
) -> torch.Tensor:
    """SDPA with grouped-query heads: q ``[..., Hq, n, D]``, k/v ``[..., Hkv, m, D]``."""
    group = q.shape[-3] // k.shape[-3]
    if group > 1 and (q.is_cuda or not _SDPA_HAS_GQA):
        # On the GPU the flash kernel does not take ``enable_gqa`` in every
        # version (the fallback materialises the score matrix): expand instead.
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
        group = 1
    if q.dim() == 3:
        # The fused (flash / memory-efficient) kernels take 4-D inputs only;
        # a 3-D call falls back to the math kernel, which materialises the scores.
        out = sdpa(q[None], k[None], v[None], mask=mask, causal=causal, scale=scale)
        return out[0]
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=group > 1
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def write_kv(
    key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store ``key``/``value`` rows ``[N, Hkv, D]`` at flat ``slots`` ``[N]``
    (``block * block_size + offset``) of the paged caches (one Triton
    kernel for both on CUDA)."""
    layer_ops.store_kv(key_cache, value_cache, key, value, slots)


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its paged context.

    ``query [B, Hq, D]``; caches ``[num_blocks, block_size, Hkv, D]``;
    ``block_tables`` int32 ``[B, max_blocks]`` (padding entries may be any
    valid block); ``context_lens`` int32 ``[B]`` counts the positions to
    attend to (the query's own included). Returns ``[B, Hq, D]``.

    On CUDA this is ``parrot.kernels.paged_decode_attention`` (Triton; no
    host sync, so CUDA graphs capture it); the torch version gathers each
    sequence's blocks into a dense tensor, then runs one masked SDPA.
    """
    if _TRITON and query.is_cuda and query.dtype in _TRITON_DTYPES:
        return kernels.paged_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale)
    batch, q_heads, dim = query.shape
    max_blocks = block_tables.shape[1]
    _, block_size, kv_heads, _ = key_cache.shape
    index = block_tables.long()
    keys = key_cache[index].view(batch, max_blocks * block_size, kv_heads, dim).transpose(1, 2)
    values = value_cache[index].view(batch, max_blocks * block_size, kv_heads, dim).transpose(1, 2)
    visible = torch.arange(max_blocks * block_size, device=query.device)[None, :] < context_lens[:, None]
    # The query heads of one KV head become that head's query rows: plain
    # SDPA over [B, Hkv, group, D], no head expansion of the gathered cache.
    q = query.reshape(batch, kv_heads, q_heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None, None, :], scale=scale)
    return out.reshape(batch, q_heads, dim)


def shared_prefix_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    prefix_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_group: torch.Tensor,
    suffix_tables: torch.Tensor,
    suffix_lens: torch.Tensor,
    scale: float,
    plan: kernels.SharedPrefixPlan,
) -> torch.Tensor:
    """Decode attention where each row sees its group's shared prefix, then
    its own blocks (cascade decode; see ``parrot.kernels.shared_prefix_decode_attention``).

    On CUDA the Triton kernel reads each group's prefix once for all its
    rows; elsewhere (or with ``PARROT_ATTENTION=torch``) the reference twin
    computes the same result part by part.
    """
    triton = _TRITON and query.is_cuda and query.dtype in _TRITON_DTYPES
    return kernels.shared_prefix_decode_attention(
        query, key_cache, value_cache, prefix_tables, prefix_lens, seq_group, suffix_tables, suffix_lens, scale,
        plan=plan, backend="triton" if triton else "reference",
    )


def paged_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    blocks: torch.Tensor,
    past: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of ``n`` new tokens of one sequence after ``past`` cached ones.

    ``query [n, Hq, D]``, ``key``/``value [n, Hkv, D]`` (already written to
    the caches); ``blocks`` int ``[>= ceil((past + n) / block_size)]`` is the
    sequence's block table. With nothing cached the new keys are used as
    they are (flash attention on GPU); otherwise the context is gathered.
    """
    n = query.shape[0]
    q = query.transpose(0, 1)
    if past == 0:
        return sdpa(q, key.transpose(0, 1), value.transpose(0, 1), causal=n > 1, scale=scale).transpose(0, 1)
    _, block_size, kv_heads, dim = key_cache.shape
    total = past + n
    used = blocks[: -(-total // block_size)].long()
    keys = key_cache[used].view(-1, kv_heads, dim)[:total].transpose(0, 1)
    values = value_cache[used].view(-1, kv_heads, dim)[:total].transpose(0, 1)
    # Query i sits at position past + i and sees keys at positions <= it: a
    # causal mask aligned to the lower right. As a bias object (not a boolean
    # tensor) SDPA keeps its flash / memory-efficient kernels; an explicit
    # mask sent every prefill after a prefix-cache hit, and every chunk after
    # a long prompt's first, to the slow masked kernel.
    out = sdpa(q[None], keys[None], values[None], mask=causal_lower_right(n, total), scale=scale)
    return out[0].transpose(0, 1)


def sparse_prefill(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, patterns: kernels.LayerPatterns, scale: float
) -> torch.Tensor:
    """Causal attention of a whole prompt ``[T, H, D]`` with one layer's
    MInference head patterns (index built online; Triton on CUDA, the
    reference twin elsewhere). Dense below ``patterns.min_length``."""
    return kernels.sparse_prefill_attention(query, key, value, patterns, scale)


__all__ = [
    "ATTENTION_BACKEND", "decode_kernels_capturable", "paged_decode_attention", "paged_prefill_attention",
    "prepare_decode_kernels", "sdpa",
    "shared_prefix_decode_attention", "sparse_prefill", "write_kv",
]
