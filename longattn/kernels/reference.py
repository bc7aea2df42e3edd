"""Plain PyTorch references for the shared kernels. Readable, slow, float32 inside; no Triton.

These are the ground truth of the tests: they build the attention mask explicitly and may
materialise repeated K/V heads and (T, T) score matrices.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def sequence_slices(batch: int, cu_seqlens_q=None, cu_seqlens_k=None) -> list:
    """(q index, k index) per sequence: the batch index b (dense) or row slices (varlen); ``t[index]``
    then gives that sequence of a (B, T, ...) or (total, ...) tensor."""
    if cu_seqlens_q is None:
        return [(b, b) for b in range(batch)]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]


def join_sequences(parts: list, varlen: bool, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`sequence_slices` for per-sequence results: stack (dense) or concatenate along
    ``dim`` (varlen; 1 for lse laid out (H, total))."""
    return torch.cat(parts, dim) if varlen else torch.stack(parts)


def attention_mask_ref(q_len: int, k_len: int, *, causal: bool, window: Optional[int],
                       device=None, chunk_size: Optional[int] = None, chunk_offset: int = 0) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where query i may attend key j.

    Queries are aligned to the end of the keys: query i sits at position ``k_len - q_len + i``.
    Causal: key j visible iff ``j <= pos(i)``. Window ``w``: additionally ``j > pos(i) - w`` (the w most
    recent keys, the query's own position included). ``chunk_size`` ``c``: additionally key j in the query's
    chunk, ``(j + chunk_offset) // c == (pos(i) + chunk_offset) // c`` (``chunk_offset``: the sequence position
    of key 0).
    """
    pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= pos
    if window is not None:
        mask &= j > pos - window
    if chunk_size is not None:
        mask &= (j + chunk_offset) // chunk_size == (pos + chunk_offset).clamp(min=0) // chunk_size
    return mask


def masked_attention_ref(q, k, v, mask, scale, softcap: Optional[float] = None):
    """Attention of one sequence with an explicit mask. q (Tq, Hq, D), k/v (Tk, Hkv, D*), mask
    (Tq, Tk) or (Hq, Tq, Tk). Returns out (Tq, Hq, Dv) in float32 and lse (Hq, Tq) in float32.
    ``softcap``: the scores ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2's logit soft-capping).

    Rows that see no key get out = 0 and lse = -inf.
    """
    hq, hkv = q.shape[1], k.shape[1]
    qf, kf, vf = q.float(), k.float(), v.float()
    if hq != hkv:
        kf = kf.repeat_interleave(hq // hkv, dim=1)
        vf = vf.repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", qf, kf) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask.dim() == 2:
        mask = mask[None]
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (Hq, Tq); -inf on empty rows
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    p = p.masked_fill(~mask, 0.0)
    out = torch.einsum("hqk,khd->qhd", p, vf)
    return out, lse


def attention_ref(q, k, v, *, causal: bool = True, window: Optional[int] = None,
                  scale: Optional[float] = None, cu_seqlens_q=None, cu_seqlens_k=None,
                  return_lse: bool = False, softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                  chunk_offsets: Optional[torch.Tensor] = None):
    """Reference for :func:`longattn.kernels.flash.flash_attention`.

    Dense: q (B, Tq, Hq, Dqk), k (B, Tk, Hkv, Dqk), v (B, Tk, Hkv, Dv) -> out (B, Tq, Hq, Dv),
    lse (B, Hq, Tq). Varlen: (total, H, D) with cu_seqlens_q / cu_seqlens_k -> lse (Hq, total_q).
    ``chunk_size`` / ``chunk_offsets`` (one per sequence): see :func:`attention_mask_ref`.
    Differentiable through autograd (float32 inside, output cast to q's dtype).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for n, (sq, sk) in enumerate(sequence_slices(q.shape[0], cu_seqlens_q, cu_seqlens_k)):
        qs, ks = q[sq], k[sk]
        offset = 0 if chunk_offsets is None else int(chunk_offsets[n])
        m = attention_mask_ref(qs.shape[0], ks.shape[0], causal=causal, window=window, device=q.device,
                               chunk_size=chunk_size, chunk_offset=offset)
        o, l = masked_attention_ref(qs, ks, v[sk], m, scale, softcap)
        outs.append(o)
        lses.append(l)
    varlen = cu_seqlens_q is not None
    out, lse = join_sequences(outs, varlen), join_sequences(lses, varlen, 1)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def block_mask_ref(blocks: torch.Tensor, q_len: int, k_len: int, block_size: int) -> torch.Tensor:
    """Token mask (Hq, Tq, Tk) of one sequence whose (query, head) attend to the key blocks listed in
    ``blocks`` (Tq, Hq, K) (-1 = unused), causally (key j visible only if j <= the query's position)."""
    pos = torch.arange(q_len, device=blocks.device) + (k_len - q_len)
    j = torch.arange(k_len, device=blocks.device)
    chosen = (blocks[:, :, :, None] == (j // block_size)[None, None, None, :]).any(2)  # (Tq, Hq, Tk)
    causal = j[None, :] <= pos[:, None]
    return (chosen & causal[:, None, :]).permute(1, 0, 2)


def block_sparse_attention_ref(q, k, v, block_indices, *, block_size: int, scale: Optional[float] = None,
                               cu_seqlens_q=None, cu_seqlens_k=None, return_lse: bool = False,
                               softcap: Optional[float] = None):
    """Reference for :func:`longattn.kernels.sparse.block_sparse_attention`: own block (causal) plus the
    listed earlier blocks, dense (B, T, H, D) or varlen (total, H, D); ``softcap`` as in :func:`attention_ref`."""
    if scale is None:
        scale = q.shape[-1] ** -0.5

    def own_blocks(tq, tk, device):
        return ((torch.arange(tq, device=device) + tk - tq) // block_size)[:, None, None]

    outs, lses = [], []
    for sq, sk in sequence_slices(q.shape[0], cu_seqlens_q, cu_seqlens_k):
        qs, ks = q[sq], k[sk]
        own = own_blocks(qs.shape[0], ks.shape[0], qs.device).expand(-1, qs.shape[1], 1)
        mask = block_mask_ref(torch.cat([block_indices[sq].long(), own], -1), qs.shape[0], ks.shape[0], block_size)
        o, l = masked_attention_ref(qs, ks, v[sk], mask, scale, softcap)
        outs.append(o)
        lses.append(l)
    varlen = cu_seqlens_q is not None
    out, lse = join_sequences(outs, varlen).to(q.dtype), join_sequences(lses, varlen, 1)
    return (out, lse) if return_lse else out


def merge_ref(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]):
    """Reference for :func:`longattn.kernels.merge.merge_attention`.

    outs[i]: (B, T, H, D) or (total, H, D); lses[i]: (B, H, T) or (H, total), natural log, float32.
    Returns (out, lse): ``lse = logsumexp_i lse_i`` and ``out = sum_i exp(lse_i - lse) * out_i``;
    rows where every lse_i is -inf give out = 0, lse = -inf.
    """
    lse_all = torch.stack([l.float() for l in lses])  # (N, ..., H, T)
    lse = torch.logsumexp(lse_all, dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lse_all - safe[None])  # (N, ..., H, T)
    w = w.transpose(-1, -2).unsqueeze(-1)  # (N, ..., T, H, 1)
    out = (w * torch.stack([o.float() for o in outs])).sum(0)
    return out.to(outs[0].dtype), lse


__all__ = ["sequence_slices", "join_sequences", "attention_mask_ref", "masked_attention_ref", "attention_ref",
           "block_mask_ref", "block_sparse_attention_ref", "merge_ref"]
