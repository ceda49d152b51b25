"""CPU checks of the kernel reference twins against naive dense attention.

The twins are what the GPU tests hold the Triton kernels to, so here they
are checked against independent computations: torch SDPA, per-row loops
over explicit key sets, and attention over contiguous (un-paged) keys.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import parrot.kernels as K
from parrot.kernels import reference as R
from parrot.kernels import sparse_index as S
from parrot.kernels.pattern_search import attention_mass_recall, search_config, search_layer


def _qkv(t: int, hq: int, hkv: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g), torch.randn(t, hkv, d, generator=g))


def _sdpa_causal(q, k, v):
    group = q.shape[1] // k.shape[1]
    qt = q.transpose(0, 1)
    kt = k.transpose(0, 1).repeat_interleave(group, 0)
    vt = v.transpose(0, 1).repeat_interleave(group, 0)
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(0, 1)


def _loop_attention(q, k, v, allowed):
    """Row by row over an explicit list of key positions (independent of the masked twin)."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(t, hq, d)
    for h in range(hq):
        for i in range(t):
            keys = allowed(h, i)
            if not keys:
                continue
            idx = torch.tensor(keys)
            s = (k[idx, h // group] @ q[i, h]) / math.sqrt(d)
            out[i, h] = torch.softmax(s, 0) @ v[idx, h // group]
    return out


def test_dense_twin_matches_sdpa_with_gqa():
    q, k, v = _qkv(77, 4, 2, 16, 0)
    torch.testing.assert_close(R.dense_causal_attention(q, k, v), _sdpa_causal(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,bm,bn", [(100, 16, 16), (100, 32, 16), (97, 16, 32), (64, 64, 64), (1, 16, 16)])
def test_full_index_is_exact_dense(t, bm, bn):
    q, k, v = _qkv(t, 4, 2, 16, 1)
    idx = S.dense_index(4, t, block_m=bm, block_n=bn)
    idx.validate(t)
    assert idx.computed_fraction(t) == pytest.approx(1.0)
    torch.testing.assert_close(K.sparse_attention(q, k, v, idx), _sdpa_causal(q, k, v), atol=1e-5, rtol=1e-5)


def test_masked_twin_matches_row_loop_on_a_vertical_slash_index():
    t, bm, bn = 90, 16, 16
    q, k, v = _qkv(t, 2, 1, 8, 2)
    vert = torch.tensor([[0, 5, 40, 61], [3, 33, 34, 89]], dtype=torch.int32)
    slash = torch.tensor([[0, 20], [1, 50]], dtype=torch.int32)
    idx = S.vertical_slash_index(vert, slash, t, block_m=bm, block_n=bn)
    idx.validate(t)
    mask = idx.dense_mask(t)
    got = K.sparse_attention(q, k, v, idx)
    want = _loop_attention(q, k, v, lambda h, i: [j for j in range(i + 1) if mask[h, i, j]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for h in range(2):
        for i in range(t):
            for col in vert[h].tolist():  # every listed column, wherever causal allows
                assert bool(mask[h, i, col]) == (col <= i)
            for off in slash[h].tolist():  # every listed diagonal
                if i - off >= 0:
                    assert mask[h, i, i - off]
    # Rounding diagonals out to blocks: nothing visited outside the blocks they cross or the columns.
    for i in range(t):
        m = i // bm
        rows = range(m * bm, min(m * bm + bm, t))
        crossed = {(r - d) // bn for d in slash[0].tolist() for r in rows if r - d >= 0}
        for j in range(i + 1):
            if mask[0, i, j]:
                assert j // bn in crossed or j in vert[0].tolist()


def test_every_diagonal_is_exact_dense():
    t = 70
    q, k, v = _qkv(t, 2, 2, 8, 3)
    slash = torch.arange(t, dtype=torch.int32).expand(2, t)
    idx = S.vertical_slash_index(torch.zeros(2, 0, dtype=torch.int32), slash, t, block_m=16, block_n=16)
    torch.testing.assert_close(K.sparse_attention(q, k, v, idx), _sdpa_causal(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,sink,window,bm,bn", [(100, 5, 20, 16, 16), (131, 40, 1, 32, 16), (64, 0, 64, 16, 16)])
def test_a_shape_covers_sinks_and_window_at_block_granularity(t, sink, window, bm, bn):
    idx = S.a_shape_index(3, t, sink, window, block_m=bm, block_n=bn)
    idx.validate(t)
    mask = idx.dense_mask(t)
    nsink = -(-sink // bn) * bn
    for i in range(t):
        lo = max(0, (i // bm) * bm - window + 1) // bn * bn
        for j in range(t):
            expected_possible = j <= i and (j < nsink or j >= lo)
            if j <= i and (j < sink or j > i - window):
                assert mask[:, i, j].all(), (i, j)  # what the pattern promises is visited
            if mask[0, i, j]:
                assert expected_possible, (i, j)  # and nothing beyond its blocks


def test_a_shape_with_a_large_window_is_dense():
    t = 75
    q, k, v = _qkv(t, 4, 1, 16, 4)
    idx = S.a_shape_index(4, t, 0, t, block_m=16, block_n=16)
    torch.testing.assert_close(K.sparse_attention(q, k, v, idx), _sdpa_causal(q, k, v), atol=1e-5, rtol=1e-5)


def test_empty_patterns_give_zero_rows():
    t = 40
    q, k, v = _qkv(t, 2, 2, 8, 5)
    idx = S.a_shape_index(2, t, 0, 0, block_m=16, block_n=16)
    assert int(idx.block_count.sum()) == 0
    assert torch.count_nonzero(K.sparse_attention(q, k, v, idx)) == 0
    # A column only in the future of a query block leaves that block's rows empty.
    idx = S.vertical_slash_index(torch.tensor([[35], [35]], dtype=torch.int32), torch.zeros(2, 0, dtype=torch.int32), t,
                                 block_m=16, block_n=16)
    out = K.sparse_attention(q, k, v, idx)
    assert torch.count_nonzero(out[:35]) == 0
    torch.testing.assert_close(out[35:], v[35:36].expand(5, -1, -1))


def test_block_sparse_full_budget_is_dense_and_keeps_diagonal():
    t = 100
    q, k, v = _qkv(t, 4, 2, 16, 6)
    full = S.estimate_block_sparse(q, k, 100, block_m=16, block_n=16)
    torch.testing.assert_close(K.sparse_attention(q, k, v, full), _sdpa_causal(q, k, v), atol=1e-5, rtol=1e-5)
    small = S.estimate_block_sparse(q, k, 2, block_m=16, block_n=16)
    small.validate(t)
    for m in range(small.num_query_blocks):
        listed = set(small.block_idx[:, m, : 2].tolist()[0][: int(small.block_count[0, m])])
        assert m in listed and 0 in listed
        assert all(b <= m for b in listed)


def test_block_sparse_picks_the_block_with_the_strong_keys():
    t, d = 128, 16
    q, k, v = _qkv(t, 1, 1, d, 7)
    q *= 0.1
    k *= 0.1
    u = torch.randn(d)
    q[:, 0] += u
    k[40:48, 0] += 3 * u  # keys in block 2 (block_n=16) answer every query
    idx = S.estimate_block_sparse(q, k, 3, block_m=16, block_n=16)
    for m in range(3, idx.num_query_blocks):
        assert 2 in idx.block_idx[0, m, : int(idx.block_count[0, m])].tolist()


def test_vertical_slash_estimation_finds_planted_column_and_local_diagonals():
    t, d = 256, 16
    q, k, v = _qkv(t, 2, 1, d, 8)
    q *= 0.1
    k *= 0.1
    u = torch.randn(d)
    q[:, :, :] += u
    k[123, 0] += 4 * u
    vert, slash = S.estimate_vertical_slash(q, k, 20, 8, last_q=32, force_vertical=4, force_slash=4)
    assert vert.shape == (2, 20) and slash.shape == (2, 8)
    assert (vert == 123).any(-1).all()
    assert set(range(4)) <= set(slash[0].tolist())
    assert (vert.diff(dim=-1) > 0).all() and (slash.diff(dim=-1) > 0).all()


def _paged(keys: torch.Tensor, block_size: int, num_blocks: int, seed: int):
    """Scatter contiguous ``keys [L, H, D]`` into random pages; return (cache, table)."""
    g = torch.Generator().manual_seed(seed)
    n = -(-keys.shape[0] // block_size)
    table = torch.randperm(num_blocks, generator=g)[: max(n, 1)].to(torch.int32)
    cache = torch.randn(num_blocks, block_size, *keys.shape[1:], generator=g)  # junk elsewhere
    for p in range(keys.shape[0]):
        cache[table[p // block_size], p % block_size] = keys[p]
    return cache, table


@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_decode_twin_matches_contiguous_attention(block_size):
    hq, hkv, d = 4, 2, 16
    lens = [0, 1, block_size, block_size + 1, 3 * block_size - 5]
    nb = 64
    g = torch.Generator().manual_seed(9)
    keys = torch.randn(nb * block_size, hkv, d, generator=g)
    vals = torch.randn(nb * block_size, hkv, d, generator=g)
    kc = keys.view(nb, block_size, hkv, d)
    vc = vals.view(nb, block_size, hkv, d)
    tables = torch.stack([torch.randperm(nb, generator=g)[:4] for _ in lens]).to(torch.int32)
    query = torch.randn(len(lens), hq, d, generator=g)
    out = K.paged_decode_attention(query, kc, vc, tables, torch.tensor(lens, dtype=torch.int32))
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        rows = tables[b].long()[pos // block_size] * block_size + pos % block_size
        if n == 0:
            assert torch.count_nonzero(out[b]) == 0
            continue
        want = _loop_attention(query[b : b + 1], keys[rows], vals[rows], lambda h, i: list(range(n)))[0]
        torch.testing.assert_close(out[b], want, atol=1e-5, rtol=1e-5)


def test_shared_prefix_twin_equals_attention_over_prefix_plus_suffix():
    hq, hkv, d, bs, nb = 8, 2, 16, 16, 80
    g = torch.Generator().manual_seed(10)
    kc = torch.randn(nb, bs, hkv, d, generator=g)
    vc = torch.randn(nb, bs, hkv, d, generator=g)
    perm = torch.randperm(nb, generator=g).to(torch.int32)
    prefix_tables = perm[:12].view(3, 4)
    prefix_lens = torch.tensor([50, 0, 64], dtype=torch.int32)  # 50: not a multiple of the block size
    seq_group = torch.tensor([2, 0, 0, 1, 2, 0], dtype=torch.int32)
    suffix_tables = perm[12:24].view(6, 2)
    suffix_lens = torch.tensor([1, 17, 0, 5, 32, 3], dtype=torch.int32)
    query = torch.randn(6, hq, d, generator=g)
    out = K.shared_prefix_decode_attention(query, kc, vc, prefix_tables, prefix_lens, seq_group, suffix_tables, suffix_lens)
    for b in range(6):
        grp = int(seq_group[b])
        keys = torch.cat([R.gather_paged(kc, prefix_tables[grp], int(prefix_lens[grp])),
                          R.gather_paged(kc, suffix_tables[b], int(suffix_lens[b]))])
        vals = torch.cat([R.gather_paged(vc, prefix_tables[grp], int(prefix_lens[grp])),
                          R.gather_paged(vc, suffix_tables[b], int(suffix_lens[b]))])
        n = keys.shape[0]
        want = _loop_attention(query[b : b + 1], keys, vals, lambda h, i: list(range(n)))[0]
        torch.testing.assert_close(out[b], want, atol=1e-5, rtol=1e-5)
    # Prefix lengths that are whole blocks: equal to plain paged decode over the joined table.
    pl = torch.tensor([64, 0, 64], dtype=torch.int32)
    joined = torch.cat([prefix_tables[seq_group.long()], suffix_tables], 1)
    joined_lens = pl[seq_group.long()] + suffix_lens
    for b in range(6):  # a group without prefix: its sequences' suffix starts the table
        if int(pl[seq_group[b]]) == 0:
            joined[b] = torch.cat([suffix_tables[b], prefix_tables[0]])
    torch.testing.assert_close(
        K.shared_prefix_decode_attention(query, kc, vc, prefix_tables, pl, seq_group, suffix_tables, suffix_lens),
        K.paged_decode_attention(query, kc, vc, joined, joined_lens), atol=1e-5, rtol=1e-5)


def test_shared_prefix_rows_in_no_group_attend_to_their_own_blocks():
    """Group -1: the row's suffix is its whole context; the plan lists such rows last, in no group."""
    hq, hkv, d, bs, nb = 4, 2, 16, 16, 40
    g = torch.Generator().manual_seed(11)
    kc, vc = torch.randn(nb, bs, hkv, d, generator=g), torch.randn(nb, bs, hkv, d, generator=g)
    perm = torch.randperm(nb, generator=g).to(torch.int32)
    prefix_tables, prefix_lens = perm[:3].view(1, 3), torch.tensor([48], dtype=torch.int32)
    seq_group = torch.tensor([-1, 0, -1, 0], dtype=torch.int32)
    suffix_tables, suffix_lens = perm[3:11].view(4, 2), torch.tensor([20, 5, 32, 1], dtype=torch.int32)
    query = torch.randn(4, hq, d, generator=g)
    out = K.shared_prefix_decode_attention(query, kc, vc, prefix_tables, prefix_lens, seq_group, suffix_tables, suffix_lens)
    alone = K.paged_decode_attention(query, kc, vc, suffix_tables, suffix_lens)
    torch.testing.assert_close(out[[0, 2]], alone[[0, 2]], atol=1e-5, rtol=1e-5)
    joined = torch.cat([prefix_tables.expand(4, -1), suffix_tables], 1)
    torch.testing.assert_close(out[[1, 3]], K.paged_decode_attention(query, kc, vc, joined, suffix_lens + 48)[[1, 3]],
                               atol=1e-5, rtol=1e-5)
    plan = K.plan_shared_prefix(seq_group, 1)
    assert plan.row_count.tolist() == [2] and plan.row_start.tolist() == [0]
    assert plan.row_seq.tolist()[:2] == [1, 3] and sorted(plan.row_seq.tolist()[2:]) == [0, 2]
    with pytest.raises(ValueError, match="below -1"):
        K.plan_shared_prefix(torch.tensor([-2, 0], dtype=torch.int32), 1)


def test_sparse_prefill_dispatch_dense_below_threshold_and_sparse_above():
    t = 96
    q, k, v = _qkv(t, 4, 2, 16, 11)
    layer = K.LayerPatterns(
        heads=(K.HeadPattern("a_shape", sink=16, window=16), K.HeadPattern("vertical_slash", vertical=8, slash=16),
               K.HeadPattern("block_sparse", top_k=2), K.HeadPattern("dense")),
        block_m=16, block_n=16, last_q=16, min_length=200,
    )
    torch.testing.assert_close(K.sparse_prefill_attention(q, k, v, layer), _sdpa_causal(q, k, v), atol=1e-5, rtol=1e-5)
    sparse = K.LayerPatterns(layer.heads, 16, 16, 16, min_length=64)
    out = K.sparse_prefill_attention(q, k, v, sparse)
    idx = K.build_layer_index(q, k, sparse)
    idx.validate(t)
    torch.testing.assert_close(out, R.sparse_attention_reference(q, k, v, idx))
    torch.testing.assert_close(out[:, 3], _sdpa_causal(q, k, v)[:, 3], atol=1e-5, rtol=1e-5)  # the dense head
    # Each head got its own pattern's index.
    a_only = K.build_layer_index(q, k, K.LayerPatterns.uniform(layer.heads[0], 4, block_m=16, block_n=16))
    assert torch.equal(idx.dense_mask(t)[0], a_only.dense_mask(t)[0])
    assert not torch.equal(idx.dense_mask(t)[0], idx.dense_mask(t)[2])


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(32, 3, 2, 8, 12)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        K.dense_prefill_attention(q, k, v)
    kc = torch.zeros(4, 12, 2, 8)
    with pytest.raises(ValueError, match="block_size"):
        K.paged_decode_attention(torch.zeros(1, 2, 8), kc, kc, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        K.sparse_attention(q[:, :2], k, v, S.dense_index(2, 32), backend="cuda")


def test_config_json_round_trip_and_field_errors(tmp_path):
    cfg = K.SparseAttentionConfig(
        [(K.HeadPattern("a_shape", sink=4, window=128), K.HeadPattern("block_sparse", top_k=9))], min_length=1000
    )
    path = tmp_path / "sparse.json"
    cfg.save(path)
    back = K.SparseAttentionConfig.load(path)
    assert back.layers == cfg.layers and back.min_length == 1000
    assert back.layer(0).heads[1].top_k == 9
    for bad, field in (
        ({"version": 2, "layers": [[{"kind": "dense"}]]}, "version"),
        ({"version": 1, "layers": [[{"kind": "spiral"}]]}, "kind"),
        ({"version": 1, "layers": [[{"kind": "a_shape", "window": -1}]]}, "window"),
        ({"version": 1, "block_m": 48, "layers": [[{"kind": "dense"}]]}, "block_m"),
        ({"version": 1, "layers": [[{"kind": "dense", "colour": 1}]]}, "unknown"),
    ):
        with pytest.raises(K.PatternConfigError, match=field):
            K.SparseAttentionConfig.from_dict(bad)
    path.write_text("{not json")
    with pytest.raises(K.PatternConfigError, match="JSON"):
        K.SparseAttentionConfig.load(path)


def test_pattern_search_keeps_the_most_mass(tmp_path):
    t, d = 512, 16
    q, k, _ = _qkv(t, 2, 2, d, 13)
    q *= 0.1
    k *= 0.1
    u = torch.randn(d)
    q[:, 0] += 2 * u
    k[[150, 300, 333], 0] += 2 * u  # head 0: a few far columns hold the mass
    cands = [K.HeadPattern("a_shape", sink=16, window=64), K.HeadPattern("vertical_slash", vertical=32, slash=64),
             K.HeadPattern("block_sparse", top_k=3)]
    heads, stats = search_layer([(q, k)], cands, max_fraction=0.5, block_m=16, block_n=16, last_q=32)
    assert heads[0].kind == "vertical_slash"
    for h in range(2):  # the chosen pattern's recall is the best of the candidates, recomputed independently
        recalls = []
        for c in cands:
            mask = K.build_layer_index(q, k, K.LayerPatterns.uniform(c, 2, block_m=16, block_n=16, last_q=32)).dense_mask(t)
            recalls.append(float(attention_mass_recall(q, k, mask)[h]))
        assert stats["heads"][h]["recall"] == pytest.approx(max(recalls), abs=1e-9)
    assert stats["heads"][0]["recall"] > 0.9
    cfg = search_config([[(q, k), (q, k)]], cands, max_fraction=0.5, block_m=16, block_n=16, last_q=32, rows=None)
    cfg.save(tmp_path / "c.json")
    assert K.SparseAttentionConfig.load(tmp_path / "c.json").layer(1).heads[0].kind == "vertical_slash"


def test_import_does_not_need_triton():
    code = "import sys, parrot.kernels; assert 'triton' not in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_computed_fraction_counts_exactly_what_the_mask_visits():
    t = 203
    q, k, _ = _qkv(t, 3, 1, 8, 14)
    vert, slash = S.estimate_vertical_slash(q, k, 30, 10, last_q=16)
    for idx in (S.vertical_slash_index(vert, slash, t, block_m=32, block_n=16),
                S.estimate_block_sparse(q, k, 3, block_m=16, block_n=32),
                S.a_shape_index(3, t, 20, 50, block_m=16, block_n=16)):
        mask = idx.dense_mask(t)
        want = (mask.sum((1, 2)).double() / (t * (t + 1) / 2)).tolist()
        assert idx.computed_fraction(t, per_head=True) == pytest.approx(want)
        assert torch.equal(idx.dense_mask(t, first_row=150), mask[:, 150:])
