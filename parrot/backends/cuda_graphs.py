"""CUDA graphs of the decode step: one replay instead of ~1000 kernel launches.

A decode-only step (every scheduled sequence feeds one token) has shapes
that depend only on the batch size and the longest block table. Each
``(batch, max_blocks)`` pair, rounded up (the batch to a power of two, the
blocks to a multiple of 8, 32 or 128), gets one graph,
captured the first time it is needed: model forward and logits over static
index buffers. A step then copies its indices into the graph's buffer (one
host-to-device copy) and replays it. Padding rows write their keys and
values into a scratch block reserved for them and attend to it alone.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from .kv_cache import PagedBatch, PagedKVPool
from .model import LlamaFamilyModel


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    buffer: torch.Tensor  # [4 * batch + batch * max_blocks] int64: ids, positions, slots, context lens, tables
    logits: torch.Tensor  # [batch, vocab] float32, written by each replay


def _bucket(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def _blocks_bucket(n: int) -> int:
    """Block-table width of a graph: coarse enough to capture few graphs, fine
    enough that the torch attention does not gather much padding."""
    step = 8 if n <= 64 else 32 if n <= 256 else 128
    return -(-n // step) * step


class DecodeGraphs:
    """Captured decode forwards of one model over one paged pool."""

    def __init__(
        self, model: LlamaFamilyModel, pool: PagedKVPool, scratch_block: int, scale: float, max_batch: int
    ) -> None:
        self.model, self.pool, self.scale, self.max_batch = model, pool, scale, max_batch
        self.scratch_block = scratch_block
        self.block_size = pool.block_size
        self.device = pool.keys.device
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._mempool = torch.cuda.graph_pool_handle()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def accepts(self, batch: int) -> bool:
        return 0 < batch <= self.max_batch

    def run(
        self, ids: list[int], positions: list[int], slots: list[int], context_lens: list[int], tables: list[list[int]]
    ) -> torch.Tensor:
        """Logits ``[len(ids), vocab]`` of one decode step (the caches are written)."""
        b = len(ids)
        bp = _bucket(b)
        mp = _blocks_bucket(max(len(t) for t in tables))
        graph = self._graphs.get((bp, mp)) or self._capture(bp, mp)
        pad = bp - b
        scratch = self.scratch_block
        host = [
            *ids, *([0] * pad),
            *positions, *([0] * pad),
            *slots, *([scratch * self.block_size] * pad),
            *context_lens, *([1] * pad),
        ]
        for t in tables:
            host.extend(t)
            host.extend([scratch] * (mp - len(t)))
        host.extend([scratch] * (mp * pad))
        graph.buffer.copy_(torch.frombuffer(array("q", host), dtype=torch.long), non_blocking=True)
        graph.graph.replay()
        return graph.logits[:b]

    def _capture(self, bp: int, mp: int) -> _Graph:
        scratch = self.scratch_block
        buffer = torch.zeros(4 * bp + bp * mp, dtype=torch.long, device=self.device)
        buffer[2 * bp : 3 * bp] = scratch * self.block_size  # every row is padding while capturing
        buffer[3 * bp : 4 * bp] = 1
        buffer[4 * bp :] = scratch
        ids, positions, slots, lens = (buffer[i * bp : (i + 1) * bp] for i in range(4))
        tables = buffer[4 * bp :].view(bp, mp)

        def forward() -> torch.Tensor:
            batch = PagedBatch(
                self.pool, [], slots, bp, tables.to(torch.int32), lens.to(torch.int32), [], self.scale
            )
            return self.model.compute_logits(self.model(ids, positions, batch))

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            forward()  # warm-up: kernels chosen and workspaces allocated outside the capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (another engine, the caller) may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            logits = forward()
        entry = _Graph(graph, buffer, logits)
        self._graphs[(bp, mp)] = entry
        return entry


__all__ = ["DecodeGraphs"]
