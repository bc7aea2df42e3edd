"""``flash_decode``: dense attention of a few new tokens per sequence against a KV cache, contiguous or paged.

The split-KV kernel is flash attention's decoding kernel (``flash._flash_decode_kernel``): one program per
(sequence, KV head, part of the context) holds the GQA group's heads times the new tokens as the rows of its
tiles, so each cached key is read once per KV head and a batch of one still fills the GPU; the parts merge by
lse. Here its keys come from a cache: ``cache_seqlens`` tokens per sequence, from a page table when paged, in
q's dtype or float8 (a quantised cache, widened as it is read).
"""
from __future__ import annotations

from typing import Optional

import torch

from .flash import DECODE_ROWS, _lastdim_contiguous, checked_chunks, flash_decode as _split_kv
from .utils import (FLOAT8_DTYPES, SUPPORTED_DTYPES, AttnDims, check_block_table, check_cache_pages, check_device,
                    check_positive_int, check_scale, check_softcap, check_tensor, kernel_inputs, next_pow2, public_op,
                    read_back_later)

MAX_QUERY_TOKENS = 16


def _check_cache(q, k_cache, v_cache, cache_seqlens, block_table, cache_offsets) -> tuple:
    """Shapes, dtypes and devices; returns (B, S, Hq, Dqk, Hkv, Dv, capacity, page)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(t, name, ndim=4, dtypes=SUPPORTED_DTYPES if name == "q" else SUPPORTED_DTYPES + FLOAT8_DTYPES)
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, *FLOAT8_DTYPES):
        raise TypeError(f"k_cache and v_cache must share one dtype, q's ({q.dtype}) or a float8 one (a quantised "
                        f"cache), got {k_cache.dtype} and {v_cache.dtype}")
    check_device({"q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": cache_seqlens,
                  "block_table": block_table, "cache_offsets": cache_offsets})
    B, S, hq, dk = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    if not 1 <= S <= MAX_QUERY_TOKENS:
        raise ValueError(f"q must hold 1 to {MAX_QUERY_TOKENS} new tokens per sequence (dim 1), got {S}")
    if k_cache.shape[3] != dk or tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(f"k_cache/v_cache must be (..., tokens, Hkv, D) with k's D = q's ({dk}) and the same leading "
                         f"dims, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if hq == 0 or hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a positive multiple of the KV heads ({hkv})")
    if min(dk, dv) == 0 or max(dk, dv) > 1024:
        raise ValueError(f"head dims must lie in [1, 1024], got q/k {dk} and v {dv}")
    for name, t, shape in (("cache_seqlens", cache_seqlens, (B,)), ("cache_offsets", cache_offsets, (B,))):
        if (t is not None or name == "cache_seqlens") and (not isinstance(t, torch.Tensor) or t.dtype != torch.int32
                                                           or tuple(t.shape) != shape):
            raise TypeError(f"{name} must be an int32 tensor of shape ({B},)")
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"a contiguous k_cache must be (B={B}, max_len, Hkv, D), got {tuple(k_cache.shape)}")
        return B, S, hq, dk, hkv, dv, k_cache.shape[1], 1
    capacity, page = check_block_table(block_table, cache_offsets, k_cache, v_cache, B, evenly_strided=True)
    return B, S, hq, dk, hkv, dv, capacity, page


@public_op("q", "k_cache", "v_cache")
def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, cache_seqlens: torch.Tensor,
                 block_table: Optional[torch.Tensor] = None, cache_offsets: Optional[torch.Tensor] = None,
                 causal: bool = True, window: Optional[int] = None, scale: Optional[float] = None,
                 k_scale: float = 1.0, v_scale: float = 1.0, return_lse: bool = False, validate: bool = True,
                 softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 chunk_offsets: Optional[torch.Tensor] = None):
    """Dense attention of a few new tokens per sequence against a KV cache, contiguous or paged (inference; not
    differentiable).

    Args:
        q: ``(B, S, Hq, Dqk)``: S = 1 to 16 new tokens per sequence (decoding; speculative tokens), their keys and
            values already in the cache: query s sits at cache position ``cache_seqlens[b] - S + s``.
        k_cache, v_cache: contiguous ``(B, max_len, Hkv, Dqk)`` / ``(B, max_len, Hkv, Dv)``, or paged
            ``(num_pages, page_size, Hkv, D*)`` with ``block_table`` (pages of any size, following one another in
            memory: ``stride(0) = page_size * stride(1)``, as in a ``(num_pages, page_size, Hkv, D)`` tensor or one
            half of a stacked K/V buffer); any other strides, a contiguous last dim. q's dtype (float16, bfloat16 or
            float32), or float8 (``float8_e4m3fn`` / ``float8_e5m2``, both caches: a quantised cache, half the
            bytes of a 16-bit one, widened to q's dtype as it is read). ``Hq`` a multiple of ``Hkv``.
        cache_seqlens: int32 ``(B,)``: keys each sequence holds, its new tokens included (S to the capacity:
            ``max_len`` less its offset, or ``max_pages * page_size``).
        block_table: int32 ``(B, max_pages)``: the page holding each sequence's keys ``j * page_size`` to
            ``(j + 1) * page_size - 1``.
        cache_offsets: int32 ``(B,)``, contiguous caches only: the cache row of each sequence's first key (a
            left-padded batch cache, as transformers keeps one transposed to ``(B, L, Hkv, D)``); default 0.
        causal: each new token sees the keys up to its own position (default); False: all of the sequence's keys.
        window: each new token sees only the ``window`` most recent keys, itself included (requires causal).
        chunk_size, chunk_offsets: chunked attention (Llama 4's local layers; requires causal, not with window):
            a new token sees only the keys of its own chunk of ``chunk_size`` positions, the sequence's key 0 at
            position ``chunk_offsets[b]`` (int32 ``(B,)``, default 0; a cache that dropped its oldest tokens) of its
            chunking (see :func:`longattn.flash_attention`; the offsets checked with ``validate``).
        scale: softmax scale, default ``Dqk ** -0.5``.
        k_scale, v_scale: dequantisation scales of the caches (per tensor): the keys are ``k_cache * k_scale``, the
            values ``v_cache * v_scale`` (a float8 cache's scales; default 1).
        return_lse: also return the float32 natural-log lse ``(B, Hq, S)``.
        validate: read ``cache_seqlens`` (and the block table, the offsets) back to the host and check them: every
            length at least S and within the cache, every page a sequence uses within it (a synchronisation; the
            work is then split for the longest sequence). ``validate=False`` skips it (no synchronisation: a
            decoding step can be captured in a CUDA graph; the work is sized for the capacity) and leaves the
            caller responsible for the result; either way the kernel clamps lengths and pages to the cache and never
            reads outside it.
        softcap: soft-capping of the scores, ``c * tanh(scale * q.k / c)`` (see :func:`longattn.flash_attention`);
            None or 0 (default): none.
    Returns:
        ``(B, S, Hq, Dv)`` in q's dtype (and the lse). Equal to :func:`longattn.flash_attention` of the new tokens
        against each sequence's keys gathered from the cache (dequantised: times ``k_scale`` / ``v_scale``).
    """
    B, S, hq, dk, hkv, dv, capacity, page = _check_cache(q, k_cache, v_cache, cache_seqlens, block_table,
                                                         cache_offsets)
    check_positive_int(window, "window", allow_none=True)  # (causal: a bool, as public_op checks every flag)
    if window is not None and not causal:
        raise ValueError("window requires causal=True")
    if chunk_size is not None:
        window = checked_chunks(chunk_size, chunk_offsets, window, B, causal, q, validate)
    elif chunk_offsets is not None:
        raise ValueError("chunk_offsets needs chunk_size")
    scale = check_scale(scale, dk ** -0.5) * check_scale(k_scale, 1.0, "k_scale")  # (the scores' scale)
    v_scale = check_scale(v_scale, 1.0, "v_scale")
    softcap = check_softcap(softcap)
    if capacity < S:
        raise ValueError(f"the cache holds at most {capacity} tokens per sequence, fewer than the {S} new tokens")
    cache_seqlens = cache_seqlens.contiguous()  # (the kernel reads entry b at cache_seqlens + b)
    block_table = block_table.contiguous() if block_table is not None else None
    cache_offsets = cache_offsets.contiguous() if cache_offsets is not None else None
    if B == 0:
        out = q.new_empty(0, S, hq, dv)
        return (out, out.new_empty(0, hq, S, dtype=torch.float32)) if return_lse else out
    longest = capacity
    if validate:
        extra = [t for t in (block_table, cache_offsets) if t is not None]
        copies = read_back_later(cache_seqlens, *extra)()
        table = copies[1] if block_table is not None else None
        longest = max(check_cache_pages(copies[0], table, S, capacity, page, k_cache.shape[0],
                                        copies[-1] if cache_offsets is not None else None))
    qk, kk, vk = kernel_inputs(q, k_cache, v_cache)
    group = hq // hkv
    # a launch holds each KV head's query heads times the new tokens in at most 64 rows: larger groups (MQA) run
    # in parts of 64 heads per KV head, and more tokens than fit in several launches
    heads = min(group, DECODE_ROWS)
    chunk = max(1, DECODE_ROWS // next_pow2(heads))
    if heads == group and chunk >= S:  # (the usual case: one launch)
        out, lse = _launch(qk, kk, vk, cache_seqlens, block_table, cache_offsets, causal, window, scale, v_scale,
                           capacity, longest, softcap)
    else:
        out = q.new_empty(B, S, hq, dv, dtype=qk.dtype)
        lse = torch.empty(B, hq, S, device=q.device, dtype=torch.float32)
        qg, og, lg = qk.reshape(B, S, hkv, group, dk), out.view(B, S, hkv, group, dv), lse.view(B, hkv, group, S)
        for h0 in range(0, group, heads):
            h1 = min(group, h0 + heads)
            for s0 in range(0, S, chunk):
                s1 = min(S, s0 + chunk)
                # the part's tokens end S - s1 tokens before the sequence: causally, they see that many keys fewer
                lens = cache_seqlens if s1 == S or not causal else cache_seqlens - (S - s1)
                part = qg[:, s0:s1, :, h0:h1].reshape(B, s1 - s0, hkv * (h1 - h0), dk)
                o, l_ = _launch(part, kk, vk, lens, block_table, cache_offsets, causal, window, scale, v_scale,
                                capacity, longest, softcap)
                og[:, s0:s1, :, h0:h1] = o.reshape(B, s1 - s0, hkv, h1 - h0, dv)
                lg[:, :, h0:h1, s0:s1] = l_.reshape(B, hkv, h1 - h0, s1 - s0)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _launch(q, k_cache, v_cache, cache_seqlens, block_table, cache_offsets, causal, window, scale, v_scale, capacity,
            longest, softcap):
    """One split-KV launch (its rows within 64: the group's heads times the tokens of q)."""
    B, S, hq, dk = q.shape
    dims = AttnDims(varlen=False, batch=B, max_seqlen_q=S, max_seqlen_k=capacity, heads_q=hq,
                    heads_kv=k_cache.shape[2], dim_qk=dk, dim_v=v_cache.shape[3])
    return _split_kv(_lastdim_contiguous(q), k_cache, v_cache, dims, causal, window, scale, cache_offsets,
                     cache_seqlens=cache_seqlens, block_table=block_table, longest=longest, v_scale=v_scale,
                     softcap=softcap)


__all__ = ["flash_decode"]
