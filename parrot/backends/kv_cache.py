"""KV storage and the batch descriptions the model forward reads.

The forward runs on a *flat* batch: the new tokens of every scheduled sequence
are concatenated into one ``[num_tokens]`` tensor, so the linear layers see
one matrix whatever mix of prefill and decode is running. Attention then
needs to know, for each sequence, which rows of the flat batch are its own
and where its keys and values live. Two kinds of batch say so, both behind
the small :class:`KVBatch` protocol (``num_tokens``, ``attend``, ``commit``):

* :class:`AttentionBatch` over :class:`SequenceKV`: each sequence's KV stored
  contiguously, grown by doubling. Simple and private to its owner; the
  compression scorer uses it to fork and extend contexts.
* :class:`PagedBatch` over one :class:`PagedKVPool`: the engine's paged
  cache, where sequences hold fixed-size blocks through block tables
  (:mod:`parrot.backends.block_manager`) and share prefix blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from parrot.kernels import SharedPrefixPlan, SparseAttentionConfig

from .attention import (
    paged_decode_attention,
    paged_prefill_attention,
    sdpa,
    shared_prefix_decode_attention,
    sparse_prefill,
    write_kv,
)
from .block_manager import BlockTable


class KVBatch(Protocol):
    """What the model forward needs from a batch description."""

    @property
    def num_tokens(self) -> int: ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's keys/values ``[N, Hkv, D]`` of ``layer`` and return
        the attention output ``[N, Hq, D]`` for queries ``[N, Hq, D]``."""
        ...

    def commit(self) -> None:
        """Advance every sequence's length past the tokens just written."""
        ...


class SequenceKV:
    """Keys and values of one sequence for every layer, stored contiguously.

    ``keys[layer]`` and ``values[layer]`` have shape
    ``[num_kv_heads, capacity, head_dim]``; only the first ``length``
    positions are valid.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        initial_capacity: int = 64,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._allocate(max(1, initial_capacity))

    def _allocate(self, capacity: int) -> None:
        shape = (self.num_kv_heads, capacity, self.head_dim)
        new_keys = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_values = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for layer in range(len(self.keys)):
            new_keys[layer][:, : self.length].copy_(self.keys[layer][:, : self.length])
            new_values[layer][:, : self.length].copy_(self.values[layer][:, : self.length])
        self.keys, self.values, self.capacity = new_keys, new_values, capacity

    def reserve(self, num_new_tokens: int) -> None:
        """Make room for ``num_new_tokens`` more positions (amortised doubling)."""
        needed = self.length + num_new_tokens
        if needed > self.capacity:
            self._allocate(max(needed, 2 * self.capacity))

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` of shape ``[num_kv_heads, n, head_dim]`` at ``start``."""
        n = keys.shape[1]
        self.keys[layer][:, start : start + n].copy_(keys)
        self.values[layer][:, start : start + n].copy_(values)

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (used to roll back a stop string)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a sequence of length {self.length} to {length}")
        self.length = length

    def copy_prefix_from(self, other: "SequenceKV", n: int) -> None:
        """Replace this sequence's contents by the first ``n`` positions of
        ``other`` (every layer, keys and values); ``length`` becomes ``n``."""
        if (other.num_layers, other.num_kv_heads, other.head_dim) != (
            self.num_layers, self.num_kv_heads, self.head_dim
        ):
            raise ValueError("cannot copy KV between sequences of different shapes")
        if not 0 <= n <= other.length:
            raise ValueError(f"cannot copy {n} positions from a sequence of length {other.length}")
        self.length = 0
        self.reserve(n)
        for layer in range(self.num_layers):
            self.keys[layer][:, :n].copy_(other.keys[layer][:, :n])
            self.values[layer][:, :n].copy_(other.values[layer][:, :n])
        self.length = n


@dataclass
class SequenceSlice:
    """One sequence's share of a flat forward batch.

    Rows ``[start, start + num_tokens)`` of the flat batch are new tokens of
    this sequence at positions ``[kv.length, kv.length + num_tokens)``.
    """

    kv: SequenceKV
    start: int
    num_tokens: int


@dataclass
class AttentionBatch:
    """Everything attention needs to know about a flat batch."""

    sequences: list[SequenceSlice] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-sequence causal attention; q ``[N, H, D]``, k/v ``[N, KVH, D]`` -> ``[N, H, D]``."""
        out = torch.empty_like(q)
        for s in self.sequences:
            n, past = s.num_tokens, s.kv.length
            if n == 0:
                continue
            rows = slice(s.start, s.start + n)
            s.kv.write(layer, past, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
            keys = s.kv.keys[layer][:, : past + n]
            values = s.kv.values[layer][:, : past + n]
            mask, causal = None, False
            if past == 0:
                causal = n > 1
            elif n > 1:
                # Query i sits at position past + i and sees keys at positions <= it.
                key_pos = torch.arange(past + n, device=q.device)
                mask = key_pos[None, :] <= key_pos[past:, None]
            out[rows] = sdpa(q[rows].transpose(0, 1), keys, values, mask=mask, causal=causal).transpose(0, 1)
        return out

    def commit(self) -> None:
        """Advance every sequence's length past the tokens just written."""
        for s in self.sequences:
            s.kv.length += s.num_tokens


class PagedKVPool:
    """The engine's KV memory: for each layer, keys and values shaped
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` (views of one tensor
    per kind, so copying a block across all layers is one indexed copy)."""

    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        *, dtype: torch.dtype, device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy block ``src`` onto block ``dst`` in every layer, for each pair (copy-on-write)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.keys.device)
        dst = torch.tensor([d for _, d in pairs], device=self.keys.device)
        self.keys[:, dst] = self.keys[:, src]
        self.values[:, dst] = self.values[:, src]


@dataclass
class PrefillSlice:
    """One sequence with several new tokens in a paged batch: rows
    ``[start, start + num_tokens)`` at positions ``[past, past + num_tokens)``."""

    start: int
    num_tokens: int
    past: int
    blocks: torch.Tensor  # the sequence's block table (device, int32)


@dataclass
class CascadeLayout:
    """Decode rows grouped by a shared prefix of KV blocks (cascade decode):
    each group's prefix is read once for all its rows, each row's own blocks
    after it separately, merged by log-sum-exp. Rows outside any group form a
    group of their own with an empty prefix. Device tensors, built once per step."""

    prefix_tables: torch.Tensor  # [G, P] int32
    prefix_lens: torch.Tensor  # [G] int32
    seq_group: torch.Tensor  # [B] int32
    suffix_tables: torch.Tensor  # [B, S] int32
    suffix_lens: torch.Tensor  # [B] int32
    plan: SharedPrefixPlan  # the rows of each group, for the kernel (no host sync)


@dataclass
class PagedBatch:
    """A flat batch over the paged pool: first ``num_decode`` rows are one
    token of a decoding sequence each, then the prefill chunks.

    Every index tensor lives on the model's device and is built once per step.
    """

    pool: PagedKVPool
    tables: list[tuple[BlockTable, int]]  # (sequence, new tokens), for commit
    slots: torch.Tensor  # [N] int64 flat slot of each new token
    num_decode: int
    block_tables: torch.Tensor  # [num_decode, max_blocks] int32
    context_lens: torch.Tensor  # [num_decode] int32, the new token included
    prefills: list[PrefillSlice]
    scale: float
    # MInference patterns for prompts prefilled from scratch in one chunk of
    # at least ``sparse.min_length`` tokens (see TorchEngineConfig.sparse_prefill).
    sparse: SparseAttentionConfig | None = None
    # Decode rows that share prefix blocks read them once per group.
    cascade: CascadeLayout | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.slots.shape[0])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        key_cache, value_cache = self.pool.keys[layer], self.pool.values[layer]
        write_kv(key_cache, value_cache, k, v, self.slots)
        if not self.prefills:
            return self._decode(q, key_cache, value_cache)
        out = torch.empty_like(q)
        d = self.num_decode
        if d:
            out[:d] = self._decode(q[:d], key_cache, value_cache)
        for p in self.prefills:
            rows = slice(p.start, p.start + p.num_tokens)
            if self.sparse is not None and p.past == 0 and p.num_tokens >= self.sparse.min_length:
                out[rows] = sparse_prefill(q[rows], k[rows], v[rows], self.sparse.layer(layer), self.scale)
                continue
            out[rows] = paged_prefill_attention(
                q[rows], k[rows], v[rows], key_cache, value_cache, p.blocks, p.past, self.scale
            )
        return out

    def _decode(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        c = self.cascade
        if c is None:
            return paged_decode_attention(q, key_cache, value_cache, self.block_tables, self.context_lens, self.scale)
        return shared_prefix_decode_attention(
            q, key_cache, value_cache, c.prefix_tables, c.prefix_lens, c.seq_group, c.suffix_tables, c.suffix_lens,
            self.scale, c.plan,
        )

    def commit(self) -> None:
        for table, n in self.tables:
            table.length += n


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
