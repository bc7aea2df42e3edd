"""HuggingFace transformers integration.

``register()`` (run by ``import longattn``) adds ``"moba"`` and ``"longattn"`` (dense flash attention) to
transformers' attention and mask interfaces, so that
``AutoModelForCausalLM.from_config(cfg, attn_implementation="moba")`` works for Llama/Qwen2-style models.
(transformers treats every implementation name containing "flash" as a flash-attn hub kernel, hence
"longattn" rather than "longattn_flash".)
"""
from __future__ import annotations

from .attention import flash_attention_forward, known_left_padding, moba_attention_forward, padding_mask
from .cache import InPlaceCache
from .swap import from_pretrained, swap_attention

IMPLEMENTATIONS = {"moba": moba_attention_forward, "longattn": flash_attention_forward}


def register() -> None:
    """Register longattn's parameter-free attention implementations with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, fn in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, padding_mask)


__all__ = ["register", "swap_attention", "from_pretrained", "InPlaceCache", "known_left_padding",
           "moba_attention_forward", "flash_attention_forward"]
