"""Dense flash attention in Triton, forward and backward.

Supports the dense ``(B, T, H, D)`` and varlen ``(total, H, D)`` layouts, GQA (K/V heads are never
repeated), causal masking with queries aligned to the end of the keys, a sliding window, different
q/k and v head dims (any size up to 1024; a q/k head dim that is not a power of two runs as two power-of-two
tiles, 192 = 128 + 64, and v's is padded inside the kernel) and the
float32 log-sum-exp of every row, whose gradient is also propagated (so partial results can be merged
differentiably, see :mod:`longattn.kernels.merge`).

Kernels
-------
``_flash_fwd_kernel``     one program per (query block, query head, sequence); online softmax. Grid axis 0
                          enumerates (sequence, block) pairs, so the number of sequences is not limited
                          by CUDA's 65535 bound on the other grid axes.
``_flash_bwd_prep_kernel`` delta = rowsum(dO * O) - dLSE.
``_flash_bwd_dkdv_kernel`` one program per (key block, KV head, sequence); loops over the query heads
                          of its GQA group, so dK/dV need no atomics and are deterministic. With few key
                          blocks for many queries the group's heads are spread over several programs whose
                          float32 partials are summed after (still deterministic).
``_flash_bwd_dq_kernel``   one program per (query block, query head, sequence).

Key and query ranges are split into blocks that need masking (diagonal, window edge, ragged tail) and
blocks that are fully visible, which skip the mask arithmetic. These kernels and the split-KV decoding one can also
read the two tiles of a split q/k head dim from two tensors each (``SPLIT_QK``; ``parts`` of flash_fwd, flash_bwd,
flash_decode): MLA's prefill then passes its latent and rotary parts, the rotary key a stride-0 view over the
heads, without concatenating them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl

from .merge import merge_fwd
from .utils import (COMPILE_OPTIONS, AttnDims, autotune, autotune_configs, autotune_enabled, cdiv,
                    check_attention_inputs, check_attention_shapes, check_device, check_positive_int, check_scale,
                    check_softcap, eager_context, empty, empty_like, first_order_backward, is_interpreter,
                    kernel_inputs, next_pow2, num_sms, public_op, resolve_seqlens, row_descriptors, small_tiles,
                    split_context, split_dim, widen_by_asm)

LOG2E = 1.4426950408889634
# online softmax with LAZY_RESCALE: the rows' reference max moves (their accumulator rescaled to it) only when some
# row's max grew past it by more than this (log2 units): the probabilities stay below 2^8
RESCALE_LOG2 = tl.constexpr(8.0)
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# Shared jit helpers
# ----------------------------------------------------------------------------------------------
# float8 e4m3 -> bfloat16 by integer operations (PTX for tl.inline_asm_elementwise, pack 4: $2 holds four bytes,
# element i in byte i; $0 and $1 two bfloat16 each, element 2j in the low half of $j; $2 is read before either
# output is written, as an output may share its register). Bytes (0, 1) and (2, 3) go to the high halves of two
# registers' 16-bit lanes (prmt); the sign stays at bit 15, exponent and mantissa shift down 4 bits (mask 0x07F0)
# to the bottom of bfloat16's exponent and the top of its mantissa; then one exact multiply by 2^(127 - 7)
# (0x7B80; fma with -0: -0 stays -0). Subnormals become bfloat16 subnormals before the multiply, normal numbers
# after it: every finite value is exact; e4m3fn's NaN becomes a finite value (a cache holds none). (Triton's own
# e5m2 -> bfloat16 already works so on the bits.)
E4M3_TO_BF16 = tl.constexpr(
    "{ .reg .b32 a0, a1, m, k, z; prmt.b32 a0, $2, 0, 0x1404; prmt.b32 a1, $2, 0, 0x3424; "
    "mov.b32 k, 0x7b807b80; mov.b32 z, 0x80008000; "
    "shr.b32 m, a0, 4; and.b32 m, m, 0x07f007f0; and.b32 a0, a0, 0x80008000; or.b32 a0, a0, m; "
    "fma.rn.bf16x2 $0, a0, k, z; "
    "shr.b32 m, a1, 4; and.b32 m, m, 0x07f007f0; and.b32 a1, a1, 0x80008000; or.b32 a1, a1, m; "
    "fma.rn.bf16x2 $1, a1, k, z; }")


@triton.jit
def _widen(x, dtype: tl.constexpr, ASM: tl.constexpr):
    """``x`` (a cache tile) in ``dtype``. An e4m3 tile to bfloat16 with ASM (NVIDIA GPUs): by the integer and
    packed-bfloat16 operations above. Triton's own conversion goes through float16 and, compiled for sm_90, ends
    in one F2F conversion instruction per value (conversions issue at a fraction of the integer rate): in MLA decoding
    with 128 heads (2026-11-27, H100) the e4m3 cache, half the bytes, was 1.2x slower than bfloat16. Otherwise
    (the interpreter, e5m2, float16 / float32, a tile already in ``dtype``) as ``.to`` converts. Both are exact."""
    if ASM and dtype == tl.bfloat16 and x.dtype == tl.float8e4nv:
        return tl.inline_asm_elementwise(E4M3_TO_BF16, "=r,=r,r", [x.to(tl.uint8, bitcast=True)],
                                         dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        return x.to(dtype)


@triton.jit
def _seq_bounds(CU, PAD, b, seqlen, pad_shift, IS_VARLEN: tl.constexpr, LEFT_PAD: tl.constexpr):
    """Start row (in the packed layout) and length of sequence b. Dense layout with LEFT_PAD: PAD holds each
    sequence's padding rows in the key layout, less ``pad_shift`` rows (Tk - Tq for the queries) here."""
    if IS_VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = b * 0
        length = seqlen + b * 0
        if LEFT_PAD:
            start = tl.maximum(tl.load(PAD + b) - pad_shift, 0)
            length = seqlen - start
    return start, length


@triton.jit
def _split_pid(pid, max_len, BLOCK: tl.constexpr):
    """Grid axis 0 enumerates (sequence, block) pairs, blocks fastest: returns (block, sequence)."""
    n = tl.cdiv(max_len, BLOCK)
    return pid % n, pid // n


@triton.jit
def _ceil_to(x, m):
    return (x + m - 1) // m * m


@triton.jit
def _window_lo(qpos, window, koff, CHUNKED: tl.constexpr):
    """First key position a query at ``qpos`` sees under its window: the ``window`` most recent keys, or
    (CHUNKED) the start of its chunk of ``window`` positions, key 0 at position ``koff`` of the chunking.
    Non-decreasing in qpos."""
    if CHUNKED:
        return tl.maximum(qpos + koff, 0) // window * window - koff
    else:
        return qpos - window + 1


@triton.jit
def _window_hi(kpos, window, koff, CHUNKED: tl.constexpr):
    """Past the last query position whose window holds the key at ``kpos`` (see _window_lo)."""
    if CHUNKED:
        return (tl.maximum(kpos + koff, 0) // window + 1) * window - koff
    else:
        return kpos + window


@triton.jit
def _key_ranges(m_first, m_last, k_len, window, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, KS: tl.constexpr, KO: tl.constexpr, CHUNKED: tl.constexpr = False,
                koff=0):
    """Key ranges for the query rows whose positions span [m_first, m_last]; key j sits at j*KS + KO.

    Returns (a, b, c, d): keys in [a, b) and [c, d) need masking, keys in [b, c) are visible to every
    row. a, b, c are multiples of BLOCK_N (or equal d). The window bounds (CHUNKED: chunks, see _window_lo)
    assume KS == 1, KO == 0.
    """
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(m_last - KO + KS, 0) // KS)
    lo = hi * 0
    full_lo = lo
    if HAS_WINDOW:
        lo = tl.maximum(_window_lo(m_first, window, koff, CHUNKED), 0) // BLOCK_N * BLOCK_N
        full_lo = _ceil_to(tl.maximum(_window_lo(m_last, window, koff, CHUNKED), 0), BLOCK_N)
    full_hi = k_len // BLOCK_N * BLOCK_N
    if CAUSAL:
        full_hi = tl.minimum(full_hi, tl.maximum(m_first - KO + KS, 0) // KS // BLOCK_N * BLOCK_N)
    b = tl.minimum(tl.maximum(full_lo, lo), hi)
    c = tl.minimum(tl.maximum(full_hi, b), hi)
    return lo, b, c, hi


@triton.jit
def _visible(pos_m, offs_n, k_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, KS: tl.constexpr,
             KO: tl.constexpr, CHUNKED: tl.constexpr = False, koff=0):
    """(M, N) mask of the keys offs_n (key j at position j*KS + KO) visible to the queries at pos_m."""
    return _visible_2d(pos_m[:, None], offs_n[None, :], k_len, window, CAUSAL, HAS_WINDOW, KS, KO, CHUNKED, koff)


@triton.jit
def _visible_2d(qpos, kidx, k_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, KS: tl.constexpr,
                KO: tl.constexpr, CHUNKED: tl.constexpr = False, koff=0, KEYS_FIXED: tl.constexpr = False):
    """Visibility for query positions ``qpos`` and key indices ``kidx`` broadcast against each other: (M, 1)
    and (1, N) give the (M, N) mask, (1, M) and (N, 1) its transpose. Chunks' bound is taken on the side that stays
    fixed along the caller's loop (KEYS_FIXED: the keys', as in dK/dV), where its division is computed once (for
    causal attention, ``kpos >= _window_lo(qpos)`` and ``qpos < _window_hi(kpos)`` say the same; as compiled for
    sm_90, dK/dV's 64 x 64 tile at d 128 has 40/37/36 spill loads and stores an iteration of its loops, not
    47/45/43)."""
    vis = kidx < k_len
    kpos = kidx * KS + KO
    if CAUSAL:
        vis = vis & (kpos <= qpos)
    if HAS_WINDOW:
        if KEYS_FIXED and CHUNKED:
            vis = vis & (qpos < _window_hi(kpos, window, koff, CHUNKED))
        else:
            vis = vis & (kpos >= _window_lo(qpos, window, koff, CHUNKED))
    return vis


@triton.jit
def _chunk_offset(KOFF, b, CHUNKED: tl.constexpr):
    """Position of sequence b's key 0 in its chunking: KOFF[b], or 0 without KOFF (or chunks)."""
    koff = b * 0
    if CHUNKED:
        if KOFF is not None:
            koff = tl.load(KOFF + b)
    return koff


@triton.jit
def _query_shift(q_len, k_len, KS: tl.constexpr, KO: tl.constexpr):
    """Position of query 0: aligned to the end of the keys, or 0 when keys are strided summaries."""
    shift = k_len - q_len
    if (KS != 1) or (KO != 0):
        shift = shift * 0
    return shift


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_cols(ptr, rows, in_rows, cols, limit, TRANS: tl.constexpr):
    """Columns ``cols`` (those below ``limit``, zeros past it) of the rows ``rows`` (pointer offsets, masked by
    ``in_rows``): a (rows, cols) tile, or TRANS (cols, rows)."""
    if TRANS:
        x = tl.load(ptr + rows[None, :] + cols[:, None], mask=in_rows[None, :] & (cols[:, None] < limit), other=0.0)
    else:
        x = tl.load(ptr + rows[:, None] + cols[None, :], mask=in_rows[:, None] & (cols[None, :] < limit), other=0.0)
    return x


@triton.jit
def _load_split(ptr, rows, in_rows, DQK: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                TRANS: tl.constexpr, ptr_b=None, rows_b=None, SPLIT: tl.constexpr = False):
    """Rows ``rows`` (pointer offsets, masked by ``in_rows``) of a (tokens, DQK) tile as two parts of BLOCK_DA
    and BLOCK_DB columns (head dims like 192 = 128 + 64 are split rather than padded to a power of two; with
    BLOCK_DB = 0 the second part is the first, unused). TRANS: as (D, rows) tiles. SPLIT: the second part's
    ``DQK - BLOCK_DA`` columns come from a tensor of their own, its rows at ``ptr_b + rows_b`` (MLA's rotary
    dims beside the latent's: no concatenated copy), the first part's BLOCK_DA columns being all of ``ptr``'s."""
    a = _load_cols(ptr, rows, in_rows, tl.arange(0, BLOCK_DA), DQK, TRANS)
    b = a
    if BLOCK_DB > 0:
        if SPLIT:
            b = _load_cols(ptr_b, rows_b, in_rows, tl.arange(0, BLOCK_DB), DQK - BLOCK_DA, TRANS)
        else:
            b = _load_cols(ptr, rows, in_rows, BLOCK_DA + tl.arange(0, BLOCK_DB), DQK, TRANS)
    return a, b


@triton.jit
def _dot_split(x_a, x_b, y_a, y_b, acc, BLOCK_DB: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + x @ y`` over a contraction dim held in two parts (see _load_split)."""
    acc = tl.dot(x_a, y_a, acc, input_precision=PRECISION)
    if BLOCK_DB > 0:
        acc = tl.dot(x_b, y_b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _store_split(ptr, rows, in_rows, x_a, x_b, DQK: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                 ptr_b=None, rows_b=None, SPLIT: tl.constexpr = False):
    """Store a (rows, DQK) tile held in two parts (see _load_split; SPLIT: the second to a tensor of its own)."""
    offs_a = tl.arange(0, BLOCK_DA)
    tl.store(ptr + rows[:, None] + offs_a[None, :], x_a.to(ptr.dtype.element_ty),
             mask=in_rows[:, None] & (offs_a[None, :] < DQK))
    if BLOCK_DB > 0:
        if SPLIT:
            offs_b = tl.arange(0, BLOCK_DB)
            tl.store(ptr_b + rows_b[:, None] + offs_b[None, :], x_b.to(ptr_b.dtype.element_ty),
                     mask=in_rows[:, None] & (offs_b[None, :] < DQK - BLOCK_DA))
        else:
            offs_b = BLOCK_DA + tl.arange(0, BLOCK_DB)
            tl.store(ptr + rows[:, None] + offs_b[None, :], x_b.to(ptr.dtype.element_ty),
                     mask=in_rows[:, None] & (offs_b[None, :] < DQK))


@triton.jit
def _rescale_to(m_i, m_new, l_i, acc):
    """An online softmax's sum and accumulator rescaled from the rows' reference max ``m_i`` to ``m_new`` (log2
    units; rows whose m_new is -inf, that saw no key, stay as they are): returns ``(m_new, l_i, acc)``."""
    alpha = tl.math.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
    return m_new, l_i * alpha, acc * alpha[:, None]


@triton.jit
def _softcapped(s, cap_scale, SOFTCAP: tl.constexpr):
    """The scores' soft-capping (Gemma 2's logits ``cap * tanh(scale * q.k / cap)``): ``tanh(s * cap_scale)``,
    ``cap_scale = scale / cap``, the cap itself folded into the kernels' qk_scale. SOFTCAP 2 (bfloat16 inputs on an
    NVIDIA GPU): by the GPU's ``tanh.approx.f32``, one special-function op a score, as many as the softmax's exp2
    (relative error about 2^-11, far below bfloat16's 2^-8 rounding of q and k). 1: as ``1 - 2 / (e^(2x) + 1)``,
    the reciprocal as a squared reciprocal square root (on NVIDIA GPUs ``rsqrt.approx.f32``, relative error about
    2^-22: a division's full-range path took 53 more registers a thread in the float32 forward, as compiled for
    sm_90). 0: ``s`` as it is."""
    if SOFTCAP == 2:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [s * cap_scale], dtype=tl.float32,
                                         is_pure=True, pack=1)
    elif SOFTCAP == 1:
        r = tl.math.rsqrt(tl.math.exp2(s * (cap_scale * 2.0 * 1.4426950408889634)) + 1.0)
        return 1.0 - 2.0 * r * r
    else:
        return s


@triton.jit
def _fwd_inner(acc, l_i, m_i, q_a, q_b, K_ptr, V_ptr, k_start, stride_kt, stride_vt, pos_m, start, end, k_len,
               window, qk_scale, offs_dv, DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr,
               BLOCK_DB: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, KS: tl.constexpr, KO: tl.constexpr, BT=None,
               last_page=0, PAGE: tl.constexpr = 0, WIDEN_ASM: tl.constexpr = False, KA_DESC=None, KB_DESC=None,
               V_DESC=None, tma_row=0, k_col=0, v_col=0, USE_TMA: tl.constexpr = False,
               LAZY_RESCALE: tl.constexpr = False, KB_ptr=None, stride_kbt=0, kb_col=0, SPLIT: tl.constexpr = False,
               cap_scale=0.0, SOFTCAP: tl.constexpr = 0, CHUNKED: tl.constexpr = False, koff=0):
    """Online softmax of the query rows over the keys [start, end) of a sequence whose key j sits at row
    ``k_start + j`` of K/V (SPLIT: the keys' second dim part at row ``k_start + j`` of KB_ptr, see _load_split), or
    (PAGE > 0: a paged cache) at row ``BT[j // PAGE] * PAGE + j % PAGE`` (each page clamped to [0, last_page]:
    never outside the cache). The pages of a tile are read one iteration ahead: its
    loads then wait on no load of their own iteration, and the compiler keeps several tiles in flight.

    USE_TMA (keys all inside the sequence, unmasked): the tiles come by TMA through K/V's row descriptors (see
    ``utils.row_descriptors``), key j at row ``tma_row + j``, the KV head's dims from columns ``k_col`` / ``v_col``
    (SPLIT: the second part's from column ``kb_col`` of its own descriptor).

    LAZY_RESCALE: the rows' reference max ``m_i`` moves, and the accumulator and sum are rescaled to it, only when
    some row's max grew past it by more than 2^RESCALE_LOG2 (rarely after the first tiles); otherwise a row's
    probabilities may reach 2^RESCALE_LOG2, the output acc / l and the lse m_i + log2 l the same. A tile then skips
    a multiply per accumulator element (d 128, 128 x 64 on 8 warps, as compiled for sm_90: 303 instructions a tile
    against 360), for a reduction over the program's rows and a barrier.

    SOFTCAP: the scores soft-capped (see _softcapped; qk_scale then holds cap * log2(e))."""
    if PAGE > 0:
        offs_n = start + tl.arange(0, BLOCK_N)
        pages = tl.load(BT + offs_n // PAGE, mask=offs_n < k_len, other=0)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < k_len
        if PAGE > 0:
            rows = tl.minimum(tl.maximum(pages, 0), last_page).to(tl.int64) * PAGE + offs_n % PAGE
            pages = tl.load(BT + (offs_n + BLOCK_N) // PAGE, mask=offs_n + BLOCK_N < k_len, other=0)
        else:
            rows = (k_start + offs_n).to(tl.int64)
        if USE_TMA:
            row = (tma_row + start_n).to(tl.int32)
            kt_a = tl.trans(KA_DESC.load([row, k_col]))
            kt_b = kt_a
            if BLOCK_DB > 0:
                if SPLIT:
                    kt_b = tl.trans(KB_DESC.load([row, kb_col]))
                else:
                    kt_b = tl.trans(KB_DESC.load([row, k_col + BLOCK_DA]))
        else:
            kt_a, kt_b = _load_split(K_ptr, rows * stride_kt, in_n, DQK, BLOCK_DA, BLOCK_DB, True, KB_ptr,
                                     rows * stride_kbt, SPLIT)
        # (float8 caches: keys and values widened to q's dtype, exactly, see _widen; their scales are folded into
        # qk_scale and the output's. The same dtype otherwise: no conversion)
        # the scores unscaled: the scale (> 0) goes into the row max and into one fused multiply-add with it per
        # score (sm_90, d 128, 128 x 64 tiles: 360 instructions a tile against 392 with a multiply of its own)
        s = _dot_split(q_a, q_b, _widen(kt_a, q_a.dtype, WIDEN_ASM), _widen(kt_b, q_a.dtype, WIDEN_ASM),
                       tl.zeros([q_a.shape[0], BLOCK_N], tl.float32), BLOCK_DB, PRECISION)
        s = _softcapped(s, cap_scale, SOFTCAP)
        if MASKED:
            s = tl.where(_visible(pos_m, offs_n, k_len, window, CAUSAL, HAS_WINDOW, KS, KO, CHUNKED, koff), s,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if LAZY_RESCALE:
            if tl.max((m_new > m_i + RESCALE_LOG2).to(tl.int32), 0) > 0:  # (m_i -inf: any key seen grew it)
                m_i, l_i, acc = _rescale_to(m_i, m_new, l_i, acc)
            m_new = m_i
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(tl.fma(s, qk_scale, -m_use[:, None]))
        if USE_TMA:
            v = V_DESC.load([row, v_col])
        else:
            v = _widen(tl.load(V_ptr + rows[:, None] * stride_vt + offs_dv[None, :],
                               mask=in_n[:, None] & (offs_dv[None, :] < DV), other=0.0), q_a.dtype, WIDEN_ASM)
        if LAZY_RESCALE:  # (rescaled above, if at all)
            l_i += tl.sum(p, 1)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# GPU tile candidates of the forward and dq kernels (the first is the one run without autotuning)
FWD_TILES = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
]
_FWD_CONFIGS = autotune_configs(FWD_TILES, dict(BLOCK_M=32, BLOCK_N=32))


# The forward's candidates: each tile of TMA_ROWS keys (64 on a GPU) also loading its unmasked key tiles by TMA
# where the host gives K/V's descriptors (tiles of TMA_ROWS rows: Hopper; the interpreter runs them too), those
# first. A fixed tile keeps the descriptors out of the candidates (a config pre-hook setting their tiles would also
# keep Triton from caching the tuning on disk). As compiled for sm_90 (tests/cuda_compile.py), TMA takes the
# addresses and masks of the unmasked loop's cp.async off the threads: d 192/128, 128 x 64 on 8 warps, 537
# instructions a thread per tile (about as many issue cycles as the tile's tensor-core work) down to 442; d 128
# 456 to 392. Timed on the H100 (Triton 3.6): the varlen forward at d 128, 2.37 ms against its pointer twin's 2.49.
# Triton 3.6's PTX of the 128 x 64 twin crashes ptxas for some shapes (d 16 causal, d 128 left-padded, sm_90): the
# autotuner skips it there, and without autotuning the next tile is taken (kernels.utils.autotune); 3.8 and 3.9
# compile them. Triton's warp specialisation of that loop (tl.range(..., warp_specialize=True), Hopper since 3.5)
# leaves the 8-warp tile as it is, as compiled for sm_90 with Triton 3.9, and fails in its pass on 4 warps. Nor does
# issuing the next tile's score product before this tile's softmax (its result carried to the next iteration, so
# that the tensor cores would work while the softmax runs): Triton 3.6 and 3.9 wait for that product right after
# issuing it (wgmma.wait_group 0 before the softmax, as compiled for sm_90), at 22-41 more registers a thread.
TMA_ROWS = _FWD_CONFIGS[0].kwargs["BLOCK_N"]  # (the first candidate's: 64 on a GPU)
_FWD_CANDIDATES = [triton.Config(dict(c.kwargs, USE_TMA=True), num_warps=c.num_warps, num_stages=c.num_stages)
                   for c in _FWD_CONFIGS if c.kwargs["BLOCK_N"] == TMA_ROWS] + _FWD_CONFIGS
# and the 128-row tiles on 8 warps also rescaling lazily (see _fwd_inner), last (not yet timed on a GPU)
_FWD_CANDIDATES += [triton.Config(dict(c.kwargs, LAZY_RESCALE=True), num_warps=c.num_warps, num_stages=c.num_stages)
                    for c in _FWD_CANDIDATES if c.kwargs["BLOCK_M"] == 128 and c.num_warps == 8]

SMEM_LIMIT = 227 * 1024  # bytes of shared memory per block on Hopper

# float32 inputs multiply on CUDA cores ("ieee" products, no tensor cores): the tiles above would spill most of
# their accumulators and take minutes to compile; these spill nothing up to head dim 256 on sm_90
# (tests/cuda_compile.py --resources). No timing either: float32 is the accuracy mode, not the fast one.
FP32_TILES = dict(fwd=dict(BLOCK_M=32, BLOCK_N=32), dq=dict(BLOCK_M=16, BLOCK_N=32), dkdv=dict(BLOCK_M=32, BLOCK_N=16))


def _smem_prune(kernel: str):
    """Autotune pruning: drop tiles whose shared-memory buffers cannot fit, or whose float32 accumulators would
    take over half a thread's registers (over 160 for dK/dV's two). ``kernel`` says which tile stays
    resident: ``"fwd"`` q (BLOCK_M rows, q/k dims), ``"dq"`` q and do (BLOCK_M rows, every dim), ``"dkdv"`` k and
    v (BLOCK_N rows, every dim); the other rows stream through ``num_stages`` buffers of every dim. Against the
    compiler's own figures for head dims 128 to 256 (tests/cuda_compile.py --resources) it errs high by up to
    ~15%; a tile that still does not fit fails to compile and the autotuner skips it. The accumulators' bound
    drops what spilled inside its loop on sm_90: 128 rows of dq on 4 warps at head dim 192 (139-151 spilled
    words per iteration), of the forward at 256 (276-278), dK/dV's 4-warp tiles at 256; it keeps every tile
    at head dims up to 192 / 128 but that dq one."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}  # constexprs passed by keyword arrive in kwargs
        elem = args["Q"].element_size()
        if elem == 4 and not small_tiles():
            return [triton.Config(dict(FP32_TILES[kernel]), num_warps=8, num_stages=1)]
        dqk = args["BLOCK_DA"] + args["BLOCK_DB"]
        d = dqk + args["BLOCK_DV"]

        def smem(c):
            m, n, stages = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], max(c.num_stages, 1)
            if kernel == "dkdv":
                resident, streamed = n * d, m * d * stages
            else:
                resident, streamed = m * (dqk if kernel == "fwd" else d), n * d * stages
            return 1.1 * elem * (resident + streamed)

        def accumulators(c):  # float32 registers per thread
            if kernel == "dkdv":
                return c.kwargs["BLOCK_N"] * d / (32 * c.num_warps) <= 160
            return c.kwargs["BLOCK_M"] * (args["BLOCK_DV"] if kernel == "fwd" else dqk) / (32 * c.num_warps) <= 128

        if d <= 256:  # the one-loop dK/dV tiles pay for their masks without saving spills there
            configs = [c for c in configs if not c.kwargs.get("ONE_LOOP")]
        if not args.get("HAS_TMA"):  # (the forward's TMA twins need K/V's descriptors)
            configs = [c for c in configs if not c.kwargs.get("USE_TMA")]
        keep = [c for c in configs if smem(c) <= SMEM_LIMIT and accumulators(c)] or [min(configs, key=smem)]
        return keep if autotune_enabled() else keep[:1]
    return prune


@autotune(_FWD_CANDIDATES, ["BLOCK_DA", "BLOCK_DB", "BLOCK_DV", "CAUSAL", "HAS_WINDOW", "IS_VARLEN", "PRECISION",
                             "HAS_TMA", "SPLIT_QK", "SOFTCAP", "CHUNKED"], _smem_prune("fwd"))
@triton.jit
def _flash_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, KA_DESC, KB_DESC, V_DESC, QB, KB,
                      stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                      stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                      stride_lb, stride_lh, stride_qbb, stride_qbt, stride_qbh, stride_kbb, stride_kbt, stride_kbh,
                      seqlen_q, seqlen_k, window, qk_scale, group, tma_rows,
                      DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                      BLOCK_DV: tl.constexpr,
                      IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      PRECISION: tl.constexpr, KS: tl.constexpr, KO: tl.constexpr, LEFT_PAD: tl.constexpr,
                      BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, HAS_TMA: tl.constexpr = False, USE_TMA: tl.constexpr = False,
                      LAZY_RESCALE: tl.constexpr = False, SPLIT_QK: tl.constexpr = False, cap_scale=0.0,
                      SOFTCAP: tl.constexpr = 0, QPOS=None, HAS_QPOS: tl.constexpr = False, KOFF=None,
                      CHUNKED: tl.constexpr = False):
    """Flash attention forward: one program per (BLOCK_M query rows of a sequence, query head). Its keys go in
    three ranges (see _key_ranges): the tiles some of its rows cannot see all of (masked), those all rows see,
    the masked tail. USE_TMA (HAS_TMA: the host gave K/V's row descriptors, ``tma_rows`` rows per batch entry, 0
    varlen) loads the middle range's tiles, wholly inside the sequence, by TMA. SPLIT_QK: q's and k's last
    ``DQK - BLOCK_DA`` dims are tensors of their own, QB and KB (see _load_split). SOFTCAP: soft-capped scores
    (see _softcapped). HAS_QPOS: the position of each sequence's first query is QPOS[b] (int32; strided keys
    summarising the tokens before a chunk of queries). CHUNKED (with HAS_WINDOW): ``window`` is a chunk size
    (see _window_lo), sequence b's key 0 at position KOFF[b] of its chunking (int32; 0 without KOFF)."""
    tl.static_assert(HAS_TMA or not USE_TMA, "USE_TMA needs K/V's descriptors")
    pid_m, b = _split_pid(tl.program_id(0), seqlen_q, BLOCK_M)
    h = tl.program_id(1)
    q_start, q_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k - seqlen_q, IS_VARLEN, LEFT_PAD)
    k_start, k_len = _seq_bounds(CU_K, CU_K, b, seqlen_k, 0, IS_VARLEN, LEFT_PAD)
    if pid_m * BLOCK_M >= q_len:
        return
    hk = h // group
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_m = offs_m < q_len
    q_rows = (q_start + offs_m).to(tl.int64)
    q_a, q_b = _load_split(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh, q_rows * stride_qt, in_m, DQK, BLOCK_DA,
                           BLOCK_DB, False, QB + b64 * stride_qbb + h.to(tl.int64) * stride_qbh, q_rows * stride_qbt,
                           SPLIT_QK)
    K_ptr = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    V_ptr = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    KB_ptr = KB + b64 * stride_kbb + hk.to(tl.int64) * stride_kbh

    shift = _query_shift(q_len, k_len, KS, KO)  # query i sits at position i + shift
    if HAS_QPOS:
        shift = tl.load(QPOS + b)
    koff = _chunk_offset(KOFF, b, CHUNKED)
    pos_m = offs_m + shift
    m_first = pid_m * BLOCK_M + shift
    m_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1 + shift
    a, bb, c, d = _key_ranges(m_first, m_last, k_len, window, BLOCK_N, CAUSAL, HAS_WINDOW, KS, KO, CHUNKED, koff)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_a, q_b, K_ptr, V_ptr, k_start, stride_kt, stride_vt, pos_m, a, bb,
                               k_len, window, qk_scale, offs_dv, DQK, DV, BLOCK_DA, BLOCK_DB, BLOCK_N, True, CAUSAL,
                               HAS_WINDOW, PRECISION, KS, KO, LAZY_RESCALE=LAZY_RESCALE, KB_ptr=KB_ptr,
                               stride_kbt=stride_kbt, SPLIT=SPLIT_QK, cap_scale=cap_scale, SOFTCAP=SOFTCAP,
                               CHUNKED=CHUNKED, koff=koff)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_a, q_b, K_ptr, V_ptr, k_start, stride_kt, stride_vt, pos_m, bb, c,
                               k_len, window, qk_scale, offs_dv, DQK, DV, BLOCK_DA, BLOCK_DB, BLOCK_N, False, CAUSAL,
                               HAS_WINDOW, PRECISION, KS, KO, KA_DESC=KA_DESC, KB_DESC=KB_DESC, V_DESC=V_DESC,
                               tma_row=b * tma_rows + k_start, k_col=(hk.to(tl.int64) * stride_kh).to(tl.int32),
                               v_col=(hk.to(tl.int64) * stride_vh).to(tl.int32), USE_TMA=USE_TMA,
                               LAZY_RESCALE=LAZY_RESCALE, KB_ptr=KB_ptr, stride_kbt=stride_kbt,
                               kb_col=(hk.to(tl.int64) * stride_kbh).to(tl.int32), SPLIT=SPLIT_QK,
                               cap_scale=cap_scale, SOFTCAP=SOFTCAP,
                               CHUNKED=CHUNKED, koff=koff)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_a, q_b, K_ptr, V_ptr, k_start, stride_kt, stride_vt, pos_m, c, d,
                               k_len, window, qk_scale, offs_dv, DQK, DV, BLOCK_DA, BLOCK_DB, BLOCK_N, True, CAUSAL,
                               HAS_WINDOW, PRECISION, KS, KO, LAZY_RESCALE=LAZY_RESCALE, KB_ptr=KB_ptr,
                               stride_kbt=stride_kbt, SPLIT=SPLIT_QK, cap_scale=cap_scale, SOFTCAP=SOFTCAP,
                               CHUNKED=CHUNKED, koff=koff)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_rows[:, None] * stride_ot + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=in_m[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_rows, lse, mask=in_m)


@triton.jit
def _decode_query(Q, stride_qb, stride_qh, b64, hk, group, DK: tl.constexpr, BLOCK_DK: tl.constexpr,
                  BLOCK_G: tl.constexpr):
    """The query rows of sequence b64's decoding token for KV head hk's GQA group, q (B, Hq, DK): (BLOCK_G,
    BLOCK_DK), the heads, their mask (shared by the decoding kernels of NSA and MoBA)."""
    rows = tl.arange(0, BLOCK_G)
    in_g = rows < group
    heads = (hk * group + rows).to(tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    q = tl.load(Q + b64 * stride_qb + heads[:, None] * stride_qh + dk[None, :],
                mask=in_g[:, None] & (dk[None, :] < DK), other=0.0)
    return q, heads, in_g


@triton.jit
def _flash_decode_kernel(Q, K, V, OS, LS, CU_Q, CU_K, SEQLENS, BT, QB, KB,
                         stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                         stride_vb, stride_vt, stride_vh, stride_op, stride_ob, stride_ot, stride_oh,
                         stride_lp, stride_lb, stride_lh, stride_btb,
                         stride_qbb, stride_qbt, stride_qbh, stride_kbb, stride_kbt, stride_kbh,
                         seqlen_q, seqlen_k, window, qk_scale, v_scale, group, heads_kv, tokens_per_split,
                         last_page, DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr,
                         BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr,
                         HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, LEFT_PAD: tl.constexpr,
                         TQ: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_SEQLENS: tl.constexpr = False, PAGE: tl.constexpr = 0, WIDEN_ASM: tl.constexpr = False,
                         SPLIT_QK: tl.constexpr = False, cap_scale=0.0, SOFTCAP: tl.constexpr = 0, KOFF=None,
                         CHUNKED: tl.constexpr = False):
    """Few queries per sequence (decoding, speculative tokens), no gradient: split-KV. Program (sequence * Hkv +
    KV head, split) holds its GQA group's heads times the sequence's queries as the rows of its tiles (each key
    tile is loaded once for all of them), streams one split of the keys and writes its normalised partial
    output and lse (natural log), merged afterwards (LEFT_PAD: also the padding query rows, 0 and -inf).

    HAS_SEQLENS (a KV cache, dense queries): sequence b holds ``SEQLENS[b]`` keys from row ``CU_K[b]`` of its
    cache (LEFT_PAD; else row 0), or (PAGE > 0) in the pages its block-table row ``BT + b * stride_btb`` lists (K/V
    then (pages, PAGE, Hkv, D), their batch strides 0); lengths are clamped to the cache (seqlen_k rows). K/V may be
    float8 (a quantised cache: keys K * k_scale, folded into qk_scale, values V * v_scale; WIDEN_ASM: widened to
    bfloat16 by inline PTX, see _widen). SPLIT_QK: q's and k's second dim part from QB and KB (see _load_split).
    SOFTCAP: soft-capped scores (see _softcapped). CHUNKED: chunks of ``window`` positions (see _flash_fwd_kernel).
    """
    b = tl.program_id(0) // heads_kv
    hk = tl.program_id(0) % heads_kv
    split = tl.program_id(1)
    if HAS_SEQLENS:
        q_start = b * 0
        q_len = seqlen_q + b * 0
        k_start = b * 0
        if LEFT_PAD:
            k_start = tl.minimum(tl.maximum(tl.load(CU_K + b), 0), seqlen_k)
        k_len = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), seqlen_k - k_start)
    else:
        q_start, q_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k - seqlen_q, IS_VARLEN, LEFT_PAD)
        k_start, k_len = _seq_bounds(CU_K, CU_K, b, seqlen_k, 0, IS_VARLEN, LEFT_PAD)
    M: tl.constexpr = BLOCK_G * TQ
    r = tl.arange(0, M)
    g = r // TQ
    t = r % TQ
    valid = (g < group) & (t < q_len)
    head = (hk * group + g).to(tl.int64)
    shift = k_len - q_len  # query t sits at key position t + shift
    pos_m = t + shift
    b64 = b.to(tl.int64)
    rows_q = (q_start + t).to(tl.int64)
    l_ptr = LS + split.to(tl.int64) * stride_lp + b64 * stride_lb + head * stride_lh + rows_q
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptr = OS + split.to(tl.int64) * stride_op + b64 * stride_ob + rows_q[:, None] * stride_ot \
        + head[:, None] * stride_oh + offs_dv[None, :]
    o_mask = valid[:, None] & (offs_dv[None, :] < DV)
    if LEFT_PAD and not HAS_SEQLENS:  # the padding query rows [0, q_start): output 0, lse -inf (in every split)
        padding = (g < group) & (t < q_start)
        t64 = t.to(tl.int64)
        tl.store(OS + split.to(tl.int64) * stride_op + b64 * stride_ob + t64[:, None] * stride_ot
                 + head[:, None] * stride_oh + offs_dv[None, :], tl.zeros([M, BLOCK_DV], tl.float32).to(
                     OS.dtype.element_ty), mask=padding[:, None] & (offs_dv[None, :] < DV))
        tl.store(LS + split.to(tl.int64) * stride_lp + b64 * stride_lb + head * stride_lh + t64,
                 tl.full([M], float("-inf"), tl.float32), mask=padding)
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, k_len)
    if CAUSAL:
        hi = tl.minimum(hi, shift + q_len)  # past the last query's position nothing is visible
    koff = _chunk_offset(KOFF, b, CHUNKED)
    if HAS_WINDOW:  # before the first query's window nothing is visible
        lo = tl.maximum(lo, _window_lo(shift, window, koff, CHUNKED))
    if lo >= hi:  # no key here: lse -inf, output 0 (the output itself when there is one split)
        tl.store(o_ptr, tl.zeros([M, BLOCK_DV], tl.float32).to(OS.dtype.element_ty), mask=o_mask)
        tl.store(l_ptr, tl.full([M], float("-inf"), tl.float32), mask=valid)
        return
    q_a, q_b = _load_split(Q + b64 * stride_qb, rows_q * stride_qt + head * stride_qh, valid, DQK, BLOCK_DA,
                           BLOCK_DB, False, QB + b64 * stride_qbb, rows_q * stride_qbt + head * stride_qbh, SPLIT_QK)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, BLOCK_DV], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_a, q_b, K + b64 * stride_kb + hk.to(tl.int64) * stride_kh,
                               V + b64 * stride_vb + hk.to(tl.int64) * stride_vh, k_start, stride_kt, stride_vt,
                               pos_m, lo, hi, hi, window, qk_scale, offs_dv, DQK, DV, BLOCK_DA, BLOCK_DB,
                               BLOCK_N, True, CAUSAL, HAS_WINDOW, PRECISION, 1, 0,  # keys past hi: other splits
                               BT + b64 * stride_btb, last_page, PAGE, WIDEN_ASM,
                               KB_ptr=KB + b64 * stride_kbb + hk.to(tl.int64) * stride_kbh, stride_kbt=stride_kbt,
                               SPLIT=SPLIT_QK, cap_scale=cap_scale, SOFTCAP=SOFTCAP, CHUNKED=CHUNKED, koff=koff)
    empty = l_i == 0.0
    out = acc * (v_scale / tl.where(empty, 1.0, l_i))[:, None]
    tl.store(o_ptr, out.to(OS.dtype.element_ty), mask=o_mask)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(l_ptr, lse, mask=valid)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _flash_bwd_prep_kernel(O, DO, DLSE, DELTA, CU_Q, stride_ob, stride_ot, stride_oh,
                           stride_dob, stride_dot, stride_doh, stride_lb, stride_lh, seqlen_q,
                           DV: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr,
                           HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, b = _split_pid(tl.program_id(0), seqlen_q, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    q_start, q_len = _seq_bounds(CU_Q, CU_Q, b, seqlen_q, 0, IS_VARLEN, False)
    if pid_m * BLOCK_M >= q_len:
        return
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    in_m = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    msk = in_m[:, None] & (offs_d[None, :] < DV)
    o = tl.load(O + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], mask=msk,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :], mask=msk,
                 other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    l_off = b64 * stride_lb + h * stride_lh + rows
    if HAS_DLSE:
        delta -= tl.load(DLSE + l_off, mask=in_m, other=0.0)
    tl.store(DELTA + l_off, delta, mask=in_m)


@triton.jit
def _bwd_probs(q_a, q_b, kt_a, kt_b, lse2, pos_m, offs_n, k_len, window, qk_scale, BLOCK_DB: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
               KS: tl.constexpr, KO: tl.constexpr, cap_scale=0.0, SOFTCAP: tl.constexpr = 0,
               CHUNKED: tl.constexpr = False, koff=0):
    """Recompute the (M, N) softmax probabilities from q, k^T (split head dim) and the row lse (log2 units).
    Returns them and the soft-capped scores' tanh (see _softcapped; the raw scores without SOFTCAP)."""
    s = _dot_split(q_a, q_b, kt_a, kt_b, tl.zeros([q_a.shape[0], kt_a.shape[1]], tl.float32), BLOCK_DB, PRECISION)
    s = _softcapped(s, cap_scale, SOFTCAP)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(_visible(pos_m, offs_n, k_len, window, CAUSAL, HAS_WINDOW, KS, KO, CHUNKED, koff), p, 0.0)
    return p, s


@triton.jit
def _softcap_grad(ds, t, SOFTCAP: tl.constexpr):
    """The gradient of the raw (scaled) scores from that of the soft-capped ones, whose tanh is ``t``:
    ``d cap * tanh(x / cap) / dx = 1 - t^2``."""
    if SOFTCAP > 0:
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _scaled_scores(q_a, q_b, kt_a, kt_b, scale, shift, BLOCK_DB: tl.constexpr, PRECISION: tl.constexpr,
                   cap_scale=0.0, SOFTCAP: tl.constexpr = 0):
    """``scale * x + shift`` for the scores x of q against k^T, both in two parts along the head dim (BLOCK_DB = 0:
    one; see _load_split), soft-capped with SOFTCAP (x the tanh, see _softcapped): returns them and the tanh (the
    scaled scores without SOFTCAP). The two parts' products are not chained: each comes into the sum by a fused
    multiply-add (Triton lays a chain's first product on all warps along its rows: with 64 rows on 8 warps both
    warpgroups would compute it; see sparse's _bwd_operands)."""
    if SOFTCAP > 0:
        t = tl.dot(q_a, kt_a, input_precision=PRECISION)
        if BLOCK_DB > 0:
            t = tl.fma(tl.dot(q_b, kt_b, input_precision=PRECISION), 1.0, t)
        t = _softcapped(t, cap_scale, SOFTCAP)
        s = tl.fma(t, scale, shift)
    else:
        s = tl.fma(tl.dot(q_a, kt_a, input_precision=PRECISION), scale, shift)
        if BLOCK_DB > 0:
            s = tl.fma(tl.dot(q_b, kt_b, input_precision=PRECISION), scale, s)
        t = s
    return s, t


@triton.jit
def _load_row_stats(LSE_ptr, DELTA_ptr, rows, in_m):
    """Row lse in log2 units (+inf for rows that see no key, so their probabilities are 0) and delta."""
    lse = tl.load(LSE_ptr + rows, mask=in_m, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA_ptr + rows, mask=in_m, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_inner(dk_a, dk_b, dv, k_a, k_b, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, q_start, stride_qt, stride_dot,
                offs_n, start, end, q_len, k_len, shift, window, qk_scale, offs_dv, DQK: tl.constexpr,
                DV: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                KS: tl.constexpr, KO: tl.constexpr, QB_ptr=None, stride_qbt=0, SPLIT: tl.constexpr = False,
                cap_scale=0.0, SOFTCAP: tl.constexpr = 0, CHUNKED: tl.constexpr = False, koff=0):
    """Works on the transposed (N, M) problem: s^T = k q^T, so p^T and ds^T come out of their matmuls in the
    layout of the next matmul's left operand (no transposition through shared memory) and k, v stay left
    operands read from shared memory."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_m = offs_m < q_len
        rows = (q_start + offs_m).to(tl.int64)
        q_a, q_b = _load_split(Q_ptr, rows * stride_qt, in_m, DQK, BLOCK_DA, BLOCK_DB, False, QB_ptr,
                               rows * stride_qbt, SPLIT)
        do = tl.load(DO_ptr + rows[:, None] * stride_dot + offs_dv[None, :],
                     mask=in_m[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse2, delta = _load_row_stats(LSE_ptr, DELTA_ptr, rows, in_m)
        st = _dot_split(k_a, k_b, tl.trans(q_a), tl.trans(q_b), tl.zeros([k_a.shape[0], BLOCK_M], tl.float32),
                        BLOCK_DB, PRECISION)
        st = _softcapped(st, cap_scale, SOFTCAP)
        pt = tl.math.exp2(st * qk_scale - lse2[None, :])
        if MASKED:
            pt = tl.where(_visible_2d((offs_m + shift)[None, :], offs_n[:, None], k_len, window, CAUSAL, HAS_WINDOW,
                                      KS, KO, CHUNKED, koff, KEYS_FIXED=True), pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = _softcap_grad(pt * (dpt - delta[None, :]), st, SOFTCAP).to(q_a.dtype)
        dk_a += tl.dot(dst, q_a, input_precision=PRECISION)
        if BLOCK_DB > 0:
            dk_b += tl.dot(dst, q_b, input_precision=PRECISION)
    return dk_a, dk_b, dv


# GPU tile candidates of the dK/dV kernel
DKDV_TILES = [
    # one loop over the block's queries per head, masked everywhere (ONE_LOOP): with the three loops nested in the
    # loop over the group's heads, the two accumulators of head dims 192 / 128 spill inside the loops at these
    # tiles on sm_90, in one loop they do not (tried only above 256 accumulated columns, see _smem_prune). First:
    # the H100's pick for NSA's window and compressed branches at 64k (2026-11-27, bench/results/nvidia-h100),
    # what runs there without autotuning; where the one-loop tiles are pruned (head dim 128) 64 x 128 comes first
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2, ONE_LOOP=True),
    dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2, ONE_LOOP=True),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2, ONE_LOOP=True),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
    # 64 keys on 8 warps: half the accumulator registers per thread (the 4-warp tiles spill at head dim 192)
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
    # 32 keys on 8 warps: at head dim 256 the only pipelined tile that spills nothing inside its loop on sm_90
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
]
_BWD_CONFIGS = autotune_configs(DKDV_TILES, dict(BLOCK_M=32, BLOCK_N=32))


@autotune(_BWD_CONFIGS, ["BLOCK_DA", "BLOCK_DB", "BLOCK_DV", "CAUSAL", "HAS_WINDOW", "IS_VARLEN", "PRECISION",
                         "SPLIT_QK", "SOFTCAP", "CHUNKED"], _smem_prune("dkdv"))
@triton.jit
def _flash_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, CU_Q, CU_K, QB, KB, DKB,
                           stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                           stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                           stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                           stride_dks, stride_dvs, stride_lb, stride_lh,
                           stride_qbb, stride_qbt, stride_qbh, stride_kbb, stride_kbt, stride_kbh,
                           stride_dkbb, stride_dkbt, stride_dkbh, stride_dkbs,
                           seqlen_q, seqlen_k, window, qk_scale, scale, group, heads_per_split,
                           DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                           BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr,
                           HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, KS: tl.constexpr,
                           KO: tl.constexpr, LEFT_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           ONE_LOOP: tl.constexpr = False, SPLIT_QK: tl.constexpr = False, cap_scale=0.0,
                           SOFTCAP: tl.constexpr = 0, KOFF=None, CHUNKED: tl.constexpr = False, QPOS=None,
                           HAS_QPOS: tl.constexpr = False):
    """dK/dV of one key block and KV head from the query heads [split * heads_per_split, ...) of its GQA group
    (grid axis 1 = KV head * splits + split); with several splits DK/DV are float32 partial sums, one slice per
    split (stride_dks / stride_dvs), added up afterwards. Per head, three loops over the query blocks (masked,
    fully visible, masked), or with ONE_LOOP one masked loop over them all. SPLIT_QK: q's and k's second dim part
    from QB and KB, dK's to DKB (see _load_split). SOFTCAP: soft-capped scores (see _softcapped). CHUNKED: chunks of
    ``window`` positions, HAS_QPOS: each sequence's first query at position QPOS[b] (see _flash_fwd_kernel)."""
    pid_n, b = _split_pid(tl.program_id(0), seqlen_k, BLOCK_N)
    n_splits = tl.cdiv(group, heads_per_split)
    hk = tl.program_id(1) // n_splits
    split = tl.program_id(1) % n_splits
    q_start, q_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k - seqlen_q, IS_VARLEN, LEFT_PAD)
    k_start, k_len = _seq_bounds(CU_K, CU_K, b, seqlen_k, 0, IS_VARLEN, LEFT_PAD)
    if pid_n * BLOCK_N >= k_len:
        return
    b64 = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_n = offs_n < k_len
    k_rows = (k_start + offs_n).to(tl.int64)
    k_a, k_b = _load_split(K + b64 * stride_kb + hk.to(tl.int64) * stride_kh, k_rows * stride_kt, in_n, DQK,
                           BLOCK_DA, BLOCK_DB, False, KB + b64 * stride_kbb + hk.to(tl.int64) * stride_kbh,
                           k_rows * stride_kbt, SPLIT_QK)
    v = tl.load(V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_rows[:, None] * stride_vt
                + offs_dv[None, :], mask=in_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk_a = tl.zeros([BLOCK_N, BLOCK_DA], tl.float32)
    dk_b = tl.zeros([BLOCK_N, BLOCK_DB if BLOCK_DB > 0 else 1], tl.float32)  # unused without a second part
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    # Query rows that see some key of this block, and those that see all of them.
    shift = _query_shift(q_len, k_len, KS, KO)
    if HAS_QPOS:
        shift = tl.load(QPOS + b)
    n_first = pid_n * BLOCK_N
    n_last = tl.minimum(n_first + BLOCK_N, k_len) - 1
    lo = q_len * 0
    full_lo = lo
    if CAUSAL:
        lo = tl.maximum(n_first * KS + KO - shift, 0) // BLOCK_M * BLOCK_M
        full_lo = _ceil_to(tl.maximum(n_last * KS + KO - shift, 0), BLOCK_M)
    hi = q_len
    full_hi = q_len // BLOCK_M * BLOCK_M
    koff = _chunk_offset(KOFF, b, CHUNKED)
    if HAS_WINDOW:
        hi = tl.minimum(q_len, tl.maximum(_window_hi(n_last, window, koff, CHUNKED) - shift, 0))
        full_hi = tl.minimum(full_hi, tl.maximum(_window_hi(n_first, window, koff, CHUNKED) - shift, 0) // BLOCK_M
                             * BLOCK_M)
    if n_first + BLOCK_N > k_len:  # ragged key block: mask everywhere
        full_hi = lo
    bb = tl.minimum(tl.maximum(full_lo, lo), hi)
    c = tl.minimum(tl.maximum(full_hi, bb), hi)
    if ONE_LOOP:  # the first, masked loop takes every query block
        bb = hi

    for g in range(split * heads_per_split, tl.minimum(split * heads_per_split + heads_per_split, group)):
        h = (hk * group + g).to(tl.int64)
        Q_ptr = Q + b64 * stride_qb + h * stride_qh
        DO_ptr = DO + b64 * stride_dob + h * stride_doh
        LSE_ptr = LSE + b64 * stride_lb + h * stride_lh
        DELTA_ptr = DELTA + b64 * stride_lb + h * stride_lh
        QB_ptr = QB + b64 * stride_qbb + h * stride_qbh
        dk_a, dk_b, dv = _dkdv_inner(dk_a, dk_b, dv, k_a, k_b, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, q_start,
                                     stride_qt, stride_dot,
                                     offs_n, lo, bb, q_len, k_len, shift, window, qk_scale, offs_dv, DQK, DV,
                                     BLOCK_DA, BLOCK_DB, BLOCK_M, True, CAUSAL, HAS_WINDOW, PRECISION, KS, KO,
                                     QB_ptr, stride_qbt, SPLIT_QK, cap_scale, SOFTCAP, CHUNKED, koff)
        if not ONE_LOOP:
            dk_a, dk_b, dv = _dkdv_inner(dk_a, dk_b, dv, k_a, k_b, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, q_start,
                                         stride_qt, stride_dot,
                                         offs_n, bb, c, q_len, k_len, shift, window, qk_scale, offs_dv, DQK, DV,
                                         BLOCK_DA, BLOCK_DB, BLOCK_M, False, CAUSAL, HAS_WINDOW, PRECISION, KS, KO,
                                         QB_ptr, stride_qbt, SPLIT_QK, cap_scale, SOFTCAP, CHUNKED, koff)
            dk_a, dk_b, dv = _dkdv_inner(dk_a, dk_b, dv, k_a, k_b, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, q_start,
                                         stride_qt, stride_dot,
                                         offs_n, c, hi, q_len, k_len, shift, window, qk_scale, offs_dv, DQK, DV,
                                         BLOCK_DA, BLOCK_DB, BLOCK_M, True, CAUSAL, HAS_WINDOW, PRECISION, KS, KO,
                                         QB_ptr, stride_qbt, SPLIT_QK, cap_scale, SOFTCAP, CHUNKED, koff)

    split64 = split.to(tl.int64)
    _store_split(DK + split64 * stride_dks + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh, k_rows * stride_dkt,
                 in_n, dk_a * scale, dk_b * scale, DQK, BLOCK_DA, BLOCK_DB,
                 DKB + split64 * stride_dkbs + b64 * stride_dkbb + hk.to(tl.int64) * stride_dkbh, k_rows * stride_dkbt,
                 SPLIT_QK)
    tl.store(DV_ + split64 * stride_dvs + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh + k_rows[:, None] * stride_dvt
             + offs_dv[None, :], dv.to(DV_.dtype.element_ty), mask=in_n[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_inner(dq_a, dq_b, q_a, q_b, do, lse2, delta, K_ptr, V_ptr, k_start, stride_kt, stride_vt, pos_m, start, end,
              k_len, window, qk_scale, offs_dv, DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr,
              BLOCK_DB: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, KS: tl.constexpr, KO: tl.constexpr, KB_ptr=None,
              stride_kbt=0, SPLIT: tl.constexpr = False, cap_scale=0.0, SOFTCAP: tl.constexpr = 0,
              CHUNKED: tl.constexpr = False, koff=0):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < k_len
        rows = (k_start + offs_n).to(tl.int64)
        k_a, k_b = _load_split(K_ptr, rows * stride_kt, in_n, DQK, BLOCK_DA, BLOCK_DB, False, KB_ptr, rows * stride_kbt,
                               SPLIT)
        vt = tl.load(V_ptr + rows[None, :] * stride_vt + offs_dv[:, None],
                     mask=in_n[None, :] & (offs_dv[:, None] < DV), other=0.0)
        p, t = _bwd_probs(q_a, q_b, tl.trans(k_a), tl.trans(k_b), lse2, pos_m, offs_n, k_len, window, qk_scale,
                          BLOCK_DB, MASKED, CAUSAL, HAS_WINDOW, PRECISION, KS, KO, cap_scale, SOFTCAP, CHUNKED, koff)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = _softcap_grad(p * (dp - delta[:, None]), t, SOFTCAP).to(k_a.dtype)
        dq_a += tl.dot(ds, k_a, input_precision=PRECISION)
        if BLOCK_DB > 0:
            dq_b += tl.dot(ds, k_b, input_precision=PRECISION)
    return dq_a, dq_b


# (restore_value: ACC_DQ adds to DQ, each timed candidate finds it as it was)
@autotune(_FWD_CONFIGS, ["BLOCK_DA", "BLOCK_DB", "BLOCK_DV", "CAUSAL", "HAS_WINDOW", "IS_VARLEN", "PRECISION",
                         "SPLIT_QK", "SOFTCAP", "CHUNKED"], _smem_prune("dq"), restore_value=["DQ"])
@triton.jit
def _flash_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, QB, KB, DQB,
                         stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                         stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                         stride_dqb, stride_dqt, stride_dqh, stride_lb, stride_lh,
                         stride_qbb, stride_qbt, stride_qbh, stride_kbb, stride_kbt, stride_kbh,
                         stride_dqbb, stride_dqbt, stride_dqbh,
                         seqlen_q, seqlen_k, window, qk_scale, scale, group,
                         DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
                         BLOCK_DV: tl.constexpr,
                         IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         PRECISION: tl.constexpr, KS: tl.constexpr, KO: tl.constexpr, LEFT_PAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DQ: tl.constexpr = False,
                         SPLIT_QK: tl.constexpr = False, cap_scale=0.0, SOFTCAP: tl.constexpr = 0, KOFF=None,
                         CHUNKED: tl.constexpr = False, QPOS=None, HAS_QPOS: tl.constexpr = False):
    """dq of a block of BLOCK_M query rows of one head; ACC_DQ: added to what DQ holds (float32 sum, one rounding),
    as when several key sets (NSA's branches) share the queries. SPLIT_QK: q's and k's second dim part from QB and
    KB, dq's to DQB (see _load_split; not with ACC_DQ). SOFTCAP: soft-capped scores (see _softcapped). CHUNKED:
    chunks of ``window`` positions, HAS_QPOS: each sequence's first query at position QPOS[b] (see
    _flash_fwd_kernel)."""
    tl.static_assert(not (SPLIT_QK and ACC_DQ), "ACC_DQ reads one DQ")
    pid_m, b = _split_pid(tl.program_id(0), seqlen_q, BLOCK_M)
    h = tl.program_id(1)
    q_start, q_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k - seqlen_q, IS_VARLEN, LEFT_PAD)
    k_start, k_len = _seq_bounds(CU_K, CU_K, b, seqlen_k, 0, IS_VARLEN, LEFT_PAD)
    if pid_m * BLOCK_M >= q_len:
        return
    hk = h // group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_m = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q_a, q_b = _load_split(Q + b64 * stride_qb + h64 * stride_qh, rows * stride_qt, in_m, DQK, BLOCK_DA, BLOCK_DB,
                           False, QB + b64 * stride_qbb + h64 * stride_qbh, rows * stride_qbt, SPLIT_QK)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows[:, None] * stride_dot + offs_dv[None, :],
                 mask=in_m[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse2, delta = _load_row_stats(LSE + b64 * stride_lb + h64 * stride_lh,
                                  DELTA + b64 * stride_lb + h64 * stride_lh, rows, in_m)
    K_ptr = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    V_ptr = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    KB_ptr = KB + b64 * stride_kbb + hk.to(tl.int64) * stride_kbh

    shift = _query_shift(q_len, k_len, KS, KO)
    if HAS_QPOS:
        shift = tl.load(QPOS + b)
    koff = _chunk_offset(KOFF, b, CHUNKED)
    pos_m = offs_m + shift
    m_first = pid_m * BLOCK_M + shift
    m_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1 + shift
    a, bb, c, d = _key_ranges(m_first, m_last, k_len, window, BLOCK_N, CAUSAL, HAS_WINDOW, KS, KO, CHUNKED, koff)
    dq_a = tl.zeros([BLOCK_M, BLOCK_DA], tl.float32)
    dq_b = tl.zeros([BLOCK_M, BLOCK_DB if BLOCK_DB > 0 else 1], tl.float32)  # unused without a second part
    dq_a, dq_b = _dq_inner(dq_a, dq_b, q_a, q_b, do, lse2, delta, K_ptr, V_ptr, k_start, stride_kt, stride_vt,
                           pos_m, a, bb, k_len, window, qk_scale, offs_dv, DQK, DV, BLOCK_DA, BLOCK_DB, BLOCK_N,
                           True, CAUSAL, HAS_WINDOW, PRECISION, KS, KO, KB_ptr, stride_kbt, SPLIT_QK, cap_scale,
                           SOFTCAP, CHUNKED, koff)
    dq_a, dq_b = _dq_inner(dq_a, dq_b, q_a, q_b, do, lse2, delta, K_ptr, V_ptr, k_start, stride_kt, stride_vt,
                           pos_m, bb, c, k_len, window, qk_scale, offs_dv, DQK, DV, BLOCK_DA, BLOCK_DB, BLOCK_N,
                           False, CAUSAL, HAS_WINDOW, PRECISION, KS, KO, KB_ptr, stride_kbt, SPLIT_QK, cap_scale,
                           SOFTCAP, CHUNKED, koff)
    dq_a, dq_b = _dq_inner(dq_a, dq_b, q_a, q_b, do, lse2, delta, K_ptr, V_ptr, k_start, stride_kt, stride_vt,
                           pos_m, c, d, k_len, window, qk_scale, offs_dv, DQK, DV, BLOCK_DA, BLOCK_DB, BLOCK_N,
                           True, CAUSAL, HAS_WINDOW, PRECISION, KS, KO, KB_ptr, stride_kbt, SPLIT_QK, cap_scale,
                           SOFTCAP, CHUNKED, koff)
    dq_a *= scale
    dq_b *= scale
    dq_ptr = DQ + b64 * stride_dqb + h64 * stride_dqh
    if ACC_DQ:
        old_a, old_b = _load_split(dq_ptr, rows * stride_dqt, in_m, DQK, BLOCK_DA, BLOCK_DB, False)
        dq_a += old_a.to(tl.float32)
        dq_b += old_b.to(tl.float32)
    _store_split(dq_ptr, rows * stride_dqt, in_m, dq_a, dq_b, DQK, BLOCK_DA, BLOCK_DB,
                 DQB + b64 * stride_dqbb + h64 * stride_dqbh, rows * stride_dqbt, SPLIT_QK)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def _strides3(t: torch.Tensor, varlen: bool):
    """(batch, token, head) strides of a (B, T, H, D) or (total, H, D) tensor; batch stride 0 for varlen."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool):
    """(batch, head) strides of an lse of shape (B, H, T) or (H, total); the token stride is 1."""
    if varlen:
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get true float32 products (tf32 would lose ~3 digits); fp16/bf16 ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _score_args(scale: float, softcap: float, dtype: torch.dtype):
    """The kernels' qk_scale (log2 units) and their soft-capping arguments (``cap_scale``, ``SOFTCAP``, see
    _softcapped) for a softmax scale and a soft cap (0: none)."""
    if not softcap:
        return scale * LOG2E, dict(cap_scale=0.0, SOFTCAP=0)
    fast = dtype == torch.bfloat16 and not is_interpreter() and torch.version.hip is None
    return softcap * LOG2E, dict(cap_scale=scale / softcap, SOFTCAP=2 if fast else 1)


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class Chunks(NamedTuple):
    """Chunked attention (Llama 4's local layers), given to the launches in place of a sliding window: a query sees
    the keys of its own chunk of ``size`` positions only (causal within it). ``offsets``: int32, one per sequence,
    the position of the sequence's key 0 in its chunking (a cache that dropped its first tokens), or None (0)."""
    size: int
    offsets: Optional[torch.Tensor] = None


Window = Union[int, Chunks, None]  # the launches' window: a sliding window's size, chunks, or none


def _window_size(window: Window) -> int:
    """The kernels' runtime ``window``: the sliding window's size or the chunk size (0: neither)."""
    return window.size if isinstance(window, Chunks) else (window or 0)


def _common_meta(dims: AttnDims, causal: bool, window: Window, dtype: torch.dtype, key_pos=(1, 0), left_pad=None):
    da, db = split_dim(dims.dim_qk)
    chunked = isinstance(window, Chunks)
    return dict(DQK=dims.dim_qk, DV=dims.dim_v, BLOCK_DA=da, BLOCK_DB=db,
                BLOCK_DV=max(16, next_pow2(dims.dim_v)), IS_VARLEN=dims.varlen, CAUSAL=causal,
                HAS_WINDOW=window is not None, PRECISION=_precision(dtype), KS=key_pos[0], KO=key_pos[1],
                LEFT_PAD=left_pad is not None, CHUNKED=chunked, KOFF=window.offsets if chunked else None)


def _cu_args(dims: AttnDims, left_pad):
    """The kernels' CU_Q, CU_K: varlen offsets, or (dense, left-padded) the padding rows as CU_K."""
    return (dims.cu_seqlens_q, dims.cu_seqlens_k) if left_pad is None else (None, left_pad)


def _outputs(rows: tuple, dims: AttnDims, dtype, device, padded: bool):
    """Output ``rows + (Hq, Dv)`` and float32 lse in the matching layout (heads before the token axis: ``(H,
    total)`` varlen, ``(B, H, T)`` dense, after any leading axes). Left-padded launches never write the padding
    query rows: their outputs then start at 0 and -inf."""
    out = (torch.zeros if padded else empty)(*rows, dims.heads_q, dims.dim_v, device=device, dtype=dtype)
    lshape = (*rows[:-1], dims.heads_q, rows[-1])
    lse = torch.full(lshape, float("-inf"), device=device) if padded else \
        empty(*lshape, device=device, dtype=torch.float32)
    return out, lse


def split_parts(dim_a: int, dim_b: int) -> bool:
    """Whether the kernels can read q and k as two tensors of ``dim_a`` and ``dim_b`` dims (``parts`` of flash_fwd and
    flash_bwd): where their head dim ``dim_a + dim_b`` is split at ``dim_a`` (see _load_split)."""
    return dim_b > 0 and split_dim(dim_a + dim_b)[0] == dim_a


def _part_args(x, x_b, varlen: bool) -> tuple:
    """The kernels' pointer and strides of the second dim part (``x_b``, or unused: x and zeros)."""
    return (x, (0, 0, 0)) if x_b is None else (x_b, _strides3(x_b, varlen))


def flash_fwd(q, k, v, dims: AttnDims, causal: bool, window: Window, scale: float, *, out=None, lse=None,
              key_pos=(1, 0), left_pad=None, parts=None, softcap: float = 0.0, query_pos=None):
    """Forward launch on validated inputs. ``out``/``lse`` may be given (written in place, e.g. one slot of
    a buffer of partial results); otherwise they are allocated. ``key_pos`` = (stride, offset) places key j
    at position j*stride + offset (summaries of token blocks; queries then sit at 0..Tq-1, or from
    ``query_pos[b]``, int32 per sequence, when given: a chunk of queries after a prefix). ``left_pad``
    (dense layout): int32 padding rows per sequence, whose query rows the kernel skips (allocated outputs
    are then 0 / -inf there). ``parts`` = (q_b, k_b): q and k hold the first ``split_dim(dims.dim_qk)[0]`` dims of
    the queries and keys, q_b and k_b (any strides, last dim contiguous; k_b's heads may be a stride-0 expansion)
    the other ``dims.dim_qk`` minus those (see split_parts). ``softcap`` (> 0): the scores
    ``softcap * tanh(scale * q.k / softcap)``. ``window``: a sliding window's size, or Chunks. Returns (out, lse)."""
    varlen = dims.varlen
    if out is None or lse is None:
        o, l_ = _outputs((q.shape[0],) if varlen else (dims.batch, dims.max_seqlen_q), dims, q.dtype, q.device,
                         left_pad is not None)
        out, lse = (o if out is None else out), (l_ if lse is None else lse)
    if out.numel() == 0 or lse.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    grid = lambda meta: (cdiv(dims.max_seqlen_q, meta["BLOCK_M"]) * dims.batch, dims.heads_q)
    meta = _common_meta(dims, causal, window, q.dtype, key_pos, left_pad)
    q_b, k_b = parts or (None, None)
    descs = kv_descriptors(k, v, TMA_ROWS, meta["BLOCK_DA"], meta["BLOCK_DB"], meta["BLOCK_DV"], 1 if varlen else 2,
                           k_b)
    (qb, sqb), (kb, skb) = _part_args(q, q_b, varlen), _part_args(k, k_b, varlen)
    qk_scale, soft = _score_args(scale, softcap, q.dtype)
    _flash_fwd_kernel[grid](
        q, k, v, out, lse, *_cu_args(dims, left_pad), *(descs or (None, None, None)), qb, kb,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        *_lse_strides(lse, varlen), *sqb, *skb,
        dims.max_seqlen_q, dims.max_seqlen_k, _window_size(window), qk_scale, dims.group, 0 if varlen else k.shape[1],
        **meta, HAS_TMA=descs is not None, SPLIT_QK=parts is not None, **soft, QPOS=query_pos,
        HAS_QPOS=query_pos is not None, **COMPILE_OPTIONS)
    return out, lse


def kv_descriptors(k, v, tile: int, da: int, db: int, block_dv: int, lead: int, k_b=None) -> Optional[tuple]:
    """K's two dim parts' (``da`` + ``db`` columns, db may be 0; the second part ``k_b`` where given, see
    flash_fwd's ``parts``) and V's (``block_dv``) row descriptors (``utils.row_descriptors``, tiles of ``tile`` rows:
    one row a token, of every KV head, over the first ``lead`` dims) for TMA loads, or None. Only where the tiles
    cover the head dims exactly: a padded tile's extra columns would hold the next head's values, not zeros."""
    if block_dv != v.shape[-1]:
        return None
    if k_b is None:
        kd = row_descriptors(k, tile, [w for w in (da, db) if w], lead) if da + db == k.shape[-1] else None
    else:
        exact = da == k.shape[-1] and db == k_b.shape[-1]
        ka, kb = (row_descriptors(k, tile, (da,), lead), row_descriptors(k_b, tile, (db,), lead)) if exact else (0, 0)
        kd = ka + kb if ka and kb else None
    vd = row_descriptors(v, tile, (block_dv,), lead)
    if kd is None or vd is None:
        return None
    return kd[0], kd[1] if len(kd) > 1 else None, vd[0]


DECODE_ROWS = 64  # the split-KV decode path: at most this many (query head, query) rows per KV head


def flash_decode(q, k, v, dims: AttnDims, causal: bool, window: Window, scale: float, left_pad=None, *,
                 cache_seqlens=None, block_table=None, longest: int = 0, v_scale: float = 1.0, parts=None,
                 softcap: float = 0.0):
    """Split-KV launch on validated inputs with few queries per sequence (the group's heads times the queries,
    each rounded up to a power of two, within DECODE_ROWS rows), forward only: partial results per split of the
    keys, merged by lse into q's dtype. Returns (out, lse) in flash_fwd's layouts.

    A KV cache (dense layout, ``dims.max_seqlen_k`` its rows per sequence): ``cache_seqlens`` (int32, keys per
    sequence), ``left_pad`` then the cache row of each sequence's first key; k/v ``(B, rows, Hkv, D)``, or with
    ``block_table`` paged ``(pages, page, Hkv, D)`` (page stride = page x token stride); the work is split for
    ``longest`` keys (the longest sequence, or the capacity). k/v may be float8 (a quantised cache: ``scale``
    includes the keys' scale, ``v_scale`` is the values'). ``parts``: q and k in two tensors each, ``softcap`` (see
    flash_fwd)."""
    varlen, tq = dims.varlen, dims.max_seqlen_q
    rows_q = q.shape[0] if varlen else tq
    programs = dims.batch * dims.heads_kv
    paged = block_table is not None
    n_split, per_split = split_context(programs, longest if cache_seqlens is not None else dims.max_seqlen_k,
                                       num_sms(q.device) * 2)
    outs, lses = _outputs((n_split, rows_q) if varlen else (n_split, dims.batch, tq), dims,
                          torch.float32 if n_split > 1 else q.dtype, q.device, False)  # (the kernel writes every row)
    if outs.numel() and lses.numel():
        so = (outs.stride(0), 0, outs.stride(1), outs.stride(2)) if varlen else outs.stride()[:4]
        sl = (lses.stride(0), 0, lses.stride(1)) if varlen else lses.stride()[:3]
        meta = {n: x for n, x in _common_meta(dims, causal, window, q.dtype, left_pad=left_pad).items()
                if n not in ("KS", "KO")}  # keys at their own positions
        block_g = max(next_pow2(dims.group), 16 // next_pow2(tq))  # 16 rows at least (matmul tiles)
        wide = block_g * next_pow2(tq) >= 64  # 8 warps (64 rows on 4 spill in float32)
        # float32 multiplies on CUDA cores: fewer keys per step, or its registers spill (sm_90)
        block_n = 32 if small_tiles() else 64 if q.dtype != torch.float32 else 32 if wide else 16
        sk, sv = _strides3(k, varlen), _strides3(v, varlen)
        q_b, k_b = parts or (None, None)
        (qb, sqb), (kb, skb) = _part_args(q, q_b, varlen), _part_args(k, k_b, varlen)
        if paged:  # pages are shared by the batch: no batch stride
            sk, sv, skb = (0, *sk[1:]), (0, *sv[1:]), (0, *skb[1:])
        qk_scale, soft = _score_args(scale, softcap, q.dtype)
        _flash_decode_kernel[(programs, n_split)](
            q, k, v, outs, lses, *_cu_args(dims, left_pad),
            cache_seqlens if cache_seqlens is not None else q, block_table if paged else q, qb, kb,
            *_strides3(q, varlen), *sk, *sv, *so, *sl, block_table.stride(0) if paged else 0, *sqb, *skb,
            dims.max_seqlen_q, dims.max_seqlen_k, _window_size(window), qk_scale, v_scale, dims.group, dims.heads_kv,
            per_split, k.shape[0] - 1 if paged else 0, **meta, TQ=next_pow2(tq), BLOCK_G=block_g, BLOCK_N=block_n,
            HAS_SEQLENS=cache_seqlens is not None, PAGE=k.shape[1] if paged else 0,
            WIDEN_ASM=widen_by_asm(q.dtype, k.dtype), SPLIT_QK=parts is not None, num_warps=8 if wide else 4,
            **soft, **COMPILE_OPTIONS)
    if n_split == 1:
        return outs[0], lses[0]
    return merge_fwd(outs, lses, q.dtype)


def flash_bwd_delta(out, do, lse, dlse, dims: AttnDims):
    """delta = rowsum(dO * O) - dLSE, float32, in the layout of ``lse``."""
    varlen = dims.varlen
    delta = empty_like(lse)
    if delta.numel() == 0:
        return delta
    block_dv = max(16, next_pow2(dims.dim_v))
    prep_block = 32 if small_tiles() else 64
    _flash_bwd_prep_kernel[(cdiv(dims.max_seqlen_q, prep_block) * dims.batch, dims.heads_q)](
        out, do, dlse, delta, dims.cu_seqlens_q, *_strides3(out, varlen), *_strides3(do, varlen),
        *_lse_strides(lse, varlen), dims.max_seqlen_q, DV=dims.dim_v, BLOCK_DV=block_dv,
        IS_VARLEN=varlen, HAS_DLSE=dlse is not None, BLOCK_M=prep_block, **COMPILE_OPTIONS)
    return delta


def flash_bwd(do, q, k, v, lse, delta, dims: AttnDims, causal: bool, window: Window, scale: float,
              key_pos=(1, 0), left_pad=None, dq=None, parts=None, softcap: float = 0.0, query_pos=None):
    """dq, dk, dv of the attention restricted to the keys that ``dims``/``causal``/``window`` make visible,
    given the row ``lse`` and ``delta`` of the full softmax (which may span more keys than this call sees,
    as when MoBA or NSA add other key sets to the same softmax). With ``left_pad`` the padding rows' gradients
    are 0. ``dq``: a gradient of q (q's shape and dtype) that this call's dq is added to, in place (the one
    returned), instead of a new tensor. ``parts`` = (q_b, k_b): q and k in two tensors each (see flash_fwd); dq and
    dk are then pairs too, dk's second part one per KV head of k (``k_b.shape``, whatever its strides). ``softcap``,
    ``query_pos``: the forward's (see flash_fwd)."""
    varlen = dims.varlen
    meta = _common_meta(dims, causal, window, q.dtype, key_pos, left_pad)
    alloc = torch.zeros if left_pad is not None else empty
    acc_dq = dq is not None
    if acc_dq and (dq.shape != q.shape or dq.dtype != q.dtype or dq.stride(-1) != 1 or left_pad is not None or
                   parts is not None):
        raise ValueError("flash_bwd adds to a dq of q's shape and dtype, contiguous in its last dim, without left_pad "
                         "or parts")
    if not acc_dq:
        dq = alloc(q.shape, device=q.device, dtype=q.dtype)
    # Few key blocks for many queries (NSA's compressed keys, a short context under a long chunk): too few
    # programs to fill the GPU, the first of them (causal) with the most work. The query heads of a GQA group
    # are then spread over several programs per key block, whose float32 partial dK/dV are added up after.
    programs = cdiv(dims.max_seqlen_k, 128) * dims.batch * dims.heads_kv
    per_split = cdiv(dims.group, max(1, min(dims.group, cdiv(8 * num_sms(q.device), programs))))
    n_splits = cdiv(dims.group, per_split)
    q_b, k_b = parts or (None, None)
    # (float32 partial sums per split, or the gradients themselves)
    grad = lambda shape, dtype: alloc(*((n_splits,) if n_splits > 1 else ()), *shape, device=q.device,
                                      dtype=torch.float32 if n_splits > 1 else dtype)
    dk, dv = grad(k.shape, k.dtype), grad(v.shape, v.dtype)
    dk_b = grad(k_b.shape, k_b.dtype) if parts else None
    one = lambda g: g[0] if n_splits > 1 else g  # (a split's slice: the strides the kernel takes)
    (qb, sqb), (kb, skb), (dkb, sdkb) = (_part_args(q, q_b, varlen), _part_args(k, k_b, varlen),
                                         _part_args(dk, None if dk_b is None else one(dk_b), varlen))
    common = (*_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen))
    qk_scale, soft = _score_args(scale, softcap, q.dtype)
    qpos = dict(QPOS=query_pos, HAS_QPOS=query_pos is not None)
    grid_kv = lambda m: (cdiv(dims.max_seqlen_k, m["BLOCK_N"]) * dims.batch, dims.heads_kv * n_splits)
    _flash_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, *_cu_args(dims, left_pad), qb, kb, dkb, *common,
        *_strides3(one(dk), varlen), *_strides3(one(dv), varlen),
        dk.stride(0) if n_splits > 1 else 0, dv.stride(0) if n_splits > 1 else 0, *_lse_strides(lse, varlen),
        *sqb, *skb, *sdkb, dk_b.stride(0) if parts and n_splits > 1 else 0,
        dims.max_seqlen_q, dims.max_seqlen_k, _window_size(window), qk_scale, scale, dims.group, per_split, **meta,
        SPLIT_QK=parts is not None, **soft, **qpos, **COMPILE_OPTIONS)
    if n_splits > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
        dk_b = dk_b.sum(0).to(k_b.dtype) if parts else None
    dq_b = alloc(q_b.shape, device=q.device, dtype=q_b.dtype) if parts else None
    (dqb, sdqb) = _part_args(dq, dq_b, varlen)
    grid_q = lambda m: (cdiv(dims.max_seqlen_q, m["BLOCK_M"]) * dims.batch, dims.heads_q)
    _flash_bwd_dq_kernel[grid_q](
        q, k, v, do, lse, delta, dq, *_cu_args(dims, left_pad), qb, kb, dqb, *common,
        *_strides3(dq, varlen), *_lse_strides(lse, varlen), *sqb, *skb, *sdqb,
        dims.max_seqlen_q, dims.max_seqlen_k, _window_size(window), qk_scale, scale, dims.group, **meta, ACC_DQ=acc_dq,
        SPLIT_QK=parts is not None, **soft, **qpos, **COMPILE_OPTIONS)
    if parts:
        return (dq, dq_b), (dk, dk_b), dv
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dims, causal, window, scale, key_pos, left_pad, softcap):
        out, lse = flash_fwd(q, k, v, dims, causal, window, scale, key_pos=key_pos, left_pad=left_pad, softcap=softcap)
        ctx.save_for_backward(q, k, v, out, lse, left_pad)
        ctx.dims, ctx.causal, ctx.window, ctx.scale, ctx.key_pos, ctx.softcap = dims, causal, window, scale, key_pos, \
            softcap
        return out, lse

    @staticmethod
    @first_order_backward("flash_attention")
    def backward(ctx, saved, dout, dlse):
        q, k, v, out, lse, left_pad = saved
        return _gradients(dout, dlse, q, k, v, out, lse, ctx.dims, ctx.causal, ctx.window, ctx.scale, ctx.key_pos,
                          left_pad, ctx.softcap) + (None,) * 7


def _gradients(dout, dlse, q, k, v, out, lse, dims: AttnDims, causal, window, scale, key_pos, left_pad, softcap):
    """dq, dk, dv from the forward's inputs, output and lse (kernel dtypes) and the gradients of out and lse
    (either may be None: no gradient)."""
    if dout is None:
        dout = torch.zeros_like(out)
    dout = _lastdim_contiguous(dout.to(out.dtype))
    if dlse is not None:
        dlse = dlse.float().contiguous()
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = flash_bwd_delta(out, dout, lse, dlse, dims)
    return flash_bwd(dout, q, k, v, lse, delta, dims, causal, window, scale, key_pos, left_pad, softcap=softcap)


def _check_left_pad(left_pad, dims: AttnDims, q, validate: bool) -> torch.Tensor:
    if dims.varlen:
        raise ValueError("left_pad applies to the dense (B, T, H, D) layout; a varlen layout has no padding")
    if not isinstance(left_pad, torch.Tensor) or left_pad.dtype != torch.int32 or \
            tuple(left_pad.shape) != (dims.batch,):
        raise TypeError(f"left_pad must be an int32 tensor of shape ({dims.batch},)")
    check_device({"q": q, "left_pad": left_pad})
    if validate and bool(((left_pad < 0) | (left_pad > dims.max_seqlen_k)).any()):
        raise ValueError(f"left_pad must lie in [0, Tk={dims.max_seqlen_k}], got {left_pad.tolist()}")
    return left_pad.contiguous()  # the kernels read entry b at left_pad + b


def checked_chunks(chunk_size, chunk_offsets, window, n: int, causal: bool, q, validate: bool) -> Chunks:
    """The launches' Chunks for ``chunk_size`` / ``chunk_offsets`` (see flash_attention) of ``n`` sequences."""
    check_positive_int(chunk_size, "chunk_size")
    if not causal:
        raise ValueError("chunk_size requires causal=True (a query sees its chunk up to itself)")
    if window is not None:
        raise ValueError("chunk_size and window cannot be combined")
    if chunk_offsets is not None:
        if not isinstance(chunk_offsets, torch.Tensor) or chunk_offsets.dtype != torch.int32 or \
                tuple(chunk_offsets.shape) != (n,):
            raise TypeError(f"chunk_offsets must be an int32 tensor of shape ({n},), one per sequence")
        check_device({"q": q, "chunk_offsets": chunk_offsets})
        if validate and bool(((chunk_offsets < 0) | (chunk_offsets >= 2 ** 30)).any()):
            raise ValueError(f"chunk_offsets must lie in [0, 2**30), got {chunk_offsets.tolist()}")
        chunk_offsets = chunk_offsets.contiguous()
    return Chunks(chunk_size, chunk_offsets)


def _checked(q, k, v, causal, window, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_stride,
             key_offset, left_pad, validate: bool, chunk_size=None, chunk_offsets=None):
    """flash_attention's checks of its arguments: ``(dims, scale, left_pad, window)`` as the launches take them
    (``window`` then Chunks for ``chunk_size``)."""
    dims = check_attention_inputs(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    if not isinstance(causal, bool):
        kind = type(causal)
        raise TypeError(f"causal must be a bool, got {kind.__name__ if kind.__module__ == 'builtins' else kind}")
    if window is not None:
        check_positive_int(window, "window")
        if not causal:
            raise ValueError("window requires causal=True (it selects the most recent keys)")
    scale = check_scale(scale, dims.dim_qk ** -0.5)
    check_positive_int(key_stride, "key_stride")
    check_positive_int(key_offset, "key_offset", minimum=0)
    if (key_stride, key_offset) != (1, 0) and window is not None:
        raise ValueError("key_stride/key_offset cannot be combined with window")
    if max(dims.max_seqlen_k - 1, 0) * key_stride + key_offset >= 2 ** 31:  # positions are 32-bit in the kernels
        raise ValueError(f"the last key's position ((max_seqlen_k - 1) * key_stride + key_offset = "
                         f"{(dims.max_seqlen_k - 1) * key_stride + key_offset}) must be below 2**31")
    if left_pad is not None:
        if (key_stride, key_offset) != (1, 0):
            raise ValueError("left_pad cannot be combined with key_stride/key_offset")
        left_pad = _check_left_pad(left_pad, dims, q, validate)
    if chunk_size is not None:
        if (key_stride, key_offset) != (1, 0):
            raise ValueError("key_stride/key_offset cannot be combined with chunk_size")
        window = checked_chunks(chunk_size, chunk_offsets, window, len(dims.seqlens_q) if dims.varlen else dims.batch,
                                causal, q, validate)
    elif chunk_offsets is not None:
        raise ValueError("chunk_offsets needs chunk_size")
    return dims, scale, left_pad, window


# torch.compile: TorchDynamo traces flash_attention as one custom op (its backward as another) instead of breaking the
# graph there, so a model calling it compiles whole (fullgraph=True); the ops run the eager code when the graph runs.
_OP_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int? max_seqlen_q, "
            "int? max_seqlen_k, Tensor? left_pad, Tensor? chunk_offsets, bool causal, int? window, float? scale, "
            "int key_stride, int key_offset, bool validate, float softcap, int? chunk_size")


@torch.library.custom_op("longattn::flash_attention", mutates_args=(), schema=f"({_OP_ARGS}) -> (Tensor, Tensor)")
def _flash_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, left_pad, chunk_offsets, causal,
              window, scale, key_stride, key_offset, validate, softcap, chunk_size):
    with torch.no_grad():  # the op's own autograd formula (below) differentiates it
        return flash_attention(q, k, v, causal=causal, window=window, scale=scale, cu_seqlens_q=cu_seqlens_q,
                               cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                               return_lse=True, key_stride=key_stride, key_offset=key_offset, left_pad=left_pad,
                               validate=validate, softcap=softcap, chunk_size=chunk_size, chunk_offsets=chunk_offsets)


@_flash_op.register_fake
def _flash_op_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, *args):
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    check_attention_shapes(q, k, v, varlen)  # what can be checked without reading cu_seqlens
    lse = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(lse, dtype=torch.float32)


@torch.library.custom_op("longattn::flash_attention_backward", mutates_args=(),
                         schema=f"(Tensor? dout, Tensor? dlse, Tensor out, Tensor lse, {_OP_ARGS}) -> "
                                "(Tensor, Tensor, Tensor)")
def _flash_backward_op(dout, dlse, out, lse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       left_pad, chunk_offsets, causal, window, scale, key_stride, key_offset, validate, softcap,
                       chunk_size):
    with eager_context(q):
        dims, scale, left_pad, window = _checked(q, k, v, causal, window, scale, cu_seqlens_q, cu_seqlens_k,
                                                 max_seqlen_q, max_seqlen_k, key_stride, key_offset, left_pad, False,
                                                 chunk_size, chunk_offsets)
        inputs = kernel_inputs(*(_lastdim_contiguous(t) for t in (q, k, v, out)))
        grads = _gradients(dout, dlse, *inputs, lse, dims, causal, window, scale, (key_stride, key_offset), left_pad,
                           check_softcap(softcap))
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


@_flash_backward_op.register_fake
def _flash_backward_shapes(dout, dlse, out, lse, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_op_save(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, left_pad, chunk_offsets, *options = inputs
    ctx.save_for_backward(*output, q, k, v, cu_q, cu_k, left_pad, chunk_offsets)
    ctx.options = (max_q, max_k, options)


def _flash_op_backward(ctx, dout, dlse):
    out, lse, q, k, v, cu_q, cu_k, left_pad, chunk_offsets = ctx.saved_tensors
    max_q, max_k, options = ctx.options
    dq, dk, dv = torch.ops.longattn.flash_attention_backward(dout, dlse, out, lse, q, k, v, cu_q, cu_k, max_q, max_k,
                                                             left_pad, chunk_offsets, *options)
    return (dq, dk, dv) + (None,) * 14


_flash_op.register_autograd(_flash_op_backward, setup_context=_flash_op_save)


def _flash_attention_traced(q, k, v, *, causal=True, window=None, scale=None, cu_seqlens=None, max_seqlen=None,
                            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                            return_lse=False, key_stride=1, key_offset=0, left_pad=None, validate=True, softcap=None,
                            chunk_size=None, chunk_offsets=None):
    """flash_attention as TorchDynamo traces it (same arguments): the custom op."""
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = resolve_seqlens(
        cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out, lse = torch.ops.longattn.flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  left_pad, chunk_offsets, causal, window, scale, key_stride,
                                                  key_offset, validate, check_softcap(softcap), chunk_size)
    return (out, lse) if return_lse else out


@public_op("q", "k", "v", traced=_flash_attention_traced)
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: Optional[int] = None, scale: Optional[float] = None,
                    cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                    return_lse: bool = False, key_stride: int = 1, key_offset: int = 0,
                    left_pad: Optional[torch.Tensor] = None, validate: bool = True, softcap: Optional[float] = None,
                    chunk_size: Optional[int] = None, chunk_offsets: Optional[torch.Tensor] = None):
    """Exact softmax attention (flash algorithm), differentiable in q, k, v (and through ``lse``).

    Layouts
        dense:  q ``(B, Tq, Hq, Dqk)``, k ``(B, Tk, Hkv, Dqk)``, v ``(B, Tk, Hkv, Dv)``
                -> out ``(B, Tq, Hq, Dv)``, lse ``(B, Hq, Tq)``.
        varlen: q ``(total_q, Hq, Dqk)``, k/v ``(total_k, Hkv, D*)`` with ``cu_seqlens`` (same lengths for
                q and k) or ``cu_seqlens_q`` + ``cu_seqlens_k`` (int32, ``(N+1,)``, starting at 0)
                -> out ``(total_q, Hq, Dv)``, lse ``(Hq, total_q)``.

    Args:
        q, k, v: float16, bfloat16 or float32, on one CUDA device (or CPU under ``TRITON_INTERPRET=1``).
            ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA; K/V heads are not repeated). Head dims up to
            1024, ``Dqk`` and ``Dv`` may differ (e.g. 192/128).
        causal: mask keys after the query (default True). When a sequence has fewer queries than keys,
            query i sits at key position ``Tk - Tq + i`` (decode / chunked prefill).
        window: if set (requires ``causal``), each query attends only to the ``window`` most recent keys,
            itself included.
        chunk_size: chunked attention (Llama 4's local layers; requires ``causal``, not with ``window``): each
            sequence's keys are cut into chunks of ``chunk_size`` positions from its start, and a query attends
            only to the keys of its own chunk, up to itself.
        chunk_offsets: with ``chunk_size``: int32 ``(B,)`` (dense) or ``(N,)`` (varlen), the position of each
            sequence's first key in its chunking (a cache that dropped its oldest tokens: key j then sits at
            position ``chunk_offsets[b] + j``); default 0. Checked to lie in [0, 2**30) (a host synchronisation)
            unless ``validate=False``.
        scale: softmax scale, default ``Dqk ** -0.5``.
        max_seqlen / max_seqlen_q / max_seqlen_k: optional upper bounds on varlen lengths (validated).
        return_lse: also return the float32 natural-log log-sum-exp of each row.
        key_stride, key_offset: keys that summarise blocks of tokens (NSA's compressed keys): key j sits at
            token position ``j * key_stride + key_offset`` and the queries are the tokens themselves (query i
            at position i, so Tq is the token count); with ``causal`` a query sees the keys at or before
            its position. Not combinable with ``window``.
        left_pad: dense layout only: int32 ``(B,)``, padding rows at the start of each sequence's keys
            (left-padded batches, as in batched generation), from 0 to Tk. Keys before them are never
            attended, without copying the batch into a varlen layout; query rows at key positions before them
            are padding too (their outputs and gradients 0, lse -inf). Checked against Tk (a host
            synchronisation) unless ``validate=False`` (then values outside [0, Tk] read outside the keys).
        softcap: soft-capping of the scores (Gemma 2: 50.0): a positive number ``c`` makes them
            ``c * tanh(scale * q.k / c)`` before the softmax; None or 0 (default): none. With bfloat16 inputs on
            an NVIDIA GPU the tanh is the hardware's approximate one (relative error about 2^-11).

    Returns:
        ``out`` in q's dtype, or ``(out, lse)``. Rows that see no key (possible only when Tq > Tk with
        ``causal``) give ``out = 0`` and ``lse = -inf``.

    Decoding: without gradients, when a KV head's query heads times the queries per sequence fit in 64 rows
    (one token or a few speculative ones), the keys are split across programs (split-KV, merged by lse) and
    each program serves a whole GQA group, so that batch 1 fills the GPU and each key is read once per KV head.

    ``torch.compile``: TorchDynamo traces the call as one custom op (``torch.ops.longattn.flash_attention``, its
    backward ``flash_attention_backward``), so a compiled model keeps one graph (``fullgraph=True`` works).
    """
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = resolve_seqlens(
        cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dims, scale, left_pad, window = _checked(q, k, v, causal, window, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, key_stride, key_offset, left_pad, validate, chunk_size,
                                             chunk_offsets)
    softcap = check_softcap(softcap)
    in_dtype = q.dtype
    qk, kk, vk = kernel_inputs(_lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not grad and (key_stride, key_offset) == (1, 0) and q.numel() and k.numel() and \
            next_pow2(dims.max_seqlen_q) * next_pow2(dims.group) <= DECODE_ROWS:
        out, lse = flash_decode(qk, kk, vk, dims, causal, window, scale, left_pad, softcap=softcap)  # split-KV
    else:
        out, lse = _FlashAttention.apply(qk, kk, vk, dims, causal, window, scale, (key_stride, key_offset),
                                         left_pad, softcap)
    out = out.to(in_dtype)
    return (out, lse) if return_lse else out


__all__ = ["flash_attention"]
