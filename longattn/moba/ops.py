"""MoBA public ops: ``moba_attention`` and ``moba_block_selection`` (Triton gate + block-sparse engine)."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..kernels.sparse import (BlockPlan, block_sparse_packed, entries, pack_inputs, plan_blocks, sparse_backward,
                              sparse_decode, unpack_output)
from ..kernels.utils import (COMPILE_OPTIONS, FLOAT8_DTYPES, AttnDims, cdiv, check_attention_inputs,
                             check_attention_shapes, check_block_table, check_cache_lengths, check_cache_rows,
                             check_decode_inputs, check_positive_int, check_scale, check_softcap, device_tensor,
                             eager_context, empty, kernel_inputs, next_pow2, public_op, resolve_seqlens, small_tiles,
                             validate_cache_rows, validate_pages)
from .kernels import _block_mean_kernel, _cache_block_mean_kernel, _moba_decode_select_kernel, _moba_select_kernel

MAX_TOPK = 64


def _select(q, k, plan: BlockPlan, dims: AttnDims, block_size: int, ksel: int):
    """Pooled keys and the top-(topk-1) earlier blocks of every (query row, head): (total_q, Hq, ksel) int32."""
    hq, hkv, d = dims.heads_q, dims.heads_kv, dims.dim_qk
    bd = max(16, next_pow2(d))
    kmean = empty(plan.n_blocks, hkv, d, device=q.device, dtype=q.dtype)
    _block_mean_kernel[(plan.n_blocks, hkv)](k, kmean, plan.block_row, plan.block_len, k.stride(0), k.stride(1),
                                             kmean.stride(0), kmean.stride(1), D=d, BLOCK_D=bd,
                                             BLOCK_T=32 if small_tiles() else 64, **COMPILE_OPTIONS)
    sel = empty(q.shape[0], hq, ksel, device=q.device, dtype=torch.int32)
    bm = select_rows(q.dtype)
    _moba_select_kernel[(cdiv(plan.max_q, bm), hq, dims.batch)](
        q, kmean, sel, plan.cu_q, plan.cu_k, plan.block_off, q.stride(0), q.stride(1), kmean.stride(0),
        kmean.stride(1), sel.stride(0), sel.stride(1), block_size, hq // hkv, D=d, BLOCK_D=bd, KSEL=ksel,
        C=max(16, next_pow2(ksel)), PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=bm,
        **COMPILE_OPTIONS)
    return sel


def select_rows(dtype) -> int:
    """Query rows per program of the gate kernel: float32 products run on CUDA cores, where 32 rows keep its tiles
    in registers up to head dim 256 (64 spilled 2 KB per thread on sm_90)."""
    return 32 if small_tiles() or dtype == torch.float32 else 64


def _check_block_size(block_size: int) -> None:
    check_positive_int(block_size, "block_size", minimum=16)
    if block_size & (block_size - 1) or block_size > 65536:
        raise ValueError(f"block_size must be a power of two from 16 to 65536, got {block_size}")


def _validate(q, k, v, block_size, topk, cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
              max_seqlen_k, v_name="v") -> AttnDims:
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = resolve_seqlens(
        cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dims = check_attention_inputs(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, v_name=v_name)
    _check_block_size(block_size)
    check_positive_int(topk, "topk")
    return dims


def _prepare(q, k, v, block_size, topk, dims: AttnDims):
    """Packed (varlen) q/k/v, the host plan and the number of earlier blocks to select, for validated inputs."""
    qp, kp, vp, lq, lk = pack_inputs(q, k, v, dims)
    plan = plan_blocks(lq, lk, block_size, dims, q.device)
    ksel = max(0, min(topk, plan.max_blocks) - 1)
    if ksel >= MAX_TOPK:
        raise ValueError(f"topk must be at most {MAX_TOPK} (or at least the number of blocks, "
                         f"{plan.max_blocks}), got {topk}")
    return plan, ksel, qp, kp, vp


@public_op("q", "k")
def moba_block_selection(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 512, topk: int = 3,
                         cu_seqlens: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                         cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The key blocks MoBA selects for every (query, query head), computed by the Triton gate kernel.

    Same format as :func:`longattn.moba.reference.moba_block_selection_ref`: int64 block indices local to
    the sequence, own block included, ascending, padded with -1; ``(B, Tq, Hq, topk)`` dense or
    ``(total_q, Hq, topk)`` varlen.
    """
    dims = _validate(q, k, k, block_size, topk, cu_seqlens, None, cu_seqlens_q, cu_seqlens_k, None, None, v_name="k")
    plan, ksel, qp, kp, _ = _prepare(q, k, k, block_size, topk, dims)
    qk_, kk_ = kernel_inputs(qp, kp)
    total_q = qp.shape[0]
    own = torch.full((total_q, dims.heads_q, 1), -1, dtype=torch.int64, device=q.device)
    if total_q:
        lq = torch.tensor(dims.seqlens_q if dims.varlen else [dims.max_seqlen_q] * dims.batch)
        lk = torch.tensor(dims.seqlens_k if dims.varlen else [dims.max_seqlen_k] * dims.batch)
        start_q = torch.cumsum(lq, 0) - lq
        pos = torch.arange(total_q) - torch.repeat_interleave(start_q - (lk - lq), lq)
        own[:, :, 0] = device_tensor(pos // block_size, torch.int64, q.device)[:, None]
    parts = [own]
    if ksel > 0 and total_q:
        parts.append(_select(qk_, kk_, plan, dims, block_size, ksel).long())
    sel = torch.cat(parts, -1)
    sel = torch.where(sel < 0, torch.full_like(sel, 1 << 62), sel).sort(-1).values
    sel = torch.where(sel == 1 << 62, torch.full_like(sel, -1), sel)
    width = min(topk, ksel + 1)
    out = torch.full((total_q, dims.heads_q, topk), -1, dtype=torch.int64, device=q.device)
    out[..., :width] = sel[..., :width]
    return out if dims.varlen else out.view(dims.batch, dims.max_seqlen_q, dims.heads_q, topk)


def _moba(q, k, v, dims: AttnDims, block_size: int, topk: int, scale: float, softcap: float = 0.0,
          shortcut: bool = True):
    """moba_attention on validated inputs: ``(out, lse, sel)``, sel the packed selection of earlier blocks
    (total_q, Hq, ksel) int32, or None from the decoding shortcut (``shortcut``: allowed)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if shortcut and not dims.varlen and dims.max_seqlen_q == 1 and not grad and q.numel() and k.numel():
        # one new token per sequence (decoding): the batch cache in place, no packing or host plan
        lens = torch.full((dims.batch,), dims.max_seqlen_k, dtype=torch.int32, device=q.device)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse = moba_decode(q[:, 0], k, v, cache_seqlens=lens, block_size=block_size, topk=topk, scale=scale,
                               softcap=softcap, return_lse=True, validate=False)
        return out[:, None], lse[:, :, None], None
    plan, ksel, qp, kp, vp = _prepare(q, k, v, block_size, topk, dims)
    qk_, kk_, vk_ = kernel_inputs(qp, kp, vp)
    with torch.no_grad():  # the block selection is not differentiated
        sel = _select(qk_, kk_, plan, dims, block_size, ksel) if ksel > 0 and qp.shape[0] else \
            torch.empty(qp.shape[0], dims.heads_q, 0, dtype=torch.int32, device=q.device)
    out, lse = block_sparse_packed(qk_, kk_, vk_, sel, plan, dims, block_size, scale, softcap)
    out, lse = unpack_output(out.to(q.dtype), lse, dims)
    return out, lse, sel


# torch.compile: moba_attention as one custom op (its backward another), as flash_attention. With gradients the
# forward also returns the selection, which its backward takes (the engine's entries are rebuilt from it), padded
# to a width known from the shapes: the selections of the longest sequence's blocks
_OP_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int? max_seqlen_q, "
            "int? max_seqlen_k, int block_size, int topk, float? scale, float softcap")


def _selection_width(k, block_size: int, topk: int, varlen: bool):
    """At least the selection's width (exactly it in the dense layout): ``min(topk, blocks) - 1``."""
    blocks = -(-k.shape[0 if varlen else 1] // block_size)
    return max(0, min(topk, blocks, MAX_TOPK) - 1)


@torch.library.custom_op("longattn::moba_attention", mutates_args=(),
                         schema=f"({_OP_ARGS}, bool keep_selection) -> (Tensor, Tensor, Tensor)")
def _moba_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, topk, scale, softcap,
             keep_selection):
    with eager_context(q):
        dims = _validate(q, k, v, block_size, topk, None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k)
        out, lse, sel = _moba(q, k, v, dims, block_size, topk, check_scale(scale, dims.dim_qk ** -0.5),
                              check_softcap(softcap), shortcut=not keep_selection)
    width = _selection_width(k, block_size, topk, dims.varlen) if keep_selection else 0
    kept = torch.full((q.shape[:-2].numel(), dims.heads_q, width), -1, dtype=torch.int32, device=q.device)
    if width:
        kept[..., :sel.shape[-1]] = sel
    return out, lse.contiguous(), kept  # (the dense lse is a transposed view: the op's outputs are contiguous)


@_moba_op.register_fake
def _moba_op_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, topk, scale,
                    softcap, keep_selection):
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    check_attention_shapes(q, k, v, varlen)
    lse = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    width = _selection_width(k, block_size, topk, varlen) if keep_selection else 0
    rows = q.shape[0] if varlen else q.shape[0] * q.shape[1]
    return (q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(lse, dtype=torch.float32),
            q.new_empty(rows, q.shape[-2], width, dtype=torch.int32))


@torch.library.custom_op("longattn::moba_attention_backward", mutates_args=(),
                         schema=f"(Tensor? dout, Tensor? dlse, Tensor out, Tensor lse, Tensor sel, {_OP_ARGS}) -> "
                                "(Tensor, Tensor, Tensor)")
def _moba_backward_op(dout, dlse, out, lse, sel, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      block_size, topk, scale, softcap):
    with eager_context(q):
        dims = _validate(q, k, v, block_size, topk, None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k)
        plan, ksel, qp, kp, vp = _prepare(q, k, v, block_size, topk, dims)
        hq = dims.heads_q
        sel = sel[..., :ksel].contiguous()
        outp, lsep, doutp, dlsep = out.reshape(-1, hq, dims.dim_v), lse, dout, dlse
        if not dims.varlen:  # the packed layout of the engine: (total, H, D) and lse (H, total)
            lsep = lse.transpose(0, 1).reshape(hq, -1)
            doutp = dout.reshape(outp.shape) if dout is not None else None
            dlsep = dlse.transpose(0, 1).reshape(hq, -1) if dlse is not None else None
        qk_, kk_, vk_, outp = kernel_inputs(qp, kp, vp, outp)
        ent = entries(sel, plan, hq, dims.heads_kv) if ksel > 0 and qp.shape[0] else None
        grads = sparse_backward(qk_, kk_, vk_, outp, lsep, doutp, dlsep, plan, dims, ent, ksel, block_size,
                                check_scale(scale, dims.dim_qk ** -0.5), softcap=check_softcap(softcap))[:3]
    return tuple(g.reshape(t.shape).to(t.dtype) for g, t in zip(grads, (q, k, v)))


@_moba_backward_op.register_fake
def _moba_backward_shapes(dout, dlse, out, lse, sel, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _moba_op_save(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *options, _ = inputs
    ctx.save_for_backward(*output, q, k, v, cu_q, cu_k)
    ctx.options = options


def _moba_op_backward(ctx, dout, dlse, _):
    out, lse, sel, q, k, v, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.longattn.moba_attention_backward(dout, dlse, out, lse, sel, q, k, v, cu_q, cu_k,
                                                            *ctx.options)
    return (dq, dk, dv) + (None,) * 9


_moba_op.register_autograd(_moba_op_backward, setup_context=_moba_op_save)


def _moba_attention_traced(q, k, v, *, block_size=512, topk=3, cu_seqlens=None, max_seqlen=None, cu_seqlens_q=None,
                           cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, scale=None, softcap=None,
                           return_lse=False):
    """moba_attention as TorchDynamo traces it (same arguments): the custom op."""
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = resolve_seqlens(
        cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out, lse, _ = torch.ops.longattn.moba_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                    block_size, topk, scale, check_softcap(softcap), grad)
    return (out, lse) if return_lse else out


@public_op("q", "k", "v", traced=_moba_attention_traced)
def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 512, topk: int = 3,
                   cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                   cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                   max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                   scale: Optional[float] = None, softcap: Optional[float] = None, return_lse: bool = False):
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
        softcap: soft-capping of the attention's scores (Gemma 2's, 50.0): a positive ``c`` makes them
            ``c * tanh(scale * q.k / c)`` (forward and gradients); the gate scores the pooled keys uncapped (tanh
            keeps their order). None or 0 (default): none.
        return_lse: also return the float32 log-sum-exp, ``(B, Hq, Tq)`` or ``(Hq, total_q)``.

    With at most one query per sequence and no gradient needed, a split-KV kernel over the own block and the
    selected blocks is used (dense inputs through :func:`moba_decode`, in place); it pools every key block at each
    call (:func:`moba_decode` also takes kept pooled keys).

    Memory beyond inputs and outputs: O(T * Hq * topk) indices in the forward pass (each selected block's part is
    merged into the output in place, one slot of the selections at a time); the backward pass adds
    one float32 dq buffer, into which the selected blocks' parts are added atomically (their order, so dq's last
    bits, may vary from run to run). Under ``torch.use_deterministic_algorithms(True)`` each part is stored in a
    buffer of its own (``topk - 1`` float32 dq buffers) and they are summed in order: every gradient is then
    bitwise reproducible (the own block's and dK/dV's always are).

    ``torch.compile``: traced as one custom op (``torch.ops.longattn.moba_attention``, its backward
    ``moba_attention_backward``), without a graph break.
    """
    dims = _validate(q, k, v, block_size, topk, cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k)
    out, lse, _ = _moba(q, k, v, dims, block_size, topk, check_scale(scale, dims.dim_qk ** -0.5),
                        check_softcap(softcap))
    return (out, lse) if return_lse else out


@public_op("q", "k_cache", "v_cache", "k_mean")
def moba_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, cache_seqlens: torch.Tensor,
                cache_offsets: Optional[torch.Tensor] = None, block_table: Optional[torch.Tensor] = None,
                cache_rows: Optional[torch.Tensor] = None, k_mean: Optional[torch.Tensor] = None,
                block_size: int = 512, topk: int = 3, scale: Optional[float] = None,
                softcap: Optional[float] = None, k_scale: float = 1.0, v_scale: float = 1.0,
                return_lse: bool = False, validate: bool = True):
    """MoBA for one new token per sequence against a batched KV cache, read in place (inference).

    The token of sequence b sits at position ``t = cache_seqlens[b] - 1`` (its own K/V already in the cache) and
    attends as in :func:`moba_attention`: causally to its own block, fully to the ``topk - 1`` earlier blocks
    whose pooled keys score highest against it (per query head). One program per (sequence, KV head) scores the
    pooled keys for the whole GQA group; the attention is split-KV over the selected blocks, so batch 1 fills
    the GPU. Nothing is copied: a transformers cache ``(B, Hkv, L, D)`` transposed to ``(B, L, Hkv, D)`` works.

    Args:
        q: ``(B, Hq, Dqk)``.
        k_cache, v_cache: ``(B, L, Hkv, Dqk)`` / ``(B, L, Hkv, Dv)``, any strides with a contiguous last dim; or
            paged, ``(num_pages, page_size, Hkv, D*)`` with ``block_table`` (pages one after another, their size
            dividing block_size; L is then ``max_pages * page_size``). q's dtype, or float8 (``float8_e4m3fn`` /
            ``float8_e5m2``, both: a quantised cache, see k_scale / v_scale, widened to q's dtype as it is read).
        cache_seqlens: int32 ``(B,)``, tokens of each sequence (the new one included), >= 1.
        cache_offsets: int32 ``(B,)``, cache row of each sequence's first token (left-padded caches); default 0.
            Contiguous caches only.
        block_table: int32 ``(B, max_pages)`` (one row per cache row, see cache_rows): the page of k_cache / v_cache
            holding each sequence's tokens ``j * page_size`` to ``(j + 1) * page_size - 1`` (a paged KV cache, as a
            serving engine keeps it).
        cache_rows: int32 ``(B,)``, the caches' batch row each query reads (default: row b). Several new tokens
            of one sequence (speculative tokens, a chunk after a cached prefix) then run in one call, each its own
            query row with its own ``cache_seqlens``; k_cache/v_cache/k_mean (paged: block_table, k_mean) have
            ``max(cache_rows) + 1`` rows or more, and the query rows of one cache row share its offset.
        k_mean: optional ``(B, N, Hkv, Dqk)`` pooled keys kept by the caller: row b's block j (tokens
            ``j * block_size`` to ``(j + 1) * block_size - 1`` of the sequence), float32 mean rounded to q's dtype,
            for every block before the token's own (``N >= (cache_seqlens[b] - 1) // block_size``). Without it
            the blocks are pooled from the cache at every call, which reads every key once. Of a quantised cache,
            the means of its keys dequantised (times k_scale: see :func:`pool_cache_blocks`'s ``scale``).
        block_size, topk, scale, softcap: as in :func:`moba_attention` (block_size 512, topk 3, scale
            ``Dqk ** -0.5``, softcap None).
        k_scale, v_scale: dequantisation scales of the caches (per tensor): the keys are ``k_cache * k_scale``, the
            values ``v_cache * v_scale`` (a float8 cache's scales; default 1).
        return_lse: also return the float32 log-sum-exp ``(B, Hq)``.
        validate: check ``cache_seqlens``/``cache_offsets`` against the cache and ``k_mean``, and the block-table
            entries the lengths use against the pages (default); that reads them back to the host, a
            synchronisation. ``validate=False`` skips it (CUDA-graph capture) and sizes the work for the cache's
            length L; out-of-range lengths then read outside the cache (pages are clamped to the cache's).
    Returns:
        ``(B, Hq, Dv)`` in q's dtype (and the lse). Equal to the last row of :func:`moba_attention` on the
        sequence.
    """
    paged = block_table is not None
    bc = check_cache_rows(cache_rows, block_table if paged else k_cache)
    B, hq, dk, L, hkv, dv = check_decode_inputs(q, k_cache, v_cache, {"k_mean": k_mean},
                                                {"cache_seqlens": cache_seqlens, "cache_offsets": cache_offsets,
                                                 "cache_rows": cache_rows, "block_table": block_table},
                                                cache_batch=k_cache.shape[0] if paged else bc, float8_caches=True)
    bc = B if bc is None else bc
    _check_block_size(block_size)
    page = 0
    if paged:
        L, page = check_block_table(block_table, cache_offsets, k_cache, v_cache, bc, divides=block_size,
                                    evenly_strided=True)
    check_positive_int(topk, "topk")
    k_scale = check_scale(k_scale, 1.0, "k_scale")
    scale = check_scale(scale, dk ** -0.5) * k_scale  # (the scores' scale)
    v_scale = check_scale(v_scale, 1.0, "v_scale")
    softcap = check_softcap(softcap)
    cache_seqlens, cache_offsets, lens = check_cache_lengths(cache_seqlens, cache_offsets, B, L, validate)
    cache_rows = validate_cache_rows(cache_rows, B, bc, validate, shared_offsets=cache_offsets)
    if paged:
        block_table = block_table.contiguous()
        if validate:  # the pages each sequence's length uses (one more synchronisation)
            validate_pages(block_table, cache_rows, lens, L, page, k_cache.shape[0])
    if B == 0:
        out = q.new_empty(0, hq, dv)
        return (out, out.new_empty(0, hq, dtype=torch.float32)) if return_lse else out
    n_cand = (max(lens) - 1) // block_size  # most blocks before a token's own
    ksel = max(0, min(topk - 1, n_cand))
    if ksel >= MAX_TOPK:
        raise ValueError(f"topk must be at most {MAX_TOPK} (or more than the number of blocks, {n_cand + 1}), "
                         f"got {topk}")
    if k_mean is not None and (k_mean.shape[0] != bc or tuple(k_mean.shape[2:]) != (hkv, dk) or
                               (validate and k_mean.shape[1] < n_cand)):
        raise ValueError(f"k_mean must be (B, N, Hkv, Dqk) = ({bc}, N >= {n_cand}, {hkv}, {dk}), got "
                         f"{tuple(k_mean.shape)}")
    qk, kk, vk, km = kernel_inputs(q, k_cache, v_cache, k_mean)
    sel = torch.empty(B, hq, 0, dtype=torch.int32, device=q.device)
    if ksel > 0:
        bd = max(16, next_pow2(dk))
        if km is None:
            # (in q's dtype beside a float8 cache)
            km = empty(bc, n_cand, hkv, dk, device=q.device, dtype=qk.dtype if kk.dtype in FLOAT8_DTYPES else kk.dtype)
            if cache_rows is None:
                pool_cache_blocks(kk, cache_seqlens, cache_offsets, block_size, km, block_table=block_table,
                                  scale=k_scale)
            else:  # each cache row pooled once, up to its longest query row
                zeros = torch.zeros(bc, dtype=torch.int32, device=q.device)
                rows64 = cache_rows.long()
                pool_cache_blocks(kk, zeros.scatter_reduce(0, rows64, cache_seqlens, "amax"),
                                  zeros.scatter(0, rows64, cache_offsets), block_size, km, block_table=block_table,
                                  scale=k_scale)
        sel = empty(B, hq, ksel, device=q.device, dtype=torch.int32)
        group = hq // hkv
        _moba_decode_select_kernel[(B, hkv)](
            qk, km, sel, cache_seqlens, cache_rows if cache_rows is not None else cache_seqlens, qk.stride(0),
            qk.stride(1), km.stride(0), km.stride(1), km.stride(2), sel.stride(0), sel.stride(1), block_size, group,
            D=dk, BLOCK_D=bd, KSEL=ksel, C=max(16, next_pow2(ksel)),
            PRECISION="ieee" if qk.dtype == torch.float32 else "tf32", BLOCK_G=max(16, next_pow2(group)),
            HAS_ROWS=cache_rows is not None, **COMPILE_OPTIONS)
    out, lse = sparse_decode(qk, kk, vk, sel, _arange_int32(B + 1, q.device), cache_offsets,
                             cache_offsets + cache_seqlens, block_size, scale, rows=cache_rows,
                             block_table=block_table, softcap=softcap, v_scale=v_scale)
    out = out.to(q.dtype)
    return (out, lse.t()) if return_lse else out


@public_op()
def pool_cache_blocks(k_cache: torch.Tensor, cache_seqlens: torch.Tensor, cache_offsets: torch.Tensor, block_size: int,
                      out: torch.Tensor, tail: Optional[int] = None,
                      block_table: Optional[torch.Tensor] = None, scale: float = 1.0) -> None:
    """Write into ``out`` ``(B, N, Hkv, D)`` the pooled keys (float32 mean, in out's dtype) of the blocks of each
    row of a batched cache ``(B, L, Hkv, D)`` before its last token's own block, as :func:`moba_decode` reads
    them: every such block up to N, or only the last ``tail`` of them (what decoding steps add to kept means).
    Lengths, offsets and ``block_table`` (k_cache paged, its offsets 0) as in :func:`moba_decode`, unchecked.
    ``scale``: the keys' dequantisation scale (a quantised cache's ``k_scale``), multiplying the means."""
    if block_table is None:
        B, L, hkv, d = k_cache.shape
        page = 0
    else:
        B, page, hkv, d = block_table.shape[0], *k_cache.shape[1:]
        L = block_table.shape[1] * page
    n = min(out.shape[1], max(0, (L - 1) // block_size))
    n = min(n, tail) if tail is not None else n
    if n <= 0 or B == 0:
        return
    _cache_block_mean_kernel[(n, hkv, B)](
        k_cache, out, cache_offsets, cache_seqlens, block_table if page else cache_seqlens, k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        block_table.stride(0) if page else 0, block_size, n if tail is not None else 0, k_cache.shape[0] - 1,
        check_scale(scale, 1.0), D=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_T=32 if small_tiles() else 64, PAGE=page,
        **COMPILE_OPTIONS)


@functools.lru_cache(maxsize=32)
def _arange_int32(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32, device=device)


__all__ = ["moba_attention", "moba_block_selection", "moba_decode"]
