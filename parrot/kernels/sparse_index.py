"""Sparse prefill indexes: what each query block attends to, built online.

One index format serves the three MInference head patterns. For query block
``m`` (rows ``[m*block_m, (m+1)*block_m)``) of head ``h`` the kernel visits

* whole key blocks ``block_idx[h, m, :block_count[h, m]]`` (keys
  ``[b*block_n, (b+1)*block_n)``), and
* single key columns ``column_idx[h, m, :column_count[h, m]]``,

and masks everything to causal (key <= query) and to the prompt length. A
builder never lists a block twice nor a column that lies in a listed block,
so no key is counted twice (:meth:`SparseIndex.validate` checks this).

* A-shape: sink blocks + the blocks covering the last ``window`` keys of
  every row of the query block.
* vertical-slash: the diagonals (``query - key = offset``) are turned into
  the key blocks they cross in each query block; the vertical columns not
  already inside those blocks become columns.
* block-sparse: the top key blocks by pooled ``mean(q) . mean(k)`` score.

The builders are plain tensor code: on a CUDA tensor they run on the GPU,
and the estimation (last queries against all keys, pooled scores) is the
only part that is not integer bookkeeping. Large prompts are processed a few
heads at a time to bound temporary memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Temporary elements allowed per chunk of heads in the builders (~1 GiB of int64).
_CHUNK_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class SparseIndex:
    """Per-head, per-query-block lists of key blocks and key columns (int32)."""

    block_m: int
    block_n: int
    block_count: torch.Tensor  # [H, nQB]
    block_idx: torch.Tensor  # [H, nQB, Wb]  (Wb >= 1)
    column_count: torch.Tensor  # [H, nQB]
    column_idx: torch.Tensor  # [H, nQB, Wc]  (Wc >= 1)

    @property
    def num_heads(self) -> int:
        return self.block_count.shape[0]

    @property
    def num_query_blocks(self) -> int:
        return self.block_count.shape[1]

    def dense_mask(self, length: int, first_row: int = 0) -> torch.Tensor:
        """The boolean ``[H, length - first_row, length]`` mask of keys each query visits (causal applied).

        ``first_row`` limits it to the last queries (cheaper for long prompts).
        """
        device = self.block_count.device
        qb0 = first_row // self.block_m
        nkb = -(-length // self.block_n)
        blocks = _scatter_flags(self.block_idx[:, qb0:], self.block_count[:, qb0:], nkb)  # [H, nQB', nKB]
        cols = _scatter_flags(self.column_idx[:, qb0:], self.column_count[:, qb0:], length)  # [H, nQB', T]
        mask = blocks.repeat_interleave(self.block_n, dim=2)[:, :, :length]
        mask = mask | cols
        mask = mask.repeat_interleave(self.block_m, dim=1)[:, first_row - qb0 * self.block_m : length - qb0 * self.block_m]
        rows = torch.arange(first_row, length, device=device).unsqueeze(1)
        return mask & (torch.arange(length, device=device).unsqueeze(0) <= rows)

    def validate(self, length: int) -> None:
        """Raise ``ValueError`` if an entry is out of range or a key would be visited twice."""
        nkb = -(-length // self.block_n)
        for name, idx, count, limit in (
            ("block", self.block_idx, self.block_count, nkb),
            ("column", self.column_idx, self.column_count, length),
        ):
            used = torch.arange(idx.shape[-1], device=idx.device) < count.unsqueeze(-1)
            vals = idx[used]
            if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= limit):
                raise ValueError(f"{name} index out of range [0, {limit})")
            srt = torch.where(used, idx, -1 - torch.arange(idx.shape[-1], device=idx.device)).sort(-1).values
            if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
                raise ValueError(f"a {name} is listed twice for one query block")
        blocks = _scatter_flags(self.block_idx, self.block_count, nkb)
        used = torch.arange(self.column_idx.shape[-1], device=self.column_idx.device) < self.column_count.unsqueeze(-1)
        inside = torch.gather(blocks, 2, (self.column_idx.long() // self.block_n).clamp_max(nkb - 1)) & used
        if bool(inside.any()):
            raise ValueError("a column lies inside a listed key block")

    def computed_fraction(self, length: int, per_head: bool = False) -> float | list[float]:
        """Fraction of the causal score matrix this index computes (1.0 = dense), counted exactly
        in closed form (no mask is built, so it is cheap at any length)."""
        device = self.block_count.device
        nqb = self.num_query_blocks
        r0 = (torch.arange(nqb, device=device) * self.block_m).view(1, nqb, 1)
        r1 = torch.clamp(r0 + self.block_m, max=length)

        def below(n: torch.Tensor, c0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            # Pairs (i, j) with i < n, c0 <= j < c0 + w, j <= i.
            p = torch.clamp(n - c0, min=0)
            tri = torch.minimum(p, w)
            return tri * (tri + 1) // 2 + w * torch.clamp(p - w, min=0)

        used = torch.arange(self.block_idx.shape[-1], device=device) < self.block_count.unsqueeze(-1)
        c0 = self.block_idx.long() * self.block_n
        w = torch.clamp(length - c0, min=0, max=self.block_n)
        tiles = ((below(r1, c0, w) - below(r0, c0, w)) * used).sum((1, 2))
        used = torch.arange(self.column_idx.shape[-1], device=device) < self.column_count.unsqueeze(-1)
        cols = (torch.clamp(r1 - torch.maximum(r0, self.column_idx.long()), min=0) * used).sum((1, 2))
        frac = ((tiles + cols).double() / (length * (length + 1) / 2)).cpu()
        return frac.tolist() if per_head else float(frac.mean())

    @staticmethod
    def merge_heads(parts: list[tuple[list[int], "SparseIndex"]], num_heads: int) -> "SparseIndex":
        """One index for all heads from indexes built for disjoint head subsets."""
        first = parts[0][1]
        nqb = first.num_query_blocks
        device = first.block_count.device
        wb = max(p.block_idx.shape[-1] for _, p in parts)
        wc = max(p.column_idx.shape[-1] for _, p in parts)
        bc = torch.zeros(num_heads, nqb, dtype=torch.int32, device=device)
        cc = torch.zeros_like(bc)
        bi = torch.zeros(num_heads, nqb, wb, dtype=torch.int32, device=device)
        ci = torch.zeros(num_heads, nqb, wc, dtype=torch.int32, device=device)
        for heads, part in parts:
            if (part.block_m, part.block_n) != (first.block_m, first.block_n):
                raise ValueError("indexes to merge must share block sizes")
            hs = torch.tensor(heads, device=device, dtype=torch.long)
            bc[hs], cc[hs] = part.block_count, part.column_count
            bi[hs, :, : part.block_idx.shape[-1]] = part.block_idx
            ci[hs, :, : part.column_idx.shape[-1]] = part.column_idx
        return SparseIndex(first.block_m, first.block_n, bc, bi, cc, ci)


def _scatter_flags(idx: torch.Tensor, count: torch.Tensor, width: int) -> torch.Tensor:
    """Boolean ``[..., width]`` with True at the first ``count`` entries of ``idx``."""
    used = torch.arange(idx.shape[-1], device=idx.device) < count.unsqueeze(-1)
    target = torch.where(used, idx.long(), width)
    flags = torch.zeros(*idx.shape[:-1], width + 1, dtype=torch.bool, device=idx.device)
    flags.scatter_(-1, target, True)
    return flags[..., :width]


def _compact(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``values`` where ``valid`` along the last dim, in order: ``(count int32, idx int32 [..., W>=1])``."""
    count = valid.sum(-1, dtype=torch.int32)
    width = max(int(count.max()) if count.numel() else 0, 1)
    pos = torch.where(valid, valid.cumsum(-1) - 1, width)
    out = torch.zeros(*values.shape[:-1], width + 1, dtype=torch.int32, device=values.device)
    out.scatter_(-1, pos, values.to(torch.int32))
    return count, out[..., :width].contiguous()


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t


def _cat_chunks(chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(c[1].shape[-1] for c in chunks)
    return torch.cat([c[0] for c in chunks]), torch.cat([_pad_last(c[1], width) for c in chunks])


def _head_chunks(num_heads: int, per_head: int) -> list[slice]:
    step = max(1, min(num_heads, _CHUNK_ELEMENTS // max(per_head, 1)))
    return [slice(h, min(h + step, num_heads)) for h in range(0, num_heads, step)]


def _empty_columns(num_heads: int, nqb: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.zeros(num_heads, nqb, dtype=torch.int32, device=device),
        torch.zeros(num_heads, nqb, 1, dtype=torch.int32, device=device),
    )


def _check_blocks(block_m: int, block_n: int) -> None:
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")


# -- A-shape --------------------------------------------------------------------
def a_shape_index(
    num_heads: int,
    length: int,
    sink: int,
    window: int,
    *,
    block_m: int = 64,
    block_n: int = 64,
    device: torch.device | str = "cpu",
) -> SparseIndex:
    """Attention sinks (the first ``sink`` keys) plus a local ``window`` of keys per query.

    Block granular: every query sees at least its last ``window`` keys and
    the first ``sink`` keys, rounded out to whole key blocks.
    """
    _check_blocks(block_m, block_n)
    device = torch.device(device)
    nqb = -(-length // block_m)
    m = torch.arange(nqb, device=device)
    last = (torch.clamp((m + 1) * block_m, max=length) - 1) // block_n  # last key block of each query block
    lo = torch.clamp(m * block_m - max(window, 0) + 1, min=0) // block_n
    if window <= 0:
        lo = last + 1
    nsink = -(-max(sink, 0) // block_n)
    nloc = int((last - lo + 1).max()) if nqb else 0
    sink_c = torch.arange(nsink, device=device).expand(nqb, nsink)
    sink_ok = (sink_c < lo.unsqueeze(1)) & (sink_c <= last.unsqueeze(1))
    loc_c = lo.unsqueeze(1) + torch.arange(max(nloc, 0), device=device)
    loc_ok = loc_c <= last.unsqueeze(1)
    count, idx = _compact(torch.cat([sink_c, loc_c], 1), torch.cat([sink_ok, loc_ok], 1))
    cc, ci = _empty_columns(num_heads, nqb, device)
    return SparseIndex(
        block_m,
        block_n,
        count.expand(num_heads, -1).contiguous(),
        idx.expand(num_heads, -1, -1).contiguous(),
        cc,
        ci,
    )


# -- vertical-slash -------------------------------------------------------------
def estimate_vertical_slash(
    q: torch.Tensor,
    k: torch.Tensor,
    n_vertical: int,
    n_slash: int,
    *,
    last_q: int = 64,
    scale: float | None = None,
    force_vertical: int = 16,
    force_slash: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick key columns and diagonals per head from the last ``last_q`` queries against all keys.

    Returns ``(vertical [Hq, nv] key positions, slash [Hq, ns] offsets
    query - key)``, each sorted ascending. The first ``force_vertical``
    columns (attention sinks) and the ``force_slash`` nearest diagonals
    (local window) are always kept, within the budgets.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nv, ns = min(n_vertical, t), min(n_slash, t)
    lq = min(last_q, t)
    sc = (1.0 / math.sqrt(d)) if scale is None else scale
    device = q.device
    rows = torch.arange(t - lq, t, device=device)  # positions of the last queries
    keys = torch.arange(t, device=device)
    offset = rows.unsqueeze(1) - keys.unsqueeze(0)  # [lq, T]
    visible = offset >= 0
    offset_idx = offset.clamp_min(0).reshape(-1)
    verts, slashes = [], []
    for hs in _head_chunks(hkv, group * lq * t * 3):
        qa = q[t - lq :, hs.start * group : hs.stop * group].float()  # [lq, hc*group, D]
        qa = qa.reshape(lq, hs.stop - hs.start, group, d).permute(1, 2, 0, 3).reshape(hs.stop - hs.start, group * lq, d)
        ka = k[:, hs].float().permute(1, 2, 0)  # [hc, D, T]
        probs = torch.softmax(((qa @ ka) * sc).reshape(-1, lq, t).masked_fill(~visible, float("-inf")), dim=-1)
        vert = probs.sum(1)  # [h, T]
        slash = torch.zeros_like(vert).scatter_add_(1, offset_idx.expand(probs.shape[0], -1), probs.reshape(probs.shape[0], -1))
        vert[:, : min(force_vertical, nv)] = float("inf")
        slash[:, : min(force_slash, ns)] = float("inf")
        verts.append(vert.topk(nv, dim=-1).indices.sort(-1).values)
        slashes.append(slash.topk(ns, dim=-1).indices.sort(-1).values)
    return torch.cat(verts).to(torch.int32), torch.cat(slashes).to(torch.int32)


def vertical_slash_index(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    length: int,
    *,
    block_m: int = 64,
    block_n: int = 64,
) -> SparseIndex:
    """Index of the key columns ``vertical [H, nv]`` and diagonals ``slash [H, ns]`` (offsets >= 0).

    Each diagonal is rounded out to the key blocks it crosses in each query
    block (so the kernel computes whole tiles around it); columns already in
    such a block are dropped from the column list.
    """
    _check_blocks(block_m, block_n)
    h = vertical.shape[0]
    device = vertical.device
    nqb, nkb = -(-length // block_m), -(-length // block_n)
    m = torch.arange(nqb, device=device)
    row_lo = (m * block_m).view(1, nqb, 1)
    row_hi = (torch.clamp((m + 1) * block_m, max=length) - 1).view(1, nqb, 1)
    span = -(-block_m // block_n) + 1  # key blocks one diagonal can cross in a query block
    blocks, columns = [], []
    per_head = nqb * (max(slash.shape[1], 1) * span + nkb + max(vertical.shape[1], 1))
    for hs in _head_chunks(h, per_head):
        d = slash[hs].long().unsqueeze(1)  # [hc, 1, ns]
        lo, hi = row_lo - d, row_hi - d  # key range of the diagonal in each query block
        lo_b, hi_b = lo.clamp_min(0) // block_n, hi // block_n
        cand = (lo_b.unsqueeze(-1) + torch.arange(span, device=device)).flatten(2)  # [hc, nQB, ns*span]
        ok = ((cand <= hi_b.unsqueeze(-1).expand(*hi_b.shape, span).flatten(2)) & (hi >= 0).repeat_interleave(span, -1))
        flags = torch.zeros(cand.shape[0], nqb, nkb + 1, dtype=torch.bool, device=device)
        flags.scatter_(2, torch.where(ok, cand, nkb), True)
        flags = flags[..., :nkb]
        kb = torch.arange(nkb, device=device).expand_as(flags)
        blocks.append(_compact(kb, flags))
        v = vertical[hs].long().unsqueeze(1).expand(-1, nqb, -1)  # [hc, nQB, nv]
        inside = torch.gather(flags, 2, (v // block_n).clamp_max(nkb - 1))
        keep = (v <= row_hi) & ~inside
        columns.append(_compact(v, keep))
    bc, bi = _cat_chunks(blocks)
    cc, ci = _cat_chunks(columns)
    return SparseIndex(block_m, block_n, bc, bi, cc, ci)


# -- block-sparse ---------------------------------------------------------------
def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each run of ``block`` positions of ``x [T, H, D]``: ``[H, nB, D]`` float32.

    Sums in float32 without a float32 copy of ``x`` (8.6 GB per tensor at 1M tokens).
    """
    t, h, d = x.shape
    full = t // block
    parts = []
    if full:
        parts.append(x[: full * block].view(full, block, h, d).sum(1, dtype=torch.float32) / block)
    if t % block:
        parts.append(x[full * block :].sum(0, keepdim=True, dtype=torch.float32) / (t % block))
    return torch.cat(parts).transpose(0, 1)


def estimate_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    top_k: int,
    *,
    block_m: int = 64,
    block_n: int = 64,
    scale: float | None = None,
) -> SparseIndex:
    """Top ``top_k`` causal key blocks per query block by pooled score; the diagonal block and block 0 always."""
    _check_blocks(block_m, block_n)
    t, hq, d = q.shape
    group = hq // k.shape[1]
    sc = (1.0 / math.sqrt(d)) if scale is None else scale
    nqb, nkb = -(-t // block_m), -(-t // block_n)
    qp = _pool(q, block_m)  # [Hq, nQB, D]
    kp = _pool(k, block_n).repeat_interleave(group, 0)  # [Hq, nKB, D]
    m = torch.arange(nqb, device=q.device)
    last = ((torch.clamp((m + 1) * block_m, max=t) - 1) // block_n).view(nqb, 1)
    kb = torch.arange(nkb, device=q.device).view(1, nkb)
    causal = kb <= last
    forced = (kb == last) | (kb == 0)
    kk = max(1, min(top_k, nkb))
    chunks = []
    for hs in _head_chunks(hq, nqb * nkb * 2):
        s = (qp[hs] @ kp[hs].transpose(1, 2)) * sc
        s = s.masked_fill(~causal, float("-inf")).masked_fill(forced, float("inf"))
        top = s.topk(kk, dim=-1)
        order = top.indices.sort(-1)
        valid = torch.gather(top.values, -1, order.indices) > float("-inf")
        chunks.append(_compact(order.values, valid))
    bc, bi = _cat_chunks(chunks)
    cc, ci = _empty_columns(hq, nqb, q.device)
    return SparseIndex(block_m, block_n, bc, bi, cc, ci)


def dense_index(num_heads: int, length: int, *, block_m: int = 64, block_n: int = 64, device="cpu") -> SparseIndex:
    """Every causal key block (a head marked ``dense`` in a sparse layer)."""
    return a_shape_index(num_heads, length, 0, length + block_m, block_m=block_m, block_n=block_n, device=device)
