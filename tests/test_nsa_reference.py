"""NSA reference: configuration checks, Eq. 9/10 scoring, the selection rules, degenerate cases."""
import pytest
import torch

from longattn.kernels.reference import attention_ref
from longattn.nsa.reference import (NSAConfig, compress_mean_ref, compressed_attention_ref, nsa_attention_ref,
                                    select_blocks_ref, selection_scores_ref)

SMALL = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=4, window=16)


def test_config_validation():
    with pytest.raises(ValueError, match="cmp_block \\(30\\) must be a multiple of cmp_stride"):
        NSAConfig(cmp_block=30)
    with pytest.raises(ValueError, match="slc_block must be a power of two"):
        NSAConfig(slc_block=48)
    with pytest.raises(ValueError, match="slc_topk \\(2\\) must be at least init_blocks \\+ local_blocks"):
        NSAConfig(slc_topk=2)
    with pytest.raises(ValueError, match="window must be an int in \\[1, "):
        NSAConfig(window=0)
    with pytest.raises(ValueError, match="slc_block must be an int in \\[1, 4096\\]"):
        NSAConfig(slc_block=2 ** 20)
    with pytest.raises(ValueError, match="local_blocks must be at least 1"):
        NSAConfig(local_blocks=0)
    with pytest.raises(TypeError, match="NSAConfig.window must be an int, got float"):
        NSAConfig(window=512.0)
    with pytest.raises(TypeError, match="NSAConfig.init_blocks must be an int, got bool"):
        NSAConfig(init_blocks=True)
    assert NSAConfig().score_weights().tolist() == [1, 2, 2, 2, 1]
    assert NSAConfig().num_cmp_blocks(31) == 0 and NSAConfig().num_cmp_blocks(32) == 1
    assert NSAConfig().num_cmp_blocks(100) == 5


def test_scores_follow_eq9_and_sum_over_group():
    cfg = NSAConfig()
    hq, hkv, tq, k_len = 4, 2, 3, 300
    n_cmp = cfg.num_cmp_blocks(k_len)
    p = torch.rand(hq, tq, n_cmp)
    got = selection_scores_ref(p, cfg, hkv, k_len)
    ratio, inner = cfg.slc_block // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride
    for j in range(-(-k_len // cfg.slc_block)):
        want = torch.zeros(hq, tq)
        for m in range(ratio):
            for n in range(inner):
                c = ratio * j - m - n
                if 0 <= c < n_cmp:
                    want += p[:, :, c]
        want = want.view(hkv, 2, tq).sum(1).T
        torch.testing.assert_close(got[:, :, j], want)


def test_selection_rules():
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=4, window=16, init_blocks=1, local_blocks=2)
    k_len, tq = 160, 160
    scores = torch.rand(tq, 1, 10)
    sel = select_blocks_ref(scores, cfg, k_len)
    for t in range(tq):
        c = t // 16
        chosen = [b for b in sel[t, 0].tolist() if b >= 0]
        assert max(chosen) == c and all(b <= c for b in chosen)
        if c + 1 <= 4:
            assert chosen == list(range(c + 1))
        else:
            assert {0, c, c - 1} <= set(chosen) and len(chosen) == 4
            rest = [b for b in range(1, c - 1)]
            best = max(rest, key=lambda b: (scores[t, 0, b].item(), -b))
            assert best in chosen
    # ties go to the lower block index
    flat = torch.ones(tq, 1, 10)
    sel = select_blocks_ref(flat, cfg, k_len)
    assert sel[-1, 0].tolist() == [0, 1, 8, 9]


def test_compressed_branch_empty_rows_are_zero():
    q = torch.randn(20, 2, 8)
    k = torch.randn(20, 1, 8)
    kc, vc = compress_mean_ref(k, SMALL), compress_mean_ref(k, SMALL)
    o, p, lse = compressed_attention_ref(q, kc, vc, SMALL, 0.3)
    assert torch.all(o[:7] == 0) and torch.isfinite(o).all() and torch.isneginf(lse[:, :7]).all()
    assert torch.allclose(p[:, 7:].sum(-1), torch.ones(2, 13))


def test_degenerate_branches_equal_dense():
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=8, window=128)
    q, k, v = torch.randn(1, 100, 4, 16), torch.randn(1, 100, 2, 16), torch.randn(1, 100, 2, 16)
    ones, zeros = torch.ones(1, 100, 4), torch.zeros(1, 100, 4)
    dense = attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(nsa_attention_ref(q, k, v, zeros, ones, zeros, config=cfg), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nsa_attention_ref(q, k, v, zeros, zeros, ones, config=cfg), dense, atol=1e-5, rtol=1e-5)


def test_varlen_equals_per_sequence_and_gradients_flow():
    lens = [50, 9, 70]
    q, k, v = torch.randn(sum(lens), 4, 16), torch.randn(sum(lens), 2, 16), torch.randn(sum(lens), 2, 16)
    gates = [torch.rand(sum(lens), 4, requires_grad=True) for _ in range(3)]
    kc = torch.cat([compress_mean_ref(k[a:a + n], SMALL) for a, n in zip([0, 50, 59], lens)]).requires_grad_()
    vc = torch.cat([compress_mean_ref(v[a:a + n], SMALL) for a, n in zip([0, 50, 59], lens)]).requires_grad_()
    cu = torch.tensor([0, 50, 59, 129], dtype=torch.int32)
    out = nsa_attention_ref(q, k, v, *gates, config=SMALL, k_cmp=kc, v_cmp=vc, cu_seqlens=cu)
    start = 0
    for n in lens:
        s = slice(start, start + n)
        one = nsa_attention_ref(q[None, s], k[None, s], v[None, s], *(g[None, s] for g in gates), config=SMALL)
        torch.testing.assert_close(out[s], one[0], atol=1e-5, rtol=1e-5)
        start += n
    out.sum().backward()
    for t in gates + [kc, vc]:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
