"""MLA's Triton kernel: absorbed-form decoding over a (paged) latent cache, split-KV.

One program takes one sequence, a group of BLOCK_H query heads times its S query tokens (all rows share
the cache: MQA) and one split of the context; it streams the split's tokens once, 576 values each (the
512-d latent, which is both key part and value, and the 64-d rotary key), and writes its normalised
partial output with its lse; the lse merge then combines the splits.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mla_decode_kernel(QL, QR, KV, BT, SEQLENS, OS, LS,
                       stride_qlb, stride_qls, stride_qlh, stride_qrb, stride_qrs, stride_qrh,
                       stride_kvp, stride_kvt, stride_btb,
                       stride_op, stride_ot, stride_oh, stride_lp, stride_lh,
                       H, S, tokens_per_split, qk_scale,
                       RANK: tl.constexpr, BLOCK_RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_ROPE: tl.constexpr,
                       PAGE: tl.constexpr,
                       HAS_BT: tl.constexpr, BLOCK_H: tl.constexpr, S_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr):
    hb = tl.program_id(0)  # head groups of one (sequence, split) run side by side: they share the cache in L2
    b = tl.program_id(1)
    split = tl.program_id(2)
    b64 = b.to(tl.int64)
    M: tl.constexpr = BLOCK_H * S_PAD
    r = tl.arange(0, M)
    head = hb * BLOCK_H + r // S_PAD
    s_idx = r % S_PAD
    valid = (head < H) & (s_idx < S)
    head64 = head.to(tl.int64)
    seqlen = tl.load(SEQLENS + b)
    pos = seqlen - S + s_idx  # query s sits at cache position seqlen - S + s
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, seqlen)
    row_out = b64 * S + s_idx  # packed (batch, query) row of the outputs
    l_ptr = LS + split.to(tl.int64) * stride_lp + head64 * stride_lh + row_out
    if lo >= hi:
        tl.store(l_ptr, tl.full([M], float("-inf"), tl.float32), mask=valid)
        return
    offs_r = tl.arange(0, BLOCK_RANK)
    in_r = offs_r < RANK
    offs_e = tl.arange(0, BLOCK_ROPE)
    ql = tl.load(QL + b64 * stride_qlb + s_idx[:, None].to(tl.int64) * stride_qls + head64[:, None] * stride_qlh
                 + offs_r[None, :], mask=valid[:, None] & in_r[None, :], other=0.0)
    qr = tl.load(QR + b64 * stride_qrb + s_idx[:, None].to(tl.int64) * stride_qrs + head64[:, None] * stride_qrh
                 + offs_e[None, :], mask=valid[:, None] & (offs_e[None, :] < ROPE), other=0.0)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, BLOCK_RANK], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        in_n = n < hi
        if HAS_BT:
            page = tl.load(BT + b64 * stride_btb + n // PAGE, mask=in_n, other=0).to(tl.int64)
            tok = page * stride_kvp + (n % PAGE).to(tl.int64) * stride_kvt
        else:
            tok = b64 * stride_kvp + n.to(tl.int64) * stride_kvt
        c = tl.load(KV + tok[:, None] + offs_r[None, :], mask=in_n[:, None] & in_r[None, :], other=0.0)
        kr = tl.load(KV + tok[:, None] + RANK + offs_e[None, :], mask=in_n[:, None] & (offs_e[None, :] < ROPE),
                     other=0.0)
        s = tl.dot(ql, tl.trans(c), input_precision=PRECISION)
        s = (s + tl.dot(qr, tl.trans(kr), input_precision=PRECISION)) * qk_scale
        s = tl.where(in_n[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(OS + split.to(tl.int64) * stride_op + row_out[:, None] * stride_ot + head64[:, None] * stride_oh
             + offs_r[None, :], out.to(OS.dtype.element_ty), mask=valid[:, None] & in_r[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(l_ptr, lse, mask=valid)
