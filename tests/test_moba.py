"""MoBA: Triton gate/top-k and block-sparse attention against the torch reference."""
import pytest
import torch

from longattn import flash_attention
from longattn.moba import moba_attention, moba_attention_ref, moba_block_selection, moba_block_selection_ref
from longattn.moba.reference import _pooled_keys
from helpers import (assert_close, assert_compiled_matches_eager, assert_first_order_only, assert_lse_close,
                     assert_same_as_widened, capture_graph, leaf)


def _cu(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


def _assert_same_selection(sel, sel_ref, q, k, block_size, cu_seqlens_q=None, cu_seqlens_k=None):
    """The kernel's selection equals the reference's, except in rows where two gate scores tie to float32
    rounding (the kernel sums the dot products in another order; thousands of rows of 30 blocks meet such
    ties): there both selections' scores must agree."""
    rows = (sel != sel_ref).any(-1).nonzero().tolist()
    assert len(rows) <= max(2, sel[..., 0].numel() // 1000), f"block selection differs in {len(rows)} rows"
    group = q.shape[-2] // k.shape[-2]
    for row in rows:
        *pos, h = row
        a, r = sel[tuple(row)], sel_ref[tuple(row)]
        if cu_seqlens_q is None:  # dense (b, t, h)
            qv, keys = q[pos[0], pos[1], h], k[pos[0]]
        else:  # varlen (t, h)
            b = int((cu_seqlens_q[1:] <= pos[0]).sum())
            qv, keys = q[pos[0], h], k[int(cu_seqlens_k[b]):int(cu_seqlens_k[b + 1])]
        scores = _pooled_keys(keys, block_size).float()[:, h // group] @ qv.float()
        own = r.max()  # the query's own block, the highest one selected
        assert a.max() == own and (a >= 0).sum() == (r >= 0).sum(), f"row {row}: {a.tolist()} vs {r.tolist()}"
        picked = [torch.sort(scores[x[(x >= 0) & (x != own)]]).values for x in (a, r)]
        torch.testing.assert_close(*picked, rtol=0, atol=1e-4 * (1 + scores.abs().max().item()),
                                   msg=f"row {row}: block selection differs from the reference beyond a tie")


def _check(q, k, v, dtype, *, block_size, topk, with_lse=True, softcap=None, **varlen):
    """Selection, forward, lse and gradients vs the reference (the reference attends to the kernel's selection
    once that has been checked)."""
    ref_cu = {}
    if "cu_seqlens" in varlen:
        ref_cu = dict(cu_seqlens_q=varlen["cu_seqlens"], cu_seqlens_k=varlen["cu_seqlens"])
    elif varlen:
        ref_cu = dict(cu_seqlens_q=varlen["cu_seqlens_q"], cu_seqlens_k=varlen["cu_seqlens_k"])
    sel_ref = moba_block_selection_ref(q, k, block_size=block_size, topk=topk, **ref_cu)
    sel = moba_block_selection(q, k, block_size=block_size, topk=topk, **varlen)
    _assert_same_selection(sel, sel_ref, q, k, block_size, **ref_cu)

    qk, kk, vk = leaf(q), leaf(k), leaf(v)
    qr, kr, vr = leaf(q, torch.float32), leaf(k, torch.float32), leaf(v, torch.float32)
    out, lse = moba_attention(qk, kk, vk, block_size=block_size, topk=topk, return_lse=True, softcap=softcap,
                              **varlen)
    out_r, lse_r = moba_attention_ref(qr, kr, vr, block_size=block_size, topk=topk, return_lse=True,
                                      selection=sel, softcap=softcap, **ref_cu)
    assert out.dtype == dtype
    assert_close(out, out_r, dtype, "out")
    assert_lse_close(lse, lse_r, atol=1e-4 if dtype == torch.float32 else 2e-3)
    dout = torch.randn_like(out_r)
    loss, loss_r = (out.float() * dout).sum(), (out_r * dout).sum()
    if with_lse:
        dlse = torch.randn_like(lse_r)
        loss, loss_r = loss + (lse * dlse).sum(), loss_r + (lse_r * dlse).sum()
    loss.backward()
    loss_r.backward()
    for name, a, b in (("dq", qk.grad, qr.grad), ("dk", kk.grad, kr.grad), ("dv", vk.grad, vr.grad)):
        assert_close(a, b, dtype, name)


DENSE = [
    # B, Tq, Tk, Hq, Hkv, D, Dv, block_size, topk
    (2, 100, 100, 4, 2, 32, 32, 16, 3),      # ragged last block, GQA 2
    (1, 257, 257, 4, 1, 64, 64, 32, 4),      # MQA, several blocks, ragged
    (1, 200, 200, 2, 2, 32, 48, 16, 1),      # topk 1: own block only (dv != dqk)
    (1, 150, 150, 4, 1, 16, 16, 16, 9),      # many blocks, topk 9 (GQA 4)
    (2, 1, 150, 4, 2, 32, 32, 16, 3),        # decode: one query at the end of a cache
    (1, 37, 300, 4, 4, 32, 32, 64, 3),       # chunked prefill, query chunk spanning two blocks
]


@pytest.mark.parametrize("case", DENSE, ids=lambda c: "B{}_Tq{}_Tk{}_H{}-{}_D{}-{}_bs{}_k{}".format(*c))
def test_moba_dense(case, dtype, device):
    B, Tq, Tk, Hq, Hkv, D, Dv, bs, topk = case
    q = torch.randn(B, Tq, Hq, D, device=device, dtype=dtype)
    k = torch.randn(B, Tk, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, Tk, Hkv, Dv, device=device, dtype=dtype)
    _check(q, k, v, dtype, block_size=bs, topk=topk)


def test_moba_dense_decode_without_grad(dtype, device):
    """One query per sequence, no gradient (a dense batch cache, here transposed as transformers keeps it): the
    in-place decoding path; output and lse equal the reference and the general path."""
    q = torch.randn(2, 1, 4, 32, device=device, dtype=dtype)
    k = torch.randn(2, 2, 150, 32, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(2, 2, 150, 32, device=device, dtype=dtype).transpose(1, 2)
    with torch.no_grad():
        out, lse = moba_attention(q, k, v, block_size=16, topk=3, return_lse=True)
    sel = moba_block_selection_ref(q, k, block_size=16, topk=3)
    out_r, lse_r = moba_attention_ref(q.float(), k.float(), v.float(), block_size=16, topk=3, return_lse=True,
                                      selection=sel)
    assert out.shape == (2, 1, 4, 32) and lse.shape == (2, 4, 1)
    assert_close(out, out_r, dtype, "out")
    assert_lse_close(lse, lse_r, atol=1e-4 if dtype == torch.float32 else 2e-3)
    general = moba_attention(leaf(q), k, v, block_size=16, topk=3)  # with a gradient: the block-sparse engine
    assert_close(out, general.detach().float(), dtype, "decode vs general")


@pytest.mark.parametrize("lq,lk", [([70, 1, 0, 120], None), ([5, 1, 64], [90, 33, 64])], ids=["same", "q<k"])
def test_moba_varlen(lq, lk, dtype, device):
    Hq, Hkv, D = 4, 2, 32
    q = torch.randn(sum(lq), Hq, D, device=device, dtype=dtype)
    n_k = sum(lk or lq)
    k = torch.randn(n_k, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(n_k, Hkv, D, device=device, dtype=dtype)
    if lk is None:
        _check(q, k, v, dtype, block_size=16, topk=3, cu_seqlens=_cu(lq, device))
    else:
        _check(q, k, v, dtype, block_size=16, topk=3, cu_seqlens_q=_cu(lq, device), cu_seqlens_k=_cu(lk, device))


@pytest.mark.parametrize("layout", ["dense", "varlen", "decode"])
def test_moba_softcap(layout, dtype, device):
    """Soft-capped scores (Gemma 2's ``c * tanh(scale * q.k / c)``; q scaled so that the cap bites): forward, lse
    and gradients equal the reference's, dense and varlen, and so do moba_decode's rows on a left-padded cache
    and the dense one-token shortcut; the gate selects on uncapped scores, the same blocks."""
    from longattn.moba import moba_decode

    Hq, Hkv, D, cap = 4, 2, 32, 3.0
    if layout == "dense":
        q = torch.randn(2, 100, Hq, D, device=device, dtype=dtype) * 4
        k = torch.randn(2, 100, Hkv, D, device=device, dtype=dtype)
        v = torch.randn(2, 100, Hkv, 48, device=device, dtype=dtype)
        _check(q, k, v, dtype, block_size=16, topk=3, softcap=cap)
        with torch.no_grad():  # one token a row: the decoding shortcut
            out1 = moba_attention(q[:, -1:], k, v, block_size=16, topk=3, softcap=cap)
        sel = moba_block_selection_ref(q[:, -1:], k, block_size=16, topk=3)
        ref1 = moba_attention_ref(q[:, -1:].float(), k.float(), v.float(), block_size=16, topk=3, softcap=cap,
                                  selection=sel)
        assert_close(out1, ref1, dtype, "one token")
        uncapped = moba_attention_ref(q[:, -1:].float(), k.float(), v.float(), block_size=16, topk=3, selection=sel)
        assert (uncapped - ref1).abs().max() > 0.1  # (the cap matters here)
    elif layout == "varlen":
        lq, lk = [5, 1, 64], [90, 33, 64]
        q = torch.randn(sum(lq), Hq, D, device=device, dtype=dtype) * 4
        k = torch.randn(sum(lk), Hkv, D, device=device, dtype=dtype)
        v = torch.randn(sum(lk), Hkv, D, device=device, dtype=dtype)
        _check(q, k, v, dtype, block_size=16, topk=3, softcap=cap, cu_seqlens_q=_cu(lq, device),
               cu_seqlens_k=_cu(lk, device))
    else:
        lens = [150, 33, 97]
        k, v, seq, off, rows = _left_padded_cache(lens, max(lens) + 5, Hkv, D, D, dtype, device)
        q = torch.randn(len(lens), Hq, D, device=device, dtype=dtype) * 4
        out, lse = moba_decode(q, k, v, cache_seqlens=seq, cache_offsets=off, block_size=16, topk=3, softcap=cap,
                               return_lse=True)
        for b, (kb, vb) in enumerate(rows):
            qb = q[b][None, None]
            sel = moba_block_selection_ref(qb, kb[None], block_size=16, topk=3)
            o_r, l_r = moba_attention_ref(qb.float(), kb[None].float(), vb[None].float(), block_size=16, topk=3,
                                          softcap=cap, return_lse=True, selection=sel)
            assert_close(out[b], o_r[0, 0], dtype, f"out[{b}]")
            assert_lse_close(lse[b], l_r[0, :, 0], atol=1e-4 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("T,bs", [(130, 32), (64, 64)])
def test_topk_at_least_blocks_is_dense_causal(T, bs, device):
    q = torch.randn(2, T, 4, 32, device=device)
    k = torch.randn(2, T, 2, 32, device=device)
    v = torch.randn(2, T, 2, 32, device=device)
    n_blocks = -(-T // bs)
    out = moba_attention(q, k, v, block_size=bs, topk=n_blocks)
    dense = flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(moba_attention(q, k, v, block_size=bs, topk=1000), dense, atol=2e-5, rtol=1e-4)


def test_selection_ties_go_to_lower_block(device):
    """Identical key blocks give identical gate scores: the lower block index must win."""
    bs, T = 16, 96
    # small integers: means and dot products are exact, so the tie is exact in any summation order
    k = torch.randint(-3, 4, (1, 1, 1, 16), device=device).float().repeat(1, T, 1, 1)
    q = torch.randint(-3, 4, (1, T, 2, 16), device=device).float()
    sel = moba_block_selection(q, k, block_size=bs, topk=3)
    sel_ref = moba_block_selection_ref(q, k, block_size=bs, topk=3)
    assert torch.equal(sel, sel_ref)
    last = sel[0, -1, 0].tolist()  # query in block 5: own block 5 and the two lowest earlier blocks
    assert last == [0, 1, 5]


def test_bad_arguments(device):
    q = torch.randn(1, 32, 2, 16, device=device)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        moba_attention(q, q, q, block_size=48)
    with pytest.raises(ValueError, match="block_size must lie in \\[16, "):
        moba_attention(q, q, q, block_size=8)
    with pytest.raises(ValueError, match="topk must lie in \\[1, "):
        moba_attention(q, q, q, block_size=16, topk=0)
    with pytest.raises(TypeError, match="topk must be an int"):
        moba_attention(q, q, q, block_size=16, topk=2.0)
    with pytest.raises(ValueError, match="only 8 keys"):
        moba_attention(q, q[:, :8], q[:, :8], block_size=16)
    long_k = torch.randn(1, 16 * 80, 2, 16, device=device)
    with pytest.raises(ValueError, match="topk must be at most 64"):
        moba_attention(q, long_k, long_k, block_size=16, topk=70)


@pytest.mark.gpu
@pytest.mark.parametrize("T,bs,topk", [(2048, 64, 4), (1500, 128, 3), (4096, 512, 3)])
def test_moba_gpu_large(T, bs, topk, dtype):
    q = torch.randn(1, T, 8, 128, device="cuda", dtype=dtype)
    k = torch.randn(1, T, 2, 128, device="cuda", dtype=dtype)
    v = torch.randn(1, T, 2, 128, device="cuda", dtype=dtype)
    _check(q, k, v, dtype, block_size=bs, topk=topk)


@pytest.mark.gpu
def test_moba_gpu_softcap(dtype):
    """Soft-capped scores with the GPU's tiles (bfloat16: the GPU's tanh.approx): forward, lse and gradients, and
    one token a row (the split-KV decoding kernel), against the reference."""
    q = torch.randn(2, 2048, 8, 128, device="cuda", dtype=dtype) * 2
    k = torch.randn(2, 2048, 2, 128, device="cuda", dtype=dtype)
    v = torch.randn(2, 2048, 2, 128, device="cuda", dtype=dtype)
    _check(q, k, v, dtype, block_size=64, topk=4, softcap=3.0)
    with torch.no_grad():
        out = moba_attention(q[:, -1:], k, v, block_size=64, topk=4, softcap=3.0)
    sel = moba_block_selection(q[:, -1:], k, block_size=64, topk=4)  # (the kernel's: a near tie goes its way)
    ref = moba_attention_ref(q[:, -1:].float(), k.float(), v.float(), block_size=64, topk=4, softcap=3.0,
                             selection=sel)
    assert_close(out, ref, dtype, "one token")


@pytest.mark.gpu
def test_moba_gpu_chunked_dkdv(monkeypatch, dtype):
    """dK/dV with every (block, KV head) segment cut into chunks of 2 entry tiles: on a GPU only blocks that
    thousands of (query, head) pairs select are, which the other tests' sizes do not reach."""
    from longattn.kernels import sparse

    monkeypatch.setattr(sparse, "CHUNK_TILES", 2)
    test_moba_gpu_large(1500, 128, 3, dtype)


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for the test, restored after it (warn_only: torch's own ops warn
    where they have no deterministic form, which the tests' bitwise comparisons would catch anyway)."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn)


def _dq_launches(monkeypatch) -> list:
    """The SLOTS flag of every launch of the engine's dq kernel from here on."""
    from longattn.kernels import sparse

    real, seen = sparse._sparse_dq_kernel, []

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append(kw.get("SLOTS")) or real[grid](*a, **kw)
    monkeypatch.setattr(sparse, "_sparse_dq_kernel", Spy())
    return seen


def test_moba_deterministic_backward(deterministic, monkeypatch, device):
    """Under torch.use_deterministic_algorithms(True) the selected blocks' dq parts are stored in per-slot buffers
    and summed in order (no float32 atomics): the gradients equal the reference's, GQA and varlen included."""
    launches = _dq_launches(monkeypatch)
    q, k, v = torch.randn(2, 100, 4, 32, device=device), torch.randn(2, 100, 2, 32, device=device), \
        torch.randn(2, 100, 2, 32, device=device)
    _check(q, k, v, torch.float32, block_size=16, topk=3)
    lq = [70, 1, 120]
    cu = torch.tensor([0, 70, 71, 191], dtype=torch.int32, device=device)
    _check(torch.randn(sum(lq), 4, 32, device=device), torch.randn(sum(lq), 1, 32, device=device),
           torch.randn(sum(lq), 1, 32, device=device), torch.float32, block_size=16, topk=4, cu_seqlens=cu)
    assert launches == [True, True]


@pytest.mark.gpu
def test_moba_gpu_deterministic_backward_repeats_bitwise(deterministic, monkeypatch):
    """On a GPU, with many (query, head) rows per selected block: deterministic backward gives the same bits every
    time (float32 atomics would not)."""
    launches = _dq_launches(monkeypatch)
    q, k, v = (torch.randn(1, 4096, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (16, 4, 4))
    dout = torch.randn(1, 4096, 16, 128, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        out = moba_attention(q, k, v, block_size=256, topk=4)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    assert launches == [True] * 3
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0]))


@pytest.mark.gpu
def test_moba_gpu_varlen_decode(dtype):
    lk = [3000, 700, 64]
    lq = [1, 1, 1]
    q = torch.randn(sum(lq), 16, 64, device="cuda", dtype=dtype)
    k = torch.randn(sum(lk), 4, 64, device="cuda", dtype=dtype)
    v = torch.randn(sum(lk), 4, 64, device="cuda", dtype=dtype)
    _check(q, k, v, dtype, block_size=64, topk=4, cu_seqlens_q=_cu(lq, "cuda"), cu_seqlens_k=_cu(lk, "cuda"))


@pytest.mark.gpu
def test_moba_decode_gpu_paged(dtype):
    """The GPU's tiles on a paged cache (shuffled 64-token pages, block 512, contexts up to 4k): the contiguous
    cache's output and lse, with the pooled keys pooled from either cache."""
    from longattn.moba import moba_decode

    lens = [4000, 1500, 600]
    k, v, seq, off, real = _left_padded_cache(lens, 4096, 4, 128, 128, dtype, "cuda")
    kp, vp, table = _paged_cache(real, 4096, 64, torch.Generator().manual_seed(0))
    q = torch.randn(len(lens), 16, 128, device="cuda", dtype=dtype)
    want, lse_w = moba_decode(q, k, v, cache_seqlens=seq, cache_offsets=off, block_size=512, topk=3, return_lse=True)
    out, lse = moba_decode(q, kp, vp, cache_seqlens=seq, block_table=table, block_size=512, topk=3, return_lse=True)
    assert_close(out, want, dtype, "paged")  # (paged launches run on 8 warps, the contiguous ones on 4)
    assert_lse_close(lse, lse_w, atol=2e-3)


@pytest.mark.parametrize("lk,bs,topk", [([150, 33], 16, 3), ([300, 64, 17], 64, 4), ([129], 32, 10),
                                         ([200, 90, 150, 64, 33, 129, 100, 80], 32, 3)])  # a batch filling the GPU
def test_moba_decode_fast_path(lk, bs, topk, dtype, device):
    """One new token per sequence without grad takes the split-KV decode kernel; it must equal the reference."""
    Hq, Hkv, D = 4, 2, 32
    lq = [1] * len(lk)
    q = torch.randn(len(lk), Hq, D, device=device, dtype=dtype)
    k = torch.randn(sum(lk), Hkv, D, device=device, dtype=dtype)
    v = torch.randn(sum(lk), Hkv, D, device=device, dtype=dtype)
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    sel = moba_block_selection_ref(q, k, block_size=bs, topk=topk, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    with torch.no_grad():
        out, lse = moba_attention(q, k, v, block_size=bs, topk=topk, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                  return_lse=True)
    out_r, lse_r = moba_attention_ref(q.float(), k.float(), v.float(), block_size=bs, topk=topk, cu_seqlens_q=cu_q,
                                      cu_seqlens_k=cu_k, return_lse=True, selection=sel)
    assert_close(out, out_r, dtype, "out")
    assert_lse_close(lse, lse_r, atol=1e-4 if dtype == torch.float32 else 2e-3)
    # the general path (taken with gradients) agrees
    out_g = moba_attention(leaf(q), k, v, block_size=bs, topk=topk, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert_close(out, out_g.detach().float(), dtype, "decode vs general")


def _left_padded_cache(lens, L, Hkv, D, Dv, dtype, device):
    """A transformers-style cache (B, Hkv, L, D) seen as (B, L, Hkv, D), each row's tokens at its end, the
    padding filled with garbage; returns the views, offsets and each row's real keys/values."""
    k = torch.randn(len(lens), Hkv, L, D, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(len(lens), Hkv, L, Dv, device=device, dtype=dtype).transpose(1, 2)
    off = [L - n for n in lens]
    for b, o in enumerate(off):
        k[b, :o] = 1e4  # a pooled or attended padding row would dominate
        v[b, :o] = float("nan")
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    return k, v, as_i32(lens), as_i32(off), [(k[b, o:], v[b, o:]) for b, o in enumerate(off)]


@pytest.mark.parametrize("lens,Hq,Hkv,bs,topk", [([150, 33, 97], 8, 2, 16, 3),   # ragged, GQA 4
                                                 ([129, 64], 4, 4, 32, 10),      # topk > blocks: dense
                                                 ([300], 16, 1, 16, 5)])         # MQA, group of 16
def test_moba_decode_cache(lens, Hq, Hkv, bs, topk, dtype, device):
    """moba_decode on a left-padded, transposed batch cache, in place: each row's output, lse and selection
    equal the reference's last row; with the caller's pooled keys, and without host checks, the same."""
    from longattn.moba import moba_decode
    from longattn.moba.reference import _pooled_keys

    D, Dv, L = 32, 48, max(lens) + 5
    k, v, seq, off, rows = _left_padded_cache(lens, L, Hkv, D, Dv, dtype, device)
    q = torch.randn(len(lens), Hq, D, device=device, dtype=dtype)
    with torch.no_grad():
        out, lse = moba_decode(q, k, v, cache_seqlens=seq, cache_offsets=off, block_size=bs, topk=topk,
                               return_lse=True)
    assert out.shape == (len(lens), Hq, Dv) and out.dtype == dtype and lse.shape == (len(lens), Hq)
    n_mean = (max(lens) - 1) // bs + 2  # more pooled blocks than needed: the extra ones are not read
    k_mean = torch.full((len(lens), n_mean, Hkv, D), float("nan"), device=device, dtype=dtype)
    for b, (kb, vb) in enumerate(rows):
        qb = q[b][None, None]
        sel = moba_block_selection_ref(qb, kb[None], block_size=bs, topk=topk)
        o_r, l_r = moba_attention_ref(qb.float(), kb[None].float(), vb[None].float(), block_size=bs, topk=topk,
                                      return_lse=True, selection=sel)
        assert_close(out[b], o_r[0, 0], dtype, f"out[{b}]")
        assert_lse_close(lse[b], l_r[0, :, 0], atol=1e-4 if dtype == torch.float32 else 2e-3)
        pooled = _pooled_keys(kb, bs)[:(lens[b] - 1) // bs]
        k_mean[b, :pooled.shape[0]] = pooled
    kept = moba_decode(q, k, v, cache_seqlens=seq, cache_offsets=off, k_mean=k_mean, block_size=bs, topk=topk)
    torch.testing.assert_close(kept, out, atol=0, rtol=0)
    unchecked = moba_decode(q, k, v, cache_seqlens=seq, cache_offsets=off, block_size=bs, topk=topk,
                            validate=False)
    torch.testing.assert_close(unchecked, out, atol=0, rtol=0)


def test_moba_decode_cache_rows(device):
    """The last 3 tokens of each row as query rows reading their row of a left-padded cache (cache_rows), each with
    its own length, in one call (pooled from the cache, or the caller's kept means): each equals the reference
    at its position, across a block boundary."""
    from longattn.moba import moba_decode

    lens, Hq, Hkv, bs, topk, chunk = [150, 33, 97], 8, 2, 16, 3, 3
    k, v, _, _, real = _left_padded_cache(lens, max(lens) + 5, Hkv, 32, 48, torch.float32, device)
    L = k.shape[1]
    rows = [b for b in range(len(lens)) for _ in range(chunk)]
    seqs = [lens[b] - chunk + 1 + i for b in range(len(lens)) for i in range(chunk)]
    q = torch.randn(len(rows), Hq, 32, device=device)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    kw = dict(cache_seqlens=i32(seqs), cache_offsets=i32([L - lens[b] for b in rows]), cache_rows=i32(rows),
              block_size=bs, topk=topk)
    out = moba_decode(q, k, v, **kw)
    for r, (b, n) in enumerate(zip(rows, seqs)):
        kb, vb = real[b][0][None, :n], real[b][1][None, :n]
        sel = moba_block_selection_ref(q[r][None, None], kb, block_size=bs, topk=topk)
        o_r = moba_attention_ref(q[r][None, None], kb, vb, block_size=bs, topk=topk, selection=sel)
        assert_close(out[r], o_r[0, 0], torch.float32, f"row {r}")
    from longattn.moba.reference import _pooled_keys

    k_mean = torch.full((len(lens), (max(lens) - 1) // bs, Hkv, 32), float("nan"), device=device)
    for b, (kb, _) in enumerate(real):
        pooled = _pooled_keys(kb, bs)[:(lens[b] - 1) // bs]
        k_mean[b, :pooled.shape[0]] = pooled
    torch.testing.assert_close(moba_decode(q, k, v, k_mean=k_mean, **kw), out, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cache_rows must lie in \\[0, 3\\)"):
        moba_decode(q, k, v, **dict(kw, cache_rows=i32([3] + rows[1:])))


def _paged_cache(real, L, page, gen):
    """Each row's keys/values (``real``) in pages of ``page`` tokens in random order, with spare pages; NaN where no
    token is, -1 in the block table past each length. Returns (k_pages, v_pages, block_table)."""
    per, kb0, vb0 = -(-L // page), real[0][0], real[0][1]
    n_pages = len(real) * per + 2
    kp = torch.full((n_pages, page, *kb0.shape[1:]), float("nan"), dtype=kb0.dtype, device=kb0.device)
    vp = torch.full((n_pages, page, *vb0.shape[1:]), float("nan"), dtype=vb0.dtype, device=vb0.device)
    order = torch.randperm(n_pages, generator=gen).tolist()
    table = torch.full((len(real), per), -1, dtype=torch.int32)
    for b, (kb, vb) in enumerate(real):
        for j in range(-(-kb.shape[0] // page)):
            p, t = order.pop(), j * page
            table[b, j] = p
            kp[p, :kb.shape[0] - t], vp[p, :kb.shape[0] - t] = kb[t:t + page], vb[t:t + page]
    return kp, vp, table.to(kb0.device)


@pytest.mark.parametrize("page,bs", [(8, 16), (16, 16), (16, 64)])
def test_moba_decode_paged(page, bs, dtype, device):
    """A paged KV cache (block_table; pages in random order, NaN where no token is) gives the contiguous cache's
    output and lse on the same tokens (bit for bit through the interpreter; on a GPU paged launches run on 8 warps,
    the contiguous ones on 4), pooled from the cache (the same means, bit for bit) or with the caller's pooled keys,
    with cache_rows, checked or not."""
    from longattn.moba import moba_decode

    lens, Hq, Hkv, topk = [150, 33, 97], 8, 2, 3
    k, v, seq, off, real = _left_padded_cache(lens, max(lens) + 5, Hkv, 32, 48, dtype, device)
    kp, vp, table = _paged_cache(real, max(lens), page, torch.Generator().manual_seed(page))
    q = torch.randn(len(lens), Hq, 32, device=device, dtype=dtype)
    want, lse_w = moba_decode(q, k, v, cache_seqlens=seq, cache_offsets=off, block_size=bs, topk=topk,
                              return_lse=True)

    def same(a, b, what, lse=False):
        if device == "cpu":
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=what)
        elif lse:
            assert_lse_close(a, b, atol=2e-3)
        else:
            assert_close(a, b, dtype, what)

    for validate in (True, False):
        out, lse = moba_decode(q, kp, vp, cache_seqlens=seq, block_table=table, block_size=bs, topk=topk,
                               return_lse=True, validate=validate)
        same(out, want, f"validate={validate}")
        same(lse, lse_w, f"lse, validate={validate}", lse=True)
    # the pooled keys as moba_decode pools them, from either cache, kept by the caller
    from longattn.moba.ops import pool_cache_blocks

    n_mean = (max(lens) - 1) // bs
    means = [torch.full((len(lens), n_mean, Hkv, 32), float("nan"), device=device, dtype=dtype) for _ in range(2)]
    pool_cache_blocks(k, seq, off, bs, means[0])
    pool_cache_blocks(kp, seq, torch.zeros_like(off), bs, means[1], block_table=table)
    torch.testing.assert_close(means[1], means[0], atol=0, rtol=0, equal_nan=True)
    # two tokens of row 0 and one of row 2 (cache_rows: the block table's rows too), pooled or kept
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    rows = i32([0, 0, 2])
    kw = dict(cache_seqlens=i32([lens[0] - 1, lens[0], lens[2]]), cache_rows=rows, block_size=bs, topk=topk)
    for k_mean in (None, means[0]):
        same(moba_decode(q, kp, vp, block_table=table, k_mean=k_mean, **kw),
             moba_decode(q, k, v, cache_offsets=off[rows.long()], k_mean=k_mean, **kw), "cache_rows")


@pytest.mark.parametrize("cache_dtype,dtype", [(torch.float8_e4m3fn, torch.bfloat16),
                                               (torch.float8_e5m2, torch.float16)], ids=["e4m3", "e5m2"])
def test_moba_decode_float8_cache(cache_dtype, dtype, device):
    """A quantised cache (float8 keys and values) gives what the same values widened to q's dtype give (bit for bit
    through the interpreter: the widening is exact), pooled from the cache (the pooled keys in q's dtype) or the
    caller's, left-padded or paged, with cache_rows, at scale 1 or with its dequantisation scales; mixed or float8
    pooled keys are refused."""
    from longattn.moba import moba_decode
    from longattn.moba.ops import pool_cache_blocks

    lens, Hq, Hkv, bs, topk = [150, 33, 97], 8, 2, 16, 3
    k, v, seq, off, real = _left_padded_cache(lens, max(lens) + 5, Hkv, 32, 48, torch.float32, device)
    top = torch.finfo(cache_dtype).max
    k8, v8 = (x.clamp(-top, top).to(cache_dtype) for x in (k, v))
    wide = lambda x: x.to(dtype)
    kp, vp, table = _paged_cache([(k8[b, o:], v8[b, o:]) for b, o in enumerate(off.tolist())], max(lens), 16,
                                 torch.Generator().manual_seed(0))
    q = torch.randn(len(lens), Hq, 32, device=device, dtype=dtype)
    kw = dict(block_size=bs, topk=topk)
    want = moba_decode(q, wide(k8), wide(v8), cache_seqlens=seq, cache_offsets=off, **kw)
    for cache in (dict(k_cache=k8, v_cache=v8, cache_offsets=off), dict(k_cache=kp, v_cache=vp, block_table=table)):
        assert_same_as_widened(moba_decode(q, cache_seqlens=seq, **cache, **kw), want, dtype, str(list(cache)))
    means = torch.full((len(lens), (max(lens) - 1) // bs, Hkv, 32), float("nan"), device=device, dtype=dtype)
    pool_cache_blocks(k8, seq, off, bs, means)
    wide_means = torch.full_like(means, float("nan"))
    pool_cache_blocks(wide(k8), seq, off, bs, wide_means)
    written = ~wide_means.isnan()  # (each row's blocks before its last token's own)
    assert torch.equal(~means.isnan(), written)
    assert_same_as_widened(means[written], wide_means[written], dtype, "pooled keys")
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    rows = i32([0, 0, 2])
    rows_kw = dict(kw, cache_seqlens=i32([lens[0] - 1, lens[0], lens[2]]), cache_rows=rows,
                   cache_offsets=off[rows.long()])
    assert_same_as_widened(moba_decode(q, k8, v8, k_mean=means, **rows_kw),
                           moba_decode(q, wide(k8), wide(v8), k_mean=means, **rows_kw), dtype, "cache_rows, kept means")
    # with dequantisation scales (the cache's tokens k8 * k_scale, v8 * v_scale), soft-capped scores too: what the
    # tokens dequantised give (powers of two: exact), the blocks pooled in the call or kept (times k_scale)
    scaled_means = torch.full_like(means, float("nan"))
    pool_cache_blocks(k8, seq, off, bs, scaled_means, scale=2.0 ** -5)
    assert_same_as_widened(scaled_means[written], wide_means[written] * 2.0 ** -5, dtype, "scaled pooled keys")
    for softcap in (None, 20.0):
        scaled = dict(k_scale=2.0 ** -5, v_scale=8.0, softcap=softcap)
        want = moba_decode(q, wide(k8) * 2.0 ** -5, wide(v8) * 8.0, softcap=softcap, **rows_kw)
        for k_mean in (None, scaled_means):
            got = moba_decode(q, k8, v8, k_mean=k_mean, **scaled, **rows_kw)
            assert_same_as_widened(got, want, dtype, f"scaled, softcap {softcap}, kept means {k_mean is not None}")
    with pytest.raises(TypeError, match="k_cache and v_cache must share one dtype"):
        moba_decode(q, k8, wide(v8), cache_seqlens=seq, cache_offsets=off, **kw)
    with pytest.raises(TypeError, match="k_mean must have dtype in"):
        moba_decode(q, k8, v8, cache_seqlens=seq, cache_offsets=off, k_mean=means.to(cache_dtype), **kw)


def test_moba_decode_paged_errors(device):
    """Pages that do not divide the block, that do not follow one another, out of the cache, and offsets on a
    paged cache are refused."""
    from longattn.moba import moba_decode

    lens = [40, 20]
    k, v, seq, off, real = _left_padded_cache(lens, 48, 2, 16, 16, torch.float32, device)
    kp, vp, table = _paged_cache(real, 48, 16, torch.Generator().manual_seed(0))
    q = torch.randn(2, 4, 16, device=device)
    run = lambda **kw: moba_decode(q, **{"k_cache": kp, "v_cache": vp, "cache_seqlens": seq, "block_table": table,
                                         "block_size": 16, **kw})
    kp32, vp32, table32 = _paged_cache(real, 48, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="page size \\(k_cache.shape\\[1\\] = 32\\) must divide block_size \\(16\\)"):
        run(k_cache=kp32, v_cache=vp32, block_table=table32)
    with pytest.raises(ValueError, match="cache_offsets applies to contiguous caches"):
        run(cache_offsets=off)
    with pytest.raises(TypeError, match="block_table must be an int32 tensor of shape \\(2, max_pages\\)"):
        run(block_table=table.long())
    with pytest.raises(ValueError, match="k_cache's pages must follow one another"):
        run(k_cache=torch.cat([kp, kp], 1)[:, :16])
    bad = table.clone()
    bad[1, 1] = kp.shape[0]  # the second page of a 20-token row: used
    with pytest.raises(ValueError, match="block_table\\[1\\] points outside the cache"):
        run(block_table=bad)


def test_moba_decode_bad_arguments(device):
    from longattn.moba import moba_decode

    k, v, seq, off, _ = _left_padded_cache([40, 20], 48, 2, 16, 16, torch.float32, device)
    q = torch.randn(2, 4, 16, device=device)
    with pytest.raises(TypeError, match="cache_seqlens must be an int32 tensor of shape"):
        moba_decode(q, k, v, cache_seqlens=seq.long(), block_size=16)
    with pytest.raises(ValueError, match="sequence 0: cache_offsets \\+ cache_seqlens must lie in the cache"):
        moba_decode(q, k, v, cache_seqlens=seq, cache_offsets=off + 20, block_size=16)
    with pytest.raises(ValueError, match="k_mean must be"):
        moba_decode(q, k, v, cache_seqlens=seq, k_mean=torch.zeros(2, 1, 2, 16, device=device), block_size=16)
    with pytest.raises(ValueError, match="v_cache must be"):
        moba_decode(q, k, v[:, :30], cache_seqlens=seq, block_size=16)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        moba_decode(q[:, :3], k, v, cache_seqlens=seq, block_size=16)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        moba_decode(q, k, v, cache_seqlens=seq, block_size=24)
    with pytest.raises(TypeError, match="k_cache must have dtype"):
        moba_decode(q, k.long(), v, cache_seqlens=seq, block_size=16)
    with pytest.raises(ValueError, match="positive multiple of the KV heads"):
        moba_decode(q[:, :0], k[:, :, :0], v[:, :, :0], cache_seqlens=seq, block_size=16)
    with pytest.raises(ValueError, match="head dims must lie in \\[1, 1024\\], got q/k 16 and v 0"):
        moba_decode(q, k, v[..., :0], cache_seqlens=seq, block_size=16)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got NoneType"):
        moba_decode(None, k, v, cache_seqlens=seq, block_size=16)
    rows = torch.zeros(2, dtype=torch.int32, device=device)  # two query rows of cache row 0, with other offsets
    with pytest.raises(ValueError, match="the query rows of cache row 0 must share its cache_offsets, got 8 and 28"):
        moba_decode(q, k, v, cache_seqlens=seq, cache_offsets=off, cache_rows=rows, block_size=16)


def test_moba_decode_empty_batch(device):
    from longattn.moba import moba_decode

    out, lse = moba_decode(torch.randn(0, 4, 16, device=device), torch.randn(0, 40, 2, 16, device=device),
                           torch.randn(0, 40, 2, 8, device=device), block_size=16, return_lse=True,
                           cache_seqlens=torch.zeros(0, dtype=torch.int32, device=device))
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)


@pytest.mark.gpu
def test_moba_decode_in_cuda_graph():
    """With validate=False (and the caller's pooled keys) a decoding step has no host synchronisation: captured
    once, replayed as the sequences grow."""
    from longattn.moba import moba_decode
    from longattn.moba.ops import pool_cache_blocks

    lens, L, bs = [700, 3000, 64], 4096, 256
    k, v, seq, off, _ = _left_padded_cache(lens, L, 2, 128, 128, torch.bfloat16, "cuda")
    k.normal_(), v.normal_()  # the sequences grow into the padding: fill it with real keys
    q = torch.randn(len(lens), 8, 128, device="cuda", dtype=torch.bfloat16)
    off.zero_()
    k_mean = torch.empty(len(lens), L // bs, 2, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        pool_cache_blocks(k, seq, off, bs, k_mean)
        return moba_decode(q, k, v, cache_seqlens=seq, cache_offsets=off, k_mean=k_mean, block_size=bs, topk=3,
                           validate=False)

    graph, out = capture_graph(step)
    for i in range(3):
        seq += 64 * (i + 1)  # the longest sequence stays within the cache
        q.normal_()
        graph.replay()
        ref = moba_decode(q, k, v, cache_seqlens=seq, cache_offsets=off, block_size=bs, topk=3)
        assert_close(out, ref, torch.bfloat16, f"replay {i}")


def test_no_second_derivative(device):
    """Gradients through moba_attention differentiate no further: a gradient penalty raises."""
    q, k, v = (leaf(torch.randn(1, 70, h, 16, device=device)) for h in (4, 2, 2))
    assert_first_order_only(lambda *x: moba_attention(*x, block_size=16, topk=2), (q, k, v),
                            "block-sparse attention (moba_attention, block_sparse_attention)")


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_torch_compile_fullgraph(layout, device):
    """Under torch.compile moba_attention is a custom op (its backward another, taking the selection the forward
    returns to it): traced without a graph break, its output, lse and gradients equal eager mode's; so does the
    output without gradients (the op keeps no selection then), one query per sequence (the decoding shortcut)
    included; a soft cap passes through."""
    opts = dict(block_size=16, topk=3, return_lse=True)
    if layout == "varlen":
        lens = [30, 70, 45]
        inputs = [leaf(torch.randn(sum(lens), h, 32, device=device)) for h in (4, 2, 2)]
        opts.update(cu_seqlens=_cu(lens, device), softcap=2.0)  # (the op takes the cap)
    else:
        inputs = [leaf(torch.randn(2, 70, h, 32, device=device)) for h in (4, 2, 2)]
    assert_compiled_matches_eager(lambda q, k, v: moba_attention(q, k, v, **opts), inputs)
    f = (lambda q, k, v: moba_attention(q[:, -1:], k, v, **opts)) if layout == "dense" else \
        (lambda q, k, v: moba_attention(q, k, v, **opts))
    with torch.no_grad():
        torch._dynamo.reset()
        got, want = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs), f(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_custom_op_registration(device):
    """moba_attention's custom ops pass torch.library.opcheck (schema, shapes, autograd formula), dense and varlen."""
    q, k, v = (leaf(torch.randn(2, 40, h, 16, device=device)) for h in (4, 2, 2))
    cu = _cu([10, 30], device)
    for args in ((q, k, v, None, None, None, None, 16, 2, None, 0.0, True),
                 (q[0], k[0], v[0], cu, cu, None, None, 16, 3, 0.2, 1.5, True)):
        torch.library.opcheck(torch.ops.longattn.moba_attention.default, args)
