"""HuggingFace transformers integration.

``register()`` (run by ``import longattn``) adds ``"moba"`` and ``"longattn"`` (dense flash attention) to
transformers' attention and mask interfaces, so that
``AutoModelForCausalLM.from_config(cfg, attn_implementation="moba")`` works for Llama/Qwen2-style models.
(transformers treats every implementation name containing "flash" as a flash-attn hub kernel, hence
"longattn" rather than "longattn_flash".)
"""
from __future__ import annotations

from .attention import flash_attention_forward, moba_attention_forward
from .swap import swap_attention

IMPLEMENTATIONS = {"moba": moba_attention_forward, "longattn": flash_attention_forward}


def register() -> None:
    """Register longattn's parameter-free attention implementations with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    for name, fn in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, fn)
        # a 2-D padding mask (or None without padding), as for flash-attention: we unpad ourselves
        AttentionMaskInterface.register(name, flash_attention_mask)


__all__ = ["register", "swap_attention", "moba_attention_forward", "flash_attention_forward"]
