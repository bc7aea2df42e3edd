"""Block-sparse attention: every query attends causally to its own key block and fully to a list of
earlier, complete key blocks of its sequence, in one softmax (the engine under MoBA, and under the
backward of NSA's selected branch). Forward and backward in Triton, varlen, GQA, Tq < Tk, and a split-KV
path for decoding.

Layout of the work. The own blocks form a block-diagonal causal problem that runs through
:mod:`longattn.kernels.flash` (each key block is one varlen "sequence"). The selected earlier blocks are
organised by key block: every (query, query head, slot) that selected block ``i`` is an *entry* (with a
selection shared by a GQA group, as NSA's, an entry is a (query, KV head, slot) standing for the group's
heads, so there are group-size times fewer to sort); entries are sorted by (global block, KV head) into
segments, and each program takes a tile of up to ``BLOCK_M`` rows of one segment (rows may mix the query
heads of a GQA group, which share the block's K/V) and runs them against the block's keys. Tiles are
found by a binary search over the per-segment tile counts, so launches need no host synchronisation. The
forward launches once per slot of the selections (each row then written once a launch), merging each piece by lse
into the output and lse in place; the backward pass uses the final row lse and delta, so no per-piece buffer is
kept for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .flash import (SMEM_LIMIT, _fwd_inner, _load_split, _scaled_scores, _score_args, _softcap_grad, _softcapped,
                    _store_split, flash_bwd, flash_bwd_delta, flash_fwd)
from .merge import merge_fwd
from .utils import (COMPILE_OPTIONS, AttnDims, autotune, autotune_enabled, cdiv, check_attention_inputs, check_device,
                    check_positive_int, check_scale, check_softcap, device_tensor, empty, first_order_backward,
                    kernel_inputs, next_pow2, num_sms, public_op, resolve_seqlens, small_tiles, split_dim,
                    widen_by_asm)

ENTRY_TILE = 64  # rows (query, head) of an entry tile
CHUNK_TILES = 256  # entry tiles per dK/dV program, at least
PARTIALS_BYTES = 256 * 2 ** 20  # bound on the float32 partial dK/dV of the chunked segments

# GPU candidates of the engine's kernels as (keys per step, warps, pipeline stages), the first run without
# autotuning (the one tile each had before they were tuned); the rows are an entry tile. As compiled for sm_90
# (tests/cuda_compile.py --resources) at head dim 128 (MoBA) and 192 / 128 with groups of 16 (NSA): dq's 64-key
# tile on 4 warps with three stages holds 128 KB of shared memory and 255 registers per thread, so one program of
# 4 warps per SM; with two stages or 32 keys two fit, and on 8 warps (dS out of a branch, see _bwd_operands: each
# warpgroup computes half the score products) two programs of 134 registers. The forward's 64 rows on 8 warps would
# compute the score products twice, so it stays on 4. dK/dV's 64 keys spill inside the loop on 4 warps, not on 8
# (one program per SM: 196-255 registers); 32 keys fit two programs per SM, on 8 warps (122 / 177 registers) or 4
# (226 / 255).
SPARSE_TILES = {
    "fwd": ((64, 4, 3), (64, 4, 2), (32, 4, 3), (32, 4, 2)),
    "dq": ((64, 4, 3), (64, 4, 2), (32, 4, 3), (32, 4, 2), (64, 8, 3), (64, 8, 2)),
    "dkdv": ((64, 8, 3), (64, 8, 2), (32, 8, 2), (32, 4, 2)),
}
# float32 multiplies on CUDA cores: 64 keys per step spilled 30-38 KB per thread at head dim 128 on sm_90 (and
# took minutes to compile); 16 on 8 warps spill under 300 bytes. The interpreter: one small tile, nothing timed.
SPARSE_FP32_TILE = (16, 8, 1)
SPARSE_INTERPRETER_TILE = (32, 4, 1)


def sparse_candidates(kernel: str, precision: str, block_size: int, dims: tuple) -> list:
    """Tile candidates of the engine's ``kernel`` ("fwd", "dq", "dkdv") for products of ``precision`` ("ieee":
    float32) on key blocks of ``block_size``, ``dims`` = (q/k, v) tile widths: those whose shared memory fits (an
    estimate: the resident rows plus ``stages`` buffers of the streamed ones, every dim; the smallest if none does),
    the first alone without autotuning; keys per step at most ``block_size``."""
    if small_tiles():
        tiles = [SPARSE_INTERPRETER_TILE]
    elif precision == "ieee":
        tiles = [SPARSE_FP32_TILE]
    else:
        tiles = list(SPARSE_TILES[kernel])
    dqk, dv = dims

    def smem(tile):
        n, _, stages = tile
        if kernel == "dkdv":
            return 2 * (n * (dqk + dv) + ENTRY_TILE * (dqk + dv) * stages)
        return 2 * (ENTRY_TILE * (dqk if kernel == "fwd" else dqk + dv) + n * (dqk + dv) * stages)

    tiles = list(dict.fromkeys((min(n, block_size), w, s) for n, w, s in tiles))  # keys within a block
    configs = _configs([t for t in tiles if smem(t) <= SMEM_LIMIT] or [min(tiles, key=smem)])
    return configs if autotune_enabled() else configs[:1]


def _configs(tiles) -> list:
    return [triton.Config(dict(BLOCK_M=ENTRY_TILE, BLOCK_N=n), num_warps=w, num_stages=s) for n, w, s in tiles]


def _sparse_prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}
        dqk = a["BLOCK_DA"] + a["BLOCK_DB"] if kernel == "dkdv" else a["BLOCK_DQK"]
        return sparse_candidates(kernel, a["PRECISION"], a["block_size"], (dqk, a["BLOCK_DV"]))
    return prune


def _tune_sparse(kernel: str, **options):
    """The engine's autotuner for ``kernel``: keyed by the dims, the group, the block size, the precision and the
    soft-capping."""
    return autotune(_configs(SPARSE_TILES[kernel]), ["DQK", "DV", "GROUP", "PRECISION", "block_size", "SOFTCAP"],
                    _sparse_prune(kernel), **options)


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
def _load_entries(ENTRY, SEG_START, seg, tile, Hq, KSEL: tl.constexpr, BLOCK_M: tl.constexpr,
                  GROUP: tl.constexpr):
    """Rows of one tile: query row t, query head h, slot s, valid. An entry id is ``(t * (Hq / GROUP) + g) *
    KSEL + s``; it stands for the GROUP query heads ``g * GROUP ..`` (GROUP > 1 when a GQA group shares its
    selection), each a row of the tile, so a tile holds BLOCK_M // GROUP entries."""
    per_tile: tl.constexpr = BLOCK_M // GROUP
    offs = tl.arange(0, BLOCK_M)
    idx = tl.load(SEG_START + seg) + tile * per_tile + offs // GROUP
    valid = (idx < tl.load(SEG_START + seg + 1)) & (offs < per_tile * GROUP)
    e = tl.load(ENTRY + idx, mask=valid, other=0).to(tl.int64)
    slot = e % KSEL
    th = e // KSEL
    hsel = Hq // GROUP
    return th // hsel, (th % hsel) * GROUP + offs % GROUP, slot, valid


@triton.jit
def _tile_queries(TILE_CUM, ENTRY, SEG_START, Q, pid, n_seg, n_iter, Hq, HKV, stride_qt, stride_qh, offs_dk,
                  DQK: tl.constexpr, KSEL: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """Tile ``pid`` of the entry list: its key block and KV head, its entries and their query rows."""
    seg, tile = _find_tile(TILE_CUM, pid, n_seg, n_iter)
    gb = (seg // HKV).to(tl.int64)
    hk = (seg % HKV).to(tl.int64)
    t, h, slot, valid = _load_entries(ENTRY, SEG_START, seg, tile, Hq, KSEL, BLOCK_M, GROUP)
    q = tl.load(Q + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_dk[None, :],
                mask=valid[:, None] & (offs_dk[None, :] < DQK), other=0.0)
    return gb, hk, t, h, slot, valid, q


@_tune_sparse("fwd", restore_value=["OS", "LS"])  # (it adds to them)
@triton.jit
def _sparse_fwd_kernel(Q, K, V, OS, LS, ENTRY, SEG_START, TILE_CUM, BLOCK_ROW,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_ot, stride_oh, stride_lh,
                            n_seg, n_iter, Hq, HKV, block_size, qk_scale,
                            DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, GROUP: tl.constexpr, cap_scale=0.0, SOFTCAP: tl.constexpr = 0):
    """Attention of a tile of entries (one selected block per row: a launch takes one slot of the selections)
    over one whole selected block, merged by lse into the rows' output and natural-log lse so far (OS, LS: the own
    block's, then each slot's in turn), in place: a launch writes each row once. SOFTCAP: soft-capped scores (see
    flash's _softcapped; qk_scale then holds cap * log2(e))."""
    pid = tl.program_id(0)
    if pid >= tl.load(TILE_CUM + n_seg):
        return
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    gb, hk, t, h, _, valid, q = _tile_queries(TILE_CUM, ENTRY, SEG_START, Q, pid, n_seg, n_iter, Hq, HKV,
                                              stride_qt, stride_qh, offs_dk, DQK, 1, BLOCK_M, GROUP)
    row0 = tl.load(BLOCK_ROW + gb).to(tl.int64)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(0, block_size, BLOCK_N):
        rows = row0 + n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        kt = tl.load(K + rows[None, :] * stride_kt + hk * stride_kh + offs_dk[:, None],
                     mask=offs_dk[:, None] < DQK, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION)  # unscaled: the scale (> 0) goes into the max and the exp's fma
        s = _softcapped(s, cap_scale, SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + rows[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :],
                    mask=offs_dv[None, :] < DV, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # every key of an earlier block is visible: l_i > 0. Merged with what the row holds (its own block's part
    # at least: lse > -inf), in float32, by weights relative to the larger lse (log2 units)
    o_ptr = OS + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_dv[None, :]
    l_ptr = LS + h * stride_lh + t
    mask = valid[:, None] & (offs_dv[None, :] < DV)
    lse_new = m_i + tl.math.log2(l_i)
    lse_old = tl.load(l_ptr, mask=valid, other=0.0) * 1.4426950408889634
    m = tl.maximum(lse_old, lse_new)
    w_old = tl.math.exp2(lse_old - m)
    w_new = tl.math.exp2(lse_new - m)
    out = (w_old[:, None] * tl.load(o_ptr, mask=mask, other=0.0).to(tl.float32) + (w_new / l_i)[:, None] * acc) \
        / (w_old + w_new)[:, None]
    tl.store(o_ptr, out.to(OS.dtype.element_ty), mask=mask)
    tl.store(l_ptr, (m + tl.math.log2(w_old + w_new)) * 0.6931471805599453, mask=valid)


@triton.jit
def _segment_rows(BLOCK_ROW, seg, pid_n, HKV, BLOCK_N: tl.constexpr):
    """KV head of segment ``seg`` (a (block, KV head) pair) and key tile pid_n of its block: rows in the block
    and in the packed keys."""
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    return (seg % HKV).to(tl.int64), local, tl.load(BLOCK_ROW + (seg // HKV).to(tl.int64)).to(tl.int64) + local


@triton.jit
def _bwd_operands(p, dp_delta, flag, dtype: tl.constexpr):
    """The backward's matmul operands p and dS = p * (dp - delta) in ``dtype``, computed in a branch whose two sides
    are the same (``flag``: any runtime condition). Triton lays a product whose result reaches another product on
    all warps along its rows, so with 64 rows on 8 warps both warpgroups would compute all of s and dp; its
    analysis does not follow values out of a branch, so those products split their tiles between the warpgroups
    instead (the operands reach both through shared memory, as their transposes do anyway)."""
    if flag:
        p16 = p.to(dtype)
        ds = (p * dp_delta).to(dtype)
    else:
        p16 = p.to(dtype)
        ds = (p * dp_delta).to(dtype)
    return p16, ds


@_tune_sparse("dkdv", restore_value=["DK", "DV_"])  # it adds to them
@triton.jit
def _sparse_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, PK, PV, ENTRY, SEG_START, TILE_CUM, CHUNK_CUM, SLOT,
                        BLOCK_ROW, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                        stride_pk, stride_pv, n_seg, n_iter, chunk_tiles, Hq, HKV, block_size, qk_scale, scale,
                        DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                        BLOCK_DV: tl.constexpr, KSEL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, GROUP: tl.constexpr, cap_scale=0.0, SOFTCAP: tl.constexpr = 0):
    """dK/dV of one key tile of one (block, KV head) segment from one chunk of the entries that selected it
    (at most ``chunk_tiles`` entry tiles: a block that every query selects, like NSA's first, is spread over
    many programs). A segment of one chunk adds its result to the own-block gradients already in DK/DV; the
    chunks of a longer one write float32 partials to their own slots of PK/PV (from SLOT[segment]), which
    _sparse_dkdv_finish_kernel adds up in order. Deterministic, no atomics. Grid: (chunks, key tiles of the
    ``block_size`` keys; it keys the autotuner, the tiles' keys BLOCK_N dividing it). The
    q/k head dim comes in two power-of-two parts (BLOCK_DA + BLOCK_DB, see flash's _load_split). SOFTCAP:
    soft-capped scores (see flash's _softcapped)."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid >= tl.load(CHUNK_CUM + n_seg):
        return
    seg, chunk = _find_tile(CHUNK_CUM, pid, n_seg, n_iter)
    n_tiles = tl.load(TILE_CUM + seg + 1) - tl.load(TILE_CUM + seg)
    hk, local, rows = _segment_rows(BLOCK_ROW, seg, pid_n, HKV, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt_a, kt_b = _load_split(K + hk * stride_kh, rows * stride_kt, local >= 0, DQK, BLOCK_DA, BLOCK_DB, True)
    v = tl.load(V + rows[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :], mask=offs_dv[None, :] < DV,
                other=0.0)
    dk_a = tl.zeros([BLOCK_N, BLOCK_DA], tl.float32)
    dk_b = tl.zeros([BLOCK_N, BLOCK_DB if BLOCK_DB > 0 else 1], tl.float32)  # unused without a second part
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for tile in range(chunk * chunk_tiles, tl.minimum(chunk * chunk_tiles + chunk_tiles, n_tiles)):
        t, h, slot, valid = _load_entries(ENTRY, SEG_START, seg, tile, Hq, KSEL, BLOCK_M, GROUP)
        q_a, q_b = _load_split(Q, t * stride_qt + h * stride_qh, valid, DQK, BLOCK_DA, BLOCK_DB, False)
        do = tl.load(DO + t[:, None] * stride_dot + h[:, None] * stride_doh + offs_dv[None, :],
                     mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + h * stride_lh + t, mask=valid, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + h * stride_lh + t, mask=valid, other=0.0)
        # the score products unchained (see _bwd_operands, flash's _scaled_scores), the lse subtracted by the first
        # multiply-add, and p, dS out of a branch
        s, t_cap = _scaled_scores(q_a, q_b, kt_a, kt_b, qk_scale, -lse[:, None], BLOCK_DB, PRECISION, cap_scale,
                                  SOFTCAP)
        p = tl.math.exp2(s)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        p16, ds = _bwd_operands(p, _softcap_grad(dp - delta[:, None], t_cap, SOFTCAP), qk_scale > 0, do.dtype)
        dv += tl.dot(tl.trans(p16), do, input_precision=PRECISION)
        dst = tl.trans(ds)
        dk_a += tl.dot(dst, q_a, input_precision=PRECISION)
        if BLOCK_DB > 0:
            dk_b += tl.dot(dst, q_b, input_precision=PRECISION)
    mv = offs_dv[None, :] < DV
    slot0 = tl.load(SLOT + seg)
    if slot0 < 0:  # the segment's only chunk
        dk_rows = rows * stride_dkt + hk * stride_dkh
        own_a, own_b = _load_split(DK, dk_rows, local >= 0, DQK, BLOCK_DA, BLOCK_DB, False)
        _store_split(DK, dk_rows, local >= 0, dk_a * scale + own_a.to(tl.float32), dk_b * scale + own_b.to(tl.float32),
                     DQK, BLOCK_DA, BLOCK_DB)
        dv_ptr = DV_ + rows[:, None] * stride_dvt + hk * stride_dvh + offs_dv[None, :]
        dv = dv + tl.load(dv_ptr, mask=mv, other=0.0).to(tl.float32)
        tl.store(dv_ptr, dv.to(DV_.dtype.element_ty), mask=mv)
    else:  # partials: rows of BLOCK_DA + BLOCK_DB (k) and BLOCK_DV (v) values in the chunk's slot
        slot = slot0 + chunk
        _store_split(PK + slot * stride_pk, local * (BLOCK_DA + BLOCK_DB), local >= 0, dk_a * scale, dk_b * scale,
                     BLOCK_DA + BLOCK_DB, BLOCK_DA, BLOCK_DB)
        tl.store(PV + slot * stride_pv + local[:, None] * BLOCK_DV + offs_dv[None, :], dv)


@triton.jit
def _sparse_dkdv_finish_kernel(DK, DV_, PK, PV, SLOT, CHUNK_CUM, BLOCK_ROW, stride_dkt, stride_dkh, stride_dvt,
                               stride_dvh, stride_pk, stride_pv, HKV,
                               DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                               BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Segments of several chunks: DK/DV (the own-block part) plus the chunks' partials, summed in order.
    Grid: (segments, key tiles)."""
    seg = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot0 = tl.load(SLOT + seg)
    if slot0 < 0:
        return
    n_chunks = tl.load(CHUNK_CUM + seg + 1) - tl.load(CHUNK_CUM + seg)
    hk, local, rows = _segment_rows(BLOCK_ROW, seg, pid_n, HKV, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    mv = offs_dv[None, :] < DV
    dk_rows = rows * stride_dkt + hk * stride_dkh
    dk_a, dk_b = _load_split(DK, dk_rows, local >= 0, DQK, BLOCK_DA, BLOCK_DB, False)
    dk_a, dk_b = dk_a.to(tl.float32), dk_b.to(tl.float32)
    dv_ptr = DV_ + rows[:, None] * stride_dvt + hk * stride_dvh + offs_dv[None, :]
    dv = tl.load(dv_ptr, mask=mv, other=0.0).to(tl.float32)
    for c in range(0, n_chunks):
        slot = (slot0 + c).to(tl.int64)
        p_a, p_b = _load_split(PK + slot * stride_pk, local * (BLOCK_DA + BLOCK_DB), local >= 0, BLOCK_DA + BLOCK_DB,
                               BLOCK_DA, BLOCK_DB, False)
        dk_a += p_a
        if BLOCK_DB > 0:
            dk_b += p_b
        dv += tl.load(PV + slot * stride_pv + local[:, None] * BLOCK_DV + offs_dv[None, :])
    _store_split(DK, dk_rows, local >= 0, dk_a, dk_b, DQK, BLOCK_DA, BLOCK_DB)
    tl.store(dv_ptr, dv.to(DV_.dtype.element_ty), mask=mv)


@triton.jit
def _add_into_kernel(X, Y, n, BLOCK: tl.constexpr):
    """``x += y`` over n elements, in float32, stored in X's dtype."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + i, mask=i < n, other=0.0).to(tl.float32)
    tl.store(X + i, (x + tl.load(Y + i, mask=i < n, other=0.0)).to(X.dtype.element_ty), mask=i < n)


def _add_into(x: torch.Tensor, y: torch.Tensor) -> None:
    """``x += y`` in place for contiguous tensors of one shape (y float32), without a float32 copy of x."""
    block = 1024
    if x.numel():
        _add_into_kernel[(cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block, **COMPILE_OPTIONS)


@_tune_sparse("dq", reset_to_zero=["DQ32"])  # it adds to DQ32 (zeroed before each timed tile and after tuning)
@triton.jit
def _sparse_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ32, ENTRY, SEG_START, TILE_CUM, BLOCK_ROW,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_dot, stride_doh, stride_dqs, stride_dqt, stride_dqh, stride_lh,
                           n_seg, n_iter, Hq, HKV, block_size, qk_scale, scale,
                           DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                           KSEL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, GROUP: tl.constexpr, SLOTS: tl.constexpr = False, cap_scale=0.0,
                           SOFTCAP: tl.constexpr = 0):
    """dQ of a tile of entries from one selected block, atomically added to a float32 buffer (a query
    row gets contributions from up to KSEL blocks, handled by different programs, in whatever order they end).
    SLOTS (deterministic): each row's part stored in its entry's slot of DQ32 (KSEL, rows, Hq, D) instead, summed
    in slot order afterwards. SOFTCAP: soft-capped scores (see flash's _softcapped)."""
    pid = tl.program_id(0)
    if pid >= tl.load(TILE_CUM + n_seg):
        return
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    gb, hk, t, h, slot, valid, q = _tile_queries(TILE_CUM, ENTRY, SEG_START, Q, pid, n_seg, n_iter, Hq, HKV,
                                                 stride_qt, stride_qh, offs_dk, DQK, KSEL, BLOCK_M, GROUP)
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
        t_cap = _softcapped(tl.dot(q, tl.trans(k), input_precision=PRECISION), cap_scale, SOFTCAP)
        p = tl.math.exp2(t_cap * qk_scale - lse[:, None])
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = _bwd_operands(p, _softcap_grad(dp - delta[:, None], t_cap, SOFTCAP), qk_scale > 0, k.dtype)[1]
        dq += tl.dot(ds, k, input_precision=PRECISION)
    dq_ptr = DQ32 + t[:, None] * stride_dqt + h[:, None] * stride_dqh + offs_dk[None, :]
    if SLOTS:
        tl.store(dq_ptr + slot[:, None] * stride_dqs, dq * scale, mask=valid[:, None] & (offs_dk[None, :] < DQK))
    else:
        tl.atomic_add(dq_ptr, dq * scale, mask=valid[:, None] & (offs_dk[None, :] < DQK))



@triton.jit
def _sparse_decode_kernel(Q, K, V, SEL, OS, LS, CU_Q, K_START, K_END, ROWS, BT,
                          stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                          stride_st, stride_sh, stride_op, stride_ot, stride_oh, stride_lp, stride_lh, stride_btb,
                          block_size, group, heads_kv, n_slots, slot_programs, qk_scale, v_scale, last_page,
                          DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                          BLOCK_DV: tl.constexpr, KSEL: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_G: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                          PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr, PAGE: tl.constexpr = 0, cap_scale=0.0,
                          SOFTCAP: tl.constexpr = 0, WIDEN_ASM: tl.constexpr = False):
    """One new token per sequence. Program (sequence * Hkv + KV head, slot program, part) holds the GQA group's
    heads as the rows of its tiles and attends to part ``part`` (SPLIT keys) of some of the group's blocks:
    slot 0 is the own block (keys up to the query, every head), slot 1 + j * KSEL + i is head j's i-th
    selected block, taken by the heads that selected it; a block several heads selected is read once, in the
    slot of its first occurrence (later ones are skipped). Slot program p takes slots p, p + slot_programs, ...
    into one online softmax and writes its partial output and lse (natural log), merged afterwards (split-KV).

    Sequence b's keys are rows ``K_START[b] .. K_END[b] - 1`` at ``K + c * stride_kb`` with c = ROWS[b] (several
    tokens of one sequence reading its cache row) or b (packed: stride_kb 0 and K_START/K_END the cu_seqlens; a
    batched cache: its batch stride and each row's padding / end). PAGE > 0: a paged cache (K/V (pages, PAGE, Hkv,
    D), pages one after another, K_START 0, PAGE dividing block_size), key j of row c at slot j % PAGE of page
    ``BT[c, j // PAGE]`` (clamped to [0, last_page]). SOFTCAP: soft-capped scores (see flash's _softcapped). K/V may
    be float8 (a quantised cache: the keys' scale folded into qk_scale, the values' v_scale multiplying the output),
    widened to q's dtype as they are read (WIDEN_ASM: see flash's _widen)."""
    b = tl.program_id(0) // heads_kv
    hk = tl.program_id(0) % heads_kv
    sp = tl.program_id(1)
    part = tl.program_id(2)
    piece = (part * slot_programs + sp).to(tl.int64)
    t = tl.load(CU_Q + b)
    if tl.load(CU_Q + b + 1) == t:  # no new token in this sequence
        return
    t = t.to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    in_g = g < group
    head = (hk * group + g).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_start = tl.load(K_START + b).to(tl.int64)
    pos = tl.load(K_END + b) - tl.load(K_START + b) - 1
    own = pos // block_size
    c = b.to(tl.int64)
    if HAS_ROWS:
        c = tl.load(ROWS + b).to(tl.int64)
    k_base = K + c * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + c * stride_vb + hk.to(tl.int64) * stride_vh
    bt_row = BT + c * stride_btb
    # the group's selections (BLOCK_G, BLOCK_S), -1 where none; flat = a slot's rank among the selected ones
    offs_s = tl.arange(0, BLOCK_S)
    in_sel = in_g[:, None] & (offs_s[None, :] < KSEL)
    sel_g = tl.load(SEL + t * stride_st + head[:, None] * stride_sh + offs_s[None, :], mask=in_sel, other=-1)
    flat = g[:, None] * KSEL + offs_s[None, :]
    q_a, q_b = _load_split(Q + t * stride_qt, head * stride_qh, in_g, DQK, BLOCK_DA, BLOCK_DB, False)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    lo = part * SPLIT
    for slot in range(sp, n_slots, slot_programs):
        blk = own
        n_keys = pos - own * block_size + 1
        rows_in = in_g
        if slot > 0:
            f = slot - 1
            blk = tl.load(SEL + t * stride_st + (hk * group + f // KSEL).to(tl.int64) * stride_sh + f % KSEL)
            n_keys = block_size
            chose = (sel_g == blk) & in_sel
            rows_in = tl.max(chose.to(tl.int32), 1) > 0
            if (blk < 0) | (tl.max(tl.max((chose & (flat < f)).to(tl.int32), 1), 0) > 0):
                n_keys = 0  # no block, or one an earlier slot takes
        hi = tl.minimum(lo + SPLIT, n_keys)
        if lo < hi:
            # rows of heads that did not select the block see none of its keys (causal mask at position -1)
            pos_m = tl.where(rows_in, hi, -1)
            bt_blk = bt_row  # (paged: the block's pages from its first one in the table, its keys from 0)
            if PAGE > 0:
                bt_blk = bt_row + blk.to(tl.int64) * (block_size // PAGE)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_a, q_b, k_base, v_base,
                                       k_start + blk.to(tl.int64) * block_size, stride_kt, stride_vt, pos_m, lo, hi,
                                       hi, 0, qk_scale, offs_dv, DQK, DV, BLOCK_DA, BLOCK_DB, BLOCK_N, True, True,
                                       False, PRECISION, 1, 0, bt_blk, last_page, PAGE, WIDEN_ASM,
                                       cap_scale=cap_scale, SOFTCAP=SOFTCAP)
    empty = l_i == 0.0
    out = acc / (tl.where(empty, 1.0, l_i) / v_scale)[:, None]
    tl.store(OS + piece * stride_op + t * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
             out.to(OS.dtype.element_ty), mask=in_g[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LS + piece * stride_lp + head * stride_lh + t, lse, mask=in_g)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
@dataclass
class BlockPlan:
    """Host-side layout of one block-sparse call (everything indexed in the packed varlen layout)."""
    cu_q: torch.Tensor            # (B+1,) int32
    cu_k: torch.Tensor            # (B+1,) int32
    max_q: int
    block_off: torch.Tensor       # (B,) int32: global index of each sequence's first key block
    block_row: torch.Tensor       # (NB,) int32: first key row of each global block
    block_len: torch.Tensor       # (NB,) int32
    row_block_off: torch.Tensor   # (total_q,) int64: block_off of each query row's sequence
    n_blocks: int
    max_blocks: int               # most key blocks in one sequence
    own: AttnDims                 # own-block causal attention as a varlen flash problem over chunks


def plan_blocks(lq: list, lk: list, block_size: int, dims: AttnDims, device) -> BlockPlan:
    """Key blocks and own-block chunks of every sequence (vectorised on the host; no device sync).

    Key block j of a sequence covers keys [j*bs, min((j+1)*bs, Tk)). It is also the own-block chunk of
    the queries whose positions fall in it (possibly none), so the chunk boundaries partition both
    packed layouts and every key row belongs to exactly one chunk of at most bs keys.
    """
    for i, (a, b) in enumerate(zip(lq, lk)):
        if a > b:
            raise ValueError(f"sequence {i} has {a} queries but only {b} keys: block-sparse attention needs every "
                             "query's own key (queries are aligned to the end of the keys)")
    lq_t = torch.tensor(lq, dtype=torch.int64)
    lk_t = torch.tensor(lk, dtype=torch.int64)
    zero = torch.zeros(1, dtype=torch.int64)
    cu_q = torch.cat([zero, lq_t.cumsum(0)])
    cu_k = torch.cat([zero, lk_t.cumsum(0)])
    nb = (lk_t + block_size - 1) // block_size
    block_off = torch.cat([zero, nb.cumsum(0)])
    n_blocks = int(block_off[-1])
    seq = torch.repeat_interleave(torch.arange(len(lk)), nb, output_size=n_blocks)
    k_lo = (torch.arange(n_blocks) - block_off[seq]) * block_size
    k_hi = torch.minimum(k_lo + block_size, lk_t[seq])
    n_q = (k_hi - torch.maximum(k_lo, (lk_t - lq_t)[seq])).clamp(min=0)  # queries whose own block this is
    cq = torch.cat([zero, n_q.cumsum(0)])
    ck = torch.cat([zero, (k_hi - k_lo).cumsum(0)])
    row_block_off = torch.repeat_interleave(block_off[:-1], lq_t, output_size=int(cu_q[-1]))
    to = lambda x: device_tensor(x, torch.int32, device)  # asynchronous copies: the plan needs no GPU wait
    own = AttnDims(True, n_blocks, max(int(n_q.max()) if n_blocks else 0, 1), block_size, dims.heads_q,
                   dims.heads_kv, dims.dim_qk, dims.dim_v, to(cq), to(ck))
    return BlockPlan(to(cu_q), to(cu_k), max(lq) if lq else 0, to(block_off[:-1]), to(ck[:-1]), to(k_hi - k_lo),
                     device_tensor(row_block_off, torch.int64, device), n_blocks, int(nb.max()) if len(lk) else 0, own)


@dataclass
class _Entries:
    entry: torch.Tensor      # entry ids sorted by segment
    seg_start: torch.Tensor  # (NSEG+1,) int64
    tile_cum: torch.Tensor   # (NSEG+1,) int64
    n_seg: int
    n_iter: int
    max_tiles: int
    group: int               # query heads per entry


def entries(sel: torch.Tensor, plan: BlockPlan, hq: int, hkv: int, group: int = 1) -> _Entries:
    """Sort the (query, head, slot) -> block selections ``sel`` (total_q, hq / group, K) into per-(block, KV
    head) segments, on device; with ``group`` > 1 an entry stands for ``group`` query heads that share it."""
    if not 1 <= group <= ENTRY_TILE:
        raise ValueError(f"entries: group must be 1 to {ENTRY_TILE}, got {group}")
    tile_m = ENTRY_TILE // group
    hq = hq // group
    n_seg = plan.n_blocks * hkv
    kv_head = (torch.arange(hq, device=sel.device) // (hq // hkv))[None, :, None]
    seg = (sel.long() + plan.row_block_off[:, None, None]) * hkv + kv_head
    seg = torch.where(sel >= 0, seg, torch.full_like(seg, n_seg)).flatten()
    # segment ids fit in 32 bits: a 32-bit key halves the radix sort's passes
    entry = torch.argsort(seg.to(torch.int32) if n_seg < 2 ** 31 - 1 else seg, stable=True)
    counts = torch.zeros(n_seg + 1, dtype=torch.int64, device=sel.device)
    counts.scatter_add_(0, seg, torch.ones_like(seg))
    counts = counts[:n_seg]
    zero = torch.zeros(1, dtype=torch.int64, device=sel.device)
    seg_start = torch.cat([zero, counts.cumsum(0)])
    tile_cum = torch.cat([zero, ((counts + tile_m - 1) // tile_m).cumsum(0)])
    return _Entries(entry, seg_start, tile_cum, n_seg, max(1, math.ceil(math.log2(n_seg + 1))),
                    cdiv(seg.numel(), tile_m) + n_seg, group)


def _meta(dims: AttnDims, dtype):
    return dict(DQK=dims.dim_qk, DV=dims.dim_v, BLOCK_DQK=max(16, next_pow2(dims.dim_qk)),
                BLOCK_DV=max(16, next_pow2(dims.dim_v)), PRECISION="ieee" if dtype == torch.float32 else "tf32")


def sparse_decode(q, k, v, sel, cu_q, k_start, k_end, block_size: int, scale: float, rows=None, block_table=None,
                  softcap: float = 0.0, v_scale: float = 1.0):
    """At most one query per sequence, no gradient: split-KV over the own block and the selected blocks (each
    cut into SPLIT-key parts so that a small batch still fills the GPU), a program per KV head holding its GQA
    group's heads (each block the group selected read once), merged by lse. Returns (out, lse).

    q ``(total_q, Hq, Dqk)`` with int32 ``cu_q`` (sequence b's query is row ``cu_q[b]`` if it has one); k/v
    packed ``(total_k, Hkv, D)`` (``k_start``/``k_end`` = cu_seqlens_k without its last / first entry) or a
    batched cache ``(B, L, Hkv, D)`` read in place (sequence b's keys are ``k_start[b] .. k_end[b] - 1`` of cache
    row ``rows[b]``, or b); sel int32 ``(total_q, Hq, n)``: earlier blocks local to the sequence, -1 = none.
    ``block_table`` int32 ``(rows, max_pages)``: k/v paged ``(pages, page_size, Hkv, D)`` instead (pages one after
    another, page_size dividing block_size, k_start 0), its row ``rows[b]`` (or b) listing sequence b's pages.
    ``softcap`` (> 0): the scores ``softcap * tanh(scale * q.k / softcap)``. k/v may be float8 (a quantised cache:
    the keys' dequantisation scale in ``scale``, the values' in ``v_scale``)."""
    total_q, hq, dqk = q.shape
    hkv, dv = k.shape[-2], v.shape[-1]
    group, ksel = hq // hkv, sel.shape[-1]
    split = min(block_size, 32 if small_tiles() else 512)
    n_split = block_size // split
    n_slots = 1 + group * ksel  # the own block, then each head's selections
    # slot programs per (sequence, KV head, part), each taking every slot_programs-th slot: as many as it takes
    # to have about four programs per SM (one when the batch fills the GPU by itself), at most 16 partial outputs
    # per part to merge however many blocks a large group selects
    programs = (cu_q.numel() - 1) * hkv * n_split
    slot_programs = max(1, min(n_slots, 16, cdiv(4 * num_sms(q.device), programs)))
    n_pieces = slot_programs * n_split
    outs = empty(n_pieces, total_q, hq, dv, device=q.device, dtype=torch.float32)
    lses = empty(n_pieces, hq, total_q, device=q.device, dtype=torch.float32)
    sel_arg = sel if ksel > 0 else torch.empty(total_q, hq, 1, dtype=torch.int32, device=q.device)
    batch_strides = (k.stride(0), v.stride(0)) if k.dim() == 4 and block_table is None else (0, 0)
    page = k.shape[1] if block_table is not None else 0
    block_da, block_db = split_dim(dqk)
    block_n = 32 if small_tiles() else 64
    if q.dtype == torch.float32:  # CUDA-core products: wider key tiles spill on sm_90 (tests/cuda_compile.py)
        block_n = 32 if dqk <= 128 else 16
    # (a paged cache's row numbers, loaded, not computed, take registers: on 4 warps its 64-key tiles took all 255
    # of them a thread on sm_90, float32's 32-key tiles spilled; on 8 warps neither)
    qk_scale, soft = _score_args(scale, softcap, q.dtype)
    _sparse_decode_kernel[((cu_q.numel() - 1) * hkv, slot_programs, n_split)](
        q, k, v, sel_arg, outs, lses, cu_q, k_start, k_end, rows if rows is not None else cu_q,
        block_table if block_table is not None else cu_q, q.stride(0), q.stride(1), batch_strides[0], k.stride(-3),
        k.stride(-2), batch_strides[1], v.stride(-3), v.stride(-2), sel_arg.stride(0), sel_arg.stride(1),
        outs.stride(0), outs.stride(1), outs.stride(2), lses.stride(0), lses.stride(1),
        block_table.stride(0) if block_table is not None else 0, block_size, group, hkv, n_slots, slot_programs,
        qk_scale, v_scale, k.shape[0] - 1 if block_table is not None else 0, DQK=dqk, DV=dv,
        BLOCK_DA=block_da, BLOCK_DB=block_db, BLOCK_DV=max(16, next_pow2(dv)), KSEL=ksel,
        BLOCK_S=next_pow2(max(ksel, 1)), BLOCK_G=max(16, next_pow2(group)), SPLIT=split,
        BLOCK_N=min(split, block_n), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_ROWS=rows is not None, PAGE=page, WIDEN_ASM=widen_by_asm(q.dtype, k.dtype),
        **({"num_warps": 8} if page else {}), **soft, **COMPILE_OPTIONS)
    return merge_fwd(outs, lses, q.dtype)


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sel, plan: BlockPlan, dims: AttnDims, block_size: int, scale: float, softcap: float):
        hq, hkv = dims.heads_q, dims.heads_kv
        out, lse = flash_fwd(q, k, v, plan.own, True, None, scale, softcap=softcap)  # the own blocks
        qk_scale, soft = _score_args(scale, softcap, q.dtype)
        # then one slot of the selections at a time, each launch merging its blocks' part into out and lse in
        # place (no buffer of partial results: (top-k) x out's size, at the peak)
        for j in range(sel.shape[-1] if q.shape[0] else 0):
            ent = entries(sel[..., j:j + 1], plan, hq, hkv)
            _sparse_fwd_kernel[(ent.max_tiles,)](
                q, k, v, out, lse, ent.entry, ent.seg_start, ent.tile_cum, plan.block_row,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1), lse.stride(0), ent.n_seg, ent.n_iter, hq, hkv, block_size,
                qk_scale, GROUP=1, **_meta(dims, q.dtype), **soft, **COMPILE_OPTIONS)
        ctx.save_for_backward(q, k, v, out, lse, sel)
        ctx.plan, ctx.dims, ctx.block_size, ctx.scale, ctx.softcap = plan, dims, block_size, scale, softcap
        ctx.mark_non_differentiable(sel)
        return out, lse

    @staticmethod
    @first_order_backward("block-sparse attention (moba_attention, block_sparse_attention)")
    def backward(ctx, saved, dout, dlse):
        q, k, v, out, lse, sel = saved
        ksel = sel.shape[-1]
        ent = entries(sel, ctx.plan, ctx.dims.heads_q, ctx.dims.heads_kv) if ksel > 0 and q.shape[0] else None
        dq, dk, dv, _, _ = sparse_backward(q, k, v, out, lse, dout, dlse, ctx.plan, ctx.dims, ent, ksel,
                                           ctx.block_size, ctx.scale, softcap=ctx.softcap)
        return (dq, dk, dv) + (None,) * 6


def sparse_backward(q, k, v, out, lse, dout, dlse, plan: BlockPlan, dims: AttnDims, ent: Optional[_Entries],
                    ksel: int, block_size: int, scale: float, dq_by_entries: bool = True, delta=None, dq=None,
                    softcap: float = 0.0):
    """Gradients of block-sparse attention (own block causal + the entries' blocks, one softmax) from its
    output and row lse: flash backward on the own blocks, then the selected blocks by key tile (dk, dv)
    and, with ``dq_by_entries``, by entry tile (dq; otherwise dq holds the own blocks' part only and the
    caller adds the rest). ``ent`` from :func:`entries` (None: no selected block). ``delta``: the rows'
    ``rowsum(dout * out) - dlse`` where the caller has it (float32, lse's layout); ``dq``: a gradient of q to add
    to in place (see :func:`flash_bwd`). ``softcap`` (> 0): soft-capped scores, as in the forward.
    Returns dq, dk, dv and, for such a caller, the contiguous dout and the row delta."""
    if dout is None:
        dout = torch.zeros_like(out)
    dout = dout.to(out.dtype).contiguous()
    if dlse is not None:
        dlse = dlse.float().contiguous()
    if q.shape[0] == 0:
        return (torch.zeros_like(q) if dq is None else dq), torch.zeros_like(k), torch.zeros_like(v), dout, None
    # One softmax over own block + selected blocks: every piece's gradient uses the final lse and delta.
    if delta is None:
        delta = flash_bwd_delta(out, dout, lse, dlse, plan.own)
    dq, dk, dv = flash_bwd(dout, q, k, v, lse, delta, plan.own, True, None, scale, dq=dq, softcap=softcap)
    if ent is None:
        return dq, dk, dv, dout, delta
    meta = _meta(dims, q.dtype)
    qk_scale, soft = _score_args(scale, softcap, q.dtype)
    # dK/dV by (block, KV head) segment, each cut into chunks of at most `ch` entry tiles (their programs run side
    # by side); the chunks of a longer segment keep float32 partials in slots, at most 2 * tiles / ch of them,
    # and `ch` keeps those under PARTIALS_BYTES
    da, db = split_dim(dims.dim_qk)
    kv_meta = dict(meta, BLOCK_DA=da, BLOCK_DB=db)
    del kv_meta["BLOCK_DQK"]
    slot_bytes = block_size * (da + db + meta["BLOCK_DV"]) * 4
    ch = 2 if small_tiles() else max(CHUNK_TILES, cdiv(2 * ent.max_tiles * slot_bytes, PARTIALS_BYTES))
    seg_tiles = ent.tile_cum[1:] - ent.tile_cum[:-1]
    n_chunks = (seg_tiles + ch - 1) // ch
    chunk_cum = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
    multi = torch.where(n_chunks > 1, n_chunks, 0)
    slot = torch.where(n_chunks > 1, multi.cumsum(0) - multi, -1)
    n_slots = max(1, 2 * ent.max_tiles // ch)
    pk = empty(n_slots, block_size, da + db, device=q.device, dtype=torch.float32)
    pv = empty(n_slots, block_size, meta["BLOCK_DV"], device=q.device, dtype=torch.float32)
    common = (plan.block_row, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
              pk.stride(0), pv.stride(0))
    _sparse_dkdv_kernel[lambda c: (ent.n_seg + cdiv(ent.max_tiles, ch), block_size // c["BLOCK_N"])](
        q, k, v, dout, lse, delta, dk, dv, pk, pv, ent.entry, ent.seg_start, ent.tile_cum, chunk_cum, slot,
        *common, ent.n_seg, ent.n_iter, ch, dims.heads_q, dims.heads_kv, block_size, qk_scale, scale, KSEL=ksel,
        GROUP=ent.group, **kv_meta, **soft, **COMPILE_OPTIONS)
    bn = min(block_size, 32 if small_tiles() else 16 if q.dtype == torch.float32 else 64)
    _sparse_dkdv_finish_kernel[(ent.n_seg, block_size // bn)](
        dk, dv, pk, pv, slot, chunk_cum, plan.block_row, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        pk.stride(0), pv.stride(0), dims.heads_kv, DQK=dims.dim_qk, DV=dims.dim_v, BLOCK_DA=da, BLOCK_DB=db,
        BLOCK_DV=meta["BLOCK_DV"], BLOCK_N=bn, **COMPILE_OPTIONS)
    if dq_by_entries:
        # float32 atomics add each row's parts, in whatever order their programs end, to its own blocks' part: the
        # bits of dq may differ from run to run. Under torch.use_deterministic_algorithms(True) each part goes to its
        # own slot (ksel x the float32 buffer) and the slots are summed in order
        slots = torch.are_deterministic_algorithms_enabled()
        dq32 = torch.zeros(ksel if slots else 1, *dq.shape, device=dq.device, dtype=torch.float32)
        _sparse_dq_kernel[(ent.max_tiles,)](
            q, k, v, dout, lse, delta, dq32, ent.entry, ent.seg_start, ent.tile_cum, plan.block_row,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq32.stride(0), dq32.stride(1), dq32.stride(2), lse.stride(0),
            ent.n_seg, ent.n_iter, dims.heads_q, dims.heads_kv, block_size, qk_scale, scale,
            KSEL=ksel, GROUP=ent.group, SLOTS=slots, **meta, **soft, **COMPILE_OPTIONS)
        _add_into(dq, dq32.sum(0) if slots else dq32[0])  # (no float32 copy of dq: 16 KB a token at 32 heads of 128)
    return dq, dk, dv, dout, delta


def block_sparse_packed(q, k, v, sel, plan: BlockPlan, dims: AttnDims, block_size: int, scale: float,
                        softcap: float = 0.0):
    """Engine entry on packed, validated inputs (kernel dtypes): q (total_q, Hq, D), k/v (total_k, Hkv, D),
    sel int32 (total_q, Hq, K) of earlier complete blocks (local indices, -1 = none), ``softcap`` (0: none).
    Returns (out, lse). Takes the split-KV decode kernel when every sequence has at most one query and no gradient
    is needed."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if plan.max_q <= 1 and not needs_grad and q.shape[0] > 0:
        return sparse_decode(q, k, v, sel, plan.cu_q, plan.cu_k, plan.cu_k[1:], block_size, scale, softcap=softcap)
    return _BlockSparse.apply(q, k, v, sel, plan, dims, block_size, scale, softcap)


def pack_inputs(q, k, v, dims: AttnDims):
    """Dense (B, T, H, D) -> packed (B*T, H, D) views (varlen inputs pass through); lengths per sequence. The
    kernels index the head dim with unit stride: a tensor strided there is copied."""
    if dims.varlen:
        qp, kp, vp, lq, lk = q, k, v, dims.seqlens_q, dims.seqlens_k
    else:
        B = dims.batch
        qp = q.reshape(B * dims.max_seqlen_q, dims.heads_q, dims.dim_qk)
        kp = k.reshape(B * dims.max_seqlen_k, dims.heads_kv, dims.dim_qk)
        vp = v.reshape(B * dims.max_seqlen_k, dims.heads_kv, v.shape[-1])
        lq, lk = [dims.max_seqlen_q] * B, [dims.max_seqlen_k] * B
    qp, kp, vp = (t if t.stride(-1) == 1 else t.contiguous() for t in (qp, kp, vp))
    return qp, kp, vp, lq, lk


def unpack_output(out, lse, dims: AttnDims):
    if dims.varlen:
        return out, lse
    out = out.view(dims.batch, dims.max_seqlen_q, dims.heads_q, dims.dim_v)
    return out, lse.view(dims.heads_q, dims.batch, dims.max_seqlen_q).permute(1, 0, 2)


INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_block_indices(block_indices, dims: AttnDims, heads: int, lq: list, lk: list, block_size: int, *,
                        own_listed: bool, q: torch.Tensor) -> torch.Tensor:
    """Validate ``block_size`` and per-(query, head) block lists (dense ``(B, Tq, heads, K)`` or varlen
    ``(total_q, heads, K)``): distinct blocks of the query's sequence, -1 for unused slots, and either
    strictly before the query's own block (``own_listed=False``) or up to it with the own block listed.
    Returns them packed ``(total_q, heads, K)`` as contiguous int32."""
    check_positive_int(block_size, "block_size", minimum=16)
    if block_size & (block_size - 1) or block_size > 65536:
        raise ValueError(f"block_size must be a power of two from 16 to 65536, got {block_size}")
    if not isinstance(block_indices, torch.Tensor):
        raise TypeError(f"block_indices must be an integer tensor, got {type(block_indices).__name__}")
    if block_indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"block_indices must have an integer dtype, got {block_indices.dtype}")
    check_device({"q": q, "block_indices": block_indices})
    total_q = sum(lq)
    lead = (total_q, heads) if dims.varlen else (dims.batch, dims.max_seqlen_q, heads)
    if block_indices.dim() != len(lead) + 1 or tuple(block_indices.shape[:-1]) != lead:
        raise ValueError(f"block_indices must be {'(total_q' if dims.varlen else '(B, Tq'}, {heads}, K) matching q, "
                         f"got {tuple(block_indices.shape)}")
    sel = block_indices.reshape(total_q, heads, block_indices.shape[-1])
    if own_listed and total_q and not sel.shape[-1]:
        raise ValueError("block_indices must list each query's own block: it needs at least one slot (K >= 1)")
    if sel.numel():
        lq_t, lk_t = torch.tensor(lq), torch.tensor(lk)
        start = torch.repeat_interleave(torch.cumsum(lq_t, 0) - lq_t - (lk_t - lq_t), lq_t)
        own = device_tensor((torch.arange(total_q) - start) // block_size, torch.int64, sel.device)[:, None, None]
        ordered = torch.sort(sel, -1).values
        bad = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any() | (sel < -1).any()
        if own_listed:
            bad |= (sel > own).any() | ~(sel == own).any(-1).all()
        else:
            bad |= (sel >= own).any()
        if bool(bad):
            raise ValueError("block_indices must list distinct blocks (or -1) " + (
                "up to each query's own block, the own block included" if own_listed else
                "strictly before each query's own block"))
    return sel.to(torch.int32).contiguous()


@public_op("q", "k", "v")
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, *,
                           block_size: int, scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                           cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                           softcap: Optional[float] = None, return_lse: bool = False):
    """Attention of each (query, query head) over its own key block (causally) and the listed earlier blocks.

    Args:
        q, k, v: dense ``(B, Tq, Hq, D)`` / ``(B, Tk, Hkv, D)`` or varlen ``(total, H, D)`` with ``cu_seqlens``
            (or ``cu_seqlens_q``/``cu_seqlens_k``); queries aligned to the end of the keys; GQA.
        block_indices: int ``(B, Tq, Hq, K)`` or ``(total_q, Hq, K)``: for every query and query head, up to
            K indices of key blocks (``block_size`` tokens from the sequence start) strictly before the
            query's own block, each listed once; ``-1`` marks an unused slot. The own block is always
            attended and must not be listed.
        block_size: a power of two from 16 to 65536.
        softcap: soft-capping of the scores (Gemma 2's): a positive ``c`` makes them ``c * tanh(scale * q.k / c)``;
            None or 0 (default): none.
    Returns:
        ``out`` in q's dtype (and the float32 lse); differentiable in q, k, v (dq bitwise reproducible under
        ``torch.use_deterministic_algorithms(True)``, as :func:`longattn.moba_attention`'s).
    """
    cu_seqlens_q, cu_seqlens_k, _, _ = resolve_seqlens(cu_seqlens, None, cu_seqlens_q, cu_seqlens_k, None, None)
    dims = check_attention_inputs(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    scale = check_scale(scale, dims.dim_qk ** -0.5)
    softcap = check_softcap(softcap)
    qp, kp, vp, lq, lk = pack_inputs(q, k, v, dims)
    sel = check_block_indices(block_indices, dims, dims.heads_q, lq, lk, block_size, own_listed=False, q=q)
    plan = plan_blocks(lq, lk, block_size, dims, q.device)
    qk_, kk_, vk_ = kernel_inputs(qp, kp, vp)
    out, lse = block_sparse_packed(qk_, kk_, vk_, sel, plan, dims, block_size, scale, softcap)
    out, lse = unpack_output(out.to(q.dtype), lse, dims)
    return (out, lse) if return_lse else out
