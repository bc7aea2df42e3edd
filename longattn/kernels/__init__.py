"""Shared Triton building blocks (dense flash attention, lse merge) and their torch references."""
from .flash import flash_attention
from .merge import merge_attention

__all__ = ["flash_attention", "merge_attention"]
