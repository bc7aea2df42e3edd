"""Shared Triton building blocks (dense flash attention, decoding against a KV cache, lse merge) and their torch
references."""
from .decode import flash_decode
from .flash import flash_attention
from .merge import merge_attention

__all__ = ["flash_attention", "flash_decode", "merge_attention"]
