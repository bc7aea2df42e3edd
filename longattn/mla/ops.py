"""MLA public ops: ``mla_prefill`` (naive form on decompressed K/V) and ``mla_decode`` (absorbed form)."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import torch

from ..kernels.flash import (DECODE_ROWS, LOG2E, _lastdim_contiguous, flash_attention, flash_bwd, flash_bwd_delta,
                             flash_decode, flash_fwd, split_parts)
from ..kernels.merge import merge_fwd
from ..kernels.utils import (COMPILE_OPTIONS, FLOAT8_DTYPES, SUPPORTED_DTYPES, cdiv, check_cache_pages, check_device,
                             check_attention_inputs, check_positive_int, check_same_dtype,
                             check_scale, check_tensor, device_tensor, eager_context, empty, kernel_inputs,
                             next_pow2, num_sms, public_op, read_back_later, resolve_seqlens, row_descriptors,
                             small_tiles, split_context, widen_by_asm)
from .kernels import _mla_decode_kernel, _mla_decode_tuned

MAX_QUERY_TOKENS = 16


def _require_scale(scale) -> None:
    if scale is None:
        raise TypeError("scale is required (DeepSeek: (qk_nope_head_dim + qk_rope_head_dim) ** -0.5)")


@public_op("q_nope", "q_rope", "c_kv", "k_rope", "w_uk", "w_uv", traced=True)  # checks and a custom op
def mla_prefill(q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                w_uk: torch.Tensor, w_uv: torch.Tensor, *, scale: float, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                cu_seqlens_k: Optional[torch.Tensor] = None, return_lse: bool = False, prefix_chunk: int = 16384):
    """Causal MLA over a prompt in the naive form: decompress K/V from the latent, then flash attention.

    Args:
        q_nope: ``(B, T, H, Dn)`` or varlen ``(total, H, Dn)`` (Dn = qk_nope_head_dim, 128 in V3).
        q_rope: ``(B, T, H, Dr)`` / ``(total, H, Dr)``, RoPE applied (Dr = 64).
        c_kv: ``(B, Tk, R)`` / ``(total, R)``: the normalised latent (R = kv_lora_rank, 512); Tk >= T (the
            queries are the last T tokens: a chunk after a cached prefix when Tk > T).
        k_rope: ``(B, Tk, Dr)`` / ``(total, Dr)``: the shared rotary key, RoPE applied.
        w_uk: ``(H, Dn, R)``, w_uv: ``(H, Dv, R)``: kv_b_proj's weight split per head
            (:func:`longattn.mla.reference.split_kv_b_weight`).
        scale: softmax scale (DeepSeek: ``(Dn + Dr) ** -0.5``, times the YaRN mscale squared when used).
        cu_seqlens / max_seqlen: varlen layout (int32 cu_seqlens); ``cu_seqlens_q``/``cu_seqlens_k`` when
            the latent holds more tokens than the queries (chunked prefill after a cached prefix: queries
            are aligned to the end of each sequence's keys, as in dense layout with Tq < Tk).
        prefix_chunk: a cached prefix (a sequence's keys before its queries) of this many tokens or more is
            decompressed this many tokens at a time (default 16384), each piece's attention merged into the result
            by its lse: the decompressed K/V held at once are at most a chunk and the queries' own keys per
            sequence, however long the cache (at DeepSeek-V3's 128 heads 16k tokens decompress to 1.3 GB).
    Returns:
        ``(B, T, H, Dv)`` / ``(total, H, Dv)`` in q's dtype (and the lse if asked). Differentiable in every
        input, the weights included.

    The flash kernels read q and k in their two parts, ``q_nope`` / ``q_rope`` and the decompressed latent keys /
    ``k_rope`` (a view repeating it on every head), where their head dim is split there for the tiles (128 + 64,
    DeepSeek's; 64 + 32): no concatenated copy of q or of the keys (32 heads of DeepSeek-V3's dims: the forward's
    peak beyond the inputs 24 KB per token, 40 with them); other dims go through the concatenations. For the
    backward only the inputs, the output and the lse are kept: it decompresses K/V again (a long prefix chunk by
    chunk too), so that a training step does not hold each layer's decompressed q, k and v (four times the output
    at DeepSeek-V3's dims) from its forward to its backward (fwd + bwd at 32 heads: 56 KB per token at its peak, 72
    before the two parts). ``torch.compile`` traces it to
    one custom op each way (``torch.ops.longattn.mla_prefill``, ``mla_prefill_backward``): no graph break.
    """
    varlen = cu_seqlens is not None or cu_seqlens_q is not None or cu_seqlens_k is not None
    nd = 3 if varlen else 4
    for name, t, n in (("q_nope", q_nope, nd), ("q_rope", q_rope, nd), ("c_kv", c_kv, nd - 1),
                       ("k_rope", k_rope, nd - 1), ("w_uk", w_uk, 3), ("w_uv", w_uv, 3)):
        check_tensor(t, name, ndim=n)
    tensors = {"q_nope": q_nope, "q_rope": q_rope, "c_kv": c_kv, "k_rope": k_rope, "w_uk": w_uk, "w_uv": w_uv}
    check_same_dtype(tensors)
    check_device(tensors)  # before the decompression (flash_attention checks the rest)
    _require_scale(scale)
    scale = check_scale(scale, 1.0)
    h, rank = q_nope.shape[-2], c_kv.shape[-1]
    if w_uk.shape[0] != h or w_uv.shape[0] != h or w_uk.shape[2] != rank or w_uv.shape[2] != rank:
        raise ValueError(f"w_uk/w_uv must be (H={h}, dim, R={rank}), got {tuple(w_uk.shape)} and {tuple(w_uv.shape)}")
    if w_uk.shape[1] != q_nope.shape[-1]:
        raise ValueError(f"w_uk's middle dim ({w_uk.shape[1]}) must equal q_nope's head dim ({q_nope.shape[-1]})")
    if q_rope.shape[:-1] != q_nope.shape[:-1] or q_rope.shape[-1] != k_rope.shape[-1]:
        raise ValueError(f"q_rope {tuple(q_rope.shape)} must match q_nope {tuple(q_nope.shape)} and k_rope's "
                         f"last dim {k_rope.shape[-1]}")
    if c_kv.shape[:-1] != k_rope.shape[:-1]:
        raise ValueError(f"c_kv {tuple(c_kv.shape)} and k_rope {tuple(k_rope.shape)} must have the same tokens")
    if not varlen and c_kv.shape[0] != q_nope.shape[0]:
        raise ValueError(f"c_kv's batch ({c_kv.shape[0]}) must equal q_nope's ({q_nope.shape[0]})")
    if not varlen and c_kv.shape[1] < q_nope.shape[1]:  # the queries are the last tokens of the latent's sequence
        raise ValueError(f"c_kv holds {c_kv.shape[1]} tokens per sequence, fewer than the {q_nope.shape[1]} queries")
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = resolve_seqlens(
        cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, None, None)
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):  # (the offsets' values: checked in the op)
        raise ValueError("varlen inputs need both cu_seqlens_q and cu_seqlens_k (or a shared cu_seqlens)")
    check_positive_int(prefix_chunk, "prefix_chunk", minimum=16)
    if not varlen and q_nope.shape[0] * q_nope.shape[1] and c_kv.shape[1] - q_nope.shape[1] >= prefix_chunk:
        # a long cached prefix (decompressed in pieces): as packed sequences
        (B, T, H), Tk = q_nope.shape[:3], c_kv.shape[1]
        cu_q, cu_k = (torch.arange(0, B * n + 1, n, dtype=torch.int32, device=q_nope.device) for n in (T, Tk))
        out, lse = mla_prefill(q_nope.flatten(0, 1), q_rope.flatten(0, 1), c_kv.flatten(0, 1), k_rope.flatten(0, 1),
                               w_uk, w_uv, scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True,
                               prefix_chunk=prefix_chunk)
        out, lse = out.view(B, T, H, -1), lse.view(H, B, T).transpose(0, 1).contiguous()
    else:
        out, lse = torch.ops.longattn.mla_prefill(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, cu_seqlens_q,
                                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(scale), prefix_chunk)
    return (out, lse) if return_lse else out


def _latent(c_kv, k_rope, w_uk, w_uv):
    """K and V decompressed from the latent: K's latent part ``(..., H, Dn)``, the rotary key on every head (a view
    ``(..., H, Dr)`` of k_rope, stride 0 over the heads) and V ``(..., H, Dv)``."""
    k_nope = torch.einsum("...r,hdr->...hd", c_kv, w_uk)
    v = torch.einsum("...r,hdr->...hd", c_kv, w_uv)
    return k_nope, k_rope.unsqueeze(-2).expand(*k_nope.shape[:-1], k_rope.shape[-1]), v


def _latent_grads(dk_nope, dk_rope, dv, c_kv, w_uk, w_uv):
    """The gradients of c_kv, k_rope, w_uk and w_uv from those of the decompressed K (its latent part, and the
    rotary one per head) and V."""
    dc_kv = torch.einsum("...hd,hdr->...r", dk_nope, w_uk).add_(torch.einsum("...hd,hdr->...r", dv, w_uv))
    return (dc_kv, dk_rope.sum(-2), torch.einsum("...hd,...r->hdr", dk_nope, c_kv),
            torch.einsum("...hd,...r->hdr", dv, c_kv))


def _two_parts(q_nope, q_rope, k_nope, v, cu_q, cu_k, max_q, max_k):
    """The problem's sizes when the flash kernels can read q and k in their two parts (no concatenated copies of
    q and of the keys, see flash_fwd's ``parts``): where the head dims split there; else None."""
    dn, dr = q_nope.shape[-1], q_rope.shape[-1]
    if not split_parts(dn, dr) or not q_nope.numel() or not k_nope.numel():
        return None
    dims = check_attention_inputs(q_nope, k_nope, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                  max_seqlen_k=max_k)
    return dataclasses.replace(dims, dim_qk=dn + dr)


def _contiguous_last(*ts):
    """The tensors as the flash kernels take them (last dim contiguous, kernel dtypes)."""
    return kernel_inputs(*map(_lastdim_contiguous, ts))


def _attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, cu_q, cu_k, max_q, max_k, causal, scale):
    """``(out, lse)`` of the queries ``[q_nope, q_rope]`` over the keys and values decompressed from c_kv and k_rope
    (no gradient: the op's backward is _attention_grads). Where the dims allow (see _two_parts) the kernels read
    each part of q and k from its own tensor, else from their concatenations (flash_attention). Few queries (at
    most DECODE_ROWS, as flash_attention decides) run split-KV, so that the keys fill the GPU."""
    k_nope, k_rot, v = _latent(c_kv, k_rope, w_uk, w_uv)
    dims = _two_parts(q_nope, q_rope, k_nope, v, cu_q, cu_k, max_q, max_k)
    if dims is None:
        with torch.no_grad():
            return flash_attention(torch.cat([q_nope, q_rope], -1), torch.cat([k_nope, k_rot], -1), v,
                                   causal=causal, scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                   max_seqlen_q=max_q, max_seqlen_k=max_k, return_lse=True)
    qa, qb, ka, kb, vk = _contiguous_last(q_nope, q_rope, k_nope, k_rot, v)
    launch = flash_decode if next_pow2(dims.max_seqlen_q) * next_pow2(dims.group) <= DECODE_ROWS else flash_fwd
    out, lse = launch(qa, ka, vk, dims, causal, None, scale, parts=(qb, kb))
    return out.to(q_nope.dtype), lse


def _attention_grads(dout, dlse, out, lse, q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, cu_q, cu_k, max_q, max_k,
                     causal, scale):
    """The gradients of q_nope, q_rope and (_latent_grads) c_kv, k_rope, w_uk, w_uv of _attention's keys, given the
    whole softmax's ``out`` and ``lse`` (which may span more keys) and their gradients (either may be None)."""
    k_nope, k_rot, v = _latent(c_kv, k_rope, w_uk, w_uv)
    dims = _two_parts(q_nope, q_rope, k_nope, v, cu_q, cu_k, max_q, max_k)
    if dims is None:
        dn = q_nope.shape[-1]
        dq, dk, dv = torch.ops.longattn.flash_attention_backward(
            dout, dlse, out, lse, torch.cat([q_nope, q_rope], -1), torch.cat([k_nope, k_rot], -1), v, cu_q, cu_k,
            max_q, max_k, None, None, causal, None, scale, 1, 0, False, 0.0, None)
        dq_nope, dq_rope, dk_nope, dk_rope = dq[..., :dn], dq[..., dn:], dk[..., :dn], dk[..., dn:]
    else:
        qa, qb, ka, kb, vk, o = _contiguous_last(q_nope, q_rope, k_nope, k_rot, v, out)
        do = torch.zeros_like(o) if dout is None else _contiguous_last(dout.to(o.dtype))[0]
        delta = flash_bwd_delta(o, do, lse, None if dlse is None else dlse.float().contiguous(), dims)
        (dq_nope, dq_rope), (dk_nope, dk_rope), dv = flash_bwd(do, qa, ka, vk, lse, delta, dims, causal, None, scale,
                                                               parts=(qb, kb))
        del qa, qb, ka, kb, vk, o, do
    del k_nope, k_rot, v  # (the decompressed keys and values, freed before the weights' gradients are made)
    return (dq_nope, dq_rope, *_latent_grads(dk_nope, dk_rope, dv, c_kv, w_uk, w_uv))


def _key_pieces(cu_seqlens_q, cu_seqlens_k, chunk: int):
    """The keys of a packed prefill whose cached prefix (a sequence's keys before its queries) holds ``chunk``
    tokens or more in some sequence, in pieces ``[(rows, cu_k, causal)]``: ``rows`` (int64) the key rows of the
    piece, ``cu_k`` (int32) its offsets per sequence. Each whole chunk of the prefixes is a piece (every query of
    its sequence sees it), the rest of each sequence's keys (its queries' own among them) the last (causal): every
    key row is in one piece. None when there is no such prefix (one call takes all the keys)."""
    if cu_seqlens_q is None:
        return None
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b, (q0, q1, k0, k1) in enumerate(zip(cq, cq[1:], ck, ck[1:])):  # (in the op: traced calls read them here)
        if q1 - q0 > k1 - k0:
            raise ValueError(f"sequence {b} has {q1 - q0} queries but {k1 - k0} latent tokens (cu_seqlens_q / "
                             "cu_seqlens_k): its queries are its last tokens")
    chunks = [max(0, (k1 - k0) - (q1 - q0)) // chunk for q0, q1, k0, k1 in zip(cq, cq[1:], ck, ck[1:])]
    if max(chunks, default=0) == 0:
        return None
    spans = [[(s + j * chunk, s + (j + 1) * chunk) if j < n else (s, s) for s, n in zip(ck, chunks)]
             for j in range(max(chunks))]
    spans.append([(s + n * chunk, e) for s, e, n in zip(ck, ck[1:], chunks)])
    device = cu_seqlens_q.device
    return [(device_tensor(torch.cat([torch.arange(a, b) for a, b in piece]), torch.int64, device),
             device_tensor([0, *itertools.accumulate(b - a for a, b in piece)], torch.int32, device),
             i == len(spans) - 1) for i, piece in enumerate(spans)]


# One custom op each way (TorchDynamo traces mla_prefill down to the first): the forward keeps for the backward only
# its inputs, output and lse, and the backward decompresses K/V again (two products with the latent, cheap next to
# the attention at long lengths) instead of autograd holding the decompressed q, k and v from the forward to the
# backward: 192 + 192 + 128 values a head and token at DeepSeek-V3's dims, four times the output's. A long cached
# prefix is decompressed a chunk at a time (_key_pieces), each piece's attention merged into the output by its lse
# (the backward's pieces take the whole softmax's output and lse).
_PREFILL_ARGS = ("Tensor q_nope, Tensor q_rope, Tensor c_kv, Tensor k_rope, Tensor w_uk, Tensor w_uv, "
                 "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int? max_seqlen_q, int? max_seqlen_k, float scale, "
                 "int prefix_chunk")


@torch.library.custom_op("longattn::mla_prefill", mutates_args=(), schema=f"({_PREFILL_ARGS}) -> (Tensor, Tensor)")
def _prefill_op(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                scale, prefix_chunk):
    with eager_context(q_nope):
        pieces = _key_pieces(cu_seqlens_q, cu_seqlens_k, prefix_chunk)
        if pieces is None:
            return _attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, True, scale)
        out = lse = None
        for rows, cu_k, causal in pieces:
            o, l_ = _attention(q_nope, q_rope, c_kv[rows], k_rope[rows], w_uk, w_uv, cu_seqlens_q, cu_k, max_seqlen_q,
                               None, causal, scale)
            # merged in float32 (one rounding to q's dtype at the end)
            out, lse = (o.float(), l_) if out is None else merge_fwd(torch.stack([out, o.float()]),
                                                                      torch.stack([lse, l_]))
        return out.to(q_nope.dtype), lse


@_prefill_op.register_fake
def _prefill_shapes(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, cu_seqlens_q, *args):
    lse = (q_nope.shape[1], q_nope.shape[0]) if cu_seqlens_q is not None else \
        (q_nope.shape[0], q_nope.shape[2], q_nope.shape[1])
    return q_nope.new_empty(*q_nope.shape[:-1], w_uv.shape[1]), q_nope.new_empty(lse, dtype=torch.float32)


@torch.library.custom_op("longattn::mla_prefill_backward", mutates_args=(),
                         schema=f"(Tensor? dout, Tensor? dlse, Tensor out, Tensor lse, {_PREFILL_ARGS}) -> "
                                "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _prefill_backward_op(dout, dlse, out, lse, q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, scale, prefix_chunk):
    with eager_context(q_nope):
        grads = lambda c, k_rope_, cu_k, max_k, causal: _attention_grads(
            dout, dlse, out, lse, q_nope, q_rope, c, k_rope_, w_uk, w_uv, cu_seqlens_q, cu_k, max_seqlen_q, max_k,
            causal, scale)
        pieces = _key_pieces(cu_seqlens_q, cu_seqlens_k, prefix_chunk)
        if pieces is None:
            result = grads(c_kv, k_rope, cu_seqlens_k, max_seqlen_k, True)
        else:  # every key row in one piece; dq and the weights' gradients summed in float32
            result = [torch.zeros(t.shape, device=t.device, dtype=torch.float32) for t in (q_nope, q_rope)]
            result += [torch.empty_like(c_kv), torch.empty_like(k_rope),
                       *(torch.zeros(w.shape, device=w.device, dtype=torch.float32) for w in (w_uk, w_uv))]
            for rows, cu_k, causal in pieces:
                dq_nope, dq_rope, dc, dk_rope, dw_uk, dw_uv = grads(c_kv[rows], k_rope[rows], cu_k, None, causal)
                result[2][rows], result[3][rows] = dc, dk_rope
                for acc, g in zip(result[:2] + result[4:], (dq_nope, dq_rope, dw_uk, dw_uv)):
                    acc.add_(g)
        return tuple(g.to(t.dtype).contiguous() for g, t in zip(result, (q_nope, q_rope, c_kv, k_rope, w_uk, w_uv)))


@_prefill_backward_op.register_fake
def _prefill_backward_shapes(dout, dlse, out, lse, *inputs):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs[:6])


def _prefill_op_save(ctx, inputs, output):
    ctx.save_for_backward(*output, *inputs[:8])
    ctx.options = inputs[8:]


def _prefill_op_backward(ctx, dout, dlse):
    grads = torch.ops.longattn.mla_prefill_backward(dout, dlse, *ctx.saved_tensors, *ctx.options)
    return grads + (None,) * 6


_prefill_op.register_autograd(_prefill_op_backward, setup_context=_prefill_op_save)


def _checked(copies: list, *args) -> list:
    """``check_cache_pages`` on the host copies of ``cache_seqlens`` and the block table if any."""
    return check_cache_pages(copies[0], copies[1] if len(copies) > 1 else None, *args)


@public_op("q_latent", "q_rope", "kv_cache")
def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, *,
               cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor] = None, scale: float,
               kv_scale: float = 1.0, return_lse: bool = False, validate: bool = True):
    """Absorbed-form MLA decoding: MQA of every head over a latent cache of ``R + Dr`` values per token
    (inference; not differentiable).

    Args:
        q_latent: ``(B, S, H, R)``: ``q_nope`` folded with ``w_uk`` (R = kv_lora_rank, 512). S = 1 to 16
            new tokens per sequence (speculative decoding), already appended to the cache: query s sits
            at cache position ``cache_seqlens[b] - S + s`` and attends causally.
        q_rope: ``(B, S, H, Dr)`` (RoPE applied).
        kv_cache: paged ``(num_pages, page_size, R + Dr)`` with ``block_table``, or contiguous
            ``(B, max_len, R + Dr)`` without; per token the latent then the rotary key. page_size a power
            of two from 16 to 256 (64 is the usual). q's dtype, or float8 (``float8_e4m3fn`` / ``float8_e5m2``: a
            quantised cache, half the bytes, widened to q's dtype as it is read).
        cache_seqlens: int32 ``(B,)``, tokens in each sequence's cache (new ones included), >= S.
        block_table: int32 ``(B, max_pages)``: physical page of each logical page.
        scale: softmax scale (DeepSeek: ``(Dn + Dr) ** -0.5`` times the YaRN mscale squared).
        kv_scale: the cache's dequantisation scale (per tensor): its tokens are ``kv_cache * kv_scale`` (a float8
            cache's scale; default 1).
        validate: check ``cache_seqlens`` and the block-table entries they use (default), raising a
            ValueError. That reads them back to the host, a synchronisation: before the launch when the context
            is split (the split depends on the lengths), while the kernel runs when the batch fills the GPU
            unsplit (a bad input's result is then dropped). ``validate=False`` skips it (no host synchronisation
            at all, so a decoding step can be captured in a CUDA graph, its work sized for the cache's full
            capacity) and leaves the caller responsible for the result. Either way the kernel never reads
            outside the cache: it takes each length clamped to [S, capacity] and each page to the cache's.
    Returns:
        ``o_latent`` ``(B, S, H, R)`` in q's dtype (apply ``w_uv`` to get the head outputs), and
        with ``return_lse`` the float32 lse ``(B, H, S)``.

    The context is split across programs (split-KV) so that a small batch still fills the GPU; each
    program serves a group of heads with one pass over its part of the cache; splits merge by lse.
    """
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("kv_cache", kv_cache)):
        check_tensor(t, name, ndim=4 if name != "kv_cache" else 3,
                     dtypes=SUPPORTED_DTYPES + FLOAT8_DTYPES if name == "kv_cache" else SUPPORTED_DTYPES)
    check_same_dtype({"q_latent": q_latent, "q_rope": q_rope})
    if kv_cache.dtype not in (q_latent.dtype, *FLOAT8_DTYPES):
        raise TypeError(f"kv_cache must have q_latent's dtype ({q_latent.dtype}) or a float8 one (a quantised "
                        f"cache), got {kv_cache.dtype}")
    check_device({"q_latent": q_latent, "q_rope": q_rope, "kv_cache": kv_cache, "cache_seqlens": cache_seqlens,
                  "block_table": block_table})
    B, S, H, R = q_latent.shape
    E = q_rope.shape[-1]
    if q_rope.shape[:3] != (B, S, H):
        raise ValueError(f"q_rope must be (B, S, H, Dr) = ({B}, {S}, {H}, Dr), got {tuple(q_rope.shape)}")
    if kv_cache.shape[-1] != R + E:
        raise ValueError(f"kv_cache's last dim must be R + Dr = {R + E} (latent then rotary key), "
                         f"got {kv_cache.shape[-1]}")
    if not 1 <= S <= MAX_QUERY_TOKENS:
        raise ValueError(f"q_latent must hold 1 to {MAX_QUERY_TOKENS} query tokens per sequence, got {S}")
    if H == 0 or R == 0 or E == 0:
        raise ValueError(f"q_latent/q_rope need at least one head and positive dims, got {tuple(q_latent.shape)} "
                         f"and {tuple(q_rope.shape)}")
    if R > 1024 or E > 256:  # (a token's latent and rotary key are one tile each: DeepSeek's 512 and 64)
        raise ValueError(f"the latent dim R must be at most 1024 and the rotary dim Dr at most 256, got {R} and {E}")
    _require_scale(scale)
    kv_scale = check_scale(kv_scale, 1.0, "kv_scale")
    scale = check_scale(scale, 1.0) * kv_scale  # (the scores' scale)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or \
            tuple(cache_seqlens.shape) != (B,):
        raise TypeError(f"cache_seqlens must be an int32 tensor of shape ({B},)")
    if block_table is not None:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
                or block_table.shape[0] != B:
            raise TypeError(f"block_table must be an int32 tensor of shape ({B}, max_pages)")
        page = kv_cache.shape[1]
        if page < 16 or page > 256 or page & (page - 1):
            raise ValueError(f"page_size (kv_cache.shape[1]) must be a power of two from 16 to 256, got {page}")
        capacity = block_table.shape[1] * page
    else:
        if kv_cache.shape[0] != B:
            raise ValueError(f"a contiguous kv_cache must be (B={B}, max_len, R + Dr), got {tuple(kv_cache.shape)}")
        page = 64  # tiles of the contiguous cache: as many tokens as a usual page
        capacity = kv_cache.shape[1]
    # the kernel reads entry b at cache_seqlens + b and page j at block_table + b * stride + j: strided views copied
    cache_seqlens = cache_seqlens.contiguous()
    block_table = block_table.contiguous() if block_table is not None else None
    if B == 0:
        out = q_latent.new_empty(0, S, H, R)
        return (out, out.new_empty(0, H, S, dtype=torch.float32)) if return_lse else out
    if kv_cache.shape[0] == 0:
        raise ValueError("kv_cache must hold at least one page")
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must be contiguous in its last dimension")
    if capacity < S:
        raise ValueError(f"the cache holds at most {capacity} tokens per sequence, fewer than the {S} query tokens")
    # 16 to 64 rows of (head, token) per program; float32 products run on CUDA cores (no tensor cores), where
    # 16 rows keep the tiles in registers
    wide = q_latent.dtype != torch.float32 or small_tiles()
    s_pad = next_pow2(S)
    block_h = max(1, min((64 if wide else 16) // s_pad, next_pow2(H)), 16 // s_pad)
    # 16-bit candidate tiles mostly take over 113 KB of shared memory: one program per SM (float32: two)
    groups, slots = B * cdiv(H, block_h), num_sms(q_latent.device) * (1 if wide else 2)
    # the lengths and the block table are read back and checked on the host (one synchronisation, no work on the
    # device beside the copies)
    pending = None
    if not validate:
        lens = [capacity] * B
    else:
        pending = read_back_later(cache_seqlens, *([block_table] if block_table is not None else []))
        if split_context(groups, capacity, slots)[0] == 1:
            # a batch that fills the GPU takes one split whatever its lengths: the kernel starts at once and the
            # checks wait for the copies alone (the host no longer holds the launch back until the GPU catches up)
            lens = [capacity] * B
        else:
            lens = _checked(pending(), S, capacity, page, kv_cache.shape[0])
            pending = None
    ql, qr, kv = kernel_inputs(_lastdim_contiguous(q_latent), _lastdim_contiguous(q_rope), kv_cache)

    n_split, per_split = split_context(groups, max(lens), slots)
    # a single split writes the output itself; several write float32 partials merged into q's dtype
    outs = empty(n_split, B * S, H, R, device=q_latent.device, dtype=torch.float32 if n_split > 1 else ql.dtype)
    lses = empty(n_split, H, B * S, device=q_latent.device, dtype=torch.float32)
    block_n = min(page, 32) if small_tiles() else min(page, 64)  # (the interpreter's tile, the TMA tiles')
    rank_pad, rope_pad = next_pow2(R), max(16, next_pow2(E))
    descs = row_descriptors(kv, block_n, (R, E)) if (rank_pad, rope_pad) == (R, E) else None
    args = (ql, qr, kv, *(descs or (None, None)), block_table if block_table is not None else cache_seqlens,
            cache_seqlens, outs, lses,
            ql.stride(0), ql.stride(1), ql.stride(2), qr.stride(0), qr.stride(1), qr.stride(2),
            kv.stride(0), kv.stride(1), block_table.stride(0) if block_table is not None else 0,
            outs.stride(0), outs.stride(1), outs.stride(2), lses.stride(0), lses.stride(1),
            H, S, capacity, kv_cache.shape[0] - 1, per_split, scale * LOG2E, kv_scale)
    meta = dict(RANK=R, BLOCK_RANK=rank_pad, ROPE=E, BLOCK_ROPE=rope_pad, PAGE=page, HAS_BT=block_table is not None,
                BLOCK_H=block_h, S_PAD=s_pad, PRECISION="ieee" if q_latent.dtype == torch.float32 else "tf32",
                WIDEN_ASM=widen_by_asm(ql.dtype, kv.dtype), HAS_TMA=descs is not None)
    grid = (cdiv(H, block_h), B, n_split)
    if small_tiles():  # one tile size, no timing of candidates; by TMA where it can
        _mla_decode_kernel[grid](*args, **meta, BLOCK_N=block_n, USE_TMA=descs is not None, **COMPILE_OPTIONS)
    else:
        _mla_decode_tuned[grid](*args, **meta, **COMPILE_OPTIONS)
    if pending is not None:
        _checked(pending(), S, capacity, page, kv_cache.shape[0])
    out, lse = merge_fwd(outs, lses, ql.dtype) if n_split > 1 else (outs[0], lses[0])
    out = out.view(B, S, H, R).to(q_latent.dtype)  # a copy only where bfloat16 ran as float32 (stock interpreter)
    if return_lse:
        return out, lse.view(H, B, S).permute(1, 0, 2)
    return out


__all__ = ["mla_prefill", "mla_decode"]
