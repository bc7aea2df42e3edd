"""MoBA's own Triton kernels: pooled keys, fused gate + top-k, and attention over the selected blocks.

The attention over the selected earlier blocks is organised by key block (as in Moonshot's design):
every (query, query head, slot) that selected block ``i`` is an *entry*; entries are sorted by
(global block, KV head) into segments, and each program takes a tile of up to ``BLOCK_M`` entries of one
segment (rows may mix query heads of one GQA group, which share the block's K/V) and runs them against
the block's keys. Tiles are found by a binary search over the per-segment tile counts, so the launch
needs no host synchronisation. The partial results of each slot are merged with the own-block result by
their lse; the backward pass uses the final row lse, so no slot buffer is kept for it.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block_mean_kernel(K, KMEAN, BLOCK_ROW, BLOCK_LEN, stride_kt, stride_kh, stride_mb, stride_mh,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Mean of the keys of one block and KV head (float32 sum, stored in KMEAN's dtype)."""
    blk = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row0 = tl.load(BLOCK_ROW + blk).to(tl.int64)
    n = tl.load(BLOCK_LEN + blk)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for t0 in range(0, n, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        x = tl.load(K + (row0 + offs_t.to(tl.int64))[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                    mask=(offs_t[:, None] < n) & (offs_d[None, :] < D), other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    tl.store(KMEAN + blk * stride_mb + h * stride_mh + offs_d, (acc / n).to(KMEAN.dtype.element_ty),
             mask=offs_d < D)


@triton.jit
def _score_keys(s, idx, valid):
    """Sortable int64 keys of (score, block index) pairs: higher score first, then lower index."""
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order == signed int order
    key = (bits.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)
    return tl.where(valid, key, -9223372036854775807 - 1)


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
    best = tl.full([BLOCK_M, C], -9223372036854775807 - 1, tl.int64)
    for c0 in range(0, n_cand, C):
        idx = c0 + cols
        km = tl.load(KMEAN + (blk0 + idx.to(tl.int64))[None, :] * stride_mb + hk * stride_mh + offs_d[:, None],
                     mask=(idx[None, :] < n_cand) & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, km, input_precision=PRECISION)
        cand = _score_keys(s, idx[None, :], idx[None, :] < own[:, None])
        # fold the chunk into the running top-KSEL: keys are unique (they embed the block index), so
        # taking the maximum KSEL times and striking it out each time is exact
        merged = tl.full([BLOCK_M, C], -9223372036854775807 - 1, tl.int64)
        for j in range(0, KSEL):
            top = tl.maximum(tl.max(best, 1), tl.max(cand, 1))
            merged = tl.where(cols[None, :] == j, top[:, None], merged)
            best = tl.where(best == top[:, None], -9223372036854775807 - 1, best)
            cand = tl.where(cand == top[:, None], -9223372036854775807 - 1, cand)
        best = merged
    blk = (2147483647 - (best & 0xFFFFFFFF)).to(tl.int32)
    blk = tl.where(best == -9223372036854775807 - 1, -1, blk)
    tl.store(SEL + rows[:, None] * stride_st + h.to(tl.int64) * stride_sh + cols[None, :], blk,
             mask=in_m[:, None] & (cols[None, :] < KSEL))


@triton.jit
def _find_tile(TILE_CUM, pid, n_seg, n_iter):
    """Segment s with TILE_CUM[s] <= pid < TILE_CUM[s + 1] (binary search), and the tile's rank in it."""
    lo = pid * 0
    hi = lo + n_seg - 1
    for _ in range(0, n_iter):
        mid = (lo + hi + 1) // 2
        go = tl.load(TILE_CUM + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo, pid - tl.load(TILE_CUM + lo)


@triton.jit
def _load_entries(ENTRY, SEG_START, seg, tile, Hq, KSEL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Entries of one tile: query row t, query head h, slot s (entry id = (t * Hq + h) * KSEL + s)."""
    e0 = tl.load(SEG_START + seg) + tile * BLOCK_M
    e1 = tl.load(SEG_START + seg + 1)
    offs = e0 + tl.arange(0, BLOCK_M)
    valid = offs < e1
    e = tl.load(ENTRY + offs, mask=valid, other=0).to(tl.int64)
    slot = e % KSEL
    th = e // KSEL
    return th // Hq, th % Hq, slot, valid


@triton.jit
def _moba_sparse_fwd_kernel(Q, K, V, OS, LS, ENTRY, SEG_START, TILE_CUM, BLOCK_ROW,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_os, stride_ot, stride_oh, stride_ls, stride_lh,
                            n_seg, n_iter, Hq, HKV, block_size, qk_scale,
                            DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                            KSEL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """Attention of a tile of entries over one whole selected block; writes slot ``1 + s`` of OS/LS."""
    pid = tl.program_id(0)
    if pid >= tl.load(TILE_CUM + n_seg):
        return
    seg, tile = _find_tile(TILE_CUM, pid, n_seg, n_iter)
    gb = (seg // HKV).to(tl.int64)
    hk = (seg % HKV).to(tl.int64)
    t, h, slot, valid = _load_entries(ENTRY, SEG_START, seg, tile, Hq, KSEL, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_dk[None, :],
                mask=valid[:, None] & (offs_dk[None, :] < DQK), other=0.0)
    row0 = tl.load(BLOCK_ROW + gb).to(tl.int64)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(0, block_size, BLOCK_N):
        rows = row0 + n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        kt = tl.load(K + rows[None, :] * stride_kt + hk * stride_kh + offs_dk[:, None],
                     mask=offs_dk[:, None] < DQK, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + rows[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :],
                    mask=offs_dv[None, :] < DV, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    slot1 = (slot + 1).to(tl.int64)
    tl.store(OS + slot1[:, None] * stride_os + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_dv[None, :],
             out.to(OS.dtype.element_ty), mask=valid[:, None] & (offs_dv[None, :] < DV))
    tl.store(LS + slot1 * stride_ls + h * stride_lh + t, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
             mask=valid)


@triton.jit
def _moba_sparse_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, ENTRY, SEG_START, BLOCK_ROW,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                             stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                             Hq, HKV, qk_scale, scale,
                             DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                             KSEL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    """dK/dV of one key tile of one (block, KV head) segment from every entry that selected it, added to
    the own-block gradients already in DK/DV (one program per key tile: deterministic, no atomics)."""
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    e0 = tl.load(SEG_START + seg)
    e1 = tl.load(SEG_START + seg + 1)
    if e1 == e0:
        return
    gb = (seg // HKV).to(tl.int64)
    hk = (seg % HKV).to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = tl.load(BLOCK_ROW + gb).to(tl.int64) + pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    k = tl.load(K + rows[:, None] * stride_kt + hk * stride_kh + offs_dk[None, :], mask=offs_dk[None, :] < DQK,
                other=0.0)
    v = tl.load(V + rows[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :], mask=offs_dv[None, :] < DV,
                other=0.0)
    kt = tl.trans(k)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for tile in range(0, tl.cdiv(e1 - e0, BLOCK_M)):
        t, h, slot, valid = _load_entries(ENTRY, SEG_START, seg, tile, Hq, KSEL, BLOCK_M)
        q = tl.load(Q + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_dk[None, :],
                    mask=valid[:, None] & (offs_dk[None, :] < DQK), other=0.0)
        do = tl.load(DO + t[:, None] * stride_dot + h[:, None] * stride_doh + offs_dv[None, :],
                     mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + h * stride_lh + t, mask=valid, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + h * stride_lh + t, mask=valid, other=0.0)
        p = tl.math.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk_ptr = DK + rows[:, None] * stride_dkt + hk * stride_dkh + offs_dk[None, :]
    dv_ptr = DV_ + rows[:, None] * stride_dvt + hk * stride_dvh + offs_dv[None, :]
    mk = offs_dk[None, :] < DQK
    mv = offs_dv[None, :] < DV
    dk = dk * scale + tl.load(dk_ptr, mask=mk, other=0.0).to(tl.float32)
    dv = dv + tl.load(dv_ptr, mask=mv, other=0.0).to(tl.float32)
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=mk)
    tl.store(dv_ptr, dv.to(DV_.dtype.element_ty), mask=mv)


@triton.jit
def _moba_sparse_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ32, ENTRY, SEG_START, TILE_CUM, BLOCK_ROW,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
                           n_seg, n_iter, Hq, HKV, block_size, qk_scale, scale,
                           DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                           KSEL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """dQ of a tile of entries from one selected block, atomically added to a float32 buffer (a query
    row gets contributions from up to KSEL blocks, handled by different programs)."""
    pid = tl.program_id(0)
    if pid >= tl.load(TILE_CUM + n_seg):
        return
    seg, tile = _find_tile(TILE_CUM, pid, n_seg, n_iter)
    gb = (seg // HKV).to(tl.int64)
    hk = (seg % HKV).to(tl.int64)
    t, h, slot, valid = _load_entries(ENTRY, SEG_START, seg, tile, Hq, KSEL, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_dk[None, :],
                mask=valid[:, None] & (offs_dk[None, :] < DQK), other=0.0)
    do = tl.load(DO + t[:, None] * stride_dot + h[:, None] * stride_doh + offs_dv[None, :],
                 mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + h * stride_lh + t, mask=valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + h * stride_lh + t, mask=valid, other=0.0)
    row0 = tl.load(BLOCK_ROW + gb).to(tl.int64)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    for n0 in range(0, block_size, BLOCK_N):
        rows = row0 + n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        k = tl.load(K + rows[:, None] * stride_kt + hk * stride_kh + offs_dk[None, :], mask=offs_dk[None, :] < DQK,
                    other=0.0)
        vt = tl.load(V + rows[None, :] * stride_vt + hk * stride_vh + offs_dv[:, None], mask=offs_dv[:, None] < DV,
                     other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.atomic_add(DQ32 + t[:, None] * stride_dqt + h[:, None] * stride_dqh + offs_dk[None, :], dq * scale,
                  mask=valid[:, None] & (offs_dk[None, :] < DQK))



@triton.jit
def _moba_decode_kernel(Q, K, V, SEL, OS, LS, CU_Q, CU_K,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_st, stride_sh,
                        stride_op, stride_ot, stride_oh, stride_lp, stride_lh,
                        Hq, block_size, group, n_split, qk_scale,
                        DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                        KSEL: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """One new token per sequence. Program (sequence * Hq + head, piece) attends to one SPLIT-key part of
    the own block (slot 0, keys up to the query) or of a selected block (slot 1 + s); the parts are
    merged by lse afterwards (split-KV). Matrix-vector products: a decode step reads each key once."""
    bh = tl.program_id(0)
    piece = tl.program_id(1)
    b = bh // Hq
    h = (bh % Hq).to(tl.int64)
    slot = piece // n_split
    part = piece % n_split
    t = tl.load(CU_Q + b)
    if tl.load(CU_Q + b + 1) == t:  # no new token in this sequence
        return
    t = t.to(tl.int64)
    k_start = tl.load(CU_K + b).to(tl.int64)
    pos = tl.load(CU_K + b + 1) - tl.load(CU_K + b) - 1
    own = pos // block_size
    blk = own
    n_keys = pos - own * block_size + 1
    if slot > 0:
        blk = tl.load(SEL + t * stride_st + h * stride_sh + slot - 1)
        n_keys = block_size
    lo = part * SPLIT
    hi = tl.minimum(lo + SPLIT, n_keys)
    l_ptr = LS + piece.to(tl.int64) * stride_lp + h * stride_lh + t
    if (blk < 0) | (lo >= hi):
        tl.store(l_ptr, float("-inf"))
        return
    hk = (h // group).to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + t * stride_qt + h * stride_qh + offs_dk, mask=offs_dk < DQK, other=0.0).to(tl.float32)
    row0 = k_start + blk.to(tl.int64) * block_size
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < hi
        rows = row0 + offs_n.to(tl.int64)
        k = tl.load(K + rows[:, None] * stride_kt + hk * stride_kh + offs_dk[None, :],
                    mask=in_n[:, None] & (offs_dk[None, :] < DQK), other=0.0).to(tl.float32)
        s = tl.where(in_n, tl.sum(k * q[None, :], 1) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        v = tl.load(V + rows[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :],
                    mask=in_n[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    tl.store(OS + piece.to(tl.int64) * stride_op + t * stride_ot + h * stride_oh + offs_dv,
             (acc / l_i).to(OS.dtype.element_ty), mask=offs_dv < DV)
    tl.store(l_ptr, (m_i + tl.math.log2(l_i)) * 0.6931471805599453)
