"""NSA's own Triton kernels.

Prefill / training: selection scores from the compressed attention probabilities and top-n
(``_nsa_select_kernel``), the selected branch's forward and dq by blocks of consecutive queries, the rows of
each tile their GQA group's heads, visiting the union of the queries' blocks once (``_nsa_selected_fwd_kernel``,
``_nsa_selected_dq_kernel``; the forward also writes the three branches' gated sum), and each branch's share of
the gated sum's gradient (``_gated_prep_kernel``). The compressed branch runs through flash attention with
strided key positions, the window through flash attention with ``window``, and the selected branch's dk/dv
through the block-sparse engine's gradient kernels (:mod:`longattn.kernels.sparse`).

Decoding (one token per sequence against a cache): ``_nsa_decode_kernel`` runs every branch in one program
per (sequence, KV head); the split-KV path spreads the compressed attention and the scoring over several
programs (``_nsa_decode_cmp_split_kernel``, ``_nsa_decode_score_split_kernel``), then the selected blocks and
the window too, one block or window part per program (``_nsa_decode_piece_kernel``), and merges and gates the
pieces (``_nsa_decode_combine_kernel``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.flash import (_decode_query, _dot_split, _load_split, _scaled_scores, _softcap_grad, _softcapped,
                             _store_split, _widen)
from ..kernels.sparse import _bwd_operands
from ..kernels.utils import autotune, autotune_enabled, small_tiles
from ..kernels.topk import fold_topk, topk_indices, topk_init, topk_keys


@triton.jit
def _band_scores(p, W, carry, M: tl.constexpr, C: tl.constexpr, R: tl.constexpr, NW: tl.constexpr):
    """Eq. 9's band on one chunk of the selection sweep: the group-summed probabilities ``p`` (M, C*R) of the
    chunk's compressed blocks give the scores (M, C) of its C selection blocks, ``carry`` (M, C) being what the
    previous chunk's taps add to them; returns (scores, carry into the next chunk), exact float32 sums.

    Column R*j + r of the chunk feeds block j + s with the weight W[R*s - r] (0 <= R*s - r < NW), for shifts
    s = 0 .. ceil((NW - 1) / R): each shift's weighted sums over r are one reduction of p seen as (M, C, R), and
    shifting them by s blocks (wrapping into the carry) is a small (C, C) product. A (C*R, C) band matrix as the
    product's operand instead held whole (rows x C*R) slices of p per thread: ~100 registers more."""
    p3 = tl.reshape(p, [M, C, R])
    r = tl.arange(0, R)
    jc = tl.arange(0, C)
    score = carry
    carry = tl.zeros([M, C], tl.float32)
    for s in tl.static_range(0, (NW + R - 2) // R + 1):
        tap = s * R - r
        part = tl.sum(p3 * tl.load(W + tap, mask=(tap >= 0) & (tap < NW), other=0.0)[None, None, :], 2)
        if s == 0:
            score += part
        else:
            score = tl.dot(part, (jc[:, None] + s == jc[None, :]).to(tl.float32), score, input_precision="ieee")
            carry = tl.dot(part, (jc[:, None] + s - C == jc[None, :]).to(tl.float32), carry,
                           input_precision="ieee")
    return score, carry


@triton.jit
def _nsa_select_kernel(Q, KC, LSE, W, SEL, CU_Q, CU_C,
                       stride_qt, stride_qh, stride_ct, stride_ch, stride_lh, stride_st, stride_sh,
                       group, scale_log2, length_class,
                       D: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, CMP_STRIDE: tl.constexpr,
                       CMP_BLOCK: tl.constexpr, SLC_BLOCK: tl.constexpr, NW: tl.constexpr, TOPK: tl.constexpr,
                       TOPK_PAD: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, GROUP_PAD: tl.constexpr,
                       C: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       HEAD_ROWS: tl.constexpr = False, QPOS=None, HAS_QPOS: tl.constexpr = False, cap_scale=0.0,
                       SOFTCAP: tl.constexpr = 0):
    """Blocks selected by each query row for one KV head (shared by its GQA group).

    Score of selection block j (Eq. 9/10): sum over the group's heads h and i < NW of
    ``W[i] * p_cmp[h, t, R*j - i]`` (R = SLC_BLOCK / CMP_STRIDE), with p_cmp = exp(q.k_cmp * scale - lse_cmp)
    on the compressed blocks visible to the query (0 elsewhere). Forced blocks (the first INIT, the LOCAL
    ending at the own block) rank first, blocks after the own one are never taken; ties go to the lower index.

    A program serves BLOCK_M consecutive query tokens and goes C selection blocks at a time: the chunk's C*R
    compressed keys are loaded once for the whole group, the group's probabilities against them are summed over
    its heads, and Eq. 9's band maps them to the C block scores (``_band_scores``; the taps that reach into the
    previous chunk come from it as a carry, C*R >= NW - 1). The scores fold into a running top-n, so no
    (T, n_cmp) matrix is ever stored. The head dim is split into two power-of-two parts (BLOCK_DA + BLOCK_DB,
    e.g. 192 = 128 + 64) instead of being padded.

    The heads are visited in one of two ways. By default, a loop over them within each chunk: a (BLOCK_M, C*R)
    product per head, summed, each head's q tile loaded again at every chunk (64 tokens x 16 heads x 192 dims,
    384 KB a program per chunk, from L2 at best: a full grid's tiles, 132 programs x 384 KB, outgrow it). With
    ``HEAD_ROWS``, one product whose rows are the (token, head) pairs, BLOCK_M * GROUP_PAD of them (GROUP_PAD:
    the group rounded up to a power of two, the padding heads masked), each token's probabilities then summed
    over its rows: q and the lse are loaded once for the whole sweep, the keys once per BLOCK_M tokens (fewer
    tokens a program: 16 for a group of 16).

    ``length_class`` (the longest sequence rounded up to a power of two) is not read: it keys the autotuner, the
    best tile depending on how many programs the grid has. ``HAS_QPOS``: sequence b's first query sits at position
    QPOS[b] (a chunk of queries after a prefix), else at 0. ``SOFTCAP``: the compressed scores soft-capped (flash's
    _softcapped; scale_log2 then holds cap * log2(e)), as the compressed branch's lse.
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
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE
    BLOCK_C: tl.constexpr = C * R
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    hk64 = hk.to(tl.int64)
    pos = offs_m
    if HAS_QPOS:
        pos += tl.load(QPOS + b)
    own = tl.where(in_m, pos // SLC_BLOCK, 0)
    jcols = tl.arange(0, C)
    ccols = tl.arange(0, BLOCK_C)
    kc_base = KC + c_start * stride_ct + hk64 * stride_ch
    lse_base = LSE + (hk * group).to(tl.int64) * stride_lh + rows
    best = topk_init(BLOCK_M, TOPK_PAD)
    carry = tl.zeros([BLOCK_M, C], tl.float32)
    if HEAD_ROWS:  # row r: token r // GROUP_PAD, head r % GROUP_PAD; q and lse loaded once
        r = tl.arange(0, BLOCK_M * GROUP_PAD)
        tok_r = pid_m * BLOCK_M + r // GROUP_PAD
        head_r = r % GROUP_PAD
        in_r = (tok_r < q_len) & (head_r < group)
        h_r = (hk * group + head_r).to(tl.int64)
        rows_r = (q_start + tok_r).to(tl.int64)
        q_ra, q_rb = _load_split(Q, rows_r * stride_qt + h_r * stride_qh, in_r, D, BLOCK_DA, BLOCK_DB, False)
        lse_r = tl.load(LSE + h_r * stride_lh + rows_r, mask=in_r, other=float("inf"))
        lse_r = tl.where(lse_r == float("-inf"), float("inf"), lse_r * 1.4426950408889634)
        # the compressed keys are loaded a chunk ahead by hand: the chunk loop holds the top-n fold's loop, and
        # Triton pipelines innermost loops only
        kn_a, kn_b = _load_split(kc_base, ccols.to(tl.int64) * stride_ct, ccols < n_cmp, D, BLOCK_DA, BLOCK_DB, True)
    last = tl.max(own, 0)
    for j0 in range(0, last + 1, C):
        ci = j0 * R + ccols
        if HEAD_ROWS:
            kc_a, kc_b = kn_a, kn_b
            cn = ci + BLOCK_C
            kn_a, kn_b = _load_split(kc_base, cn.to(tl.int64) * stride_ct, cn < tl.where(j0 + C <= last, n_cmp, 0),
                                     D, BLOCK_DA, BLOCK_DB, True)
            # one accumulation chain (at 128 rows a warpgroup, no warpgroup computes another's rows)
            s = tl.dot(q_ra, kc_a, input_precision=PRECISION)
            if BLOCK_DB > 0:
                s = tl.dot(q_rb, kc_b, s, input_precision=PRECISION)
            s = tl.fma(_softcapped(s, cap_scale, SOFTCAP), scale_log2, -lse_r[:, None])
            p = tl.sum(tl.reshape(tl.math.exp2(s), [BLOCK_M, GROUP_PAD, BLOCK_C]), 1)  # over each token's heads
        else:
            kc_a, kc_b = _load_split(kc_base, ci.to(tl.int64) * stride_ct, ci < n_cmp, D, BLOCK_DA, BLOCK_DB, True)
            p = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
            # each head's row lse is loaded one head ahead, so that the exp never waits on its load (a (rows, group)
            # tile of them held across the loop cost ~50 registers per thread, and picking a head's column from it
            # a layout conversion per head)
            lse_ptr = lse_base
            lse_next = tl.load(lse_ptr, mask=in_m, other=float("inf"))
            for g in range(0, group):
                lse = lse_next
                lse_ptr += tl.where(g + 1 < group, stride_lh, 0)  # the last head reloads its own
                lse_next = tl.load(lse_ptr, mask=in_m, other=float("inf"))
                h = (hk * group + g).to(tl.int64)
                q_a, q_b = _load_split(Q, rows * stride_qt + h * stride_qh, in_m, D, BLOCK_DA, BLOCK_DB, False)
                # lse in log2 units; a row that saw no compressed block (lse -inf) has p = 0
                lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
                # two separate products, not one accumulation chain: Triton lays a chain's first product out on 8
                # warps x 64 rows, i.e. both warpgroups computing all 64 rows, then converts it for the second. The
                # scale and the lse go in as two fused multiply-adds per score (sm_90: 318 instructions a head step
                # against 350 with the scale, lse and sum as separate operations)
                p += tl.math.exp2(_scaled_scores(q_a, q_b, kc_a, kc_b, scale_log2, -lse[:, None], BLOCK_DB, PRECISION,
                                                 cap_scale, SOFTCAP)[0])
        # the blocks a row cannot see are masked once, on the sum: their terms may be +inf, never NaN (lse > -inf)
        vis = (ci < n_cmp)[None, :] & ((ci * CMP_STRIDE + CMP_BLOCK - 1)[None, :] <= pos[:, None])
        p = tl.where(vis, p, 0.0)
        score, carry = _band_scores(p, W, carry, BLOCK_M, C, R, NW)
        jj = j0 + jcols
        forced = (jj[None, :] < INIT) | ((jj[None, :] > own[:, None] - LOCAL) & (jj[None, :] <= own[:, None]))
        score = tl.where(forced, float("inf"), score)
        best = fold_topk(best, topk_keys(score, jj[None, :], jj[None, :] <= own[:, None]), TOPK)
    blk = topk_indices(best, TOPK)
    tcols = tl.arange(0, TOPK_PAD)
    tl.store(SEL + rows[:, None] * stride_st + hk64 * stride_sh + tcols[None, :], blk,
             mask=in_m[:, None] & (tcols[None, :] < TOPK))


# GPU candidates of the selection kernel as (query tokens, selection blocks per chunk, warps, pipeline stages,
# register limit or None, (token, head) rows), the first used without autotuning (the H100's pick at 64k with
# paper defaults, 2026-11-27: bench/results/nvidia-h100). 64 rows on 8 warps split each head's score tile between
# the two warpgroups, 128 give each warpgroup its own 64 rows; 32 blocks per chunk load each head's q tile half as
# often (16 heads x 64 rows x 192 dims reloaded per chunk); 128 registers per thread fit two programs of 8 warps on
# an SM (their matmuls and exponentials then overlap), spilling 68 bytes. The others spill nothing on sm_90 but
# (64, 16, 4, 2), 32 bytes, and (64, 32, 8, 3), 4 bytes outside its head loop (tests/cuda_compile.py --resources).
# At 2 stages a head's q tile is copied at the end of the previous head's step and waited for at the start of its
# own (its whole latency exposed, 16 times a chunk); at 3 a step ahead (sm_90's TTGIR: async_wait num 2). (token,
# head) rows (``HEAD_ROWS``, not yet timed on a GPU): 256 rows, 128 a warpgroup (16 tokens of a group of 16, 32 of
# 8, 64 of 4), q (96 KB) and a chunk of 128 or 64 keys in 152 / 122 KB of shared memory, 142-228 registers
# (Triton 3.6: 166-248), nothing spilled (32 and 64 tokens with 128-key chunks spilled: each token's running top-n
# and carry held in more registers). float32 multiplies on CUDA cores: 16 rows (64 spilled 5 KB per thread).
SELECT_TILES = ((64, 32, 8, 2, None, False), (64, 32, 8, 3, None, False), (64, 16, 8, 3, None, False),
                (64, 16, 8, 2, None, False), (64, 16, 8, 2, 128, False), (128, 16, 8, 2, None, False),
                (64, 16, 4, 2, None, False), (16, 32, 8, 2, None, True), (16, 16, 8, 2, None, True),
                (32, 16, 8, 2, None, True), (64, 16, 8, 2, None, True))
SELECT_FP32_TILE = (16, 16, 8, 3, None, False)


def select_candidates(precision: str, min_chunk: int = 1) -> list:
    """The selection kernel's autotune candidates for products of ``precision`` ("ieee": float32), with at least
    ``min_chunk`` selection blocks per chunk (Eq. 9's taps must not reach past the previous chunk)."""
    tiles = [SELECT_FP32_TILE] if precision == "ieee" else SELECT_TILES
    configs = {}
    for m, c, w, s, r, h in tiles:
        configs.setdefault((m, max(c, min_chunk), w, s, r, h), None)
    return [triton.Config({"BLOCK_M": m, "C": c, "HEAD_ROWS": h}, num_warps=w, num_stages=s, maxnreg=r)
            for m, c, w, s, r, h in configs]


def _select_prune(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    r = a["SLC_BLOCK"] // a["CMP_STRIDE"]
    keep = select_candidates(a["PRECISION"], triton.next_power_of_2((a["NW"] - 1 + r - 1) // r))
    # (token, head) rows: 128 a warpgroup (fewer rows on 8 warps: both warpgroups would compute all of them; small
    # groups reload little q in the head loop)
    keep = [c for c in keep if not c.kwargs["HEAD_ROWS"] or c.kwargs["BLOCK_M"] * a["GROUP_PAD"] == 256]
    return keep if autotune_enabled() else keep[:1]


_nsa_select_tuned = autotune(select_candidates("tf32"), ["D", "CMP_STRIDE", "CMP_BLOCK", "SLC_BLOCK", "NW", "TOPK_PAD",
                                                         "PRECISION", "group", "length_class", "SOFTCAP"],
                             _select_prune)(_nsa_select_kernel)


@triton.jit
def _gated_prep_kernel(O, DOUT, G, DO, DELTA, DG, n_rows, heads, stride_lh, DV: tl.constexpr,
                       BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr):
    """One branch's share of the gated sum's gradient, ready for its backward: over rows r = token * heads + head
    of DV values, ``do = g * dout`` (in O's dtype), ``dg = sum(dout * o)`` (the gate's gradient) and the row's
    ``delta = sum(do * o)`` (float32, at ``head * stride_lh + token``: the branch lse's layout)."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    in_r = r < n_rows
    d = tl.arange(0, BLOCK_DV)
    mask = in_r[:, None] & (d[None, :] < DV)
    off = r[:, None] * DV + d[None, :]
    dout = tl.load(DOUT + off, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(O + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + r, mask=in_r, other=0.0).to(tl.float32)
    do = (g[:, None] * dout).to(DO.dtype.element_ty)
    tl.store(DO + off, do, mask=mask)
    tl.store(DG + r, tl.sum(dout * o, 1).to(DG.dtype.element_ty), mask=in_r)
    tl.store(DELTA + (r % heads) * stride_lh + r // heads, tl.sum(do.to(tl.float32) * o, 1), mask=in_r)


@triton.jit
def _online_step(q_a, q_b, k_a, k_b, v, vis, m, l, acc, scale_log2, BLOCK_DB: tl.constexpr,
                 PRECISION: tl.constexpr, SPLIT_SCORES: tl.constexpr = False, cap_scale=0.0,
                 SOFTCAP: tl.constexpr = 0):
    """One tile of an online softmax: rows q (G, D) against keys k (D, N) / values v (N, Dv) where ``vis``
    (broadcast to (G, N)); running max ``m`` (base 2), sum ``l`` and accumulator ``acc``. Safe when nothing
    is visible yet. q and k come in two parts along D (flash's _load_split; BLOCK_DB = 0: one). SOFTCAP: the
    scores soft-capped (flash's _softcapped; scale_log2 then holds cap * log2(e)).

    ``SPLIT_SCORES`` (64 rows on 8 warps): Triton lays a product whose result reaches another product on all
    warps along its rows, so both warpgroups would compute all of the scores; with the two parts' products not
    chained and p, alpha leaving a branch whose two sides are the same (its analysis does not follow values out of
    one), the score tile is split between the warpgroups instead (as MLA's SHARED_P).

    With SPLIT_SCORES the scores stay unscaled: the scale (> 0) goes into the row max and, with it, into one fused
    multiply-add per score before the exponential. Not without: as compiled for sm_90, the selected branch's
    one-query TMA tile (the H100's pick) then took 368 instructions a block against 347 (ptxas packed its masks'
    predicates into a register), though the pointer tiles took fewer."""
    if SPLIT_SCORES:
        s = tl.dot(q_a, k_a, input_precision=PRECISION)
        if BLOCK_DB > 0:  # added by a multiply-add: an addition of the two products would chain them
            s = tl.fma(tl.dot(q_b, k_b, input_precision=PRECISION), 1.0, s)
        s = tl.where(vis, _softcapped(s, cap_scale, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1) * scale_log2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(tl.fma(s, scale_log2, -m_safe[:, None]))
        if scale_log2 > 0:
            p16 = p.to(v.dtype)
            alpha = tl.exp2(m - m_safe)
        else:
            p16 = p.to(v.dtype)
            alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p16, v, input_precision=PRECISION)
    else:
        s = _softcapped(_dot_split(q_a, q_b, k_a, k_b, tl.zeros([q_a.shape[0], k_a.shape[1]], tl.float32), BLOCK_DB,
                                   PRECISION), cap_scale, SOFTCAP) * scale_log2
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _load_kv(k_base, v_base, stride_kt, stride_vt, pos, ok, DK: tl.constexpr, DV: tl.constexpr,
             BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr, page_ids=None, last_page=0,
             stride_kp=0, stride_vp=0, PAGE: tl.constexpr = 0):
    """The keys (transposed, two parts along D) and values at rows ``pos`` where ``ok`` (N,), zeros elsewhere.
    PAGE > 0 (a paged cache): token ``pos`` at slot ``pos % PAGE`` of page ``page_ids`` (the block table's
    entry for it, clamped here to [0, last_page]: never outside the cache), pages ``stride_kp`` / ``stride_vp``
    elements apart."""
    dv = tl.arange(0, BLOCK_DV)
    if PAGE == 0:
        k_rows = pos.to(tl.int64) * stride_kt
        v_rows = pos.to(tl.int64) * stride_vt
    else:
        page = tl.minimum(tl.maximum(page_ids, 0), last_page).to(tl.int64)
        slot = (pos % PAGE).to(tl.int64)
        k_rows = page * stride_kp + slot * stride_kt
        v_rows = page * stride_vp + slot * stride_vt
    k_a, k_b = _load_split(k_base, k_rows, ok, DK, BLOCK_DA, BLOCK_DB, True)
    v = tl.load(v_base + v_rows[:, None] + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
    return k_a, k_b, v


@triton.jit
def _attend_tile(q_a, q_b, k_base, v_base, stride_kt, stride_vt, pos, ok, vis, m, l, acc, scale_log2,
                 DK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                 BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, SPLIT_SCORES: tl.constexpr = False,
                 page_ids=None, last_page=0, stride_kp=0, stride_vp=0, PAGE: tl.constexpr = 0, cap_scale=0.0,
                 SOFTCAP: tl.constexpr = 0, WIDEN_ASM: tl.constexpr = False):
    """Load the keys/values at rows ``pos`` where ``ok`` (N,) (PAGE > 0: in a paged cache, see _load_kv) and
    take one online-softmax step of the rows q (in two parts along D), each seeing the keys where ``vis``
    (broadcast to (rows, N)); SOFTCAP: soft-capped scores (see _online_step). Keys and values of a float8 cache
    are widened to q's dtype as they are read (WIDEN_ASM: see flash's _widen)."""
    k_a, k_b, v = _load_kv(k_base, v_base, stride_kt, stride_vt, pos, ok, DK, DV, BLOCK_DA, BLOCK_DB, BLOCK_DV,
                           page_ids, last_page, stride_kp, stride_vp, PAGE)
    k_a, v = _widen(k_a, q_a.dtype, WIDEN_ASM), _widen(v, q_a.dtype, WIDEN_ASM)  # (else no-ops)
    if BLOCK_DB > 0:
        k_b = _widen(k_b, q_a.dtype, WIDEN_ASM)
    else:
        k_b = k_a
    return _online_step(q_a, q_b, k_a, k_b, v, vis, m, l, acc, scale_log2, BLOCK_DB, PRECISION, SPLIT_SCORES,
                        cap_scale=cap_scale, SOFTCAP=SOFTCAP)


@triton.jit
def _attend_range(q, k_base, v_base, stride_kt, stride_vt, lo, hi, scale_log2, DK: tl.constexpr, DV: tl.constexpr,
                  BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr, BT=None, last_page=0, stride_kp=0, stride_vp=0, PAGE: tl.constexpr = 0,
                  cap_scale=0.0, SOFTCAP: tl.constexpr = 0, WIDEN_ASM: tl.constexpr = False):
    """Online softmax of the rows q over the key rows [lo, hi) (compressed blocks or the window; PAGE > 0: in a
    paged cache whose block-table row is BT, see _load_kv; SOFTCAP: soft-capped scores; WIDEN_ASM: see
    _attend_tile): (m, l, acc), base 2. A
    tile's pages are read one tile ahead: its key loads then wait on no load of their own iteration (the compiler
    keeps tiles in flight)."""
    cols = tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    pages = cols
    if PAGE > 0:
        pages = tl.load(BT + (lo + cols) // PAGE, mask=lo + cols < hi, other=0)
    for p0 in range(lo, hi, BLOCK_N):
        pos = p0 + cols
        here = pages
        if PAGE > 0:
            pages = tl.load(BT + (pos + BLOCK_N) // PAGE, mask=pos + BLOCK_N < hi, other=0)
        m, l, acc = _attend_tile(q, q, k_base, v_base, stride_kt, stride_vt, pos, pos < hi, (pos < hi)[None, :], m,
                                 l, acc, scale_log2, DK, DV, BLOCK_DK, 0, BLOCK_DV, PRECISION, False, here,
                                 last_page, stride_kp, stride_vp, PAGE, cap_scale=cap_scale, SOFTCAP=SOFTCAP,
                                 WIDEN_ASM=WIDEN_ASM)
    return m, l, acc


@triton.jit
def _score_topk(q, in_g, lse2, kc_base, stride_ct, W, n_cmp, own, j_lo, j_hi, scale_log2, DK: tl.constexpr,
                BLOCK_DK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr, NW: tl.constexpr,
                TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
                C: tl.constexpr, PRECISION: tl.constexpr, cap_scale=0.0, SOFTCAP: tl.constexpr = 0):
    """Top-TOPK keys (see kernels/topk.py), (1, TOPK_PAD), among the selection blocks [j_lo, j_hi) (all at or
    before the own block): Eq. 9 scores summed over the group's rows, forced blocks first. ``lse2`` is the
    compressed branch's base-2 lse per row (+inf where it saw no block); SOFTCAP: its scores soft-capped.

    As the prefill's selection kernel: C selection blocks at a time, their C*R compressed keys loaded once (one
    matmul), the probabilities summed over the rows, then Eq. 9's band of weights maps them to the C scores,
    the taps reaching into the previous chunk carried over (a split starting at j_lo > 0 first runs the chunk
    before it for that carry alone)."""
    dk = tl.arange(0, BLOCK_DK)
    jcols = tl.arange(0, C)
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE
    BLOCK_C: tl.constexpr = C * R
    ccols = tl.arange(0, BLOCK_C)
    tap = jcols[None, :] * R - ccols[:, None]
    w_cur = tl.load(W + tap, mask=(tap >= 0) & (tap < NW), other=0.0)
    w_next = tl.load(W + tap + BLOCK_C, mask=(tap + BLOCK_C >= 0) & (tap + BLOCK_C < NW), other=0.0)
    best = topk_init(1, TOPK_PAD)
    carry = tl.zeros([C], tl.float32)
    for j0 in range(j_lo - tl.where(j_lo > 0, C, 0), j_hi, C):
        ci = j0 * R + ccols
        ok = (ci >= 0) & (ci < n_cmp)
        kc = tl.load(kc_base + ci[None, :].to(tl.int64) * stride_ct + dk[:, None],
                     mask=ok[None, :] & (dk[:, None] < DK), other=0.0)
        s = _softcapped(tl.dot(q, kc, input_precision=PRECISION), cap_scale, SOFTCAP) * scale_log2
        psum = tl.sum(tl.where(ok[None, :] & in_g[:, None], tl.exp2(s - lse2[:, None]), 0.0), 0)
        score = tl.sum(psum[:, None] * w_cur, 0) + carry
        carry = tl.sum(psum[:, None] * w_next, 0)
        jj = j0 + jcols
        forced = (jj < INIT) | ((jj > own - LOCAL) & (jj <= own))
        score = tl.where(forced, float("inf"), score)
        best = fold_topk(best, topk_keys(score[None, :], jj[None, :], ((jj >= j_lo) & (jj < j_hi))[None, :]), TOPK)
    return best


@triton.jit
def _attend_selected(q, blk, last, k_base, v_base, stride_kt, stride_vt, scale_log2, DK: tl.constexpr,
                     DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_G: tl.constexpr,
                     SLC_BLOCK: tl.constexpr, SLC_TILE: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
                     PRECISION: tl.constexpr, BT=None, last_page=0, stride_kp=0, stride_vp=0, PAGE: tl.constexpr = 0,
                     cap_scale=0.0, SOFTCAP: tl.constexpr = 0, WIDEN_ASM: tl.constexpr = False):
    """Online softmax of the rows q (one query position, the heads of a group) over the selected blocks
    ``blk`` (1, TOPK_PAD) (-1 = none), keys at positions <= ``last`` only (PAGE > 0: in a paged cache whose
    block-table row is BT, see _load_kv; SOFTCAP: soft-capped scores; WIDEN_ASM: see _attend_tile): (m, l, acc),
    base 2."""
    tcols = tl.arange(0, TOPK_PAD)
    scols = tl.arange(0, SLC_TILE)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    # the selected blocks come first in blk (best first, -1 after): the loop runs over them without conditions so
    # that the compiler prefetches the next block's tiles; a tile past the query is fully masked
    for i in range(0, tl.sum((blk >= 0).to(tl.int32))):
        j = tl.sum(tl.where(tcols[None, :] == i, blk, 0))
        for s0 in tl.static_range(0, SLC_BLOCK, SLC_TILE):
            pos = j * SLC_BLOCK + s0 + scols
            page_ids = pos
            if PAGE > 0:
                page_ids = tl.load(BT + pos // PAGE, mask=pos <= last, other=0)
            m, l, acc = _attend_tile(q, q, k_base, v_base, stride_kt, stride_vt, pos, pos <= last,
                                     (pos <= last)[None, :], m, l, acc, scale_log2, DK, DV, BLOCK_DK, 0,
                                     BLOCK_DV, PRECISION, False, page_ids, last_page, stride_kp, stride_vp, PAGE,
                                     cap_scale=cap_scale, SOFTCAP=SOFTCAP, WIDEN_ASM=WIDEN_ASM)
    return m, l, acc


@triton.jit
def _slc_swa_gated(q, blk, n, k_base, v_base, stride_kt, stride_vt, gate_ptr, stride_g3, in_g, out, scale_log2,
                   DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SLC_BLOCK: tl.constexpr, SLC_TILE: tl.constexpr,
                   TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                   BT=None, last_page=0, stride_kp=0, stride_vp=0, PAGE: tl.constexpr = 0, sink=0.0,
                   HAS_SINKS: tl.constexpr = False, cap_scale=0.0, SOFTCAP: tl.constexpr = 0,
                   WIDEN_ASM: tl.constexpr = False, v_scale=1.0):
    """``out`` (the gated compressed branch) plus the gated selected-block and window branches of the token
    at position n - 1 (PAGE > 0: its keys in a paged cache, see _load_kv); ``blk`` (1, TOPK_PAD) the selected
    blocks, -1 for none. HAS_SINKS: each branch scaled by what the rows' attention sinks ``sink`` leave of it.
    SOFTCAP: soft-capped scores. WIDEN_ASM: see _attend_tile; a quantised cache's keys' scale is in scale_log2 (or
    cap_scale), its values' is v_scale."""
    m, l, acc = _attend_selected(q, blk, n - 1, k_base, v_base, stride_kt, stride_vt, scale_log2, DK, DV,
                                 BLOCK_DK, BLOCK_DV, BLOCK_G, SLC_BLOCK, SLC_TILE, TOPK, TOPK_PAD, PRECISION, BT,
                                 last_page, stride_kp, stride_vp, PAGE, cap_scale=cap_scale, SOFTCAP=SOFTCAP,
                                 WIDEN_ASM=WIDEN_ASM)
    g3 = stride_g3.to(tl.int64)
    g = tl.load(gate_ptr + g3, mask=in_g, other=0.0).to(tl.float32) * v_scale
    if HAS_SINKS:
        g = g * _sink_scale(m, l, sink)
    out += g[:, None] * (acc / tl.where(l > 0, l, 1.0)[:, None])
    m, l, acc = _attend_range(q, k_base, v_base, stride_kt, stride_vt, tl.maximum(n - WINDOW, 0), n, scale_log2, DK,
                              DV, BLOCK_DK, BLOCK_DV, BLOCK_G, BLOCK_N, PRECISION, BT, last_page, stride_kp, stride_vp,
                              PAGE, cap_scale=cap_scale, SOFTCAP=SOFTCAP, WIDEN_ASM=WIDEN_ASM)
    g = tl.load(gate_ptr + 2 * g3, mask=in_g, other=0.0).to(tl.float32) * v_scale
    if HAS_SINKS:
        g = g * _sink_scale(m, l, sink)
    return out + g[:, None] * (acc / tl.where(l > 0, l, 1.0)[:, None])


@triton.jit
def _query_block(Q, K, V, SEL, CU, q0, pid_h, b, group, heads_per_prog, stride_qt, stride_qh, stride_kt, stride_kh,
                 stride_vt, stride_vh, stride_st, stride_sh, DK: tl.constexpr, BLOCK_DA: tl.constexpr,
                 BLOCK_DB: tl.constexpr, QB: tl.constexpr, ROWS: tl.constexpr, TOPK: tl.constexpr,
                 TOPK_PAD: tl.constexpr, CU_K=None, QPOS=None, HAS_QPOS: tl.constexpr = False):
    """The rows of the block of QB consecutive queries from q0 of sequence b for program pid_h of the KV heads'
    head slices (KV head hk = pid_h // slices, its query heads h0 .. h0 + heads_per_prog - 1 of the group, all of
    them unless the group is larger than a tile holds; row r: query q0 + r // heads_per_prog, head hk * group + h0
    + r % heads_per_prog): their q (two parts along D), packed row t, head, position in the sequence, validity,
    each row's selection (ROWS, TOPK_PAD), the block's (query, slot) pairs (QB * TOPK_PAD,), -1 where none, the
    sequence's K/V rows of head hk, its number of queries (none of the rows is valid past it) and the position of
    its first query. Queries and keys are the same tokens (both packed by CU), or with ``HAS_QPOS`` the queries a
    chunk of the keys: its keys packed by CU_K, its first query at position QPOS[b]."""
    slices = tl.cdiv(group, heads_per_prog)
    hk = pid_h // slices
    h0 = pid_h % slices * heads_per_prog
    row0 = tl.load(CU + b).to(tl.int64)
    q_len = tl.load(CU + b + 1) - tl.load(CU + b)
    krow0 = row0
    qoff = q_len * 0
    if HAS_QPOS:
        krow0 = tl.load(CU_K + b).to(tl.int64)
        qoff = tl.load(QPOS + b)
    r = tl.arange(0, ROWS)
    qi = r // heads_per_prog
    g = h0 + r % heads_per_prog
    valid = (qi < QB) & (q0 + qi < q_len) & (g < group)
    pos = qoff + q0 + qi
    t = row0 + (q0 + qi).to(tl.int64)
    heads = (hk * group + g).to(tl.int64)
    q_a, q_b = _load_split(Q, t * stride_qt + heads * stride_qh, valid, DK, BLOCK_DA, BLOCK_DB, False)
    tcols = tl.arange(0, TOPK_PAD)
    hk64 = hk.to(tl.int64)
    row_sel = tl.load(SEL + t[:, None] * stride_st + hk64 * stride_sh + tcols[None, :],
                      mask=valid[:, None] & (tcols[None, :] < TOPK), other=-1)
    p = tl.arange(0, QB * TOPK_PAD)
    pq = p // TOPK_PAD
    pairs = tl.load(SEL + (row0 + (q0 + pq).to(tl.int64)) * stride_st + hk64 * stride_sh + p % TOPK_PAD,
                    mask=(q0 + pq < q_len) & (p % TOPK_PAD < TOPK), other=-1)
    k_base = K + krow0 * stride_kt + hk64 * stride_kh
    v_base = V + krow0 * stride_vt + hk64 * stride_vh
    return q_a, q_b, t, heads, pos, valid, row_sel, pairs, k_base, v_base, q_len, qoff


@triton.jit
def _distinct_blocks(pairs):
    """The distinct blocks named by ``pairs`` (P,) (-1 = none), compacted: each pair's rank among the first
    occurrences (-1 for the others) and their count. The loops over them then carry no condition, so that the
    compiler can prefetch the next blocks while one is computed."""
    p = tl.arange(0, pairs.shape[0])
    before = (p[None, :] < p[:, None]) & (pairs[None, :] == pairs[:, None])  # (P, P): an earlier pair, same block
    first = (pairs >= 0) & (tl.sum(before.to(tl.int32), 1) == 0)
    rank = tl.where(first, tl.cumsum(first.to(tl.int32), 0) - 1, -1)
    return rank, tl.sum(first.to(tl.int32), 0)


@triton.jit
def _block_at(pairs, rank, u):
    """The u-th distinct block (see _distinct_blocks)."""
    return tl.sum(tl.where(rank == u, pairs, 0))


@triton.jit
def _sink_scale(m, l, sink):
    """``sigmoid(lse - sink)``, what an attention sink (a logit ``sink``, natural log, beside the keys, attending to
    nothing) leaves of rows whose softmax has base-2 running max ``m`` and sum ``l``: 0 for a row that saw no key."""
    lse2 = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), 0.0)
    return tl.where(l > 0, 1.0 / (1.0 + tl.exp2(sink * 1.4426950408889634 - lse2)), 0.0)


@triton.jit
def _store_rows(O, LSE, t, heads, valid, m, l, acc, stride_ot, stride_oh, stride_lh, DV: tl.constexpr,
                BLOCK_DV: tl.constexpr, GATE, GATED: tl.constexpr, WRITE_O: tl.constexpr):
    """The rows' normalised output (WRITE_O) and natural-log lse (rows that saw no key: 0 and -inf). GATED: also
    NSA's gated sum of the rows, ``out = g_cmp * o_cmp + g_slc * o + g_swa * o_swa`` in float32 (this output
    unrounded), ``GATE`` = (OUT, O_CMP, O_SWA, G_CMP, G_SLC, G_SWA, heads, SINKS): outputs in O's layout, gates
    (tokens, heads) contiguous. Each element of OUT is written by the program that reads it in O_CMP and O_SWA, so
    OUT may be O_CMP. GATED == 2: attention sinks, SINKS (Hq,) float32 logits: ``g_slc`` times ``sigmoid(lse -
    sink)`` (the other branches' gates come with theirs)."""
    dv = tl.arange(0, BLOCK_DV)
    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]
    off = t[:, None] * stride_ot + heads[:, None] * stride_oh + dv[None, :]
    mask = valid[:, None] & (dv[None, :] < DV)
    if WRITE_O:
        tl.store(O + off, o.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + heads * stride_lh + t, (m + tl.log2(l_safe)) * 0.6931471805599453, mask=valid)
    if GATED:
        OUT, O_CMP, O_SWA, G_CMP, G_SLC, G_SWA, n_heads, SINKS = GATE
        g = t * n_heads + heads
        g_slc = tl.load(G_SLC + g, mask=valid, other=0.0).to(tl.float32)
        if GATED == 2:
            g_slc = g_slc * _sink_scale(m, l, tl.load(SINKS + heads, mask=valid, other=0.0))
        out = g_slc[:, None] * o
        out += tl.load(G_CMP + g, mask=valid, other=0.0).to(tl.float32)[:, None] * \
            tl.load(O_CMP + off, mask=mask, other=0.0).to(tl.float32)
        out += tl.load(G_SWA + g, mask=valid, other=0.0).to(tl.float32)[:, None] * \
            tl.load(O_SWA + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + off, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _selected_fwd_per_query(Q, K, V, SEL, O, LSE, CU, q0, pid_h, b, stride_qt, stride_qh, stride_kt, stride_kh,
                            stride_vt, stride_vh, stride_st, stride_sh, stride_ot, stride_oh, stride_lh, group,
                            heads_per_prog, scale_log2, GATE, DK: tl.constexpr, DV: tl.constexpr,
                            BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr, QB: tl.constexpr,
                            HR: tl.constexpr, SLC_BLOCK: tl.constexpr, SLC_TILE: tl.constexpr, TOPK: tl.constexpr,
                            TOPK_PAD: tl.constexpr, PRECISION: tl.constexpr, GATED: tl.constexpr,
                            WRITE_O: tl.constexpr, CU_K=None, QPOS=None, HAS_QPOS: tl.constexpr = False,
                            cap_scale=0.0, SOFTCAP: tl.constexpr = 0):
    """The forward of QB (2 or 4) consecutive queries from q0, each with its own HR rows (its heads) and online
    softmax: every block any of them selected is loaded once, and multiplied only by the rows of the queries that
    selected it (the shared tile multiplies every block by all QB x HR rows). Triton's pipeliner does not follow
    loads into products in branches: with 2 queries the first one's product runs on every block (masked where it
    did not select it), so that the loads are multi-buffered; with 4 that spilled, and no product runs needlessly."""
    qa0, qb0, t0, hd0, pos0, ok0, _, pr0, k_base, v_base, q_len, qoff = _query_block(
        Q, K, V, SEL, CU, q0, pid_h, b, group, heads_per_prog, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
        stride_vh, stride_st, stride_sh, DK, BLOCK_DA, BLOCK_DB, 1, HR, TOPK, TOPK_PAD, CU_K, QPOS, HAS_QPOS)
    m0 = tl.full([HR], float("-inf"), tl.float32)
    l0 = tl.zeros([HR], tl.float32)
    acc0 = tl.zeros([HR, BLOCK_DV], tl.float32)
    qa1, qb1, t1, hd1, pos1, ok1, _, pr1, _, _, _, _ = _query_block(
        Q, K, V, SEL, CU, q0 + 1, pid_h, b, group, heads_per_prog, stride_qt, stride_qh, stride_kt, stride_kh,
        stride_vt, stride_vh, stride_st, stride_sh, DK, BLOCK_DA, BLOCK_DB, 1, HR, TOPK, TOPK_PAD, CU_K, QPOS,
        HAS_QPOS)
    m1, l1, acc1 = m0, l0, acc0
    if QB > 2:
        qa2, qb2, t2, hd2, pos2, ok2, _, pr2, _, _, _, _ = _query_block(
            Q, K, V, SEL, CU, q0 + 2, pid_h, b, group, heads_per_prog, stride_qt, stride_qh, stride_kt, stride_kh,
            stride_vt, stride_vh, stride_st, stride_sh, DK, BLOCK_DA, BLOCK_DB, 1, HR, TOPK, TOPK_PAD, CU_K, QPOS,
            HAS_QPOS)
        qa3, qb3, t3, hd3, pos3, ok3, _, pr3, _, _, _, _ = _query_block(
            Q, K, V, SEL, CU, q0 + 3, pid_h, b, group, heads_per_prog, stride_qt, stride_qh, stride_kt, stride_kh,
            stride_vt, stride_vh, stride_st, stride_sh, DK, BLOCK_DA, BLOCK_DB, 1, HR, TOPK, TOPK_PAD, CU_K, QPOS,
            HAS_QPOS)
        m2, l2, acc2 = m0, l0, acc0
        m3, l3, acc3 = m0, l0, acc0
    # the queries' (query, slot) pairs, for the union of their blocks
    hk64 = (pid_h // tl.cdiv(group, heads_per_prog)).to(tl.int64)
    row0 = tl.load(CU + b).to(tl.int64)
    p = tl.arange(0, QB * TOPK_PAD)
    pq = p // TOPK_PAD
    pairs = tl.load(SEL + (row0 + (q0 + pq).to(tl.int64)) * stride_st + hk64 * stride_sh + p % TOPK_PAD,
                    mask=(q0 + pq < q_len) & (p % TOPK_PAD < TOPK), other=-1)
    last = qoff + tl.minimum(q0 + QB, q_len) - 1  # the last query's position
    scols = tl.arange(0, SLC_TILE)
    rank, n_blocks = _distinct_blocks(pairs)
    for u in range(0, n_blocks):
        j = _block_at(pairs, rank, u)
        hit0 = tl.sum((pr0 == j).to(tl.int32)) > 0  # whether each query selected block j
        hit1 = tl.sum((pr1 == j).to(tl.int32)) > 0
        if QB > 2:
            hit2 = tl.sum((pr2 == j).to(tl.int32)) > 0
            hit3 = tl.sum((pr3 == j).to(tl.int32)) > 0
        for s0 in tl.static_range(0, SLC_BLOCK, SLC_TILE):  # loaded once, whichever queries take it
            kp = j * SLC_BLOCK + s0 + scols
            k_a, k_b, v = _load_kv(k_base, v_base, stride_kt, stride_vt, kp, kp <= last, DK, DV, BLOCK_DA, BLOCK_DB,
                                   BLOCK_DV)
            if QB == 2:  # out of a branch (masked instead), so the loads feed a product the pipeliner follows
                m0, l0, acc0 = _online_step(qa0, qb0, k_a, k_b, v, (kp[None, :] <= pos0[:, None]) & hit0, m0, l0,
                                            acc0, scale_log2, BLOCK_DB, PRECISION, False,
                                            cap_scale=cap_scale, SOFTCAP=SOFTCAP)
            elif hit0:
                m0, l0, acc0 = _online_step(qa0, qb0, k_a, k_b, v, kp[None, :] <= pos0[:, None], m0, l0, acc0,
                                            scale_log2, BLOCK_DB, PRECISION, False,
                                            cap_scale=cap_scale, SOFTCAP=SOFTCAP)
            if hit1:
                m1, l1, acc1 = _online_step(qa1, qb1, k_a, k_b, v, kp[None, :] <= pos1[:, None], m1, l1, acc1,
                                            scale_log2, BLOCK_DB, PRECISION, False,
                                            cap_scale=cap_scale, SOFTCAP=SOFTCAP)
            if QB > 2:
                if hit2:
                    m2, l2, acc2 = _online_step(qa2, qb2, k_a, k_b, v, kp[None, :] <= pos2[:, None], m2, l2, acc2,
                                                scale_log2, BLOCK_DB, PRECISION, False,
                                                cap_scale=cap_scale, SOFTCAP=SOFTCAP)
                if hit3:
                    m3, l3, acc3 = _online_step(qa3, qb3, k_a, k_b, v, kp[None, :] <= pos3[:, None], m3, l3, acc3,
                                                scale_log2, BLOCK_DB, PRECISION, False,
                                                cap_scale=cap_scale, SOFTCAP=SOFTCAP)
    _store_rows(O, LSE, t0, hd0, ok0, m0, l0, acc0, stride_ot, stride_oh, stride_lh, DV, BLOCK_DV, GATE,
                GATED, WRITE_O)
    _store_rows(O, LSE, t1, hd1, ok1, m1, l1, acc1, stride_ot, stride_oh, stride_lh, DV, BLOCK_DV, GATE,
                GATED, WRITE_O)
    if QB > 2:
        _store_rows(O, LSE, t2, hd2, ok2, m2, l2, acc2, stride_ot, stride_oh, stride_lh, DV, BLOCK_DV, GATE,
                    GATED, WRITE_O)
        _store_rows(O, LSE, t3, hd3, ok3, m3, l3, acc3, stride_ot, stride_oh, stride_lh, DV, BLOCK_DV, GATE,
                    GATED, WRITE_O)


@triton.jit
def _tma_kv(KA_DESC, KB_DESC, V_DESC, row, k_col, v_col, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """The keys (transposed, two parts along D) and values of the tile of rows from ``row`` by TMA (K/V's row
    descriptors, ``utils.row_descriptors``), the KV head's dims from columns ``k_col`` / ``v_col``."""
    k_a = tl.trans(KA_DESC.load([row, k_col]))
    k_b = k_a
    if BLOCK_DB > 0:
        k_b = tl.trans(KB_DESC.load([row, k_col + BLOCK_DA]))
    return k_a, k_b, V_DESC.load([row, v_col])


@triton.jit
def _nsa_selected_fwd_kernel(Q, K, V, SEL, O, LSE, CU, KA_DESC, KB_DESC, V_DESC, OUT, O_CMP, O_SWA, G_CMP, G_SLC,
                             G_SWA, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_st,
                             stride_sh, stride_ot, stride_oh, stride_lh, group, heads_per_prog, n_heads, scale_log2,
                             DK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                             BLOCK_DV: tl.constexpr, QB: tl.constexpr, ROWS: tl.constexpr, SLC_BLOCK: tl.constexpr,
                             SLC_TILE: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
                             PRECISION: tl.constexpr, SPLIT_SCORES: tl.constexpr, PER_QUERY: tl.constexpr = False,
                             HAS_TMA: tl.constexpr = False, USE_TMA: tl.constexpr = False, GATED: tl.constexpr = False,
                             WRITE_O: tl.constexpr = True, CU_K=None, QPOS=None, HAS_QPOS: tl.constexpr = False,
                             SINKS=None, cap_scale=0.0, SOFTCAP: tl.constexpr = 0):
    """Selected branch, forward. One program per block of QB consecutive queries and KV head (or slice of its
    group's heads, for groups larger than a tile): its rows are the group's heads of each query (they share the
    selection), and it visits the union of the queries' selected blocks once each, every row taking the keys of
    the blocks its query selected (causal in the own block).
    Consecutive queries select mostly the same blocks, so each block is loaded once for all of them (QB times
    less traffic than one program per query) and the tiles have QB times more rows. Writes the output and the
    natural-log lse of each row. ``PER_QUERY`` (QB 2 or 4, ROWS / QB rows a query): each query its own tile and
    online softmax, a block multiplied only by the queries that selected it (_selected_fwd_per_query).
    ``USE_TMA`` (HAS_TMA: the host gave K/V's row descriptors, tiles of SLC_TILE rows): the blocks before the one
    holding the last query come by TMA, that block last, by masked loads (its tail may lie past the sequence).
    ``GATED``: the program also writes NSA's gated sum of its rows into OUT from the other branches' outputs O_CMP,
    O_SWA and the gates (see _store_rows; ``n_heads``: the gates' heads per token; GATED == 2: attention sinks
    SINKS), and O only with ``WRITE_O``.
    ``HAS_QPOS``: the queries are a chunk of each sequence's tokens, from position QPOS[b], the keys packed by CU_K
    (see _query_block). ``SOFTCAP``: soft-capped scores (see _online_step)."""
    tl.static_assert(HAS_TMA or not USE_TMA, "USE_TMA needs K/V's descriptors")
    GATE = (OUT, O_CMP, O_SWA, G_CMP, G_SLC, G_SWA, n_heads, SINKS)
    tl.static_assert(not (USE_TMA and PER_QUERY), "USE_TMA is for the shared tile")
    q0 = tl.program_id(0) * QB
    if PER_QUERY:
        if q0 >= tl.load(CU + tl.program_id(2) + 1) - tl.load(CU + tl.program_id(2)):
            return
        _selected_fwd_per_query(Q, K, V, SEL, O, LSE, CU, q0, tl.program_id(1), tl.program_id(2), stride_qt,
                                stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_st, stride_sh,
                                stride_ot, stride_oh, stride_lh, group, heads_per_prog, scale_log2, GATE, DK, DV,
                                BLOCK_DA, BLOCK_DB, BLOCK_DV, QB, ROWS // QB, SLC_BLOCK, SLC_TILE, TOPK, TOPK_PAD,
                                PRECISION, GATED, WRITE_O, CU_K, QPOS, HAS_QPOS, cap_scale=cap_scale, SOFTCAP=SOFTCAP)
        return
    q_a, q_b, t, heads, pos, valid, row_sel, pairs, k_base, v_base, q_len, qoff = _query_block(
        Q, K, V, SEL, CU, q0, tl.program_id(1), tl.program_id(2), group, heads_per_prog, stride_qt, stride_qh,
        stride_kt, stride_kh, stride_vt, stride_vh, stride_st, stride_sh, DK, BLOCK_DA, BLOCK_DB, QB, ROWS, TOPK,
        TOPK_PAD, CU_K, QPOS, HAS_QPOS)
    if q0 >= q_len:
        return
    last = qoff + tl.minimum(q0 + QB, q_len) - 1  # the block's last query position
    scols = tl.arange(0, SLC_TILE)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    last_blk = last // SLC_BLOCK
    if USE_TMA:  # the last query's block is left for the masked loads after the loop
        pairs = tl.where(pairs == last_blk, -1, pairs)
        row0 = tl.load(CU + tl.program_id(2))
        if HAS_QPOS:
            row0 = tl.load(CU_K + tl.program_id(2))
        hk64 = (tl.program_id(1) // tl.cdiv(group, heads_per_prog)).to(tl.int64)
        k_col = (hk64 * stride_kh).to(tl.int32)
        v_col = (hk64 * stride_vh).to(tl.int32)
    rank, n_blocks = _distinct_blocks(pairs)
    for u in range(0, n_blocks):
        j = _block_at(pairs, rank, u)
        rows_j = tl.sum((row_sel == j).to(tl.int32), 1) > 0  # the rows whose query selected block j
        for s0 in tl.static_range(0, SLC_BLOCK, SLC_TILE):  # a tile past the last query is fully masked
            kp = j * SLC_BLOCK + s0 + scols
            vis = rows_j[:, None] & (kp[None, :] <= pos[:, None])
            if USE_TMA:
                k_a, k_b, v = _tma_kv(KA_DESC, KB_DESC, V_DESC, row0 + j * SLC_BLOCK + s0, k_col, v_col, BLOCK_DA,
                                      BLOCK_DB)
                m, l, acc = _online_step(q_a, q_b, k_a, k_b, v, vis, m, l, acc, scale_log2, BLOCK_DB, PRECISION,
                                         SPLIT_SCORES, cap_scale=cap_scale, SOFTCAP=SOFTCAP)
            else:
                m, l, acc = _attend_tile(q_a, q_b, k_base, v_base, stride_kt, stride_vt, kp, kp <= last, vis, m, l,
                                         acc, scale_log2, DK, DV, BLOCK_DA, BLOCK_DB, BLOCK_DV, PRECISION,
                                         SPLIT_SCORES, cap_scale=cap_scale, SOFTCAP=SOFTCAP)
    if USE_TMA:
        rows_j = tl.sum((row_sel == last_blk).to(tl.int32), 1) > 0
        if tl.sum(rows_j.to(tl.int32)) > 0:
            for s0 in tl.static_range(0, SLC_BLOCK, SLC_TILE):
                kp = last_blk * SLC_BLOCK + s0 + scols
                m, l, acc = _attend_tile(q_a, q_b, k_base, v_base, stride_kt, stride_vt, kp, kp <= last,
                                         rows_j[:, None] & (kp[None, :] <= pos[:, None]), m, l, acc, scale_log2,
                                         DK, DV, BLOCK_DA, BLOCK_DB, BLOCK_DV, PRECISION, SPLIT_SCORES,
                                         cap_scale=cap_scale, SOFTCAP=SOFTCAP)
    _store_rows(O, LSE, t, heads, valid, m, l, acc, stride_ot, stride_oh, stride_lh, DV, BLOCK_DV, GATE, GATED,
                WRITE_O)


@triton.jit
def _nsa_selected_dq_kernel(Q, K, V, DO, LSE, DELTA, SEL, DQ, CU,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                            stride_st, stride_sh, stride_dqt, stride_dqh, stride_lh, group, heads_per_prog, scale_log2,
                            scale,
                            DK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                            BLOCK_DV: tl.constexpr, QB: tl.constexpr, ROWS: tl.constexpr, SLC_BLOCK: tl.constexpr,
                            SLC_TILE: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
                            PRECISION: tl.constexpr, SPLIT_SCORES: tl.constexpr, CU_K=None, QPOS=None,
                            HAS_QPOS: tl.constexpr = False, cap_scale=0.0, SOFTCAP: tl.constexpr = 0):
    """Selected branch, backward, dq from the selected blocks before each query's own one (the own block's part
    is already in DQ, from flash's backward), organised like the forward (a block of queries visits the union
    of its selections once): each (query, head) row is owned by one program and updated once, without
    atomics. LSE / DELTA are the rows' natural-log lse and delta, (Hq, total). ``HAS_QPOS``: the queries are a
    chunk of each sequence's tokens (see _query_block). ``SOFTCAP``: soft-capped scores (see _online_step)."""
    q0 = tl.program_id(0) * QB
    q_a, q_b, t, heads, pos, valid, row_sel, pairs, k_base, v_base, q_len, qoff = _query_block(
        Q, K, V, SEL, CU, q0, tl.program_id(1), tl.program_id(2), group, heads_per_prog, stride_qt, stride_qh,
        stride_kt, stride_kh, stride_vt, stride_vh, stride_st, stride_sh, DK, BLOCK_DA, BLOCK_DB, QB, ROWS, TOPK,
        TOPK_PAD, CU_K, QPOS, HAS_QPOS)
    if q0 >= q_len:
        return
    dv = tl.arange(0, BLOCK_DV)
    do = tl.load(DO + t[:, None] * stride_dot + heads[:, None] * stride_doh + dv[None, :],
                 mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
    lse2 = tl.load(LSE + heads * stride_lh + t, mask=valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + heads * stride_lh + t, mask=valid, other=0.0)
    own = pos // SLC_BLOCK
    scols = tl.arange(0, SLC_TILE)
    acc_a = tl.zeros([ROWS, BLOCK_DA], tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK_DB if BLOCK_DB > 0 else 1], tl.float32)  # unused without a second part
    # only blocks before a query's own one: a pair naming its query's own block is dropped (that part is done)
    p = tl.arange(0, QB * TOPK_PAD)
    earlier = tl.where(pairs != (qoff + q0 + p // TOPK_PAD) // SLC_BLOCK, pairs, -1)
    rank, n_blocks = _distinct_blocks(earlier)
    for u in range(0, n_blocks):
        j = _block_at(earlier, rank, u)
        # the rows whose query selected block j as an earlier block (every key precedes the query)
        rows_j = (tl.sum((row_sel == j).to(tl.int32), 1) > 0) & (j != own)
        for s0 in tl.static_range(0, SLC_BLOCK, SLC_TILE):
            kp = (j * SLC_BLOCK + s0 + scols).to(tl.int64)
            k_a, k_b = _load_split(k_base, kp * stride_kt, kp >= 0, DK, BLOCK_DA, BLOCK_DB, False)
            vt = tl.load(v_base + kp[None, :] * stride_vt + dv[:, None], mask=dv[:, None] < DV, other=0.0)
            if SPLIT_SCORES:  # as in _online_step: the products not chained, dS out of a branch
                s, t_cap = _scaled_scores(q_a, q_b, tl.trans(k_a), tl.trans(k_b), scale_log2, -lse2[:, None],
                                          BLOCK_DB, PRECISION, cap_scale, SOFTCAP)
                p_ = tl.where(rows_j[:, None], tl.exp2(s), 0.0)
                ds = _bwd_operands(p_, _softcap_grad(tl.dot(do, vt, input_precision=PRECISION) - delta[:, None],
                                                     t_cap, SOFTCAP), scale_log2 > 0, k_a.dtype)[1]
            else:
                t_cap = _softcapped(_dot_split(q_a, q_b, tl.trans(k_a), tl.trans(k_b),
                                               tl.zeros([ROWS, SLC_TILE], tl.float32), BLOCK_DB, PRECISION),
                                    cap_scale, SOFTCAP)
                p_ = tl.where(rows_j[:, None], tl.exp2(t_cap * scale_log2 - lse2[:, None]), 0.0)
                ds = (p_ * _softcap_grad(tl.dot(do, vt, input_precision=PRECISION) - delta[:, None], t_cap,
                                         SOFTCAP)).to(k_a.dtype)
            acc_a += tl.dot(ds, k_a, input_precision=PRECISION)
            if BLOCK_DB > 0:
                acc_b += tl.dot(ds, k_b, input_precision=PRECISION)
    # add to the own blocks' part already in DQ
    dq_rows = t * stride_dqt + heads * stride_dqh
    own_a, own_b = _load_split(DQ, dq_rows, valid, DK, BLOCK_DA, BLOCK_DB, False)
    _store_split(DQ, dq_rows, valid, own_a.to(tl.float32) + acc_a * scale, own_b.to(tl.float32) + acc_b * scale, DK,
                 BLOCK_DA, BLOCK_DB)


# Tiles of the selected branch's kernels: QB consecutive queries per program, the rows of a tile their GQA group's
# heads (ROWS = QB x heads, padded). More queries per program load a block that several of them select once for
# all, but multiply every block any of them selects by all the tile's rows: on the H100 at 64k with random inputs
# (unrelated selections) 1 query of a group of 16 per program beat 4 (forward 28.3 ms against 37.9, fwd+bwd 92.7
# against 115.2); in trained models neighbouring queries select mostly the same blocks (the benchmark's smooth
# inputs: 32 distinct blocks among four neighbours' 64 selections on average, 45 on random inputs, at 8k). So the
# number of queries is autotuned on the call's own selection: the base fills a 16-row tile within 128 (query,
# slot) pairs (64 rows under the interpreter, whose cost is per program), on a GPU also twice and four times as
# many queries (up to 64 rows). With them the warps and pipeline stages: for the base two programs of 4 warps
# share an SM (by shared memory: two K/V tiles in flight each), or of 8 warps (half the registers per thread), or
# one program keeps three tiles in flight. Four queries of a group of 16 at three stages hold 147 KB (4 warps) or
# 156 KB (8) of shared memory, one program per SM (the launch the H100 timed them with, smooth inputs: 31.2 ms
# against one query's 28.1); at two stages 107 / 115 KB, and two programs of 4 warps fit on an SM (each waits for
# its next block's tiles every iteration, issued as the current one's products are: the other program computes
# meanwhile): the larger numbers of queries try two stages first. At head dim 192 with groups of 16 none
# spills inside its loop on sm_90 but dq with 4 queries on 4 warps (tests/cuda_compile.py --resources). Tiles of
# 64 rows on 8 warps split their score products between the warpgroups (SPLIT_SCORES, see _online_step; both
# warpgroups computed all of them). The forward also tries a tile per query for 2 and 4 queries of 16 heads or more
# (PER_QUERY: each block loaded once, multiplied only by the 16-row tiles of the queries that selected it, where the
# shared tile multiplies it by all rows: half its rows on the smooth inputs above). Its products sit in branches,
# which Triton's pipeliner does not follow: with 4 queries its loads are not multi-buffered (67 KB of shared memory
# and 255 registers leave two programs per SM to hide each other's loads); with 2 the first query's product runs on
# every block so that they are (90 KB, 255 registers, two programs per SM). float32 takes the first candidate.
SELECTED_ROWS = 16
SELECTED_PAIRS = 128  # at most QB * n (query, slot) pairs per program, each a candidate block
SELECTED_LAUNCHES = ((4, 3), (8, 3), (4, 4), (8, 4))  # (warps, stages) of the base number of queries
WIDE_LAUNCHES = ((4, 2), (8, 2), (4, 3), (8, 3))  # of two and four times as many
PER_QUERY_LAUNCHES = ((4, 3),)  # of those with a tile per query


def selected_queries(heads: int, top_pad: int) -> list:
    """The numbers of queries per program the selected branch's kernels may take with ``heads`` heads per program
    and ``top_pad`` selection slots per query (padded), the base first."""
    cap = 64 if small_tiles() else SELECTED_ROWS
    base = max(1, min(cap // triton.next_power_of_2(heads), SELECTED_PAIRS // top_pad))
    if small_tiles():
        return [base]
    return [qb for qb in (base, 2 * base, 4 * base)
            if qb == base or (qb * top_pad <= SELECTED_PAIRS and triton.next_power_of_2(qb * heads) <= 64)]


def selected_rows(queries: int, heads: int) -> int:
    """Rows of a selected-branch tile for ``queries`` queries of ``heads`` heads: 16 at least (matmul tiles)."""
    return max(16, triton.next_power_of_2(queries * heads))


def selected_configs(heads: int, top_pad: int, precision: str, per_query: bool = False, tma: bool = False) -> list:
    """The selected branch's autotune candidates: each number of queries per program with its launches
    (SELECTED_LAUNCHES for the base, WIDE_LAUNCHES for the larger ones), and with ``per_query`` (the forward) the
    larger ones of at least 16 heads also a tile per query (PER_QUERY, PER_QUERY_LAUNCHES); float32 (``"ieee"``)
    only the first. With ``tma`` (the forward, given K/V's row descriptors) each shared-tile candidate also loading
    its blocks by TMA (USE_TMA), those first: as compiled for sm_90, one query of 16 heads on 4 warps issues 516
    instructions a thread per block with pointer loads, about 200 of them addresses and masks. Not yet timed."""
    configs = [triton.Config({"QB": qb, "ROWS": selected_rows(qb, heads),
                              "SPLIT_SCORES": w == 8 and selected_rows(qb, heads) >= 64}, num_warps=w, num_stages=s)
               for i, qb in enumerate(selected_queries(heads, top_pad))
               for w, s in (SELECTED_LAUNCHES if i == 0 else WIDE_LAUNCHES)]
    if tma and precision != "ieee":
        configs = [triton.Config(dict(c.kwargs, USE_TMA=True), num_warps=c.num_warps, num_stages=c.num_stages)
                   for c in configs] + configs
    if per_query and heads >= 16:
        configs += [triton.Config({"QB": qb, "ROWS": selected_rows(qb, heads), "SPLIT_SCORES": False,
                                   "PER_QUERY": True}, num_warps=w, num_stages=s)
                    for qb in selected_queries(heads, top_pad)[1:] for w, s in PER_QUERY_LAUNCHES]
    return configs[:1] if precision == "ieee" else configs


def _tune_selected(kernel, per_query: bool, **options):
    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}
        keep = selected_configs(a["heads_per_prog"], a["TOPK_PAD"], a["PRECISION"], per_query, a.get("HAS_TMA", False))
        return keep if autotune_enabled() else keep[:1]

    key = ["DK", "DV", "SLC_BLOCK", "SLC_TILE", "TOPK_PAD", "PRECISION", "group", "heads_per_prog", "SOFTCAP"]
    if "HAS_TMA" in kernel.arg_names:  # (the forward)
        key.append("HAS_TMA")
    return autotune(selected_configs(16, 16, "tf32", per_query), key, prune, **options)(kernel)


# (the gated sum may write over O_CMP, which it reads: OUT is O_CMP's storage then, restored after each timed tile)
_nsa_selected_fwd_tuned = _tune_selected(_nsa_selected_fwd_kernel, True, restore_value=["OUT"])
_nsa_selected_dq_tuned = _tune_selected(_nsa_selected_dq_kernel, False, restore_value=["DQ"])  # it adds to DQ


@triton.jit
def _cache_row(ROWS, b, HAS_ROWS: tl.constexpr):
    """The cache row (int64) query row b reads: ROWS[b] (several query rows of one sequence) or b itself."""
    row = b.to(tl.int64)
    if HAS_ROWS:
        row = tl.load(ROWS + b).to(tl.int64)
    return row


@triton.jit
def _kv_bases(K, V, BT, cb, off, hk64, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_btb,
              PAGE: tl.constexpr):
    """Where cache row ``cb``'s keys and values of KV head hk64 start (token 0 at row ``off``), and its block-table
    row; PAGE > 0 (a paged cache: K/V (pages, PAGE, Hkv, D), token j at slot j % PAGE of page BT[cb, j // PAGE]):
    the KV head's place in page 0, the pages added per token (see _load_kv)."""
    if PAGE == 0:
        return (K + cb * stride_kb + off * stride_kt + hk64 * stride_kh,
                V + cb * stride_vb + off * stride_vt + hk64 * stride_vh, BT)
    return K + hk64 * stride_kh, V + hk64 * stride_vh, BT + cb * stride_btb


@triton.jit
def _nsa_decode_kernel(Q, K, V, KC, VC, GATES, W, OUT, SEL, SEQ, OFF, ROWS, BT, SINKS,
                       stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                       stride_cb, stride_ct, stride_ch, stride_db, stride_dt, stride_dh,
                       stride_g3, stride_gb, stride_ob, stride_oh, stride_sb, stride_sh, stride_btb,
                       group, scale_log2, kv_scale_log2, kv_cap_scale, v_scale, last_page,
                       DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, CMP_STRIDE: tl.constexpr,
                       CMP_BLOCK: tl.constexpr, SLC_BLOCK: tl.constexpr, SLC_TILE: tl.constexpr, NW: tl.constexpr,
                       TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
                       C: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
                       PAGE: tl.constexpr = 0, HAS_SINKS: tl.constexpr = False, cap_scale=0.0,
                       SOFTCAP: tl.constexpr = 0, WIDEN_ASM: tl.constexpr = False):
    """One decoding token (query row b) against its sequence's cache, for the query heads of KV head hk (fused
    path). HAS_SINKS: attention sinks SINKS (Hq,) float32, a logit per head in each branch's softmax. SOFTCAP:
    every branch's scores soft-capped (flash's _softcapped; scale_log2 then holds cap * log2(e)). K/V may be
    float8 (a quantised cache; the compressed keys in q's dtype), widened as they are read (WIDEN_ASM: see flash's
    _widen): the selected and window branches take their scores' scales kv_scale_log2 / kv_cap_scale (the keys'
    dequantisation scale folded in) and the values' scale v_scale.

    The token sits at position t = SEQ[b] - 1 (tokens live at rows OFF[b] .. OFF[b] + SEQ[b] - 1 of K/V, in
    cache row ROWS[b], or b; PAGE > 0: in the pages of that row of the block table BT, see _kv_bases).
    The group's heads are the rows of every tile; the phases run back to back in one program:
    1. compressed attention over the sequence's complete compressed blocks (all visible to t): o_cmp, lse;
    2. selection scores (Eq. 9/10, summed over the group) C blocks at a time, folded into a running top-n;
    3. attention over the n selected blocks (keys up to t), 4. over the window, then the gated sum.
    Reads the compressed keys (about 2.25 times), n blocks and the window.
    """
    b = tl.program_id(0)
    hk = tl.program_id(1)
    n = tl.load(SEQ + b)
    off = tl.load(OFF + b).to(tl.int64)
    b64 = b.to(tl.int64)
    cb = _cache_row(ROWS, b, HAS_ROWS)
    hk64 = hk.to(tl.int64)
    q, heads, in_g = _decode_query(Q, stride_qb, stride_qh, b64, hk, group, DK, BLOCK_DK, BLOCK_G)
    gate_ptr = GATES + b64 * stride_gb + heads
    kc_base = KC + cb * stride_cb + hk64 * stride_ch
    n_cmp = tl.where(n >= CMP_BLOCK, (n - CMP_BLOCK) // CMP_STRIDE + 1, 0)
    m, l, acc = _attend_range(q, kc_base, VC + cb * stride_db + hk64 * stride_dh, stride_ct, stride_dt, 0, n_cmp,
                              scale_log2, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_G, BLOCK_N, PRECISION,
                              cap_scale=cap_scale, SOFTCAP=SOFTCAP)
    has = l > 0
    lse2 = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("inf"))
    g = tl.load(gate_ptr, mask=in_g, other=0.0).to(tl.float32)
    sink = g * 0
    if HAS_SINKS:
        sink = tl.load(SINKS + heads, mask=in_g, other=0.0)
        g = g * _sink_scale(m, l, sink)
    out = g[:, None] * (acc / tl.where(has, l, 1.0)[:, None])
    own = (n - 1) // SLC_BLOCK
    best = _score_topk(q, in_g, lse2, kc_base, stride_ct, W, n_cmp, own, 0, own + 1, scale_log2, DK, BLOCK_DK,
                       CMP_STRIDE, SLC_BLOCK, NW, TOPK, TOPK_PAD, INIT, LOCAL, C, PRECISION,
                       cap_scale=cap_scale, SOFTCAP=SOFTCAP)
    blk = topk_indices(best, TOPK)  # (1, TOPK_PAD), best first, -1 padded
    tcols = tl.arange(0, TOPK_PAD)
    tl.store(SEL + b64 * stride_sb + hk64 * stride_sh + tcols[None, :], blk, mask=tcols[None, :] < TOPK)
    k_base, v_base, bt = _kv_bases(K, V, BT, cb, off, hk64, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                   stride_vh, stride_btb, PAGE)
    out = _slc_swa_gated(q, blk, n, k_base, v_base, stride_kt, stride_vt, gate_ptr, stride_g3, in_g, out,
                         kv_scale_log2, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_G, BLOCK_N, SLC_BLOCK, SLC_TILE, TOPK,
                         TOPK_PAD, WINDOW, PRECISION, bt, last_page, stride_kb, stride_vb, PAGE, sink, HAS_SINKS,
                         cap_scale=kv_cap_scale, SOFTCAP=SOFTCAP, WIDEN_ASM=WIDEN_ASM, v_scale=v_scale)
    dv = tl.arange(0, BLOCK_DV)
    tl.store(OUT + b64 * stride_ob + heads[:, None] * stride_oh + dv[None, :], out.to(OUT.dtype.element_ty),
             mask=in_g[:, None] & (dv[None, :] < DV))


@triton.jit
def _nsa_decode_cmp_split_kernel(Q, KC, VC, OP, LP, SEQ, ROWS,
                                 stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_db, stride_dt,
                                 stride_dh, stride_ps, stride_pb, stride_ph, stride_ls, stride_lh,
                                 group, per_split, scale_log2,
                                 DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                                 BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, CMP_STRIDE: tl.constexpr,
                                 CMP_BLOCK: tl.constexpr, PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
                                 cap_scale=0.0, SOFTCAP: tl.constexpr = 0):
    """Split-KV path, step 1: compressed attention of the token over compressed blocks
    [split * per_split, (split + 1) * per_split): partial output OP (S, B, Hq, DV) fp32 and base-2 lse LP (S, Hq,
    B) (-inf for an empty split), merged by the later steps (the scores' lse, the combined output). SOFTCAP:
    soft-capped scores, here and in the next steps."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    n = tl.load(SEQ + b)
    b64 = b.to(tl.int64)
    cb = _cache_row(ROWS, b, HAS_ROWS)
    hk64 = hk.to(tl.int64)
    q, heads, in_g = _decode_query(Q, stride_qb, stride_qh, b64, hk, group, DK, BLOCK_DK, BLOCK_G)
    n_cmp = tl.where(n >= CMP_BLOCK, (n - CMP_BLOCK) // CMP_STRIDE + 1, 0)
    lo = sp * per_split
    m, l, acc = _attend_range(q, KC + cb * stride_cb + hk64 * stride_ch, VC + cb * stride_db + hk64 * stride_dh,
                              stride_ct, stride_dt, lo, tl.minimum(lo + per_split, n_cmp), scale_log2, DK, DV,
                              BLOCK_DK, BLOCK_DV, BLOCK_G, BLOCK_N, PRECISION, cap_scale=cap_scale, SOFTCAP=SOFTCAP)
    has = l > 0
    lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
    dv = tl.arange(0, BLOCK_DV)
    sp64 = sp.to(tl.int64)
    tl.store(OP + sp64 * stride_ps + b64 * stride_pb + heads[:, None] * stride_ph + dv[None, :],
             acc / tl.where(has, l, 1.0)[:, None], mask=in_g[:, None] & (dv[None, :] < DV))
    tl.store(LP + sp64 * stride_ls + heads * stride_lh + b64, lse, mask=in_g)


@triton.jit
def _nsa_decode_score_split_kernel(Q, KC, LP, W, CAND, SEQ, ROWS,
                                   stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_ls, stride_lh,
                                   stride_xb, stride_xh, stride_xs,
                                   group, per_split, n_cmp_split, scale_log2,
                                   DK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_G: tl.constexpr,
                                   CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr, SLC_BLOCK: tl.constexpr,
                                   NW: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, INIT: tl.constexpr,
                                   LOCAL: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr,
                                   HAS_ROWS: tl.constexpr, cap_scale=0.0, SOFTCAP: tl.constexpr = 0):
    """Split-KV path, step 2: the top-n keys among selection blocks [split * per_split, (split + 1) *
    per_split), from the compressed lse merged from step 1's ``n_cmp_split`` partial ones LP (S, Hq, B) (base 2):
    CAND (B, Hkv, S, TOPK_PAD) int64."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    n = tl.load(SEQ + b)
    b64 = b.to(tl.int64)
    q, heads, in_g = _decode_query(Q, stride_qb, stride_qh, b64, hk, group, DK, BLOCK_DK, BLOCK_G)
    lp = LP + heads * stride_lh + b64
    ls = stride_ls.to(tl.int64)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for p in range(0, n_cmp_split):
        m = tl.maximum(m, tl.load(lp + p * ls, mask=in_g, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_G], tl.float32)
    for p in range(0, n_cmp_split):
        l += tl.exp2(tl.load(lp + p * ls, mask=in_g, other=float("-inf")) - m_safe)
    lse2 = tl.where(l > 0, m_safe + tl.log2(tl.where(l > 0, l, 1.0)), float("inf"))  # +inf: no block, p = 0
    n_cmp = tl.where(n >= CMP_BLOCK, (n - CMP_BLOCK) // CMP_STRIDE + 1, 0)
    own = (n - 1) // SLC_BLOCK
    lo = sp * per_split
    best = _score_topk(q, in_g, lse2, KC + _cache_row(ROWS, b, HAS_ROWS) * stride_cb + hk.to(tl.int64) * stride_ch,
                       stride_ct, W, n_cmp, own,
                       lo, tl.minimum(lo + per_split, own + 1), scale_log2, DK, BLOCK_DK, CMP_STRIDE, SLC_BLOCK, NW,
                       TOPK, TOPK_PAD, INIT, LOCAL, C, PRECISION, cap_scale=cap_scale, SOFTCAP=SOFTCAP)
    tcols = tl.arange(0, TOPK_PAD)
    tl.store(CAND + b64 * stride_xb + hk.to(tl.int64) * stride_xh + sp.to(tl.int64) * stride_xs + tcols[None, :],
             best)


@triton.jit
def _nsa_decode_piece_kernel(Q, K, V, CAND, OP, LP, SEL, SEQ, OFF, ROWS, BT,
                             stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                             stride_xb, stride_xh, stride_ps, stride_pb, stride_ph, stride_ls, stride_lh,
                             stride_sb, stride_sh, stride_btb,
                             group, n_split, scale_log2, v_scale, last_page,
                             DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SLC_BLOCK: tl.constexpr,
                             TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, CAND_PAD: tl.constexpr,
                             WINDOW: tl.constexpr, WINDOW_PIECE: tl.constexpr, PRECISION: tl.constexpr,
                             HAS_ROWS: tl.constexpr, PAGE: tl.constexpr = 0, cap_scale=0.0,
                             SOFTCAP: tl.constexpr = 0, WIDEN_ASM: tl.constexpr = False):
    """Split-KV path, step 3: one piece of the selected and window branches for the group's heads (PAGE > 0:
    keys in a paged cache, see _kv_bases; a float8 cache widened as it is read, see _nsa_decode_kernel: its keys'
    scale in scale_log2 or cap_scale, its values' v_scale). Pieces
    0 .. TOPK-1 take the final top-n of the splits' candidates (piece 0 stores it) and attend to the selected block
    of their rank (keys up to the token); pieces TOPK .. attend to one WINDOW_PIECE-key part of the window. Partial
    output OP (P, B, Hq, DV) fp32 and base-2 lse LP (P, Hq, B) (-inf and zeros when empty)."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    piece = tl.program_id(2)
    n = tl.load(SEQ + b)
    off = tl.load(OFF + b).to(tl.int64)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q, heads, in_g = _decode_query(Q, stride_qb, stride_qh, b64, hk, group, DK, BLOCK_DK, BLOCK_G)
    if piece < TOPK:
        # each selected piece folds the splits' candidates itself (at most 64 x TOPK_PAD keys, a few microseconds,
        # all pieces in parallel) rather than waiting for one more launch that would store the final top-n
        xc = tl.arange(0, CAND_PAD)
        cand = tl.load(CAND + b64 * stride_xb + hk64 * stride_xh + xc[None, :],
                       mask=xc[None, :] < n_split * TOPK_PAD, other=-9223372036854775807 - 1)
        blk = topk_indices(fold_topk(topk_init(1, TOPK_PAD), cand, TOPK), TOPK)  # (1, TOPK_PAD), best first
        tcols = tl.arange(0, TOPK_PAD)
        if piece == 0:
            tl.store(SEL + b64 * stride_sb + hk64 * stride_sh + tcols[None, :], blk, mask=tcols[None, :] < TOPK)
        j = tl.sum(tl.where(tcols[None, :] == piece, blk, 0))
        lo = tl.where(j >= 0, j * SLC_BLOCK, n)
        hi = tl.minimum(lo + SLC_BLOCK, n)
    else:
        lo = tl.maximum(n - WINDOW, 0) + (piece - TOPK) * WINDOW_PIECE
        hi = tl.minimum(lo + WINDOW_PIECE, n)
    cb = _cache_row(ROWS, b, HAS_ROWS)
    k_base, v_base, bt = _kv_bases(K, V, BT, cb, off, hk64, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                   stride_vh, stride_btb, PAGE)
    m, l, acc = _attend_range(q, k_base, v_base, stride_kt, stride_vt, lo, hi, scale_log2, DK, DV, BLOCK_DK, BLOCK_DV,
                              BLOCK_G, BLOCK_N, PRECISION, bt, last_page, stride_kb, stride_vb, PAGE,
                              cap_scale=cap_scale, SOFTCAP=SOFTCAP, WIDEN_ASM=WIDEN_ASM)
    has = l > 0
    dv = tl.arange(0, BLOCK_DV)
    p64 = piece.to(tl.int64)
    tl.store(OP + p64 * stride_ps + b64 * stride_pb + heads[:, None] * stride_ph + dv[None, :],
             acc / (tl.where(has, l, 1.0) / v_scale)[:, None], mask=in_g[:, None] & (dv[None, :] < DV))
    tl.store(LP + p64 * stride_ls + heads * stride_lh + b64, tl.where(has, m + tl.log2(tl.where(has, l, 1.0)),
                                                                     float("-inf")), mask=in_g)


@triton.jit
def _merge_pieces(OP, LP, b64, heads, in_g, lo, hi, stride_ps, stride_pb, stride_ph, stride_ls, stride_lh,
                  DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr, sink, HAS_SINKS: tl.constexpr):
    """The normalised merge (by their base-2 lse) of the partial outputs of pieces [lo, hi): (BLOCK_G, BLOCK_DV);
    HAS_SINKS: scaled by what the rows' attention sinks ``sink`` leave of it."""
    dv = tl.arange(0, BLOCK_DV)
    lp = LP + heads * stride_lh + b64
    op = OP + b64 * stride_pb + heads[:, None] * stride_ph + dv[None, :]
    ps, ls = stride_ps.to(tl.int64), stride_ls.to(tl.int64)  # piece index * stride in 64 bits
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for p in range(lo, hi):
        m = tl.maximum(m, tl.load(lp + p * ls, mask=in_g, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for p in range(lo, hi):
        w = tl.exp2(tl.load(lp + p * ls, mask=in_g, other=float("-inf")) - m_safe)
        part = tl.load(op + p * ps, mask=(in_g & (w > 0))[:, None] & (dv[None, :] < DV), other=0.0)
        l += w
        acc += w[:, None] * part
    acc = acc / tl.where(l > 0, l, 1.0)[:, None]
    if HAS_SINKS:
        acc = acc * _sink_scale(m_safe, l, sink)[:, None]
    return acc


@triton.jit
def _nsa_decode_combine_kernel(OC, LC, OP, LP, GATES, OUT, SINKS,
                               stride_cs, stride_cb, stride_ch, stride_lcs, stride_lch,
                               stride_ps, stride_pb, stride_ph, stride_ls, stride_lh,
                               stride_g3, stride_gb, stride_ob, stride_oh,
                               Hq, n_cmp_split, n_pieces,
                               DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_H: tl.constexpr, TOPK: tl.constexpr,
                               HAS_SINKS: tl.constexpr = False):
    """Split-KV path, step 4: for BLOCK_H heads of sequence b, the gated sum of the compressed branch (merged from
    step 1's partial outputs OC and base-2 lse LC) and the selected and window branches (each merged from its
    pieces OP / LP); HAS_SINKS: attention sinks SINKS (Hq,) float32 in each branch's softmax."""
    b64 = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = heads < Hq
    heads = heads.to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    gate_ptr = GATES + b64 * stride_gb + heads
    g3 = stride_g3.to(tl.int64)
    sink = tl.zeros([BLOCK_H], tl.float32)
    if HAS_SINKS:
        sink = tl.load(SINKS + heads, mask=in_h, other=0.0)
    out = tl.load(gate_ptr, mask=in_h, other=0.0).to(tl.float32)[:, None] * \
        _merge_pieces(OC, LC, b64, heads, in_h, 0, n_cmp_split, stride_cs, stride_cb, stride_ch, stride_lcs,
                      stride_lch, DV, BLOCK_H, BLOCK_DV, sink, HAS_SINKS)
    out += tl.load(gate_ptr + g3, mask=in_h, other=0.0).to(tl.float32)[:, None] * \
        _merge_pieces(OP, LP, b64, heads, in_h, 0, TOPK, stride_ps, stride_pb, stride_ph, stride_ls, stride_lh, DV,
                      BLOCK_H, BLOCK_DV, sink, HAS_SINKS)
    out += tl.load(gate_ptr + 2 * g3, mask=in_h, other=0.0).to(tl.float32)[:, None] * \
        _merge_pieces(OP, LP, b64, heads, in_h, TOPK, n_pieces, stride_ps, stride_pb, stride_ph, stride_ls,
                      stride_lh, DV, BLOCK_H, BLOCK_DV, sink, HAS_SINKS)
    tl.store(OUT + b64 * stride_ob + heads[:, None] * stride_oh + dv[None, :], out.to(OUT.dtype.element_ty),
             mask=in_h[:, None] & (dv[None, :] < DV))
