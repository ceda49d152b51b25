"""Attention kernels for the torch engine: Triton on CUDA, PyTorch reference twins elsewhere.

Public entry points (each picks the Triton kernel for CUDA tensors when
triton is importable, and its twin from :mod:`parrot.kernels.reference`
otherwise; ``backend="reference"|"triton"`` forces one):

* :func:`paged_decode_attention` - one query token per sequence over a paged
  KV cache.
* :func:`shared_prefix_decode_attention` - the same, where groups of
  sequences share a prefix: each group's prefix is read once for all of its
  sequences, each suffix separately, merged exactly by log-sum-exp.
* :func:`sparse_prefill_attention` - causal prefill of one long prompt with
  the MInference head patterns of one layer (A-shape, vertical-slash,
  block-sparse), the index built online from ``q``/``k``; dense below the
  layer's ``min_length``.
* :func:`sparse_attention` - the sparse kernel given an explicit
  :class:`SparseIndex` (built with the functions of
  :mod:`parrot.kernels.sparse_index`).

KV cache layout per layer: ``[num_blocks, block_size, num_kv_heads,
head_dim]`` (``block_size`` a power of two >= 16); block tables are
``int32 [rows, max_blocks]``; lengths ``int32 [rows]``. GQA everywhere:
query head ``h`` reads KV head ``h // (Hq // Hkv)``. ``scale`` defaults to
``1/sqrt(head_dim)``. Importing this package never imports triton.
"""

from __future__ import annotations

import functools
import importlib.util
import torch
import torch.nn.functional as F

from . import reference
from .decode_plan import SharedPrefixPlan, plan_shared_prefix
from .patterns import HeadPattern, LayerPatterns, PatternConfigError, SparseAttentionConfig
from .prefill import build_layer_index
from .sparse_index import (
    SparseIndex,
    a_shape_index,
    estimate_block_sparse,
    estimate_vertical_slash,
    vertical_slash_index,
)

__all__ = [
    "HeadPattern",
    "LayerPatterns",
    "PatternConfigError",
    "SparseAttentionConfig",
    "SharedPrefixPlan",
    "SparseIndex",
    "a_shape_index",
    "build_layer_index",
    "compile_decode_kernels",
    "dense_prefill_attention",
    "estimate_block_sparse",
    "estimate_vertical_slash",
    "paged_decode_attention",
    "plan_shared_prefix",
    "shared_prefix_decode_attention",
    "sparse_attention",
    "sparse_prefill_attention",
    "triton_available",
    "vertical_slash_index",
]


@functools.cache  # asked per kernel call: the answer cannot change within a process
def triton_available() -> bool:
    """True when triton is installed (it is needed only for CUDA tensors)."""
    return importlib.util.find_spec("triton") is not None


def _use_triton(t: torch.Tensor, backend: str | None) -> bool:
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"backend must be 'triton', 'reference' or None, got {backend!r}")
    if backend == "reference":
        return False
    ok = t.is_cuda and triton_available()
    if backend == "triton" and not ok:
        raise RuntimeError("the triton backend needs CUDA tensors and an installed triton")
    return ok


def _check_gqa(num_q_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")


def _check_cache(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if query.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError("expected query [B, Hq, D] and key/value caches [num_blocks, block_size, Hkv, D] of one shape")
    if key_cache.shape[-1] != query.shape[-1]:
        raise ValueError(f"head_dim differs: query {query.shape[-1]}, cache {key_cache.shape[-1]}")
    bs = key_cache.shape[1]
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {bs}")
    _check_gqa(query.shape[1], key_cache.shape[2])


def compile_decode_kernels(q_heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                           device: torch.device | str) -> int:
    """Compile the Triton decode kernels' variants for a model of these heads
    (see ``triton_decode.compile_decode_kernels``); the number of launches.
    Needs triton and a CUDA device."""
    from .triton_decode import compile_decode_kernels as compile_all

    return compile_all(q_heads, kv_heads, head_dim, block_size, dtype, device)


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode attention ``[B, Hq, D]`` of one query per sequence over its paged context.

    Sequence ``b`` attends to positions ``0 .. context_lens[b]-1``, stored at
    ``block_tables[b, pos // block_size]``, offset ``pos % block_size``. A
    sequence of length 0 gets zeros.
    """
    _check_cache(query, key_cache, value_cache)
    if _use_triton(query, backend):
        from .triton_decode import paged_decode_attention_triton

        return paged_decode_attention_triton(query, key_cache, value_cache, block_tables, context_lens, scale)
    return reference.paged_decode_attention_reference(query, key_cache, value_cache, block_tables, context_lens, scale)


def shared_prefix_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    prefix_block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_group: torch.Tensor,
    suffix_block_tables: torch.Tensor,
    suffix_lens: torch.Tensor,
    scale: float | None = None,
    *,
    plan: SharedPrefixPlan | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode attention where sequence ``b`` sees its group's prefix, then its own suffix.

    ``prefix_block_tables [G, P]`` and ``prefix_lens [G]`` describe each
    group's shared prefix; ``seq_group [B]`` names each sequence's group
    (-1: none, its suffix is its whole context);
    ``suffix_block_tables [B, S]`` and ``suffix_lens [B]`` its own tokens
    after the prefix. The result equals :func:`paged_decode_attention` over
    the concatenated context. On CUDA the prefix of a group is read once for
    all its sequences (and all query heads of a KV head); ``plan`` (from
    :func:`plan_shared_prefix`) avoids a host sync per call.
    """
    _check_cache(query, key_cache, value_cache)
    if seq_group.shape[0] != query.shape[0] or suffix_lens.shape[0] != query.shape[0]:
        raise ValueError("seq_group, suffix_lens and query must have one entry per sequence")
    if _use_triton(query, backend):
        from .triton_decode import shared_prefix_decode_attention_triton

        return shared_prefix_decode_attention_triton(
            query, key_cache, value_cache, prefix_block_tables, prefix_lens, seq_group,
            suffix_block_tables, suffix_lens, scale, plan=plan,
        )
    return reference.shared_prefix_decode_attention_reference(
        query, key_cache, value_cache, prefix_block_tables, prefix_lens, seq_group,
        suffix_block_tables, suffix_lens, scale,
    )


def _check_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError("expected q [T, Hq, D] and k, v [T, Hkv, D]")
    _check_gqa(q.shape[1], k.shape[1])


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention of ``q [T, Hq, D]`` over exactly the keys ``index`` lists, in ``q``'s dtype."""
    _check_prefill(q, k, v)
    if index.num_heads != q.shape[1] or index.num_query_blocks != -(-q.shape[0] // index.block_m):
        raise ValueError("index does not match q: need one entry per query head and per query block")
    if _use_triton(q, backend):
        from .triton_sparse import sparse_attention_triton

        return sparse_attention_triton(q, k, v, index, scale)
    return reference.sparse_attention_reference(q, k, v, index, scale)


def dense_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal dense attention through torch SDPA (flash on CUDA), ``[T, Hq, D]`` in and out."""
    _check_prefill(q, k, v)
    group = q.shape[1] // k.shape[1]
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=group > 1)
    return out[0].transpose(0, 1)


def sparse_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern_config_for_layer: LayerPatterns,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal prefill of one prompt with one layer's head patterns.

    Prompts shorter than ``pattern_config_for_layer.min_length`` go to
    :func:`dense_prefill_attention`. Otherwise the index is built online from
    ``q``/``k`` (:func:`build_layer_index`) and :func:`sparse_attention`
    runs over it; on CUDA both happen on the GPU.
    """
    _check_prefill(q, k, v)
    if q.shape[0] < pattern_config_for_layer.min_length:
        return dense_prefill_attention(q, k, v, scale)
    index = build_layer_index(q, k, pattern_config_for_layer, scale)
    return sparse_attention(q, k, v, index, scale, backend=backend)
