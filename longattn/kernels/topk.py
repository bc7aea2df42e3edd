"""Triton helpers for a running top-k over (score, index) pairs, shared by MoBA's gate and NSA's selection.

Each pair becomes one int64 key: the score's bits in an order-preserving form in the high word and
``2^31 - 1 - index`` in the low word, so that larger keys mean a higher score, then a lower index (ties go
to the lower index). Keys are unique, so the k largest keys are an exact top-k.

The running buffer ``best`` (M, P), P >= k, holds in its first k columns the k largest keys seen so far, in
no particular order; free slots (and the columns past k) hold *absent* keys, ``int64 min + column``, which
are distinct and below every real key (a real key's high word is above ``int32 min``). A fold only touches
the candidates that beat a row's current k-th key, one insertion per step, so once the top-k has settled
(most of a long sweep) a chunk costs one comparison pass instead of k passes.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def topk_init(M: tl.constexpr, P: tl.constexpr):
    """An empty running top-k buffer (M, P): every slot absent."""
    cols = tl.arange(0, P).to(tl.int64)
    return tl.zeros([M, P], tl.int64) + (cols[None, :] - 9223372036854775807 - 1)


@triton.jit
def topk_keys(score, idx, valid):
    """Keys of float32 ``score`` with int32 ``idx`` (broadcast together); the int64 minimum (absent) where
    not ``valid``."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order == signed int order
    bits = tl.maximum(bits, -2147483647)  # keep int32 min in the high word for absent keys
    key = (bits.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)
    return tl.where(valid, key, -9223372036854775807 - 1)


@triton.jit
def fold_topk(best, cand, K):
    """Fold the candidate keys ``cand`` (M, C) (absent ones allowed) into the running buffer ``best`` (M, P):
    afterwards its first K columns hold the K largest keys of both, unordered."""
    cols = tl.arange(0, best.shape[1])
    slot = cols[None, :] < K
    kth = tl.min(tl.where(slot, best, 9223372036854775807), 1)
    new = (cand > kth[:, None]) & (cand >= -9223372032559808512)  # beats the k-th key, and is a real key
    cand = tl.where(new, cand, -9223372036854775807 - 1)
    steps = tl.minimum(tl.max(tl.sum(new.to(tl.int32), 1), 0), K)
    for _ in range(0, steps):  # insert each row's best remaining candidate in place of its smallest key
        top = tl.max(cand, 1)
        low = tl.min(tl.where(slot, best, 9223372036854775807), 1)
        best = tl.where(slot & (best == low[:, None]) & (top > low)[:, None], top[:, None], best)
        cand = tl.where(cand == top[:, None], -9223372036854775807 - 1, cand)
    return best


@triton.jit
def topk_indices(best, K):
    """int32 (M, P) indices of the first K keys of ``best``, best first, -1 for absent keys and past K."""
    cols = tl.arange(0, best.shape[1])
    out = tl.full(best.shape, -1, tl.int32)
    for j in range(0, K):
        top = tl.max(best, 1)
        idx = tl.where(top >= -9223372032559808512, (2147483647 - (top & 0xFFFFFFFF)).to(tl.int32), -1)
        out = tl.where(cols[None, :] == j, idx[:, None], out)
        best = tl.where(best == top[:, None], -9223372036854775807 - 1, best)
    return out


__all__ = ["topk_init", "topk_keys", "fold_topk", "topk_indices"]
