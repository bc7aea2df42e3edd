"""MoBA: Mixture of Block Attention (arXiv 2502.13189)."""
from .ops import moba_attention, moba_block_selection, moba_decode
from .reference import moba_attention_ref, moba_block_selection_ref

__all__ = ["moba_attention", "moba_block_selection", "moba_decode", "moba_attention_ref", "moba_block_selection_ref"]
