"""MoBA public op: ``moba_attention`` (Triton forward and backward)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..kernels.flash import LOG2E, flash_bwd, flash_bwd_delta, flash_fwd
from ..kernels.merge import merge_fwd
from ..kernels.utils import (AttnDims, check_attention_inputs, check_positive_int, check_scale, empty,
                             is_interpreter, kernel_inputs, next_pow2)
from .kernels import (_block_mean_kernel, _moba_decode_kernel, _moba_select_kernel, _moba_sparse_dkdv_kernel,
                      _moba_sparse_dq_kernel, _moba_sparse_fwd_kernel)

MAX_TOPK = 64


def _tiles():
    """(entries per tile, keys per step, queries per selection program) for the MoBA kernels."""
    return (64, 32, 32) if is_interpreter() else (64, 64, 64)


@dataclass
class _Plan:
    """Host-side layout of one MoBA call (everything indexed in the packed varlen layout)."""
    cu_q: torch.Tensor            # (B+1,) int32
    cu_k: torch.Tensor            # (B+1,) int32
    max_q: int
    block_off: torch.Tensor       # (B,) int32: global index of each sequence's first key block
    block_row: torch.Tensor       # (NB,) int32: first key row of each global block
    block_len: torch.Tensor       # (NB,) int32
    row_block_off: torch.Tensor   # (total_q,) int64: block_off of each query row's sequence
    n_blocks: int
    ksel: int                     # earlier blocks selected per query (topk - 1, capped)
    own: AttnDims                 # own-block causal attention as a varlen flash problem over chunks


def _plan(lq: list, lk: list, block_size: int, topk: int, dims: AttnDims, device) -> _Plan:
    """Key blocks and own-block chunks of every sequence (vectorised on the host; no device sync).

    Key block j of a sequence covers keys [j*bs, min((j+1)*bs, Tk)). It is also the own-block chunk of
    the queries whose positions fall in it (possibly none), so the chunk boundaries partition both
    packed layouts and every key row belongs to exactly one chunk of at most bs keys.
    """
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
    max_nb = int(nb.max()) if len(lk) else 0
    ksel = max(0, min(topk, max_nb) - 1)
    to = lambda x: x.to(torch.int32).to(device, non_blocking=True)
    own = AttnDims(True, n_blocks, max(int(n_q.max()) if n_blocks else 0, 1), block_size, dims.heads_q,
                   dims.heads_kv, dims.dim_qk, dims.dim_v, to(cq), to(ck))
    return _Plan(to(cu_q), to(cu_k), max(lq) if lq else 0, to(block_off[:-1]), to(ck[:-1]), to(k_hi - k_lo),
                 row_block_off.to(device), n_blocks, ksel, own)


@dataclass
class _Entries:
    entry: torch.Tensor      # entry ids sorted by segment
    seg_start: torch.Tensor  # (NSEG+1,) int64
    tile_cum: torch.Tensor   # (NSEG+1,) int64
    n_seg: int
    n_iter: int
    max_tiles: int


def _entries(sel: torch.Tensor, plan: _Plan, hq: int, hkv: int, tile_m: int) -> _Entries:
    """Sort the (query, head, slot) -> block selections into per-(block, KV head) segments, on device."""
    n_seg = plan.n_blocks * hkv
    kv_head = (torch.arange(hq, device=sel.device) // (hq // hkv))[None, :, None]
    seg = (sel.long() + plan.row_block_off[:, None, None]) * hkv + kv_head
    seg = torch.where(sel >= 0, seg, torch.full_like(seg, n_seg)).flatten()
    entry = torch.argsort(seg, stable=True)
    counts = torch.zeros(n_seg + 1, dtype=torch.int64, device=sel.device)
    counts.scatter_add_(0, seg, torch.ones_like(seg))
    counts = counts[:n_seg]
    zero = torch.zeros(1, dtype=torch.int64, device=sel.device)
    seg_start = torch.cat([zero, counts.cumsum(0)])
    tile_cum = torch.cat([zero, ((counts + tile_m - 1) // tile_m).cumsum(0)])
    return _Entries(entry, seg_start, tile_cum, n_seg, max(1, math.ceil(math.log2(n_seg + 1))),
                    triton.cdiv(seg.numel(), tile_m) + n_seg)


def _meta(dims: AttnDims, dtype):
    return dict(DQK=dims.dim_qk, DV=dims.dim_v, BLOCK_DQK=max(16, next_pow2(dims.dim_qk)),
                BLOCK_DV=max(16, next_pow2(dims.dim_v)), PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _select(q, k, plan: _Plan, dims: AttnDims, block_size: int):
    """Pooled keys and the top-(topk-1) earlier blocks of every (query row, head): (total_q, Hq, ksel) int32."""
    hq, hkv, d = dims.heads_q, dims.heads_kv, dims.dim_qk
    bd = max(16, next_pow2(d))
    kmean = empty(plan.n_blocks, hkv, d, device=q.device, dtype=q.dtype)
    _block_mean_kernel[(plan.n_blocks, hkv)](k, kmean, plan.block_row, plan.block_len, k.stride(0), k.stride(1),
                                             kmean.stride(0), kmean.stride(1), D=d, BLOCK_D=bd,
                                             BLOCK_T=32 if is_interpreter() else 64)
    sel = empty(q.shape[0], hq, plan.ksel, device=q.device, dtype=torch.int32)
    bm = _tiles()[2]
    _moba_select_kernel[(triton.cdiv(plan.max_q, bm), hq, dims.batch)](
        q, kmean, sel, plan.cu_q, plan.cu_k, plan.block_off, q.stride(0), q.stride(1), kmean.stride(0),
        kmean.stride(1), sel.stride(0), sel.stride(1), block_size, hq // hkv, D=d, BLOCK_D=bd, KSEL=plan.ksel,
        C=max(16, next_pow2(plan.ksel)), PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=bm)
    return sel


def _decode(q, k, v, plan: _Plan, dims: AttnDims, block_size: int, scale: float):
    """At most one new token per sequence, no gradient: split-KV over the own block and the selected
    blocks (each cut into SPLIT-key parts so that a small batch still fills the GPU), merged by lse."""
    hq, dv = dims.heads_q, dims.dim_v
    total_q = q.shape[0]
    split = min(block_size, 32 if is_interpreter() else 512)
    n_split = block_size // split
    n_pieces = (plan.ksel + 1) * n_split
    sel = _select(q, k, plan, dims, block_size) if plan.ksel > 0 else \
        torch.empty(total_q, hq, 1, dtype=torch.int32, device=q.device)
    outs = empty(n_pieces, total_q, hq, dv, device=q.device, dtype=q.dtype)
    lses = empty(n_pieces, hq, total_q, device=q.device, dtype=torch.float32)
    meta = _meta(dims, q.dtype)
    meta.pop("PRECISION")
    _moba_decode_kernel[(dims.batch * hq, n_pieces)](
        q, k, v, sel, outs, lses, plan.cu_q, plan.cu_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), sel.stride(0), sel.stride(1), outs.stride(0), outs.stride(1), outs.stride(2),
        lses.stride(0), lses.stride(1), hq, block_size, hq // dims.heads_kv, n_split, scale * LOG2E,
        KSEL=plan.ksel, SPLIT=split, BLOCK_N=min(split, 32 if is_interpreter() else 64), **meta)
    return merge_fwd(outs, lses)


class _MoBA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, dims: AttnDims, block_size: int, scale: float):
        hq, hkv, dv = dims.heads_q, dims.heads_kv, dims.dim_v
        total_q = q.shape[0]
        tile_m, tile_n, _ = _tiles()
        outs = empty(plan.ksel + 1, total_q, hq, dv, device=q.device, dtype=q.dtype)
        lses = torch.full((plan.ksel + 1, hq, total_q), float("-inf"), device=q.device, dtype=torch.float32)
        flash_fwd(q, k, v, plan.own, True, None, scale, out=outs[0], lse=lses[0])
        ent = None
        if plan.ksel > 0 and total_q > 0:
            sel = _select(q, k, plan, dims, block_size)
            ent = _entries(sel, plan, hq, hkv, tile_m)
            _moba_sparse_fwd_kernel[(ent.max_tiles,)](
                q, k, v, outs, lses, ent.entry, ent.seg_start, ent.tile_cum, plan.block_row,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                outs.stride(0), outs.stride(1), outs.stride(2), lses.stride(0), lses.stride(1),
                ent.n_seg, ent.n_iter, hq, hkv, block_size, scale * LOG2E, KSEL=plan.ksel,
                BLOCK_M=tile_m, BLOCK_N=min(tile_n, block_size), **_meta(dims, q.dtype))
        out, lse = merge_fwd(outs, lses) if plan.ksel > 0 else (outs[0], lses[0])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.dims, ctx.ent, ctx.block_size, ctx.scale = plan, dims, ent, block_size, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, dims, ent, scale = ctx.plan, ctx.dims, ctx.ent, ctx.scale
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.to(out.dtype).contiguous()
        if dlse is not None:
            dlse = dlse.float().contiguous()
        if q.shape[0] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None, None
        # One softmax over own block + selected blocks: every piece's gradient uses the final lse and delta.
        delta = flash_bwd_delta(out, dout, lse, dlse, plan.own)
        dq, dk, dv = flash_bwd(dout, q, k, v, lse, delta, plan.own, True, None, scale)
        if ent is not None:
            tile_m, tile_n, _ = _tiles()
            bn = min(tile_n, ctx.block_size)
            meta = _meta(dims, q.dtype)
            _moba_sparse_dkdv_kernel[(ctx.block_size // bn, ent.n_seg)](
                q, k, v, dout, lse, delta, dk, dv, ent.entry, ent.seg_start, plan.block_row,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                lse.stride(0), dims.heads_q, dims.heads_kv, scale * LOG2E, scale, KSEL=plan.ksel,
                BLOCK_M=tile_m, BLOCK_N=bn, **meta)
            dq32 = torch.zeros(dq.shape, device=dq.device, dtype=torch.float32)
            _moba_sparse_dq_kernel[(ent.max_tiles,)](
                q, k, v, dout, lse, delta, dq32, ent.entry, ent.seg_start, ent.tile_cum, plan.block_row,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                dout.stride(0), dout.stride(1), dq32.stride(0), dq32.stride(1), lse.stride(0),
                ent.n_seg, ent.n_iter, dims.heads_q, dims.heads_kv, ctx.block_size, scale * LOG2E, scale,
                KSEL=plan.ksel, BLOCK_M=tile_m, BLOCK_N=bn, **meta)
            dq = (dq.float() + dq32).to(dq.dtype)
        return dq, dk, dv, None, None, None, None


def _prepare(q, k, v, block_size, topk, cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
             max_seqlen_k, v_name="v"):
    """Validate arguments; return dims, packed (varlen) q/k/v and the host plan."""
    if cu_seqlens is not None:
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            raise ValueError("pass either cu_seqlens or cu_seqlens_q/cu_seqlens_k, not both")
        cu_seqlens_q = cu_seqlens_k = cu_seqlens
    if max_seqlen is not None:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("pass either max_seqlen or max_seqlen_q/max_seqlen_k, not both")
        max_seqlen_q = max_seqlen_k = max_seqlen
    dims = check_attention_inputs(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, v_name=v_name)
    check_positive_int(block_size, "block_size", minimum=16)
    if block_size & (block_size - 1) or block_size > 65536:
        raise ValueError(f"block_size must be a power of two from 16 to 65536, got {block_size}")
    check_positive_int(topk, "topk")
    if dims.varlen:
        lq, lk = dims.seqlens_q, dims.seqlens_k
        qp, kp, vp = q, k, v
    else:
        B = dims.batch
        lq, lk = [dims.max_seqlen_q] * B, [dims.max_seqlen_k] * B
        qp = q.reshape(B * dims.max_seqlen_q, dims.heads_q, dims.dim_qk)
        kp = k.reshape(B * dims.max_seqlen_k, dims.heads_kv, dims.dim_qk)
        vp = v.reshape(B * dims.max_seqlen_k, dims.heads_kv, v.shape[-1])
    for i, (a, b) in enumerate(zip(lq, lk)):
        if a > b:
            raise ValueError(f"sequence {i} has {a} queries but only {b} keys: MoBA needs every query's own "
                             "key (queries are aligned to the end of the keys)")
    plan = _plan(lq, lk, block_size, topk, dims, q.device)
    if plan.ksel >= MAX_TOPK:
        raise ValueError(f"topk must be at most {MAX_TOPK} (or at least the number of blocks, "
                         f"{-(-max(lk) // block_size)}), got {topk}")
    qp, kp, vp = (t if t.stride(-1) == 1 else t.contiguous() for t in (qp, kp, vp))
    return dims, plan, qp, kp, vp


def moba_block_selection(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 512, topk: int = 3,
                         cu_seqlens: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                         cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The key blocks MoBA selects for every (query, query head), computed by the Triton gate kernel.

    Same format as :func:`longattn.moba.reference.moba_block_selection_ref`: int64 block indices local to
    the sequence, own block included, ascending, padded with -1; ``(B, Tq, Hq, topk)`` dense or
    ``(total_q, Hq, topk)`` varlen.
    """
    dims, plan, qp, kp, _ = _prepare(q, k, k, block_size, topk, cu_seqlens, None, cu_seqlens_q, cu_seqlens_k,
                                     None, None, v_name="k")
    qk_, kk_ = kernel_inputs(qp, kp)
    total_q = qp.shape[0]
    own = torch.full((total_q, dims.heads_q, 1), -1, dtype=torch.int64, device=q.device)
    if total_q:
        lq = torch.tensor(dims.seqlens_q if dims.varlen else [dims.max_seqlen_q] * dims.batch)
        lk = torch.tensor(dims.seqlens_k if dims.varlen else [dims.max_seqlen_k] * dims.batch)
        start_q = torch.cumsum(lq, 0) - lq
        pos = torch.arange(total_q) - torch.repeat_interleave(start_q - (lk - lq), lq)
        own[:, :, 0] = (pos // block_size).to(q.device)[:, None]
    parts = [own]
    if plan.ksel > 0 and total_q:
        parts.append(_select(qk_, kk_, plan, dims, block_size).long())
    sel = torch.cat(parts, -1)
    sel = torch.where(sel < 0, torch.full_like(sel, 1 << 62), sel).sort(-1).values
    sel = torch.where(sel == 1 << 62, torch.full_like(sel, -1), sel)
    width = min(topk, max(1, plan.ksel + 1))
    out = torch.full((total_q, dims.heads_q, topk), -1, dtype=torch.int64, device=q.device)
    out[..., :width] = sel[..., :width]
    return out if dims.varlen else out.view(dims.batch, dims.max_seqlen_q, dims.heads_q, topk)


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 512, topk: int = 3,
                   cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                   cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                   max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                   scale: Optional[float] = None, return_lse: bool = False):
    """Mixture of Block Attention (MoBA), differentiable in q, k, v.

    Each query attends, in one softmax, causally to its own key block and fully to the ``topk - 1``
    earlier blocks whose mean-pooled key scores highest against it (per query head; semantics in
    :mod:`longattn.moba.reference`). The block selection is not differentiated.

    Layouts (as :func:`longattn.flash_attention`):
        dense:  q ``(B, Tq, Hq, Dqk)``, k ``(B, Tk, Hkv, Dqk)``, v ``(B, Tk, Hkv, Dv)`` -> ``(B, Tq, Hq, Dv)``
        varlen: ``(total, H, D)`` with ``cu_seqlens`` or ``cu_seqlens_q``/``cu_seqlens_k`` (int32).
        With fewer queries than keys, query i sits at key position ``Tk - Tq + i`` (decode, chunked prefill).

    Args:
        block_size: key block length, a power of two from 16 to 65536 (default 512).
        topk: blocks per query including its own (default 3), 1 to 64 (larger values act as "all
            blocks", which is dense causal attention).
        scale: softmax scale, default ``Dqk ** -0.5``.
        return_lse: also return the float32 log-sum-exp, ``(B, Hq, Tq)`` or ``(Hq, total_q)``.

    With at most one query per sequence and no gradient needed (decoding), a split-KV kernel over the
    own block and the selected blocks is used. It still pools every key block of the cache at each call.

    Memory beyond inputs and outputs: the partial outputs of the ``topk`` pieces in the forward pass
    (``topk`` x output size, freed before returning) and O(T * Hq * topk) indices; the backward pass adds
    one float32 dq buffer.
    """
    dims, plan, qp, kp, vp = _prepare(q, k, v, block_size, topk, cu_seqlens, max_seqlen, cu_seqlens_q,
                                      cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = check_scale(scale, dims.dim_qk ** -0.5)
    in_dtype = q.dtype
    qk_, kk_, vk_ = kernel_inputs(qp, kp, vp)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if plan.max_q <= 1 and not needs_grad and qp.shape[0] > 0:
        out, lse = _decode(qk_, kk_, vk_, plan, dims, block_size, scale)
    else:
        out, lse = _MoBA.apply(qk_, kk_, vk_, plan, dims, block_size, scale)
    out = out.to(in_dtype)
    if not dims.varlen:
        out = out.view(dims.batch, dims.max_seqlen_q, dims.heads_q, dims.dim_v)
        lse = lse.view(dims.heads_q, dims.batch, dims.max_seqlen_q).permute(1, 0, 2)
    return (out, lse) if return_lse else out


__all__ = ["moba_attention", "moba_block_selection"]
