"""Triton helpers for a running top-k over (score, index) pairs, shared by MoBA's gate and NSA's selection.

Each pair becomes one int64 key: the score's bits in an order-preserving form in the high word and
``2^31 - 1 - index`` in the low word, so that larger keys mean a higher score, then a lower index (ties go
to the lower index). Keys are unique, so taking the maximum K times and striking it out is an exact top-k.
"""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def topk_keys(score, idx, valid):
    """Keys of float32 ``score`` with int32 ``idx`` (broadcast together); the int64 minimum (an absent entry)
    where not ``valid``."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order == signed int order
    key = (bits.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)
    return tl.where(valid, key, -9223372036854775807 - 1)


@triton.jit
def fold_topk(best, cand, K):
    """The K largest keys of each row of ``best`` (M, P) and ``cand`` (M, C), best first, in a (M, P) tensor
    (P >= K; columns past K hold the absent key)."""
    cols = tl.arange(0, best.shape[1])
    merged = tl.full(best.shape, -9223372036854775807 - 1, tl.int64)
    for j in range(0, K):
        top = tl.maximum(tl.max(best, 1), tl.max(cand, 1))
        merged = tl.where(cols[None, :] == j, top[:, None], merged)
        best = tl.where(best == top[:, None], -9223372036854775807 - 1, best)
        cand = tl.where(cand == top[:, None], -9223372036854775807 - 1, cand)
    return merged


@triton.jit
def topk_indices(best):
    """int32 indices of the keys, -1 for absent entries."""
    idx = (2147483647 - (best & 0xFFFFFFFF)).to(tl.int32)
    return tl.where(best == -9223372036854775807 - 1, -1, idx)


__all__ = ["topk_keys", "fold_topk", "topk_indices"]
