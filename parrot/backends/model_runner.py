"""The model runner: turns a step plan into tensors, runs the forward and
samples.

Everything that touches the device lives here: the KV pool's block copies,
the flat batch (every index goes to the device in one copy), CUDA-graph
replay of decode-only steps, the forward with paged attention (sparse
prefill for long uncached prompts when configured) and batched sampling.
"""

from __future__ import annotations

from typing import Protocol

import torch

from parrot.kernels import SparseAttentionConfig

from .cuda_graphs import DecodeGraphs
from .engine import batched_delivery
from .engine_request import EngineRequest
from .engine_scheduler import StepPlan
from .kv_cache import PagedBatch, PagedKVPool, PrefillSlice
from .model import LlamaFamilyModel
from .sampler import sample


class RunnerCounters(Protocol):
    prefill_tokens: int
    decode_tokens: int


class ModelRunner:
    """Runs planned steps of one model over one KV pool."""

    def __init__(
        self,
        model: LlamaFamilyModel,
        pool: PagedKVPool,
        block_size: int,
        scale: float,
        counters: RunnerCounters,
        *,
        sparse: SparseAttentionConfig | None = None,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.block_size = block_size
        self.scale = scale
        self.counters = counters
        self.sparse = sparse
        self.graphs = graphs
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> tuple[list[EngineRequest], torch.Tensor | None]:
        """Feed the plan's tokens; returns the requests that sample now and
        their logits (one row each, in that order). Table lengths advance."""
        self.pool.copy_blocks(plan.copies)
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        decode_tables: list[list[int]] = []
        prefill_meta: list[tuple[int, int, int, int]] = []  # (start, n, past, offset in the flat block list)
        prefill_blocks: list[int] = []
        sample_rows: list[tuple[EngineRequest, int]] = []
        for item in plan.items:
            r, take = item.request, item.tokens
            table, seq = r.table, r.seq
            past = table.length
            start = len(ids)
            ids.extend(seq.tokens[past : past + take])
            positions.extend(range(past, past + take))
            # Slots block by block, not position by position (long prefills).
            pos = past
            while pos < past + take:
                block, offset = divmod(pos, bs)
                end = min(past + take, (block + 1) * bs)
                base = table.blocks[block] * bs
                slots.extend(range(base + offset, base + offset + end - pos))
                pos = end
            if item.decoding:
                context_lens.append(past + 1)
                decode_tables.append(table.blocks)
                self.counters.decode_tokens += 1
            else:
                prefill_meta.append((start, take, past, len(prefill_blocks)))
                prefill_blocks.extend(table.blocks)
                seq.stats.prefill_tokens += take
                self.counters.prefill_tokens += take
            if past + take == len(seq.tokens) and seq.generating:
                sample_rows.append((r, len(ids) - 1))
        samplers = [r for r, _ in sample_rows]
        num_decode = len(decode_tables)
        if not prefill_meta and self.graphs is not None and self.graphs.accepts(num_decode):
            # Decode only: replay the captured graph (every row samples).
            logits = self.graphs.run(ids, positions, slots, context_lens, decode_tables)
            for item in plan.items:
                item.request.table.length += item.tokens
            return samplers, logits
        max_blocks = max((len(t) for t in decode_tables), default=0)
        flat_tables = [b for t in decode_tables for b in (*t, *([0] * (max_blocks - len(t))))]
        rows = [row for _, row in sample_rows]
        # Every index goes to the device in one copy.
        parts = [ids, positions, slots, context_lens, flat_tables, prefill_blocks, rows]
        host = torch.tensor([x for part in parts for x in part], dtype=torch.long)
        dev = host.to(self.device, non_blocking=True)
        n = len(ids)
        input_ids, pos_t, slot_t = dev[:n], dev[n : 2 * n], dev[2 * n : 3 * n]
        o = 3 * n
        ctx_t = dev[o : o + num_decode].to(torch.int32)
        o += num_decode
        tables_t = dev[o : o + len(flat_tables)].view(num_decode, max_blocks).to(torch.int32)
        o += len(flat_tables)
        pblocks_t = dev[o : o + len(prefill_blocks)]
        o += len(prefill_blocks)
        rows_t = dev[o : o + len(rows)]
        prefills = [
            PrefillSlice(start, take, past, pblocks_t[off : off + -(-(past + take) // bs)])
            for start, take, past, off in prefill_meta
        ]
        attn = PagedBatch(
            self.pool, [(item.request.table, item.tokens) for item in plan.items], slot_t, num_decode, tables_t,
            ctx_t, prefills, self.scale, self.sparse,
        )
        hidden = self.model(input_ids, pos_t, attn)
        attn.commit()  # every table's length advances past the tokens just written
        if not samplers:
            return samplers, None
        return samplers, self.model.compute_logits(hidden.index_select(0, rows_t))

    def sample(self, requests: list[EngineRequest], logits: torch.Tensor | None) -> None:
        """Sample one token per request and hand it to its sequence; every
        event of the step reaches its consumer loop in one wake-up."""
        if not requests or logits is None:
            return
        configs = [r.seq.current_gen.sampling for r in requests]
        tokens = sample(logits, configs, [r.generator() for r in requests])
        with batched_delivery():
            for r, token in zip(requests, tokens):
                r.seq.accept(token)
