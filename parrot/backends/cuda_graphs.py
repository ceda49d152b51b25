"""CUDA graphs of the decode step: one replay instead of ~1000 kernel launches.

A decode-only step (every scheduled sequence feeds one token) has shapes
that depend only on the batch size and the longest block table. Each
``(batch, max_blocks)`` pair, rounded up (the batch to a power of two, the
blocks to a multiple of 8, 32 or 128), gets one graph,
captured the first time it is needed: model forward and logits over static
index buffers. A step then copies its indices into the graph's buffer (one
host-to-device copy) and replays it. Padding rows write their keys and
values into a scratch block reserved for them and attend to it alone.

Cascade steps (rows grouped by shared prefix blocks, see
:func:`parrot.backends.model_runner.shared_prefix_groups`) have graphs of
their own, keyed also by the number of groups (rounded up; prefix and
suffix tables are as wide as the step's tables, so no other size adds
graphs): each group's prefix is one item of the shared-prefix kernel, rows
in no group (padding rows too) read their own blocks only, and unused group
slots have no rows. Only the Triton kernels can be
captured this way (the torch twin reads lengths on the host).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from parrot.kernels import SharedPrefixPlan

from .kv_cache import CascadeLayout, PagedBatch, PagedKVPool
from .model import LlamaFamilyModel

# (rows of the step in the group, prefix blocks they share), as the runner finds them.
Groups = list[tuple[list[int], int]]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    # int64: ids, positions, slots, context lens [batch each], then tables
    # [batch * max_blocks]; or, in cascade graphs, prefix tables [groups *
    # max_blocks], prefix lens, row starts, row counts [groups each], row
    # order, suffix lens, group of each row [batch each], suffix tables
    # [batch * max_blocks].
    buffer: torch.Tensor
    logits: torch.Tensor  # [batch, vocab] float32, written by each replay


def _tables_size(bp: int, mp: int, gp: int) -> int:
    """Entries of a graph's buffer after the four per-row lists."""
    return gp * mp + 3 * gp + 3 * bp + bp * mp if gp else bp * mp


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
        self, model: LlamaFamilyModel, pool: PagedKVPool, scratch_block: int, scale: float, max_batch: int,
        *, cascade: bool = False,
    ) -> None:
        self.model, self.pool, self.scale, self.max_batch = model, pool, scale, max_batch
        self.scratch_block = scratch_block
        self.block_size = pool.block_size
        self.device = pool.keys.device
        # Whether cascade steps may be captured (the shared-prefix kernel is Triton).
        self.cascade = cascade
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._mempool = torch.cuda.graph_pool_handle()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    @property
    def num_cascade_graphs(self) -> int:
        """Graphs captured for cascade steps (part of ``num_graphs``)."""
        return sum(1 for _, _, groups in self._graphs if groups)

    def accepts(self, batch: int) -> bool:
        return 0 < batch <= self.max_batch

    def run(
        self, ids: list[int], positions: list[int], slots: list[int], context_lens: list[int], tables: list[list[int]],
        groups: Groups | None = None,
    ) -> torch.Tensor:
        """Logits ``[len(ids), vocab]`` of one decode step (the caches are
        written). With ``groups`` (only if ``cascade``), each group's rows read
        its shared prefix blocks once."""
        b = len(ids)
        bp = _bucket(b)
        mp = _blocks_bucket(max(len(t) for t in tables))
        gp = 0
        if groups:
            if not self.cascade:
                raise ValueError("these graphs were built without cascade decode")
            gp = _bucket(len(groups))
        key = (bp, mp, gp)
        graph = self._graphs.get(key) or self._capture(*key)
        pad = bp - b
        scratch = self.scratch_block
        host = [
            *ids, *([0] * pad),
            *positions, *([0] * pad),
            *slots, *([scratch * self.block_size] * pad),
            *context_lens, *([1] * pad),
        ]
        if groups:
            self._cascade_host(host, groups, context_lens, tables, bp, mp, gp)
        else:
            for t in tables:
                host.extend(t)
                host.extend([scratch] * (mp - len(t)))
            host.extend([scratch] * (mp * pad))
        graph.buffer.copy_(torch.frombuffer(array("q", host), dtype=torch.long), non_blocking=True)
        graph.graph.replay()
        return graph.logits[:b]

    def _cascade_host(
        self, host: list[int], groups: Groups, context_lens: list[int], tables: list[list[int]],
        bp: int, mp: int, gp: int,
    ) -> None:
        """Append the cascade part of a step's buffer (layout: see ``_Graph``)."""
        scratch, bs = self.scratch_block, self.block_size
        b = len(tables)
        group_of = [-1] * bp  # rows in no group (padding included) read their own blocks only
        shared_of = [0] * bp
        for g, (rows, shared) in enumerate(groups):
            table = tables[rows[0]]
            host.extend(table[:shared])
            host.extend([scratch] * (mp - shared))
            for r in rows:
                group_of[r], shared_of[r] = g, shared
        host.extend([scratch] * (mp * (gp - len(groups))))
        host.extend(shared * bs for _, shared in groups)
        host.extend([0] * (gp - len(groups)))
        starts, order = [], []
        for rows, _ in groups:
            starts.append(len(order))
            order.extend(rows)
        host.extend(starts)
        host.extend([len(order)] * (gp - len(groups)))
        host.extend(len(rows) for rows, _ in groups)
        host.extend([0] * (gp - len(groups)))
        host.extend(order)
        host.extend(r for r in range(bp) if group_of[r] < 0)
        host.extend(context_lens[r] - shared_of[r] * bs for r in range(b))
        host.extend([1] * (bp - b))
        host.extend(group_of)
        for r in range(b):
            own = tables[r][shared_of[r]:]
            host.extend(own)
            host.extend([scratch] * (mp - len(own)))
        host.extend([scratch] * (mp * (bp - b)))

    def _capture(self, bp: int, mp: int, gp: int) -> _Graph:
        scratch = self.scratch_block
        buffer = torch.zeros(4 * bp + _tables_size(bp, mp, gp), dtype=torch.long, device=self.device)
        buffer[2 * bp : 3 * bp] = scratch * self.block_size  # every row is padding while capturing
        buffer[3 * bp : 4 * bp] = 1
        ids, positions, slots, lens = (buffer[i * bp : (i + 1) * bp] for i in range(4))
        cascade = None
        if gp:
            cascade = self._cascade_views(buffer[4 * bp :], bp, mp, gp)
            tables = cascade[-1]  # the paged path's tables are not read in a cascade step
        else:
            buffer[4 * bp :] = scratch
            tables = buffer[4 * bp :].view(bp, mp)

        def forward() -> torch.Tensor:
            layout = None
            if cascade is not None:
                prefix_tables, prefix_lens, starts, counts, order, suffix_lens, group_of, suffix_tables = cascade
                i32 = torch.int32
                plan = SharedPrefixPlan(starts.to(i32), counts.to(i32), order.to(i32), bp)
                layout = CascadeLayout(prefix_tables.to(i32), prefix_lens.to(i32), group_of.to(i32),
                                       suffix_tables.to(i32), suffix_lens.to(i32), plan)
            batch = PagedBatch(
                self.pool, [], slots, bp, tables.to(torch.int32), lens.to(torch.int32), [], self.scale,
                cascade=layout,
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
        self._graphs[(bp, mp, gp)] = entry
        return entry

    def _cascade_views(self, part: torch.Tensor, bp: int, mp: int, gp: int) -> tuple[torch.Tensor, ...]:
        """Views of a cascade graph's buffer part, filled as for a batch of
        padding rows (one group holding every row, empty prefixes)."""
        sizes = (gp * mp, gp, gp, gp, bp, bp, bp, bp * mp)
        views = list(torch.split(part, sizes))
        views[0].fill_(self.scratch_block)  # prefix tables
        views[3][0] = bp  # row counts: every row in group 0 (the capture sizes nothing by it) ...
        views[4].copy_(torch.arange(bp, device=part.device))  # ... in order
        views[5].fill_(1)  # suffix lens: the row's own token
        views[7].fill_(self.scratch_block)  # suffix tables
        views[0] = views[0].view(gp, mp)
        views[7] = views[7].view(bp, mp)
        return tuple(views)


__all__ = ["DecodeGraphs"]
