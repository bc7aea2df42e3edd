"""NSA public op: ``nsa_attention`` (Triton kernels for every branch, differentiable end to end)."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..kernels.flash import flash_attention
from ..kernels.sparse import block_sparse_packed, pack_inputs, plan_blocks
from ..kernels.utils import check_attention_inputs, check_scale, check_tensor, empty, is_interpreter, kernel_inputs, \
    next_pow2
from .kernels import _nsa_select_kernel
from .reference import NSAConfig


def _mean_compress(x: torch.Tensor, lengths: list, config: NSAConfig) -> torch.Tensor:
    """Mean-pooling compressor over packed sequences: (total, H, D) -> (total_cmp, H, D), differentiable."""
    parts, start = [], 0
    for n in lengths:
        m = config.num_cmp_blocks(n)
        if m:
            seq = x[start:start + n]
            parts.append(seq.unfold(0, config.cmp_block, config.cmp_stride)[:m].float().mean(-1).to(x.dtype))
        start += n
    return torch.cat(parts) if parts else x.new_zeros(0, *x.shape[1:])


def _cu(lengths: list, device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu.to(device)


def nsa_select(q: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor, cu_q: torch.Tensor, cu_cmp: torch.Tensor,
               max_q: int, heads_kv: int, config: NSAConfig, scale: float) -> torch.Tensor:
    """Top-n selection blocks per (query row, KV head) from the compressed attention: int32
    ``(total_q, Hkv, slc_topk)``, best first, -1 padded. q ``(total_q, Hq, D)``, k_cmp ``(total_cmp, Hkv, D)``,
    lse_cmp ``(Hq, total_q)`` (natural log, from the compressed branch)."""
    hq, d = q.shape[1], q.shape[2]
    top = config.slc_topk
    ratio, inner = config.slc_block // config.cmp_stride, config.cmp_block // config.cmp_stride
    weights = config.score_weights().to(device=q.device, dtype=torch.float32)
    sel = empty(q.shape[0], heads_kv, top, device=q.device, dtype=torch.int32)
    bm = 32 if is_interpreter() else 64
    _nsa_select_kernel[(triton.cdiv(max_q, bm), heads_kv, cu_q.numel() - 1)](
        q, k_cmp, lse_cmp, weights, sel, cu_q, cu_cmp, q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1),
        lse_cmp.stride(0), sel.stride(0), sel.stride(1), hq // heads_kv, scale,
        D=d, BLOCK_D=max(16, next_pow2(d)), CMP_STRIDE=config.cmp_stride, CMP_BLOCK=config.cmp_block,
        SLC_BLOCK=config.slc_block, NW=ratio + inner - 1, TOPK=top, TOPK_PAD=next_pow2(top),
        INIT=config.init_blocks, LOCAL=config.local_blocks, C=max(16, next_pow2(top)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=bm)
    return sel


def nsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cmp: torch.Tensor, g_slc: torch.Tensor,
                  g_swa: torch.Tensor, *, config: NSAConfig = NSAConfig(), k_cmp: Optional[torch.Tensor] = None,
                  v_cmp: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  max_seqlen: Optional[int] = None, scale: Optional[float] = None, return_selection: bool = False):
    """Native Sparse Attention (prefill / training), differentiable in q, k, v, the gates and k_cmp/v_cmp.

    ``o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`` with the semantics of
    :mod:`longattn.nsa.reference`.

    Args:
        q: ``(B, T, Hq, Dk)`` or varlen ``(total, Hq, Dk)`` with ``cu_seqlens`` (int32).
        k, v: ``(B, T, Hkv, Dk)`` / ``(B, T, Hkv, Dv)`` (or varlen); every query head group shares one
            selection. Group sizes 1 to 16 (any ``Hq % Hkv == 0`` works).
        g_cmp, g_slc, g_swa: gates ``(B, T, Hq)`` / ``(total, Hq)``, any float dtype, typically in [0, 1].
        config: :class:`NSAConfig` (paper defaults).
        k_cmp, v_cmp: compressed keys/values ``(B, n_cmp, Hkv, D*)`` / packed ``(total_cmp, Hkv, D*)`` from a
            learnable compressor; default: mean pooling of k and v.
        scale: softmax scale of every branch, default ``Dk ** -0.5``.
        return_selection: also return the selected blocks, int32 ``(B, T, Hkv, slc_topk)`` / ``(total, Hkv,
            slc_topk)``, best first, -1 padded.
    Returns:
        ``(B, T, Hq, Dv)`` / ``(total, Hq, Dv)`` in q's dtype.

    Branches: compressed attention through :func:`flash_attention` with strided key positions (which also
    gives the row lse); scores + top-n in one kernel that never stores the (T, n_cmp) probabilities;
    selected blocks through the block-sparse engine (a GQA group's heads share each loaded block); the
    window through flash attention; the gates in PyTorch.
    """
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
    dims = check_attention_inputs(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                  max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    if not dims.varlen and dims.max_seqlen_q != dims.max_seqlen_k:
        raise ValueError(f"nsa_attention runs on whole sequences: q and k must have the same length, got "
                         f"{dims.max_seqlen_q} and {dims.max_seqlen_k}")
    scale = check_scale(scale, dims.dim_qk ** -0.5)
    gshape = q.shape[:-1]
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        check_tensor(g, name, dtypes=(torch.float16, torch.bfloat16, torch.float32))
        if tuple(g.shape) != tuple(gshape):
            raise ValueError(f"{name} must have shape {tuple(gshape)} (one gate per query head), got {tuple(g.shape)}")
    qp, kp, vp, lq, lk = pack_inputs(q, k, v, dims)
    n_cmp = [config.num_cmp_blocks(n) for n in lk]
    if k_cmp is None and v_cmp is None:
        kc, vc = _mean_compress(kp, lk, config), _mean_compress(vp, lk, config)
    elif k_cmp is None or v_cmp is None:
        raise ValueError("pass both k_cmp and v_cmp, or neither")
    else:
        kc = k_cmp if dims.varlen else k_cmp.reshape(-1, *k_cmp.shape[2:])
        vc = v_cmp if dims.varlen else v_cmp.reshape(-1, *v_cmp.shape[2:])
        want_k = (sum(n_cmp), dims.heads_kv, dims.dim_qk)
        want_v = (sum(n_cmp), dims.heads_kv, dims.dim_v)
        if tuple(kc.shape) != want_k or tuple(vc.shape) != want_v:
            raise ValueError(f"k_cmp/v_cmp must hold {sum(n_cmp)} compressed blocks: shapes {want_k} and {want_v} "
                             f"(packed), got {tuple(kc.shape)} and {tuple(vc.shape)}")
    cu, cu_cmp = _cu(lq, q.device), _cu(n_cmp, q.device)
    max_q = max(lq) if lq else 0

    # compressed branch (also yields the lse the selection needs)
    o_cmp, lse_cmp = flash_attention(qp, kc, vc, cu_seqlens_q=cu, cu_seqlens_k=cu_cmp, scale=scale,
                                     key_stride=config.cmp_stride, key_offset=config.cmp_block - 1,
                                     return_lse=True)
    # selection (not differentiated)
    with torch.no_grad():
        qs, kcs = kernel_inputs(qp.detach(), kc.detach())
        sel = nsa_select(qs, kcs, lse_cmp.detach(), cu, cu_cmp, max_q, dims.heads_kv, config, scale)
        group = dims.heads_q // dims.heads_kv
        own = torch.cat([torch.arange(n, device=q.device) // config.slc_block for n in lq]) if lq else \
            torch.zeros(0, dtype=torch.long, device=q.device)
        sel_q = sel.repeat_interleave(group, dim=1)
        sel_q = torch.where(sel_q == own[:, None, None], torch.full_like(sel_q, -1), sel_q).contiguous()
    # selected branch: own block causal + the other selected blocks, one softmax
    plan = plan_blocks(lq, lk, config.slc_block, dims, q.device)
    qk_, kk_, vk_ = kernel_inputs(qp, kp, vp)
    o_slc, _ = block_sparse_packed(qk_, kk_, vk_, sel_q, plan, dims, config.slc_block, scale)
    # sliding window
    o_swa = flash_attention(qp, kp, vp, cu_seqlens=cu, window=config.window, scale=scale)
    gates = [g.reshape(qp.shape[0], dims.heads_q, 1).float() for g in (g_cmp, g_slc, g_swa)]
    out = gates[0] * o_cmp.float() + gates[1] * o_slc.float() + gates[2] * o_swa.float()
    out = out.to(q.dtype)
    if not dims.varlen:
        out = out.view(dims.batch, dims.max_seqlen_q, dims.heads_q, dims.dim_v)
        sel = sel.view(dims.batch, dims.max_seqlen_q, dims.heads_kv, -1)
    return (out, sel) if return_selection else out


__all__ = ["nsa_attention", "nsa_select"]
