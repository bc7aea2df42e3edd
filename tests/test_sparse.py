"""The block-sparse engine with caller-given block lists (the engine under MoBA and NSA's selected branch)."""
import pytest
import torch

from longattn.kernels.reference import block_sparse_attention_ref
from longattn.kernels.sparse import SPARSE_TILES, block_sparse_attention
from helpers import assert_close, assert_lse_close, leaf


def _random_blocks(own, heads, K, generator=None):
    """Up to K distinct earlier blocks per (query, head), -1 padded, in random order."""
    T = own.shape[0]
    out = torch.full((T, heads, K), -1, dtype=torch.int32)
    for t in range(T):
        for h in range(heads):
            n = int(own[t])
            pick = torch.randperm(n)[:min(K, n)] if n else torch.empty(0, dtype=torch.long)
            keep = int(torch.randint(0, pick.numel() + 1, (1,))) if pick.numel() else 0
            out[t, h, :keep] = pick[:keep].int()
    return out


@pytest.mark.parametrize("lq,lk,bs,K,softcap", [([70, 1, 45], [70, 33, 100], 16, 3, None), ([130], [130], 32, 2, None),
                                                ([70, 1, 45], [70, 33, 100], 16, 3, 2.0)],
                         ids=["varlen-q<k", "single", "varlen-softcap"])
def test_block_sparse_matches_reference(lq, lk, bs, K, softcap, dtype, device):
    """Forward, lse and gradients equal the reference's; soft-capped scores too (q scaled so that the cap bites:
    scores of several times the cap)."""
    Hq, Hkv, D = 4, 2, 32
    q = torch.randn(sum(lq), Hq, D, device=device, dtype=dtype) * (4 if softcap else 1)
    k = torch.randn(sum(lk), Hkv, D, device=device, dtype=dtype)
    v = torch.randn(sum(lk), Hkv, D, device=device, dtype=dtype)
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32, device=device)
    own = torch.cat([(torch.arange(a) + b - a) // bs for a, b in zip(lq, lk)])
    blocks = _random_blocks(own, Hq, K).to(device)
    kw = dict(block_size=bs, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), softcap=softcap)
    qk, kk, vk = leaf(q), leaf(k), leaf(v)
    qr, kr, vr = leaf(q, torch.float32), leaf(k, torch.float32), leaf(v, torch.float32)
    out, lse = block_sparse_attention(qk, kk, vk, blocks, return_lse=True, **kw)
    out_r, lse_r = block_sparse_attention_ref(qr, kr, vr, blocks, return_lse=True, **kw)
    assert_close(out, out_r, dtype, "out")
    assert_lse_close(lse, lse_r, atol=1e-4 if dtype == torch.float32 else 2e-3)
    dout = torch.randn_like(out_r)
    (out.float() * dout).sum().backward()
    (out_r * dout).sum().backward()
    for name, a, b in (("dq", qk.grad, qr.grad), ("dk", kk.grad, kr.grad), ("dv", vk.grad, vr.grad)):
        assert_close(a, b, dtype, name)
    if softcap:  # (the cap changes the result: the test would see a kernel that ignored it)
        uncapped = block_sparse_attention_ref(qr, kr, vr, blocks, **dict(kw, softcap=None))
        assert (uncapped - out_r).abs().max() > 0.1
        with torch.no_grad():  # one query per sequence: the split-KV decoding kernel
            one = [torch.cat([qk[int(c) - 1:int(c)] for c in cu(lq)[1:]])]
            out1 = block_sparse_attention(one[0], kk, vk, torch.cat([blocks[int(c) - 1:int(c)] for c in cu(lq)[1:]]),
                                          **dict(kw, cu_seqlens_q=cu([1] * len(lq))))
        assert_close(out1, torch.cat([out_r[int(c) - 1:int(c)] for c in cu(lq)[1:]]), dtype, "decode")


def test_block_sparse_rejects_bad_blocks(device):
    q = torch.randn(1, 64, 2, 16, device=device)
    blocks = torch.full((1, 64, 2, 2), -1, dtype=torch.int32, device=device)
    blocks[0, 40, 0, 0] = 2  # query 40 lives in block 2 (bs 16): its own block may not be listed
    with pytest.raises(ValueError, match="strictly before each query's own block"):
        block_sparse_attention(q, q, q, blocks, block_size=16)
    blocks[0, 40, 0, 0] = 1
    blocks[0, 40, 0, 1] = 1  # listed twice
    with pytest.raises(ValueError, match="distinct blocks"):
        block_sparse_attention(q, q, q, blocks, block_size=16)
    with pytest.raises(TypeError, match="block_indices must have an integer dtype"):
        block_sparse_attention(q, q, q, blocks.float(), block_size=16)
    with pytest.raises(ValueError, match="block_indices must be \\(B, Tq, "):
        block_sparse_attention(q, q, q, blocks[:, :30], block_size=16)
    for bs in (24, 2 ** 17):  # (the kernels walk a block's tiles: no block longer than 65536 keys)
        with pytest.raises(ValueError, match="block_size must be a power of two from 16 to 65536"):
            block_sparse_attention(q, q, q, torch.full_like(blocks, -1), block_size=bs)


def test_sparse_candidates(monkeypatch):
    """The engine's autotuner candidates: every GPU tile in order, keys per step clamped to the block (duplicates
    dropped), tiles whose shared memory cannot fit dropped (the smallest kept if none fits), float32 and the
    interpreter one tile each, and only the first without autotuning."""
    from longattn.kernels import sparse as K

    monkeypatch.setattr(K, "small_tiles", lambda: False)
    monkeypatch.setattr(K, "autotune_enabled", lambda: True)
    tiles = lambda cs: [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in cs]
    assert all(c.kwargs["BLOCK_M"] == K.ENTRY_TILE for c in K.sparse_candidates("dq", "tf32", 512, (128, 128)))
    for kernel in ("fwd", "dq", "dkdv"):
        assert tiles(K.sparse_candidates(kernel, "tf32", 4096, (128, 128))) == list(K.SPARSE_TILES[kernel])
        assert tiles(K.sparse_candidates(kernel, "ieee", 4096, (128, 128))) == [K.SPARSE_FP32_TILE]
    assert tiles(K.sparse_candidates("dq", "tf32", 32, (128, 128))) == [(32, 4, 3), (32, 4, 2), (32, 8, 3), (32, 8, 2)]
    assert tiles(K.sparse_candidates("dq", "ieee", 16, (128, 128))) == [(16, 8, 1)]
    # head dims 256: dq's 64 keys with three stages (q, dO and three (k, v) buffers: 256 KB) cannot fit
    assert (64, 4, 3) not in tiles(K.sparse_candidates("dq", "tf32", 512, (256, 256)))
    assert (64, 4, 2) in tiles(K.sparse_candidates("dq", "tf32", 512, (256, 256)))
    assert tiles(K.sparse_candidates("dkdv", "tf32", 512, (1024, 1024))) == [(32, 8, 2)]  # none fits: the least
    monkeypatch.setattr(K, "autotune_enabled", lambda: False)
    assert tiles(K.sparse_candidates("dkdv", "tf32", 4096, (128, 128))) == [K.SPARSE_TILES["dkdv"][0]]
    monkeypatch.setattr(K, "small_tiles", lambda: True)
    assert tiles(K.sparse_candidates("dq", "tf32", 4096, (128, 128))) == [K.SPARSE_INTERPRETER_TILE]


@pytest.mark.parametrize("keys", sorted({tile[0] for tiles in SPARSE_TILES.values() for tile in tiles}))
def test_every_sparse_tile(keys, device, monkeypatch):
    """Each number of keys per step the engine's autotuners may pick gives the reference's output and gradients
    (the other tests run the interpreter's tile): blocks of 128 keys (several steps each), varlen, GQA."""
    from longattn.kernels import sparse as K

    if device == "cuda":
        pytest.skip("the GPU runs the tiles its autotuners pick")
    if not K.small_tiles():
        pytest.skip("the interpreter on the GPU's tiles runs their first candidate in every test")
    monkeypatch.setattr(K, "SPARSE_INTERPRETER_TILE", (keys, 4, 1))
    kernels = (K._sparse_fwd_kernel, K._sparse_dq_kernel, K._sparse_dkdv_kernel)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "cache", {})
    lq, lk, bs, dtype = [300, 90], [400, 90], 128, torch.float16
    q = leaf(torch.randn(sum(lq), 4, 64, dtype=dtype))
    k = leaf(torch.randn(sum(lk), 2, 64, dtype=dtype))
    v = leaf(torch.randn(sum(lk), 2, 32, dtype=dtype))
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32)
    own = torch.cat([(torch.arange(a) + b - a) // bs for a, b in zip(lq, lk)])
    blocks = _random_blocks(own, 4, 2)
    kw = dict(block_size=bs, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk))
    qr, kr, vr = (leaf(t.detach(), torch.float32) for t in (q, k, v))
    out = block_sparse_attention(q, k, v, blocks, **kw)
    out_r = block_sparse_attention_ref(qr, kr, vr, blocks, **kw)
    assert_close(out, out_r, dtype, "out")
    dout = torch.randn_like(out_r)
    (out.float() * dout).sum().backward()
    (out_r * dout).sum().backward()
    for name, a, b in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
        assert_close(a, b, dtype, f"{name} with {keys} keys per step")
    assert all(kernel.best_config.kwargs["BLOCK_N"] == keys for kernel in kernels)
