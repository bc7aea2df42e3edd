"""NSA: Native Sparse Attention (arXiv 2502.11089): the op (Triton kernels for every branch) and the
PyTorch reference."""
from .ops import nsa_attention, nsa_decode, nsa_selected_attention
from .reference import NSAConfig, nsa_attention_ref

__all__ = ["NSAConfig", "nsa_attention", "nsa_attention_ref", "nsa_decode", "nsa_selected_attention"]
