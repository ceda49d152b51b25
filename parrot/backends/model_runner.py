"""The model runner: turns a step plan into tensors, runs the forward and
samples.

Everything that touches the device lives here: the KV pool's block copies,
the flat batch (every index goes to the device in one copy), CUDA-graph
replay of decode-only steps, the forward with paged attention (sparse
prefill for long uncached prompts when configured) and batched sampling.
"""

from __future__ import annotations

import os
from array import array
from typing import Protocol

import torch

from parrot.kernels import SharedPrefixPlan, SparseAttentionConfig

from .constraints import GrammarStates, apply_masks, fill_masks
from .cuda_graphs import DecodeGraphs
from .engine import TokenLogprob, batched_delivery
from .engine_request import EngineRequest
from .engine_scheduler import StepPlan
from .kv_cache import CascadeLayout, PagedBatch, PagedKVPool, PrefillSlice
from .model import LlamaFamilyModel
from .sampler import apply_penalties, model_logprobs, pick_logprobs, sample


class RunnerCounters(Protocol):
    prefill_tokens: int
    decode_tokens: int
    cascade_steps: int
    graph_prefill_steps: int


def shared_prefix_groups(
    tables: list[list[int]], context_lens: list[int], block_size: int, min_tokens: int
) -> list[tuple[list[int], int]]:
    """Decode rows whose block tables start with the same blocks (a shared
    prefix held once in the pool): ``(rows, shared full blocks)`` for every
    group of at least two rows sharing at least ``min_tokens`` positions.
    Only blocks wholly before each row's new token count, so the prefix is
    read-only for the whole group."""
    by_first: dict[int, list[int]] = {}
    for row, table in enumerate(tables):
        if table:
            by_first.setdefault(table[0], []).append(row)
    groups = []
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        limit = min((context_lens[r] - 1) // block_size for r in rows)
        # The common start of the tables: min and max compare in C, then one walk of the shorter.
        shared = len(os.path.commonprefix([tables[r][:limit] for r in rows]))
        if shared * block_size >= min_tokens:
            groups.append((rows, shared))
    return groups


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
        graph_prefill_positions: int = 0,
        cascade_min_tokens: int | None = None,
        grammars: GrammarStates | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.block_size = block_size
        self.scale = scale
        self.counters = counters
        self.sparse = sparse
        self.graphs = graphs
        # Prefill chunks join the graphs while the rows' contexts sum to at most this.
        self.graph_prefill_positions = graph_prefill_positions
        # Cascade decode for rows sharing at least this many prefix positions (None: off).
        self.cascade_min_tokens = cascade_min_tokens
        # Compiles constrained Gens' grammars (None: a constraint is an error).
        self.grammars = grammars
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
        decode_rows: list[int] = []  # each decode row's index in the flat batch
        decode_tables: list[list[int]] = []
        prefill_meta: list[tuple[int, int, int, int]] = []  # (start, n, past, offset in the flat block list)
        prefill_blocks: list[int] = []
        sample_rows: list[tuple[EngineRequest, int]] = []
        # Every new token as a decode row (its context and block table): a
        # step of decoders and short prefill chunks replays a CUDA graph.
        row_lens: list[int] = []
        row_tables: list[list[int]] = []
        graphable = self.graphs is not None and self.graphs.accepts(sum(item.tokens for item in plan.items))
        row_positions = 0
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
                decode_rows.append(start)
                context_lens.append(past + 1)
                decode_tables.append(table.blocks)
                self.counters.decode_tokens += 1
            else:
                prefill_meta.append((start, take, past, len(prefill_blocks)))
                prefill_blocks.extend(table.blocks)
                seq.stats.prefill_tokens += take
                self.counters.prefill_tokens += take
            if graphable:
                # Each row reads its whole context: a long one is cheaper eagerly.
                row_positions += take * past + take * (take + 1) // 2
                graphable = row_positions <= self.graph_prefill_positions or not prefill_meta
                row_lens.extend(range(past + 1, past + take + 1))
                row_tables.extend([table.blocks] * take)
            if past + take == len(seq.tokens) and seq.generating:
                sample_rows.append((r, len(ids) - 1))
        samplers = [r for r, _ in sample_rows]
        num_decode = len(decode_tables)
        groups = (shared_prefix_groups(decode_tables, context_lens, bs, self.cascade_min_tokens)
                  if self.cascade_min_tokens is not None and num_decode > 1 else [])
        if graphable and (not groups or self.graphs.cascade):
            # Decoders and short prefill chunks: replay a captured graph.
            graph_groups = [([decode_rows[r] for r in rows], shared) for rows, shared in groups]
            if graph_groups:
                self.counters.cascade_steps += 1
            logits = self.graphs.run(ids, positions, slots, row_lens, row_tables, graph_groups or None)
            for item in plan.items:
                item.request.table.length += item.tokens
            if prefill_meta:
                self.counters.graph_prefill_steps += 1
                if samplers:
                    logits = logits[[row for _, row in sample_rows]]
            return samplers, (logits if samplers else None)
        max_blocks = max((len(t) for t in decode_tables), default=0)
        flat_tables = [b for t in decode_tables for b in (*t, *([0] * (max_blocks - len(t))))]
        rows = [row for _, row in sample_rows]
        cascade_parts, cascade_shape = self._cascade_host(groups, decode_tables, context_lens) if groups else ([], None)
        # Every index goes to the device in one copy.
        parts = [ids, positions, slots, context_lens, flat_tables, prefill_blocks, rows, *cascade_parts]
        # array() turns the ints into bytes in C; torch.tensor(list) is ~10x slower per element.
        host = torch.frombuffer(array("q", [x for part in parts for x in part]), dtype=torch.long)
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
        o += len(rows)
        cascade = None
        if cascade_shape is not None:
            cascade = self._cascade_device(dev[o:], cascade_shape)
            self.counters.cascade_steps += 1
        prefills = [
            PrefillSlice(start, take, past, pblocks_t[off : off + -(-(past + take) // bs)])
            for start, take, past, off in prefill_meta
        ]
        attn = PagedBatch(
            self.pool, [(item.request.table, item.tokens) for item in plan.items], slot_t, num_decode, tables_t,
            ctx_t, prefills, self.scale, self.sparse, cascade,
        )
        hidden = self.model(input_ids, pos_t, attn)
        attn.commit()  # every table's length advances past the tokens just written
        if not samplers:
            return samplers, None
        return samplers, self.model.compute_logits(hidden.index_select(0, rows_t))

    @staticmethod
    def _cascade_host(
        groups: list[tuple[list[int], int]], tables: list[list[int]], context_lens: list[int]
    ) -> tuple[list[list[int]], tuple[int, int, int, int, int]]:
        """The cascade layout as flat int lists (for the step's one copy) and
        its shape ``(groups, prefix width, rows, suffix width, max members)``."""
        num_rows = len(tables)
        group_of = [-1] * num_rows  # -1: in no group, the row's own blocks are its whole context
        shared_of = [0] * num_rows
        prefixes: list[list[int]] = []
        members: list[list[int]] = []
        for rows, shared in groups:
            for r in rows:
                group_of[r], shared_of[r] = len(prefixes), shared
            prefixes.append(tables[rows[0]][:shared])
            members.append(rows)
        width = max(1, max(len(p) for p in prefixes))
        suffixes = [tables[r][shared_of[r]:] for r in range(num_rows)]
        suffix_width = max(1, max(len(x) for x in suffixes))
        prefix_flat = [b for p in prefixes for b in (*p, *([0] * (width - len(p))))]
        suffix_flat = [b for x in suffixes for b in (*x, *([0] * (suffix_width - len(x))))]
        starts, counts, order = [], [], []
        for rows in members:
            starts.append(len(order))
            counts.append(len(rows))
            order.extend(rows)
        order.extend(r for r in range(num_rows) if group_of[r] < 0)
        parts = [prefix_flat, [len(p) for p in prefixes], group_of, suffix_flat, shared_of, list(context_lens),
                 starts, counts, order]
        return parts, (len(prefixes), width, num_rows, suffix_width, max(counts))

    def _cascade_device(self, dev: torch.Tensor, shape: tuple[int, int, int, int, int]) -> CascadeLayout:
        groups, width, rows, suffix_width, max_members = shape
        bs = self.block_size
        o = 0

        def take(n: int) -> torch.Tensor:
            nonlocal o
            out = dev[o : o + n]
            o += n
            return out

        prefix_tables = take(groups * width).view(groups, width).to(torch.int32)
        prefix_lens = (take(groups) * bs).to(torch.int32)
        seq_group = take(rows).to(torch.int32)
        suffix_tables = take(rows * suffix_width).view(rows, suffix_width).to(torch.int32)
        shared = take(rows)
        suffix_lens = (take(rows) - shared * bs).to(torch.int32)
        plan = SharedPrefixPlan(take(groups).to(torch.int32), take(groups).to(torch.int32), take(rows).to(torch.int32),
                                max_members)
        return CascadeLayout(prefix_tables, prefix_lens, seq_group, suffix_tables, suffix_lens, plan)

    @torch.inference_mode()  # the logits are inference tensors; penalties and masks edit them in place
    def sample(self, requests: list[EngineRequest], logits: torch.Tensor | None) -> None:
        """Sample one token per request and hand it to its sequence; every
        event of the step reaches its consumer loop in one wake-up."""
        if not requests or logits is None:
            return
        configs = [r.seq.current_gen.sampling for r in requests]
        matchers = self.grammars.matchers(requests) if self.grammars is not None else [None] * len(requests)
        masks = fill_masks(matchers, logits.shape[-1])  # CPU, while a GPU still runs the forward
        logprobs = model_logprobs(logits, configs)  # the model's, before penalties and masks
        apply_penalties(logits, configs, [r.seq.gen_ids for r in requests])
        apply_masks(logits, masks)  # constrained rows only; free rows share the batch
        tokens = sample(logits, configs, [r.generator() for r in requests])
        GrammarStates.accept(matchers, tokens)
        picked = pick_logprobs(logprobs, configs, tokens)
        with batched_delivery():
            for r, token, lp in zip(requests, tokens, picked):
                r.seq.accept(token, TokenLogprob(token, lp[0], tuple(lp[1])) if lp is not None else None)
