"""MoBA (Mixture of Block Attention, arXiv 2502.13189) in plain PyTorch: the ground truth of the tests.

Semantics (per query head, per sequence):
- keys are cut into blocks of ``block_size`` tokens from the start of the sequence (the last may be short);
- the query at position t (queries are aligned to the end of the keys) lives in block ``c = t // block_size``;
- the gate score of an earlier block ``i < c`` is ``q_t . mean(k[block i])``, with q_t the query head and k
  its KV head (GQA). The mean is taken in float32 and rounded to the input dtype, the dot product is
  float32 (as Moonshot's reference keeps the pooled keys in the input dtype);
- block c is always selected and counts in ``topk``: the ``topk - 1`` highest-scoring earlier blocks are
  added (all of them when there are fewer); ties go to the lower block index; later blocks never;
- the query attends, in one softmax, to every key of its selected earlier blocks and causally to its own
  block. With ``topk >= number of blocks`` this is dense causal attention.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.reference import block_mask_ref, block_sparse_attention_ref, join_sequences, sequence_slices


def _pooled_keys(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """(Tk, Hkv, D) -> (num_blocks, Hkv, D): float32 mean of each block, rounded to k's dtype."""
    tk = k.shape[0]
    nb = -(-tk // block_size)
    pooled = torch.stack([k[i * block_size:(i + 1) * block_size].float().mean(0) for i in range(nb)]) if nb else \
        k.new_zeros(0, *k.shape[1:], dtype=torch.float32)
    return pooled.to(k.dtype)


def _select_one(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """One sequence: q (Tq, Hq, D), k (Tk, Hkv, D) -> selected blocks (Tq, Hq, topk), ascending, -1 padded."""
    tq, hq = q.shape[0], q.shape[1]
    tk, hkv = k.shape[0], k.shape[1]
    nb = -(-tk // block_size)
    sel = torch.full((tq, hq, topk), -1, dtype=torch.int64, device=q.device)
    if tq == 0 or nb == 0:
        return sel
    pooled = _pooled_keys(k, block_size).float().repeat_interleave(hq // hkv, dim=1)  # (nb, Hq, D)
    scores = torch.einsum("thd,nhd->thn", q.float(), pooled)  # (Tq, Hq, nb)
    pos = torch.arange(tq, device=q.device) + (tk - tq)
    own = (pos // block_size)[:, None, None]
    blk = torch.arange(nb, device=q.device)[None, None, :]
    scores = torch.where(blk < own, scores, torch.full_like(scores, float("-inf")))
    scores = torch.where(blk == own, torch.full_like(scores, float("inf")), scores)
    # stable descending sort: among equal scores the lower block index comes first
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    m = min(topk, nb)
    idx = order.indices[..., :m]
    ok = order.values[..., :m] > float("-inf")
    idx = torch.where(ok, idx, torch.full_like(idx, nb + 1))
    idx = torch.sort(idx, dim=-1).values
    sel[..., :m] = torch.where(idx <= nb, idx, torch.full_like(idx, -1))
    return sel


def moba_block_selection_ref(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int,
                             cu_seqlens_q: Optional[torch.Tensor] = None,
                             cu_seqlens_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Blocks selected by each (query, query head), own block included.

    Dense q (B, Tq, Hq, D), k (B, Tk, Hkv, D) -> (B, Tq, Hq, topk); varlen (total, H, D) with cu_seqlens ->
    (total_q, Hq, topk). int64 block indices local to the sequence, ascending, padded with -1.
    """
    parts = [_select_one(q[sq], k[sk], block_size, topk)
             for sq, sk in sequence_slices(q.shape[0], cu_seqlens_q, cu_seqlens_k)]
    return join_sequences(parts, cu_seqlens_q is not None)


moba_mask_ref = block_mask_ref  # the token mask of a MoBA selection (own block included)


def moba_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, topk: int,
                       cu_seqlens: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                       cu_seqlens_k: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                       return_lse: bool = False, selection: Optional[torch.Tensor] = None,
                       softcap: Optional[float] = None):
    """MoBA attention with an explicit token mask (float32 inside, output in q's dtype, differentiable).

    Dense (B, T, H, D) or varlen (total, H, D) with ``cu_seqlens`` (or ``cu_seqlens_q``/``cu_seqlens_k``).
    ``selection`` (as returned by :func:`moba_block_selection_ref`) overrides the gate, e.g. to use the
    selection made from lower-precision inputs. ``softcap`` (Gemma 2's logit soft-capping): the attention's
    scores are ``softcap * tanh(scale * q.k / softcap)``; the gate is not capped (tanh keeps the scores' order,
    so the selection is the same but for scores that tanh rounds to a tie).
    """
    if cu_seqlens is not None:
        cu_seqlens_q = cu_seqlens_k = cu_seqlens
    if scale is None:
        scale = q.shape[-1] ** -0.5
    sel = selection
    if sel is None:
        with torch.no_grad():
            sel = moba_block_selection_ref(q, k, block_size=block_size, topk=topk, cu_seqlens_q=cu_seqlens_q,
                                           cu_seqlens_k=cu_seqlens_k)
    # the own block is in the selection too; listing it twice changes no mask
    return block_sparse_attention_ref(q, k, v, sel, block_size=block_size, scale=scale, cu_seqlens_q=cu_seqlens_q,
                                      cu_seqlens_k=cu_seqlens_k, return_lse=return_lse, softcap=softcap)


__all__ = ["moba_attention_ref", "moba_block_selection_ref", "moba_mask_ref"]
