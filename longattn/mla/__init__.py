"""MLA: DeepSeek-V2/V3 Multi-head Latent Attention (prefill on decompressed K/V, absorbed paged decode)."""
from .cache import PagedLatentCache
from .ops import mla_decode, mla_prefill
from .reference import mla_absorbed_ref, mla_decode_ref, mla_naive_ref, split_kv_b_weight

__all__ = ["PagedLatentCache", "mla_decode", "mla_prefill", "mla_absorbed_ref", "mla_decode_ref", "mla_naive_ref",
           "split_kv_b_weight"]
