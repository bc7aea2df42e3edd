"""MoBA's own Triton kernels: mean-pooled keys and the fused gate + top-k block selection.

The attention over the selected blocks runs on the shared block-sparse engine
(:mod:`longattn.kernels.sparse`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.flash import _decode_query
from ..kernels.topk import fold_topk, topk_indices, topk_init, topk_keys


@triton.jit
def _mean_rows(K, stride_kt, n, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BT=None,
               last_page=0, PAGE: tl.constexpr = 0):
    """Float32 mean of n rows of D values at K, K + stride_kt, ...; PAGE > 0 (a paged cache, its pages one after
    another): row t at slot t % PAGE of page BT[t // PAGE] (clamped to [0, last_page]), the same sums in the same
    order."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for t0 in range(0, n, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        rows = offs_t.to(tl.int64)
        if PAGE > 0:
            page = tl.minimum(tl.maximum(tl.load(BT + offs_t // PAGE, mask=offs_t < n, other=0), 0), last_page)
            rows = page.to(tl.int64) * PAGE + offs_t % PAGE
        x = tl.load(K + rows[:, None] * stride_kt + offs_d[None, :],
                    mask=(offs_t[:, None] < n) & (offs_d[None, :] < D), other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    return acc / n


@triton.jit
def _block_mean_kernel(K, KMEAN, BLOCK_ROW, BLOCK_LEN, stride_kt, stride_kh, stride_mb, stride_mh,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Mean of the keys of one block and KV head (float32 sum, stored in KMEAN's dtype)."""
    blk = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row0 = tl.load(BLOCK_ROW + blk).to(tl.int64)
    mean = _mean_rows(K + row0 * stride_kt + h * stride_kh, stride_kt, tl.load(BLOCK_LEN + blk), D, BLOCK_D, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(KMEAN + blk * stride_mb + h * stride_mh + offs_d, mean.to(KMEAN.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _cache_block_mean_kernel(K, KMEAN, START, SEQ, BT, stride_kb, stride_kt, stride_kh, stride_mb, stride_mn,
                             stride_mh, stride_btb, block_size, tail, last_page, scale, D: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, PAGE: tl.constexpr = 0):
    """Decoding: mean of key block j (tokens j*block_size .. of row b, which starts at cache row START[b]) of a
    batched cache (B, L, Hkv, D), for the blocks before the last token's own block (the gate's candidates):
    block program_id(0), or with tail > 0 the program_id(0)-th of the last ``tail`` of them (what decoding steps
    add to kept means). PAGE > 0: a paged cache (pages, PAGE, Hkv, D), row b's pages listed in row b of the block
    table BT (PAGE dividing block_size, START 0). ``scale``: the keys' dequantisation scale (a quantised cache's),
    multiplying the means."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n_cand = (tl.load(SEQ + b) - 1) // block_size
    j = tl.program_id(0)
    if tail > 0:
        j += n_cand - tail
    if (j < 0) | (j >= n_cand):
        return
    if PAGE == 0:
        row0 = tl.load(START + b).to(tl.int64) + j.to(tl.int64) * block_size
        mean = _mean_rows(K + b * stride_kb + row0 * stride_kt + h * stride_kh, stride_kt, block_size, D, BLOCK_D,
                          BLOCK_T)
    else:
        mean = _mean_rows(K + h * stride_kh, stride_kt, block_size, D, BLOCK_D, BLOCK_T,
                          BT + b * stride_btb + j.to(tl.int64) * (block_size // PAGE), last_page, PAGE)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(KMEAN + b * stride_mb + j.to(tl.int64) * stride_mn + h * stride_mh + offs_d,
             (mean * scale).to(KMEAN.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _moba_select_kernel(Q, KMEAN, SEL, CU_Q, CU_K, BLOCK_OFF,
                        stride_qt, stride_qh, stride_mb, stride_mh, stride_st, stride_sh,
                        block_size, group,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, KSEL: tl.constexpr, C: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Top-KSEL earlier blocks of every query row (one query head), by q . mean(k[block]).

    Scores are computed chunk by chunk (C blocks at a time) and folded into a running top-KSEL buffer,
    so no (T, num_blocks) score matrix is ever stored. SEL gets the block indices (local to the
    sequence), best first, -1 where a query has fewer than KSEL earlier blocks.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    k_len = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    if pid_m * BLOCK_M >= q_len:
        return
    hk = (h // group).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + rows[:, None] * stride_qt + h.to(tl.int64) * stride_qh + offs_d[None, :],
                mask=in_m[:, None] & (offs_d[None, :] < D), other=0.0)
    own = (offs_m + k_len - q_len) // block_size  # own block = number of candidate blocks
    own = tl.where(in_m, own, 0)
    n_cand = tl.max(own, 0)
    blk0 = tl.load(BLOCK_OFF + b).to(tl.int64)
    cols = tl.arange(0, C)
    best = topk_init(BLOCK_M, C)
    for c0 in range(0, n_cand, C):
        idx = c0 + cols
        km = tl.load(KMEAN + (blk0 + idx.to(tl.int64))[None, :] * stride_mb + hk * stride_mh + offs_d[:, None],
                     mask=(idx[None, :] < n_cand) & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, km, input_precision=PRECISION)
        best = fold_topk(best, topk_keys(s, idx[None, :], idx[None, :] < own[:, None]), KSEL)
    blk = topk_indices(best, KSEL)
    tl.store(SEL + rows[:, None] * stride_st + h.to(tl.int64) * stride_sh + cols[None, :], blk,
             mask=in_m[:, None] & (cols[None, :] < KSEL))


@triton.jit
def _moba_decode_select_kernel(Q, KMEAN, SEL, SEQ, ROWS, stride_qb, stride_qh, stride_mb, stride_mn, stride_mh,
                               stride_sb, stride_sh, block_size, group,
                               D: tl.constexpr, BLOCK_D: tl.constexpr, KSEL: tl.constexpr, C: tl.constexpr,
                               PRECISION: tl.constexpr, BLOCK_G: tl.constexpr, HAS_ROWS: tl.constexpr):
    """Decoding: the top-KSEL earlier blocks of the new token of sequence b for every query head of KV head
    hk. The group's heads are the rows of one tile (they score the same pooled keys, each loaded once);
    same keys, ties and -1 padding as :func:`_moba_select_kernel`. KMEAN (B, N, Hkv, D): the pooled keys of
    the blocks before the token's own block, local to the sequence: its row ROWS[b] (several tokens of one
    sequence), or b."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    n_cand = (tl.load(SEQ + b) - 1) // block_size  # own block = number of candidates
    q, heads, in_g = _decode_query(Q, stride_qb, stride_qh, b, hk, group, D, BLOCK_D, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    c = b
    if HAS_ROWS:
        c = tl.load(ROWS + b).to(tl.int64)
    km_base = KMEAN + c * stride_mb + hk.to(tl.int64) * stride_mh
    cols = tl.arange(0, C)
    best = topk_init(BLOCK_G, C)
    for c0 in range(0, n_cand, C):
        idx = c0 + cols
        km = tl.load(km_base + idx.to(tl.int64)[None, :] * stride_mn + offs_d[:, None],
                     mask=(idx[None, :] < n_cand) & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, km, input_precision=PRECISION)
        best = fold_topk(best, topk_keys(s, idx[None, :], idx[None, :] < n_cand), KSEL)
    blk = topk_indices(best, KSEL)
    tl.store(SEL + b * stride_sb + heads[:, None] * stride_sh + cols[None, :], blk,
             mask=in_g[:, None] & (cols[None, :] < KSEL))
