"""Per-sequence KV storage and the batch description the model forward reads.

The forward runs on a *flat* batch: the new tokens of every scheduled sequence
are concatenated into one ``[num_tokens]`` tensor, so the linear layers see
one matrix whatever mix of prefill and decode is running. Attention then
needs to know, for each sequence, which rows of the flat batch are its own
and where its keys and values live; that is :class:`AttentionBatch`.

This first cut stores each sequence's KV contiguously and grows it by
doubling. The paged pool with shared prefix blocks replaces
:class:`SequenceKV` behind the same ``AttentionBatch`` shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def snapshot(self, n: int | None = None) -> "SequenceKV":
        """A new sequence holding a copy of the first ``n`` positions (default
        all), allocated to exactly ``n`` positions so :meth:`nbytes` is exact."""
        n = self.length if n is None else n
        copy = SequenceKV(
            self.num_layers, self.num_kv_heads, self.head_dim,
            dtype=self.dtype, device=self.device, initial_capacity=n,
        )
        copy.copy_prefix_from(self, n)
        return copy

    def nbytes(self) -> int:
        """Bytes held by this sequence's allocation (all layers, keys and values)."""
        per = self.num_kv_heads * self.capacity * self.head_dim * torch.finfo(self.dtype).bits // 8
        return 2 * self.num_layers * per


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

    def commit(self) -> None:
        """Advance every sequence's length past the tokens just written."""
        for s in self.sequences:
            s.kv.length += s.num_tokens
