"""MLA (DeepSeek-V2/V3 Multi-head Latent Attention) in plain PyTorch: the ground truth of the tests.

Notation (DeepSeek-V3 sizes): per token a latent ``c_kv`` (kv_lora_rank 512, after its RMSNorm) and one
rotary key ``k_rope`` (64, shared by all heads, RoPE applied); per head a query ``q_nope`` (128) and
``q_rope`` (64, RoPE applied). ``kv_b_proj`` decompresses the latent: its weight, viewed as
``(H, qk_nope_head_dim + v_head_dim, kv_lora_rank)``, splits into ``w_uk`` ``(H, 128, 512)`` and ``w_uv``
``(H, 128, 512)``.

- naive form: ``k = [w_uk c_kv ; k_rope]`` (192 per head), ``v = w_uv c_kv`` (128), causal attention.
- absorbed form: ``q_latent = q_nope w_uk`` (512 per head); scores ``q_latent . c_kv + q_rope . k_rope``
  over the 576 cached values per token; ``out = (P c_kv) w_uv^T``. The two forms are equal.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.reference import attention_mask_ref


def split_kv_b_weight(weight: torch.Tensor, num_heads: int, qk_nope_head_dim: int, v_head_dim: int):
    """kv_b_proj.weight ``(H * (nope + v), rank)`` -> (w_uk ``(H, nope, rank)``, w_uv ``(H, v, rank)``)."""
    w = weight.view(num_heads, qk_nope_head_dim + v_head_dim, weight.shape[-1])
    return w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]


def mla_decompress_ref(c_kv, k_rope, w_uk, w_uv):
    """(B, T, rank), (B, T, rope) -> k (B, T, H, nope + rope), v (B, T, H, v) in float32."""
    k_nope = torch.einsum("btr,hdr->bthd", c_kv.float(), w_uk.float())
    v = torch.einsum("btr,hdr->bthd", c_kv.float(), w_uv.float())
    k_r = k_rope.float()[:, :, None, :].expand(-1, -1, w_uk.shape[0], -1)
    return torch.cat([k_nope, k_r], -1), v


def _attend(q, k, v, scale, causal):
    """q (B, Tq, H, D), k (B, Tk, H|1, D), v (B, Tk, H|1, Dv), float32, queries aligned to the end."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.expand(-1, -1, q.shape[2], -1)) * scale
    if causal:
        mask = attention_mask_ref(q.shape[1], k.shape[1], causal=True, window=None, device=q.device)
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.expand(-1, -1, q.shape[2], -1)), lse


def mla_naive_ref(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, *, scale: float, causal: bool = True):
    """Naive MLA: decompress K/V, then attention. q_* (B, Tq, H, *), c_kv (B, Tk, rank), k_rope (B, Tk, rope).
    Returns (B, Tq, H, v_head_dim) float32."""
    k, v = mla_decompress_ref(c_kv, k_rope, w_uk, w_uv)
    q = torch.cat([q_nope.float(), q_rope.float()], -1)
    return _attend(q, k, v, scale, causal)[0]


def mla_absorbed_ref(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, *, scale: float, causal: bool = True):
    """Absorbed MLA over the latent: same arguments and result as :func:`mla_naive_ref`."""
    q_latent = torch.einsum("bqhd,hdr->bqhr", q_nope.float(), w_uk.float())
    o_latent, _ = mla_latent_attention_ref(q_latent, q_rope, c_kv, k_rope, scale=scale, causal=causal)
    return torch.einsum("bqhr,hdr->bqhd", o_latent, w_uv.float())


def mla_latent_attention_ref(q_latent, q_rope, c_kv, k_rope, *, scale: float, causal: bool = True):
    """MQA over the latent cache: q_latent (B, Tq, H, rank), q_rope (B, Tq, H, rope), c_kv (B, Tk, rank),
    k_rope (B, Tk, rope) -> o_latent (B, Tq, H, rank) and lse (B, H, Tq), float32."""
    q = torch.cat([q_latent.float(), q_rope.float()], -1)
    k = torch.cat([c_kv.float(), k_rope.float()], -1)[:, :, None]
    return _attend(q, k, c_kv.float()[:, :, None], scale, causal)


def gather_paged_ref(kv_cache: torch.Tensor, block_table: torch.Tensor, seqlen: int, b: int) -> torch.Tensor:
    """Tokens [0, seqlen) of sequence b from a paged cache (num_pages, page_size, D) -> (seqlen, D)."""
    page = kv_cache.shape[1]
    n_pages = -(-seqlen // page)
    pages = kv_cache[block_table[b, :n_pages].long()]  # (n_pages, page, D)
    return pages.reshape(-1, kv_cache.shape[-1])[:seqlen]


def mla_decode_ref(q_latent, q_rope, kv_cache, *, cache_seqlens, block_table: Optional[torch.Tensor] = None,
                   scale: float, kv_lora_rank: int = 512):
    """Reference for :func:`longattn.mla.mla_decode`. The S query tokens of sequence b are its last S
    cached tokens (causal among themselves). Returns o_latent (B, S, H, rank) float32 and lse (B, H, S)."""
    outs, lses = [], []
    for b in range(q_latent.shape[0]):
        n = int(cache_seqlens[b])
        kv = gather_paged_ref(kv_cache, block_table, n, b) if block_table is not None else kv_cache[b, :n]
        o, l = mla_latent_attention_ref(q_latent[b:b + 1], q_rope[b:b + 1], kv[None, :, :kv_lora_rank],
                                        kv[None, :, kv_lora_rank:], scale=scale, causal=True)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


__all__ = ["split_kv_b_weight", "mla_decompress_ref", "mla_naive_ref", "mla_absorbed_ref",
           "mla_latent_attention_ref", "gather_paged_ref", "mla_decode_ref"]
