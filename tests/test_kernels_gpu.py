"""Triton kernels against their reference twins (run on a CUDA machine with `pytest -m gpu`).

``PARROT_TEST_DEVICE=cpu TRITON_INTERPRET=1`` runs the same checks through
triton's interpreter on the CPU (slow; for debugging kernels without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import parrot.kernels as K
from parrot.kernels import reference as R
from parrot.kernels import sparse_index as S

DEVICE = os.environ.get("PARROT_TEST_DEVICE", "cuda")
_READY = (DEVICE != "cuda" or torch.cuda.is_available()) and importlib.util.find_spec("triton") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _READY, reason="needs a CUDA device and triton")]


# The Triton entry points, imported only when a test runs (importing them needs triton).
def sparse_attention_triton(*args, **kwargs):
    from parrot.kernels.triton_sparse import sparse_attention_triton as fn

    return fn(*args, **kwargs)


def paged_decode_attention_triton(*args, **kwargs):
    from parrot.kernels.triton_decode import paged_decode_attention_triton as fn

    return fn(*args, **kwargs)


def shared_prefix_decode_attention_triton(*args, **kwargs):
    from parrot.kernels.triton_decode import shared_prefix_decode_attention_triton as fn

    return fn(*args, **kwargs)


def shared_prefix_decode_passes(*args, **kwargs):
    from parrot.kernels.triton_decode import shared_prefix_decode_passes as fn

    return fn(*args, **kwargs)

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite output (an element left unwritten?)"
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def _qkv(t, hq, hkv, d, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda h: torch.randn(t, h, d, generator=g).to(DEVICE, dtype)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def _indexes(q, k, t):
    hq = q.shape[1]
    vert, slash = S.estimate_vertical_slash(q, k, 40, 24, last_q=64)
    return {
        "a_shape": S.a_shape_index(hq, t, 64, 200, device=DEVICE),
        "vertical_slash": S.vertical_slash_index(vert, slash, t),
        "block_sparse": S.estimate_block_sparse(q, k, 4),
        "dense": S.dense_index(hq, t, device=DEVICE),
        "empty": S.a_shape_index(hq, t, 0, 0, device=DEVICE),
        "future_column": S.vertical_slash_index(
            torch.full((hq, 1), t - 1, dtype=torch.int32, device=DEVICE), torch.zeros(hq, 0, dtype=torch.int32, device=DEVICE), t
        ),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,t,hq,hkv", [(64, 1000, 4, 2), (128, 577, 4, 4), (128, 1537, 8, 2)])
def test_sparse_kernel_matches_twin(dtype, d, t, hq, hkv):
    q, k, v = _qkv(t, hq, hkv, d, dtype, seed=t + d)
    for name, idx in _indexes(q, k, t).items():
        idx.validate(t)
        want = R.sparse_attention_reference(q, k, v, idx)
        out = sparse_attention_triton(q, k, v, idx)
        if name in ("empty",):
            assert torch.count_nonzero(out) == 0
            continue
        if name == "future_column":  # only the last row sees anything: its own value
            assert torch.count_nonzero(out[: t - 1]) == 0
            torch.testing.assert_close(out[t - 1].float(), v[t - 1].float().repeat_interleave(hq // hkv, 0))
            continue
        assert _rel_err(out, want) < 1e-2, name


@pytest.mark.skipif(DEVICE != "cuda", reason="the dispatcher picks triton only for CUDA tensors")
def test_sparse_prefill_dispatcher_on_cuda_matches_dense_when_dense_and_twin_when_sparse():
    t, d = 3000, 128
    q, k, v = _qkv(t, 8, 2, d, torch.bfloat16, seed=1)
    dense = R.dense_causal_attention(q, k, v)
    layer = K.LayerPatterns.uniform(K.HeadPattern("dense"), 8, min_length=1024)
    assert _rel_err(K.sparse_prefill_attention(q, k, v, layer), dense) < 1e-2
    heads = (K.HeadPattern("a_shape", sink=64, window=512), K.HeadPattern("vertical_slash", vertical=64, slash=128),
             K.HeadPattern("block_sparse", top_k=8), K.HeadPattern("dense")) * 2
    layer = K.LayerPatterns(heads, min_length=1024)
    idx = K.build_layer_index(q, k, layer)
    idx.validate(t)
    assert _rel_err(K.sparse_prefill_attention(q, k, v, layer), R.sparse_attention_reference(q, k, v, idx)) < 1e-2
    below = K.LayerPatterns(heads, min_length=4096)
    assert _rel_err(K.sparse_prefill_attention(q, k, v, below), dense) < 1e-2


def _cache(nb, bs, hkv, d, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(nb, bs, hkv, d, generator=g).to(DEVICE, dtype), torch.randn(nb, bs, hkv, d, generator=g).to(DEVICE, dtype), g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv,bs", [(64, 8, 2, 16), (128, 4, 4, 32), (128, 32, 8, 16)])
def test_paged_decode_matches_twin(dtype, d, hq, hkv, bs):
    nb = 200
    kc, vc, g = _cache(nb, bs, hkv, d, dtype, seed=d + bs)
    lens = torch.tensor([0, 1, bs - 1, bs, bs + 1, 17 * bs + 5, 1000], dtype=torch.int32)
    width = -(-int(lens.max()) // bs) + 1
    tables = torch.stack([torch.randperm(nb, generator=g)[:width] for _ in lens]).to(torch.int32)
    query = torch.randn(len(lens), hq, d, generator=g).to(DEVICE, dtype)
    want = R.paged_decode_attention_reference(query, kc, vc, tables.to(DEVICE), lens.to(DEVICE))
    out = paged_decode_attention_triton(query, kc, vc, tables.to(DEVICE), lens.to(DEVICE))
    assert torch.count_nonzero(out[0]) == 0
    assert _rel_err(out, want) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_of_a_wide_batch_writes_its_output_in_one_pass(dtype):
    """Enough sequences that no context is split: the partial pass writes
    the output itself (no merge kernel), lengths 0 and 1 included."""
    from parrot.kernels.triton_decode import _passes, _per_sequence_items

    nb, bs, hkv, d = 300, 16, 8, 128
    kc, vc, g = _cache(nb, bs, hkv, d, dtype, seed=77)
    lens = torch.randint(0, 200, (160,), generator=g, dtype=torch.int32)
    lens[:2] = torch.tensor([0, 1])
    tables = torch.stack([torch.randperm(nb, generator=g)[:13] for _ in lens]).to(torch.int32)
    query = torch.randn(len(lens), 32, d, generator=g).to(DEVICE, dtype)
    tables, lens = tables.to(DEVICE), lens.to(DEVICE)
    assert len(_passes(query, kc, vc, [_per_sequence_items(tables, lens)], None)) == 1  # fused
    want = R.paged_decode_attention_reference(query, kc, vc, tables, lens)
    out = paged_decode_attention_triton(query, kc, vc, tables, lens)
    assert torch.count_nonzero(out[0]) == 0
    assert _rel_err(out, want) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv,bs", [(64, 8, 2, 16), (128, 32, 32, 16), (128, 8, 1, 64)])
def test_shared_prefix_decode_matches_twin(dtype, d, hq, hkv, bs):
    nb = 400
    kc, vc, g = _cache(nb, bs, hkv, d, dtype, seed=d + bs + 1)
    # Groups of 40 (several row tiles), 3, 0 members, and 1; prefixes not a multiple of bs, one empty;
    # two rows in no group (-1).
    seq_group = torch.tensor([0] * 40 + [1] * 3 + [3], dtype=torch.int32)[torch.randperm(44, generator=g)]
    seq_group[torch.nonzero(seq_group == 0)[:2, 0]] = -1
    prefix_lens = torch.tensor([700, 3 * bs + 1, 300, 0], dtype=torch.int32)
    pw = -(-700 // bs)
    perm = torch.randperm(nb, generator=g).to(torch.int32)
    prefix_tables = perm[: 4 * pw].view(4, pw)
    suffix_lens = torch.randint(0, 3 * bs, (44,), generator=g, dtype=torch.int32)
    suffix_lens[:3] = torch.tensor([0, 1, bs])
    rest = perm[4 * pw :]
    suffix_tables = torch.stack([rest[torch.randperm(rest.numel(), generator=g)[:3]] for _ in range(44)])
    query = torch.randn(44, hq, d, generator=g).to(DEVICE, dtype)
    args = [x.to(DEVICE) for x in (prefix_tables, prefix_lens, seq_group, suffix_tables, suffix_lens)]
    want = R.shared_prefix_decode_attention_reference(query, kc, vc, *args)
    out = shared_prefix_decode_attention_triton(query, kc, vc, *args)
    assert _rel_err(out, want) < 1e-2
    plan = K.plan_shared_prefix(args[2], 4)
    again = shared_prefix_decode_attention_triton(query, kc, vc, *args, plan=plan)
    assert torch.equal(out, again)
    if DEVICE == "cuda":  # the dispatcher takes the Triton path on CUDA
        assert torch.equal(K.shared_prefix_decode_attention(query, kc, vc, *args, plan=plan), out)
    # The suffix pass merging the prefix slots itself equals a separate merge kernel.
    for fused in (True, False):
        *partials, last = shared_prefix_decode_passes(query, kc, vc, *args, plan=plan, merge_in_last_pass=fused)
        # Fused only where the suffix pass is not split: suffixes of at most 3 blocks of 16 are one split.
        assert len(partials) == (1 if fused and bs == 16 else 2) or (fused and bs != 16)
        for run in partials:
            run()
        assert _rel_err(last(), want) < 1e-2


# -- the fused layer ops (RMSNorm with residual, rotary, SwiGLU gate) ----------
# triton's CPU interpreter truncates float32 to bfloat16 where the GPU rounds to nearest.
_TRUNCATES_BF16 = os.environ.get("TRITON_INTERPRET") == "1"


def _ulp_bound(dtype: torch.dtype, ulps: int) -> int:
    return ulps + 2 if _TRUNCATES_BF16 and dtype == torch.bfloat16 else ulps


def _bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference in units of the want's bf16/fp16 spacing."""
    spacing = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(torch.finfo(want.dtype).tiny)
    return float(((got.float() - want.float()).abs() / spacing).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 576), (33, 100)])
def test_add_rms_norm_matches_twin(dtype, rows, hidden):
    from parrot.kernels import layer_ops as L
    from parrot.kernels.triton_layer_ops import add_rms_norm_triton

    g = torch.Generator(device="cpu").manual_seed(rows)
    x = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
    res = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    want_sum = res + x
    want_norm = L.rms_norm_reference(want_sum, w, 1e-5)
    got_norm, got_sum = add_rms_norm_triton(x, res.clone(), w, 1e-5)
    if not (_TRUNCATES_BF16 and dtype == torch.bfloat16):
        assert torch.equal(got_sum, want_sum)  # the rounded add is bit-exact
    assert _bf16_ulps(got_norm, want_norm) <= _ulp_bound(dtype, 2)
    plain, same = add_rms_norm_triton(x, None, w, 1e-5)
    assert same is x or torch.equal(same, x)
    assert _bf16_ulps(plain, L.rms_norm_reference(x, w, 1e-5)) <= _ulp_bound(dtype, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,heads,kv_heads,dim", [(1, 32, 8, 128), (5, 9, 3, 64), (17, 4, 4, 16)])
def test_rotary_matches_twin_on_a_strided_qkv_view(dtype, rows, heads, kv_heads, dim):
    from parrot.kernels import layer_ops as L
    from parrot.kernels.triton_layer_ops import rotary_triton_

    g = torch.Generator(device="cpu").manual_seed(dim)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE, dtype)
    positions = torch.randint(0, 9000, (rows,), generator=g).to(DEVICE)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    qk = qkv[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
    cos, sin = L.rotary_tables(positions, inv_freq.to(DEVICE), dtype)
    want = L.rotary_reference(qk.clone(), cos, sin)
    v_before = qkv[:, (heads + kv_heads) * dim :].clone()
    got = rotary_triton_(qk, positions, inv_freq.to(DEVICE))
    assert got.data_ptr() == qk.data_ptr()  # in place
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], v_before)  # the values are left alone
    # cos/sin may differ by one rounding of the angle's sine; the result by a couple of ulps.
    assert _rel_err(got, want) < 1e-2
    assert float((got.float() - want.float()).abs().max()) <= 4 * torch.finfo(dtype).eps * float(want.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 14336), (9, 1536), (3, 100)])
def test_silu_mul_matches_twin(dtype, rows, inter):
    from parrot.kernels import layer_ops as L
    from parrot.kernels.triton_layer_ops import silu_mul_triton

    g = torch.Generator(device="cpu").manual_seed(inter)
    gate_up = (3 * torch.randn(rows, 2 * inter, generator=g)).to(DEVICE, dtype)
    assert _bf16_ulps(silu_mul_triton(gate_up), L.silu_mul_reference(gate_up)) <= _ulp_bound(dtype, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_matches_twin_from_strided_rows(dtype):
    from parrot.kernels import layer_ops as L
    from parrot.kernels.triton_layer_ops import store_kv_triton

    g = torch.Generator(device="cpu").manual_seed(11)
    heads, dim, rows = 8, 64, 13
    qkv = torch.randn(rows, (4 + 2 * heads) * dim, generator=g).to(DEVICE, dtype)
    k = qkv[:, 4 * dim : (4 + heads) * dim].view(rows, heads, dim)
    v = qkv[:, (4 + heads) * dim :].view(rows, heads, dim)
    slots = torch.randperm(6 * 16, generator=g)[:rows].to(DEVICE)
    caches = [torch.randn(6, 16, heads, dim, generator=g).to(DEVICE, dtype) for _ in range(2)]
    want = [c.clone() for c in caches]
    L.store_kv_reference(want[0], want[1], k, v, slots)
    store_kv_triton(caches[0], caches[1], k, v, slots)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])
