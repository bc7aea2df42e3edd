"""NSA's own Triton kernel: selection scores from the compressed attention probabilities and top-n.

The compressed branch itself runs through :func:`longattn.flash_attention` with strided key positions,
the selected branch through the block-sparse engine (:mod:`longattn.kernels.sparse`) and the window
through flash attention with ``window``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.topk import fold_topk, topk_indices, topk_keys


@triton.jit
def _nsa_select_kernel(Q, KC, LSE, W, SEL, CU_Q, CU_C,
                       stride_qt, stride_qh, stride_ct, stride_ch, stride_lh, stride_st, stride_sh,
                       group, scale,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr,
                       SLC_BLOCK: tl.constexpr, NW: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
                       INIT: tl.constexpr, LOCAL: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr):
    """Blocks selected by each query row for one KV head (shared by its GQA group).

    Score of selection block j (Eq. 9/10): sum over the group's heads h and i < NW of
    ``W[i] * p_cmp[h, t, (SLC_BLOCK/CMP_STRIDE)*j - i]``, with p_cmp = exp(q.k_cmp * scale - lse_cmp)
    on the compressed blocks visible to the query (0 elsewhere). Forced blocks (the first INIT, the
    LOCAL ending at the own block) rank first, blocks after the own one are never taken; ties go to the
    lower index. Scores are computed C blocks at a time and folded into a running top-TOPK buffer.
    """
    pid_m = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    c_start = tl.load(CU_C + b).to(tl.int64)
    n_cmp = tl.load(CU_C + b + 1) - tl.load(CU_C + b)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    own = tl.where(in_m, offs_m // SLC_BLOCK, 0)
    n_cand = tl.max(own, 0) + 1
    cols = tl.arange(0, C)
    tcols = tl.arange(0, TOPK_PAD)
    best = tl.full([BLOCK_M, TOPK_PAD], -9223372036854775807 - 1, tl.int64)
    ratio: tl.constexpr = SLC_BLOCK // CMP_STRIDE
    for j0 in range(0, n_cand, C):
        jj = j0 + cols
        score = tl.zeros([BLOCK_M, C], tl.float32)
        for g in range(0, group):
            h = (hk * group + g).to(tl.int64)
            q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                        mask=in_m[:, None] & (offs_d[None, :] < D), other=0.0)
            lse = tl.load(LSE + h * stride_lh + rows, mask=in_m, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no compressed block
            for i in tl.static_range(NW):
                ci = jj * ratio - i
                ok = (ci >= 0) & (ci < n_cmp)
                kc = tl.load(KC + (c_start + ci.to(tl.int64))[None, :] * stride_ct + hk.to(tl.int64) * stride_ch
                             + offs_d[:, None], mask=ok[None, :] & (offs_d[:, None] < D), other=0.0)
                s = tl.dot(q, kc, input_precision=PRECISION) * scale
                vis = ok[None, :] & ((ci * CMP_STRIDE + CMP_BLOCK - 1)[None, :] <= offs_m[:, None])
                score += tl.load(W + i) * tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        forced = (jj[None, :] < INIT) | ((jj[None, :] > own[:, None] - LOCAL) & (jj[None, :] <= own[:, None]))
        score = tl.where(forced, float("inf"), score)
        best = fold_topk(best, topk_keys(score, jj[None, :], jj[None, :] <= own[:, None]), TOPK)
    blk = topk_indices(best)
    tl.store(SEL + rows[:, None] * stride_st + hk.to(tl.int64) * stride_sh + tcols[None, :], blk,
             mask=in_m[:, None] & (tcols[None, :] < TOPK))
