"""Exact merge of partial attention results by their log-sum-exp, in Triton, forward and backward.

If ``(o_i, lse_i)`` are the softmax attention outputs of one query over disjoint key sets ``S_i``, the
attention over their union is ``o = sum_i exp(lse_i - lse) o_i`` with ``lse = logsumexp_i lse_i``. This
is how MoBA, NSA and split-KV decoding combine their pieces.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import triton
import triton.language as tl

from .utils import (COMPILE_OPTIONS, cdiv, check_device, check_same_dtype, check_tensor, empty, empty_like,
                    first_order_backward, kernel_inputs, next_pow2, public_op, small_tiles)


@triton.jit
def _merge_fwd_kernel(O_in, LSE_in, O, LSE, n_parts, seqlen,
                      s_in_n, s_in_b, s_in_t, s_in_h, s_lin_n, s_lin_b, s_lin_h,
                      s_ob, s_ot, s_oh, s_lb, s_lh,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    t0 = (pid_t * BLOCK_T).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    in_t = t0 + offs_t < seqlen
    msk = in_t[:, None] & (offs_d[None, :] < D)
    # 64-bit arithmetic on the scalar bases only (a part n lives at base + n * stride); offsets within a tile
    # stay 32-bit, so no tensor of 64-bit pointers is carried through the loops
    l_base = LSE_in + b * s_lin_b + h * s_lin_h + t0
    o_base = O_in + b * s_in_b + h * s_in_h + t0 * s_in_t
    o_off = offs_t[:, None] * s_in_t + offs_d[None, :]
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_ptr = l_base
    for _ in range(0, n_parts):
        m = tl.maximum(m, tl.load(l_ptr + offs_t, mask=in_t, other=float("-inf")))
        l_ptr += s_lin_n
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    total = tl.zeros([BLOCK_T], tl.float32)
    for _ in range(0, n_parts):  # scalar pointers advance by a part's stride (64-bit)
        w = tl.exp(tl.load(l_base + offs_t, mask=in_t, other=float("-inf")) - m_use)
        o_n = tl.load(o_base + o_off, mask=msk, other=0.0).to(tl.float32)
        o_n = tl.where(w[:, None] > 0.0, o_n, 0.0)  # an empty part's output is never used
        acc += w[:, None] * o_n
        total += w
        l_base += s_lin_n
        o_base += s_in_n
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), m_use + tl.log(tl.where(empty, 1.0, total)))
    tl.store(O + b * s_ob + h * s_oh + t0 * s_ot + (offs_t[:, None] * s_ot + offs_d[None, :]),
             out.to(O.dtype.element_ty), mask=msk)
    tl.store(LSE + b * s_lb + h * s_lh + t0 + offs_t, lse, mask=in_t)


@triton.jit
def _merge_bwd_kernel(O_in, LSE_in, O, LSE, DO, DLSE, DO_in, DLSE_in, n_parts, seqlen,
                      s_in_n, s_in_b, s_in_t, s_in_h, s_lin_n, s_lin_b, s_lin_h,
                      s_ob, s_ot, s_oh, s_lb, s_lh, s_dob, s_dot, s_doh,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    in_t = offs_t < seqlen
    t64 = offs_t.to(tl.int64)
    msk = in_t[:, None] & (offs_d[None, :] < D)
    o = tl.load(O + b * s_ob + h * s_oh + t64[:, None] * s_ot + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b * s_dob + h * s_doh + t64[:, None] * s_dot + offs_d[None, :], mask=msk,
                 other=0.0).to(tl.float32)
    lse = tl.load(LSE + b * s_lb + h * s_lh + t64, mask=in_t, other=float("-inf"))
    lse_use = tl.where(lse == float("-inf"), float("inf"), lse)  # all parts empty: every weight is 0
    dlse = tl.zeros([BLOCK_T], tl.float32)
    if HAS_DLSE:
        dlse = tl.load(DLSE + b * s_lb + h * s_lh + t64, mask=in_t, other=0.0)
    l_off = b * s_lin_b + h * s_lin_h + t64
    o_off = b * s_in_b + h * s_in_h + t64[:, None] * s_in_t + offs_d[None, :]
    L_ptr, DL_ptr = LSE_in + l_off, DLSE_in + l_off
    O_ptr, DO_ptr = O_in + o_off, DO_in + o_off
    for _ in range(0, n_parts):
        w = tl.exp(tl.load(L_ptr, mask=in_t, other=float("-inf")) - lse_use)
        o_n = tl.load(O_ptr, mask=msk, other=0.0).to(tl.float32)
        tl.store(DO_ptr, (w[:, None] * do).to(DO_in.dtype.element_ty), mask=msk)
        o_n = tl.where(w[:, None] > 0.0, o_n, 0.0)
        tl.store(DL_ptr, w * (tl.sum(do * (o_n - o), 1) + dlse), mask=in_t)
        L_ptr += s_lin_n
        DL_ptr += s_lin_n
        O_ptr += s_in_n
        DO_ptr += s_in_n


def _views(outs: torch.Tensor, lses: torch.Tensor):
    """Strides as (n, batch, token, head) for outs and (n, batch, head) for lses; varlen is batch 1."""
    if outs.dim() == 4:  # (N, total, H, D), lse (N, H, total)
        return (1, outs.shape[1], outs.shape[2], outs.shape[3],
                (outs.stride(0), 0, outs.stride(1), outs.stride(2)), (lses.stride(0), 0, lses.stride(1)))
    return (outs.shape[1], outs.shape[2], outs.shape[3], outs.shape[4],
            (outs.stride(0), outs.stride(1), outs.stride(2), outs.stride(3)),
            (lses.stride(0), lses.stride(1), lses.stride(2)))


def _out_strides(o: torch.Tensor, lse: torch.Tensor):
    if o.dim() == 3:
        return (0, o.stride(0), o.stride(1)), (0, lse.stride(0))
    return (o.stride(0), o.stride(1), o.stride(2)), (lse.stride(0), lse.stride(1))


def _block_t(d: int, elem: int) -> int:
    """Rows per program: 8 KB of outputs per tile (4096 16-bit elements; 4 warps hold a tile and its part
    without spilling registers)."""
    if small_tiles():
        return 64
    return max(8, min(128, 8192 // (next_pow2(d) * elem)))


def merge_fwd(outs: torch.Tensor, lses: torch.Tensor, out_dtype: torch.dtype = None):
    """Merge launch on validated, stacked inputs: outs (N, B, T, H, D) or (N, total, H, D), lses
    (N, B, H, T) or (N, H, total), both contiguous. Returns (out, lse); out in ``out_dtype`` (default: that of
    outs: float32 partials can be merged straight into a 16-bit output)."""
    B, T, H, D, s_in, s_lin = _views(outs, lses)
    out = empty(outs.shape[1:], device=outs.device, dtype=out_dtype or outs.dtype)
    lse = empty(lses.shape[1:], device=outs.device, dtype=torch.float32)
    if out.numel() > 0:
        so, sl = _out_strides(out, lse)
        bt = _block_t(D, outs.element_size())
        _merge_fwd_kernel[(cdiv(T, bt), H, B)](
            outs, lses, out, lse, outs.shape[0], T, *s_in, *s_lin, *so, *sl,
            D=D, BLOCK_D=next_pow2(D), BLOCK_T=bt, **COMPILE_OPTIONS)
    return out, lse


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, outs, lses):
        out, lse = merge_fwd(outs, lses)
        ctx.save_for_backward(outs, lses, out, lse)
        return out, lse

    @staticmethod
    @first_order_backward("merge_attention")
    def backward(ctx, saved, dout, dlse):
        outs, lses, out, lse = saved
        B, T, H, D, s_in, s_lin = _views(outs, lses)
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.to(out.dtype).contiguous()
        if dlse is not None:
            dlse = dlse.float().contiguous()
        d_outs = empty_like(outs)
        d_lses = empty_like(lses)
        if out.numel() > 0:
            so, sl = _out_strides(out, lse)
            sdo, _ = _out_strides(dout, lse)
            bt = _block_t(D, outs.element_size())
            _merge_bwd_kernel[(cdiv(T, bt), H, B)](
                outs, lses, out, lse, dout, dlse, d_outs, d_lses, outs.shape[0], T, *s_in, *s_lin, *so, *sl, *sdo,
                D=D, BLOCK_D=next_pow2(D), HAS_DLSE=dlse is not None, BLOCK_T=bt, **COMPILE_OPTIONS)
        return d_outs, d_lses


TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


@public_op()
def merge_attention(outs: TensorOrList, lses: TensorOrList):
    """Merge N partial attention results over disjoint key sets into the attention over their union.

    Args:
        outs: N partial outputs, each ``(B, T, H, D)`` (dense) or ``(total, H, D)`` (varlen), as a list or
            stacked in one tensor ``(N, ...)`` (stacking avoids a copy); float16, bfloat16 or float32.
        lses: the matching float32 natural-log log-sum-exps, each ``(B, H, T)`` or ``(H, total)``
            (as returned by ``flash_attention(..., return_lse=True)``), list or stacked ``(N, ...)``.
            A part with ``lse = -inf`` (no visible key) contributes nothing, whatever its output holds.

    Returns:
        ``(out, lse)``: out in the dtype of ``outs``, lse float32; rows where every part is empty give
        ``out = 0`` and ``lse = -inf``. Differentiable in every ``outs[i]`` and ``lses[i]``.
    """
    if isinstance(outs, (list, tuple)):
        if len(outs) == 0:
            raise ValueError("outs must hold at least one partial output")
        for i, o in enumerate(outs):
            check_tensor(o, f"outs[{i}]", ndim=(3, 4))
            if o.shape != outs[0].shape:
                raise ValueError(f"outs[{i}] has shape {tuple(o.shape)} but outs[0] has {tuple(outs[0].shape)}: every "
                                 f"part must have the same shape")
        check_same_dtype({f"outs[{i}]": o for i, o in enumerate(outs)})
        check_device({f"outs[{i}]": o for i, o in enumerate(outs)})
        outs = torch.stack(list(outs))
    if isinstance(lses, (list, tuple)):
        if len(lses) == 0:
            raise ValueError("lses must hold at least one partial lse")
        for i, l in enumerate(lses):
            check_tensor(l, f"lses[{i}]", ndim=(2, 3), dtypes=(torch.float32,))
            if l.shape != lses[0].shape:
                raise ValueError(f"lses[{i}] has shape {tuple(l.shape)} but lses[0] has {tuple(lses[0].shape)}: every "
                                 f"part must have the same shape")
        check_device({f"lses[{i}]": l for i, l in enumerate(lses)})
        lses = torch.stack(list(lses))
    check_tensor(outs, "outs", ndim=(4, 5))
    check_tensor(lses, "lses", ndim=(3, 4), dtypes=(torch.float32,))
    check_device({"outs": outs, "lses": lses})
    if outs.shape[0] != lses.shape[0] or outs.shape[0] == 0:
        raise ValueError(f"outs and lses must hold the same positive number of parts, got {outs.shape[0]} "
                         f"and {lses.shape[0]}")
    if outs.dim() == 5:
        want = (outs.shape[0], outs.shape[1], outs.shape[3], outs.shape[2])
    else:
        want = (outs.shape[0], outs.shape[2], outs.shape[1])
    if tuple(lses.shape) != want:
        raise ValueError(f"lses must have shape {want} to match outs of shape {tuple(outs.shape)} "
                         f"(lse layout (B, H, T) or (H, total)), got {tuple(lses.shape)}")
    if not 1 <= outs.shape[-1] <= 1024:  # (a head's row is one tile of the kernels)
        raise ValueError(f"outs must have a head dim in [1, 1024], got {outs.shape[-1]}")
    in_dtype = outs.dtype
    (outs_k,) = kernel_inputs(outs.contiguous())  # the backward writes d_outs with the strides of outs
    lses = lses.contiguous()
    out, lse = _Merge.apply(outs_k, lses)
    return out.to(in_dtype), lse


__all__ = ["merge_attention"]
