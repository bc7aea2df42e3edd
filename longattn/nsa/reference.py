"""NSA (Native Sparse Attention, arXiv 2502.11089) in plain PyTorch: the ground truth of the tests.

Three branches over the same queries, combined by per-head gates in [0, 1]:
``o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa``.

Points the paper leaves open, settled here (``l`` = cmp_block, ``d`` = cmp_stride, ``l'`` = slc_block,
``n`` = slc_topk, ``w`` = window; queries are aligned to the end of the keys, query t at position t):

- compression: compressed block j summarises tokens ``[j*d, j*d + l)``; a sequence of T tokens has
  ``floor((T - l) / d) + 1`` compressed blocks (none when T < l). The reference compressor is the mean
  of the block's keys / values; a learnable compressor's output can be passed as ``k_cmp``/``v_cmp``.
- compressed attention: query t sees compressed block j iff ``j*d + l - 1 <= t``; a query that sees no
  compressed block gets ``o_cmp = 0`` (not NaN) and selects from the forced blocks only.
- selection scores (Eq. 9): ``p_slc[j] = sum_{m < l'/d} sum_{k < l/d} p_cmp[(l'/d)*j - m - k]``, indices
  outside ``[0, n_cmp)`` contributing 0, where ``p_cmp`` are the compressed attention probabilities of the
  query; summed (not averaged) over the query heads of the GQA group (Eq. 10), so a group shares one
  selection.
- top-n: among the selection blocks ``0 .. c`` (c = t // l', the query's own block; later blocks never),
  the first ``init_blocks`` blocks and the ``local_blocks`` blocks ending at the query's own block are
  always taken, then the highest scores fill the ``n`` slots; ties go to the lower block index. Queries
  with at most ``n`` candidate blocks take them all.
- selected attention: all keys of the selected blocks, causal inside the query's own block.
- sliding window: the ``w`` most recent keys, the query itself included.
- attention sinks (optional, gpt-oss's): one learned logit per query head in the softmax of each branch, a key
  without a value: a branch's output scaled by ``sigmoid(lse - sink)``, lse the logsumexp of its scaled scores
  (0 for a query that sees no key in it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..kernels.reference import (attention_ref, block_mask_ref, join_sequences, masked_attention_ref,
                                 sequence_slices)


@dataclass(frozen=True)
class NSAConfig:
    """NSA hyper-parameters (paper defaults). Validated on construction."""
    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    slc_topk: int = 16
    window: int = 512
    init_blocks: int = 1
    local_blocks: int = 2

    def __post_init__(self):
        # upper bounds: the kernels take block sizes and top-n as tile sizes, the window as a 32-bit int
        limits = dict(cmp_block=4096, cmp_stride=4096, slc_block=4096, slc_topk=512, window=2 ** 31 - 1)
        for name, most in limits.items():
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"NSAConfig.{name} must be an int, got {type(val).__name__}")
            if not 1 <= val <= most:
                raise ValueError(f"NSAConfig.{name} must be an int in [1, {most}], got {val!r}")
        for name in ("init_blocks", "local_blocks"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"NSAConfig.{name} must be an int, got {type(val).__name__}")
            if val < 0:
                raise ValueError(f"NSAConfig.{name} must be a non-negative int, got {val!r}")
        if self.cmp_block % self.cmp_stride:
            raise ValueError(f"NSAConfig.cmp_block ({self.cmp_block}) must be a multiple of cmp_stride "
                             f"({self.cmp_stride})")
        if self.slc_block % self.cmp_stride:
            raise ValueError(f"NSAConfig.slc_block ({self.slc_block}) must be a multiple of cmp_stride "
                             f"({self.cmp_stride})")
        if self.slc_block < 16 or self.slc_block & (self.slc_block - 1):
            raise ValueError(f"NSAConfig.slc_block must be a power of two >= 16, got {self.slc_block}")
        if self.local_blocks < 1:
            raise ValueError(f"NSAConfig.local_blocks must be at least 1 (the query's own block is always selected: "
                             f"the selected branch attends causally inside it), got {self.local_blocks}")
        if self.init_blocks + self.local_blocks > self.slc_topk:
            raise ValueError(f"NSAConfig.slc_topk ({self.slc_topk}) must be at least init_blocks + local_blocks "
                             f"({self.init_blocks + self.local_blocks})")

    def num_cmp_blocks(self, seqlen: int) -> int:
        return 0 if seqlen < self.cmp_block else (seqlen - self.cmp_block) // self.cmp_stride + 1

    def score_weights(self) -> torch.Tensor:
        """Weight of ``p_cmp[(l'/d)*j - i]`` in ``p_slc[j]`` for i = 0, 1, ...: the convolution of
        ``l'/d`` ones with ``l/d`` ones (Eq. 9)."""
        a = torch.ones(self.slc_block // self.cmp_stride)
        b = torch.ones(self.cmp_block // self.cmp_stride)
        return torch.nn.functional.conv1d(a.view(1, 1, -1), b.view(1, 1, -1), padding=b.numel() - 1).flatten()


def compress_mean_ref(k: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Mean-pooling compressor of one sequence: (T, H, D) -> (n_cmp, H, D) (float32 mean, input dtype)."""
    n = config.num_cmp_blocks(k.shape[0])
    if n == 0:
        return k.new_zeros(0, *k.shape[1:])
    blocks = [k[j * config.cmp_stride: j * config.cmp_stride + config.cmp_block].float().mean(0) for j in range(n)]
    return torch.stack(blocks).to(k.dtype)


def compressed_attention_ref(q, k_cmp, v_cmp, config: NSAConfig, scale: float, k_len: Optional[int] = None,
                             softcap: Optional[float] = None):
    """One sequence: q (Tq, Hq, D) over compressed keys (n_cmp, Hkv, D) -> o_cmp (Tq, Hq, Dv) float32,
    probabilities p_cmp (Hq, Tq, n_cmp) float32 and lse (Hq, Tq). ``k_len`` is the token length of the
    sequence (default Tq); query i sits at position ``k_len - Tq + i``. ``softcap``: the scores soft-capped,
    ``softcap * tanh(scale * q.k / softcap)``, in the probabilities too."""
    tq = q.shape[0]
    k_len = tq if k_len is None else k_len
    n = k_cmp.shape[0]
    pos = torch.arange(tq, device=q.device) + (k_len - tq)
    j = torch.arange(n, device=q.device)
    mask = (j[None, :] * config.cmp_stride + config.cmp_block - 1) <= pos[:, None]  # (Tq, n)
    o, lse = masked_attention_ref(q, k_cmp, v_cmp, mask, scale, softcap)
    hq, hkv = q.shape[1], k_cmp.shape[1]
    kf = k_cmp.float().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe[..., None]).masked_fill(~mask[None], 0.0)
    return o, p, lse


def selection_scores_ref(p_cmp: torch.Tensor, config: NSAConfig, heads_kv: int, k_len: int) -> torch.Tensor:
    """p_cmp (Hq, Tq, n_cmp) -> selection scores (Tq, Hkv, n_slc) by Eq. 9, summed over each GQA group."""
    hq, tq, n_cmp = p_cmp.shape
    n_slc = -(-k_len // config.slc_block)
    ratio = config.slc_block // config.cmp_stride
    w = config.score_weights().to(p_cmp)
    out = p_cmp.new_zeros(hq, tq, n_slc)
    for jj in range(n_slc):
        for i, wi in enumerate(w.tolist()):
            c = ratio * jj - i
            if 0 <= c < n_cmp:
                out[:, :, jj] += wi * p_cmp[:, :, c]
    return out.view(heads_kv, hq // heads_kv, tq, n_slc).sum(1).permute(1, 0, 2)


def select_blocks_ref(scores: torch.Tensor, config: NSAConfig, k_len: int) -> torch.Tensor:
    """scores (Tq, Hkv, n_slc) -> selected blocks (Tq, Hkv, slc_topk), ascending, -1 padded."""
    tq, hkv, n_slc = scores.shape
    top = config.slc_topk
    sel = torch.full((tq, hkv, top), -1, dtype=torch.int64, device=scores.device)
    pos = torch.arange(tq, device=scores.device) + (k_len - tq)
    own = pos // config.slc_block
    blk = torch.arange(n_slc, device=scores.device)
    forced = (blk[None, :] < config.init_blocks) | ((blk[None, :] > own[:, None] - config.local_blocks)
                                                    & (blk[None, :] <= own[:, None]))
    s = scores.float().clone()
    s = torch.where(forced[:, None, :], torch.full_like(s, float("inf")), s)
    s = torch.where((blk[None, :] <= own[:, None])[:, None, :], s, torch.full_like(s, float("-inf")))
    order = torch.sort(s, dim=-1, descending=True, stable=True)  # ties: lower block index first
    m = min(top, n_slc)
    idx = order.indices[..., :m]
    idx = torch.where(order.values[..., :m] > float("-inf"), idx, torch.full_like(idx, n_slc + 1))
    idx = torch.sort(idx, -1).values
    sel[..., :m] = torch.where(idx <= n_slc, idx, torch.full_like(idx, -1))
    return sel


def _one_sequence(q, k, v, k_cmp, v_cmp, config: NSAConfig, scale: float, softcap: Optional[float] = None):
    """Branch outputs of one sequence (float32): ``(o, lse)`` of each of the compressed, selected and window
    branches (o (Tq, Hq, Dv), lse (Hq, Tq)) and the selection."""
    tq, hq = q.shape[:2]
    tk, hkv = k.shape[:2]
    if k_cmp is None:
        k_cmp, v_cmp = compress_mean_ref(k, config), compress_mean_ref(v, config)
    o_cmp, p_cmp, lse_cmp = compressed_attention_ref(q, k_cmp, v_cmp, config, scale, k_len=tk, softcap=softcap)
    sel = select_blocks_ref(selection_scores_ref(p_cmp.detach(), config, hkv, tk), config, tk)
    sel_q = sel.repeat_interleave(hq // hkv, dim=1)  # (Tq, Hq, n): a group shares its blocks
    slc = masked_attention_ref(q, k, v, block_mask_ref(sel_q, tq, tk, config.slc_block), scale, softcap)
    o_swa, lse_swa = attention_ref(q[None], k[None], v[None], causal=True, window=config.window, scale=scale,
                                   return_lse=True, softcap=softcap)
    return ((o_cmp, lse_cmp), slc, (o_swa[0].float(), lse_swa[0])), sel


def nsa_attention_ref(q, k, v, g_cmp, g_slc, g_swa, *, config: NSAConfig = NSAConfig(), k_cmp=None, v_cmp=None,
                      cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None, scale: Optional[float] = None,
                      sinks=None, softcap: Optional[float] = None, return_selection: bool = False):
    """Native Sparse Attention, readable and slow (float32 inside, output in q's dtype, differentiable in
    q, k, v, the gates and k_cmp/v_cmp).

    Dense: q (B, Tq, Hq, Dk), k (B, Tk, Hkv, Dk), v (B, Tk, Hkv, Dv), gates (B, Tq, Hq), optional compressed
    keys/values (B, n_cmp, Hkv, D*). Varlen: (total, H, D) with cu_seqlens (gates (total, Hq), compressed
    (total_cmp, Hkv, D*) packed per sequence in order). ``sinks``: (Hq,) attention sinks, one logit per query
    head in every branch's softmax (differentiable too). ``softcap`` (Gemma 2's logit soft-capping): every
    branch's scores ``softcap * tanh(scale * q.k / softcap)``, the compressed probabilities that score the
    selection too. ``return_selection`` also returns the selected blocks ((B, Tq, Hkv, n) or (total_q, Hkv, n)).
    """
    if cu_seqlens is not None:
        cu_seqlens_q = cu_seqlens_k = cu_seqlens
    if scale is None:
        scale = q.shape[-1] ** -0.5
    varlen = cu_seqlens_q is not None
    outs, sels, c0 = [], [], 0
    for b, (sq, sk) in enumerate(sequence_slices(q.shape[0], cu_seqlens_q, cu_seqlens_k)):
        ks = k[sk]
        if varlen:  # packed compressed blocks: this sequence's run
            n = config.num_cmp_blocks(ks.shape[0])
            sc, c0 = slice(c0, c0 + n), c0 + n
        else:
            sc = b
        kc = None if k_cmp is None else k_cmp[sc]
        vc = None if v_cmp is None else v_cmp[sc]
        branches, sel = _one_sequence(q[sq], ks, v[sk], kc, vc, config, scale, softcap)
        out = 0
        for (o, lse), g in zip(branches, (g_cmp, g_slc, g_swa)):
            if sinks is not None:  # (a query that sees no key: lse -inf, its branch 0 whatever the sink)
                none = torch.isneginf(lse)
                share = torch.sigmoid(lse.masked_fill(none, 0) - sinks.float()[:, None]).masked_fill(none, 0)
                o = o * share.t()[..., None]
            out = out + g[sq].float()[..., None] * o
        outs.append(out)
        sels.append(sel)
    out, sel = join_sequences(outs, varlen), join_sequences(sels, varlen)
    out = out.to(q.dtype)
    return (out, sel) if return_selection else out


__all__ = ["NSAConfig", "compress_mean_ref", "compressed_attention_ref", "selection_scores_ref",
           "select_blocks_ref", "nsa_attention_ref"]
