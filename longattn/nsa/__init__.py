"""NSA: Native Sparse Attention (arXiv 2502.11089). So far: the configuration and the PyTorch reference."""
from .reference import NSAConfig, nsa_attention_ref

__all__ = ["NSAConfig", "nsa_attention_ref"]
