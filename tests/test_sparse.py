"""The block-sparse engine with caller-given block lists (the engine under MoBA and NSA's selected branch)."""
import pytest
import torch

from longattn.kernels.reference import block_sparse_attention_ref
from longattn.kernels.sparse import block_sparse_attention
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


@pytest.mark.parametrize("lq,lk,bs,K", [([70, 1, 45], [70, 33, 100], 16, 3), ([130], [130], 32, 2)],
                         ids=["varlen-q<k", "single"])
def test_block_sparse_matches_reference(lq, lk, bs, K, dtype, device):
    Hq, Hkv, D = 4, 2, 32
    q = torch.randn(sum(lq), Hq, D, device=device, dtype=dtype)
    k = torch.randn(sum(lk), Hkv, D, device=device, dtype=dtype)
    v = torch.randn(sum(lk), Hkv, D, device=device, dtype=dtype)
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32, device=device)
    own = torch.cat([(torch.arange(a) + b - a) // bs for a, b in zip(lq, lk)])
    blocks = _random_blocks(own, Hq, K).to(device)
    kw = dict(block_size=bs, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk))
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
