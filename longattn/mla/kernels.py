"""MLA's Triton kernel: absorbed-form decoding over a (paged) latent cache, split-KV.

One program takes one sequence, a group of BLOCK_H query heads times its S query tokens (all rows share
the cache: MQA) and one split of the context; it streams the split's tokens once, 576 values each (the
512-d latent, which is both key part and value, and the 64-d rotary key), and writes its normalised
partial output with its lse; the lse merge then combines the splits. A float8 cache (values ``cache * scale``)
is widened to q's dtype as it is read, its scale applied to the scores (``qk_scale``) and the output
(``out_scale``).

On a GPU the launch goes through ``_mla_decode_tuned``, which picks the token tile, pipeline depth and how
tiles are loaded (per-thread masked loads, or on Hopper bulk TMA copies through the cache's descriptors, see
``kernels.utils.row_descriptors``) per (dtype, rows, page size) by timing the candidates
(``LONGATTN_AUTOTUNE=0``: the first that fits).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.flash import RESCALE_LOG2, _rescale_to, _widen
from ..kernels.utils import autotune, autotune_enabled


@triton.jit
def _load_tile(KV, tile, n0, hi, stride_kvp, stride_kvt, dtype: tl.constexpr, RANK: tl.constexpr,
               BLOCK_RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_ROPE: tl.constexpr, PAGE: tl.constexpr,
               HAS_BT: tl.constexpr, BLOCK_N: tl.constexpr, WIDEN_ASM: tl.constexpr):
    """The latent (BLOCK_N, BLOCK_RANK) and rotary keys (BLOCK_N, BLOCK_ROPE) of tokens n0 .. n0 + BLOCK_N of
    page (HAS_BT) or sequence ``tile``, zeros from ``hi`` on, in ``dtype`` (a float8 cache is widened exactly, see
    _widen: its scale is in the kernel's qk_scale and out_scale)."""
    n = n0 + tl.arange(0, BLOCK_N)
    in_n = n < hi
    tok = tile * stride_kvp + ((n % PAGE) if HAS_BT else n).to(tl.int64) * stride_kvt
    offs_r = tl.arange(0, BLOCK_RANK)
    offs_e = tl.arange(0, BLOCK_ROPE)
    c = tl.load(KV + tok[:, None] + offs_r[None, :], mask=in_n[:, None] & (offs_r[None, :] < RANK), other=0.0)
    kr = tl.load(KV + tok[:, None] + RANK + offs_e[None, :], mask=in_n[:, None] & (offs_e[None, :] < ROPE), other=0.0)
    return _widen(c, dtype, WIDEN_ASM), _widen(kr, dtype, WIDEN_ASM)


@triton.jit
def _attend_tile(ql, qr, c, kr, n0, hi, pos, m_i, l_i, acc, qk_scale, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                 SHARED_P: tl.constexpr, LAZY_RESCALE: tl.constexpr):
    """One online-softmax step of the rows (latent and rotary queries ``ql``, ``qr`` at positions ``pos``) over
    the tokens n0 .. n0 + BLOCK_N (latent ``c``, rotary keys ``kr``), those from ``hi`` on masked."""
    n = n0 + tl.arange(0, BLOCK_N)
    # the scores unscaled: the scale (> 0) goes into the row max and into the exponential's fused multiply-add
    if SHARED_P:  # two products, not a chain (see below): added by a multiply-add, which Triton does not chain
        s = tl.fma(tl.dot(qr, tl.trans(kr), input_precision=PRECISION), 1.0,
                   tl.dot(ql, tl.trans(c), input_precision=PRECISION))
    else:
        s = tl.dot(ql, tl.trans(c), input_precision=PRECISION)
        s = tl.dot(qr, tl.trans(kr), s, input_precision=PRECISION)  # one accumulation chain
    s = tl.where((n[None, :] < hi) & (n[None, :] <= pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if LAZY_RESCALE:
        # the rows' reference max m_i moves (the accumulator and sum rescaled to it: 128 multiplies a thread at 64
        # rows x 512 on 8 warps) only when some row's max grew past it by more than 2^RESCALE_LOG2, rarely after
        # the first tiles; otherwise that row's probabilities may reach 2^RESCALE_LOG2 (the output acc / l and the
        # lse m_i + log2 l all the same). The condition comes out of a branch, as p does below: else the branch's
        # results would reach p.V
        grow = (m_new > m_i + RESCALE_LOG2).to(tl.int32)  # (m_i -inf: any key seen grew it)
        if qk_scale > 0:
            rescale = tl.max(grow, 0) > 0
        else:
            rescale = tl.max(grow, 0) > 0
        if rescale:
            m_i, l_i, acc = _rescale_to(m_i, m_new, l_i, acc)
        m_new = m_i
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(tl.fma(s, qk_scale, -m_use[:, None]))
    if SHARED_P:
        # Triton lays a product whose result reaches another product (here p.V, and the rescaled accumulator
        # of p.V) on all warps along its rows: with 64 rows on 8 warps both warpgroups compute all of q.k
        # (and all of a chained product before it). Its analysis does not follow values out of a branch: p
        # and alpha leave one (both sides compute the same, so the condition does not matter), the score
        # tile is then split between the warpgroups by keys and p reaches both through shared memory.
        if qk_scale > 0:
            pp = p.to(c.dtype)
            alpha = tl.math.exp2(m_i - m_use)
        else:
            pp = p.to(c.dtype)
            alpha = tl.math.exp2(m_i - m_use)
    else:
        pp = p.to(c.dtype)
        alpha = tl.math.exp2(m_i - m_use)
    if LAZY_RESCALE:  # (rescaled above, if at all)
        l_i += tl.sum(p, 1)
        acc = acc + tl.dot(pp, c, input_precision=PRECISION)
    else:
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(pp, c, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _mla_decode_kernel(QL, QR, KV, C_DESC, R_DESC, BT, SEQLENS, OS, LS,
                       stride_qlb, stride_qls, stride_qlh, stride_qrb, stride_qrs, stride_qrh,
                       stride_kvp, stride_kvt, stride_btb,
                       stride_op, stride_ot, stride_oh, stride_lp, stride_lh,
                       H, S, capacity, last_page, tokens_per_split, qk_scale, out_scale,
                       RANK: tl.constexpr, BLOCK_RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_ROPE: tl.constexpr,
                       PAGE: tl.constexpr,
                       HAS_BT: tl.constexpr, BLOCK_H: tl.constexpr, S_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr, SHARED_P: tl.constexpr = False, WIDEN_ASM: tl.constexpr = False,
                       HAS_TMA: tl.constexpr = False, USE_TMA: tl.constexpr = False,
                       LAZY_RESCALE: tl.constexpr = False):
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
    # lengths within [S, capacity] and pages within the cache whatever the inputs hold (the host checks them,
    # unless told not to): no read outside the cache
    seqlen = tl.minimum(tl.maximum(tl.load(SEQLENS + b), S), capacity)
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
    # a tile lies in one page (BLOCK_N divides PAGE, tiles start at multiples of BLOCK_N). The page of the next
    # tile is read one iteration ahead: the cache loads then depend on no load of their own iteration, and the
    # compiler can keep num_stages tiles in flight (it keeps two when a tile's address waits on its page)
    bt_row = BT + b64 * stride_btb
    page = (lo * 0).to(tl.int64)
    if HAS_BT:
        page = tl.minimum(tl.maximum(tl.load(bt_row + lo // PAGE), 0), last_page).to(tl.int64)
    # USE_TMA: the tiles wholly before hi come by TMA, one bulk copy per tile into shared memory instead of a
    # few hundred address and mask instructions per thread (the cache seen as one matrix of token rows: page p's
    # token t at row p * PAGE + t, or sequence b's at b * capacity + t); the last, partial, tile through masked
    # loads (a bulk copy would bring in rows past the sequence, which may hold NaN: p = 0 does not cancel it)
    tl.static_assert(HAS_TMA or not USE_TMA, "USE_TMA needs the cache's descriptors")
    hi_bulk = lo + (hi - lo) // BLOCK_N * BLOCK_N if USE_TMA else hi
    for n0 in range(lo, hi_bulk, BLOCK_N):
        tile = page if HAS_BT else b64  # this tile's page (or sequence)
        if HAS_BT:
            page = tl.minimum(tl.maximum(tl.load(bt_row + tl.minimum(n0 + BLOCK_N, hi - 1) // PAGE), 0),
                              last_page).to(tl.int64)
        if USE_TMA:
            row = (tile * PAGE + n0 % PAGE if HAS_BT else tile * capacity + n0).to(tl.int32)
            c = _widen(C_DESC.load([row, 0]), ql.dtype, WIDEN_ASM)
            kr = _widen(R_DESC.load([row, RANK]), qr.dtype, WIDEN_ASM)
        else:
            c, kr = _load_tile(KV, tile, n0, hi, stride_kvp, stride_kvt, ql.dtype, RANK, BLOCK_RANK, ROPE, BLOCK_ROPE,
                               PAGE, HAS_BT, BLOCK_N, WIDEN_ASM)
        m_i, l_i, acc = _attend_tile(ql, qr, c, kr, n0, hi, pos, m_i, l_i, acc, qk_scale, BLOCK_N, PRECISION, SHARED_P,
                                      LAZY_RESCALE)
    if USE_TMA:
        if hi_bulk < hi:
            c, kr = _load_tile(KV, page if HAS_BT else b64, hi_bulk, hi, stride_kvp, stride_kvt, ql.dtype, RANK,
                               BLOCK_RANK, ROPE, BLOCK_ROPE, PAGE, HAS_BT, BLOCK_N, WIDEN_ASM)
            m_i, l_i, acc = _attend_tile(ql, qr, c, kr, hi_bulk, hi, pos, m_i, l_i, acc, qk_scale, BLOCK_N, PRECISION,
                                         SHARED_P, LAZY_RESCALE)
    empty = l_i == 0.0
    out = acc * (out_scale / tl.where(empty, 1.0, l_i))[:, None]
    tl.store(OS + split.to(tl.int64) * stride_op + row_out[:, None] * stride_ot + head64[:, None] * stride_oh
             + offs_r[None, :], out.to(OS.dtype.element_ty), mask=valid[:, None] & in_r[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(l_ptr, lse, mask=valid)


SMEM_LIMIT = 227 * 1024
# 16-bit candidates (rows = heads x query tokens, up to 64): beside q (64 x 576), 64-token tiles fit 2
# buffers, 32- and 16-token tiles 3 to 6 (more loads in flight). 64 rows run on 8 warps with the scores split
# between the warpgroups (SHARED_P; without it both warpgroups compute all of them and the 64-token tile spilled
# 352 bytes per thread on sm_90: on the H100 it lost to its SHARED_P twin at 1 and 4 query tokens, 2026-11-27,
# and its variants were dropped). First: the H100's pick at batch 64, context 8k, 1 and 4 tokens
# (bench/results/nvidia-h100), what runs without autotuning. 64 rows on 16 warps (four warpgroups, 32-token tiles:
# one's softmax could overlap another's products) lost on the H100 by 1.09-1.57x at every key of the fifth run
# (batch 1 and 64, 1 and 4 tokens, bf16 and float8 caches, 2026-11-27 18:30) and were dropped.
# Triton's own warp specialisation (tl.range(..., warp_specialize=True), on Hopper since 3.5, with tensor
# descriptors) does not reach this loop: as compiled for sm_90 on 3.6 and 3.9 it leaves 8-warp programs as they are,
# and a 4-warp program of 64 rows x 576 (a producer warpgroup added) needs 352 KB of shared memory and spills.
# A float8 cache's tiles take half the room, but each is also widened into a 16-bit tile for the tensor cores, and
# Triton buffers num_stages - 1 of them ahead (as compiled for sm_90: 64-token tiles at 2 stages, none ahead): its
# 64-token tiles also go at 3 stages (one ahead, 217 KB), which 16-bit caches do not fit.
_TILES = ((64, 8, 2, True), (64, 8, 3, True), (32, 8, 3, True), (32, 8, 4, True), (16, 8, 6, True),
          (64, 4, 2, False), (32, 4, 4, False), (16, 4, 4, False))
# The 8-warp tiles are also loaded by TMA (USE_TMA, where the host gives the cache's descriptors, whose tiles are
# a page's tokens, at most 64): as compiled for sm_90 (tests/cuda_compile.py), the 64-token bf16 loop goes from
# 1,028 instructions a thread per tile (about 300 of them addresses and masks of its 18 cp.async) to 599 (565 on
# Triton 3.6), the float8 one from 1,186 to 1,006, in the same shared memory. Not yet timed on a GPU: the TMA twins
# come first (what runs without autotuning, so the GPU tests run them), the autotuner times both. (4 warps, rows
# under 64, multiply on mma.sync from registers: their TMA twin spilled 1.3 KB a thread, 132 bytes in its loop.)
# Each tile also has a twin that rescales its accumulator lazily (LAZY_RESCALE, see _attend_tile; after the TMA or
# pointer tiles it twins): as compiled for sm_90, the 64-token TMA tile's loop runs 468 instructions a tile against
# 586 when no row's max grew by 2^8 (most tiles after the first), with two barriers more (the condition is the
# program's); with Triton 3.6 515 against 554, and 5 spilled words loaded or stored a tile. Not yet timed on a GPU.
_DECODE_CONFIGS = [triton.Config({"BLOCK_N": n, "SHARED_P": p, "USE_TMA": t, "LAZY_RESCALE": lazy}, num_warps=w,
                                 num_stages=s)
                   for t in (True, False) for lazy in (False, True) for n, w, s, p in _TILES if w == 8 or not t]


def decode_candidates(rows: int, page: int, width: int, precision: str, cache_bytes: int = 2,
                      tma_tile: int = 0) -> list:
    """The configurations tried for a launch with ``rows`` (head, token) rows, pages of ``page`` tokens and
    ``width`` padded values per token of ``cache_bytes`` bytes (1: float8): warps by rows (8 for 64 rows, else 4),
    tiles within a page, q and the cache tiles in flight within shared memory; float32 (CUDA cores) takes its one
    small-tile configuration. ``tma_tile``: the tokens of the cache descriptors' tiles (0: no descriptors), the
    tiles loaded by TMA. The first is the one used without autotuning."""
    if precision == "ieee":
        return [triton.Config({"BLOCK_N": 16, "SHARED_P": False, "USE_TMA": False, "LAZY_RESCALE": False}, num_warps=4,
                              num_stages=2)]

    def smem(c):  # q, the cache tiles in flight (float8: num_stages - 1, and the tile widened) and p's exchange tile
        n, s = c.kwargs["BLOCK_N"], c.num_stages
        tiles = 2 * n * s if cache_bytes == 2 else cache_bytes * n * (s - 1) + 2 * n
        return 2 * width * rows + width * tiles + (2 * rows * n + 512 if c.kwargs["SHARED_P"] else 0)

    # 16-token tiles on 8 warps only where pages hold fewer than 32 tokens: elsewhere they lost to a larger tile at
    # every key the H100 timed (the fifth and sixth runs' autotune tables: 1.08-1.91x, batch 1 and 64, 1 and 4 tokens,
    # bf16 and float8 caches)
    keep = [c for c in _DECODE_CONFIGS if c.num_warps == (8 if rows >= 64 else 4)
            and c.kwargs["BLOCK_N"] <= page and smem(c) <= SMEM_LIMIT
            and (not c.kwargs["USE_TMA"] or c.kwargs["BLOCK_N"] == tma_tile)
            and not (c.num_warps == 8 and c.kwargs["BLOCK_N"] == 16 and page >= 32)]
    return keep or [min((c for c in _DECODE_CONFIGS if not c.kwargs["USE_TMA"]), key=smem)]


def _decode_prune(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    keep = decode_candidates(a["BLOCK_H"] * a["S_PAD"], a["PAGE"], a["BLOCK_RANK"] + a["BLOCK_ROPE"], a["PRECISION"],
                             a["KV"].element_size(), a["C_DESC"].block_shape[0] if a["HAS_TMA"] else 0)
    return keep if autotune_enabled() else keep[:1]


_mla_decode_tuned = autotune(_DECODE_CONFIGS, ["BLOCK_H", "S_PAD", "PAGE", "HAS_BT", "PRECISION", "HAS_TMA"],
                             _decode_prune)(_mla_decode_kernel)
