"""Comparison helpers shared by the tests."""
import importlib.metadata
import re

import pytest
import torch

try:
    _TRANSFORMERS_MAJOR = int(importlib.metadata.version("transformers").split(".")[0])
except importlib.metadata.PackageNotFoundError:  # (the tests of models skip themselves)
    _TRANSFORMERS_MAJOR = 0

# relative-norm tolerances: interpreter fp32 / fp16, GPU bf16 (and fp32 on GPU, which uses true fp32 dots)
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-12)).item()


def assert_close(actual, expected, dtype, name="", factor=1.0):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten or NaN)"
    err = rel_err(actual, expected)
    tol = TOL[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def assert_same_as_widened(actual, expected, dtype, name=""):
    """An op reading a float8 cache against the same op on the cache widened to q's dtype: bit for bit through the
    interpreter (the widening is exact, the tiles the same), within ``dtype``'s tolerance on a GPU (which may take
    other tiles for either)."""
    if actual.device.type == "cpu":
        torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=name)
    else:
        assert_close(actual, expected, dtype, name)


def assert_lse_close(actual, expected, atol=1e-3):
    """lse: same -inf pattern, and close where finite."""
    assert actual.shape == expected.shape
    assert not torch.isnan(actual).any(), "lse has NaN (unwritten elements?)"
    inf_a, inf_e = torch.isinf(actual), torch.isinf(expected)
    assert torch.equal(inf_a, inf_e), "lse -inf pattern differs"
    diff = (actual[~inf_a] - expected[~inf_e]).abs()
    assert diff.numel() == 0 or diff.max().item() <= atol, f"lse max abs error {diff.max().item():.3g}"


def float8_bytes(dtype) -> torch.Tensor:
    """The 256 bytes of a float8 format, those that do not encode a finite value (NaN, inf) replaced by 0: every
    finite value once or more, as a uint8 tensor to ``.view(dtype)`` (torch 2.5 indexes no float8 tensor on the CPU)."""
    bits = torch.arange(256, dtype=torch.uint8)
    return torch.where(bits.view(dtype).float().isfinite(), bits, torch.zeros_like(bits))


def sorted_selection(sel: torch.Tensor) -> torch.Tensor:
    """Selected block indices sorted along the last dim, -1 padding last: the same set in any order compares equal."""
    sel = sel.long()
    return torch.where(sel < 0, torch.full_like(sel, 1 << 30), sel).sort(-1).values


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def tiny_deepseek_v3_config():
    """A DeepSeek-V3 config small enough for the CPU interpreter (random weights, no download)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                            num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=48,
                            qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=1,
                            max_position_embeddings=512)


# Other decoder families whose attention the MoBA / NSA swaps take (model type: extra config), tiny (sliding-window
# layers in some, so that they stay so; hybrids with a linear-attention layer first)
_LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2, linear_num_key_heads=2,
               linear_key_head_dim=16, linear_value_head_dim=16)
_QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
# Gemma 4 as in its E2B / E4B models: the last two layers reuse the keys and values of the last earlier layer of their
# type (KV sharing), the full-attention layers with heads of their own (one KV head of 32, keys as values)
GEMMA4 = dict(num_hidden_layers=4, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
              num_kv_shared_layers=2, attention_k_eq_v=True, num_global_key_value_heads=1, global_head_dim=32,
              hidden_size_per_layer_input=16, vocab_size_per_layer_input=128)
# Gemma 3n's language model: its last two layers reuse earlier layers' keys and values; AltUp, Laurel, per-layer inputs
GEMMA3N = dict(num_hidden_layers=4, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
               num_kv_shared_layers=2, vocab_size_per_layer_input=128, hidden_size_per_layer_input=16,
               altup_num_inputs=2, laurel_rank=8, activation_sparsity_pattern=[0.0] * 4)
OTHER_ARCHS = {
    "glm4": {}, "glm4_moe": dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                 topk_group=1, first_k_dense_replace=1, use_qk_norm=True),
    "seed_oss": {}, "ernie4_5": {}, "ernie4_5_moe": dict(moe_intermediate_size=32, moe_num_experts=4, moe_k=2),
    "granite": {}, "phi3": dict(partial_rotary_factor=0.5), "olmo2": {},
    "olmo3": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "exaone4": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "hunyuan_v1_dense": {}, "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, moe_intermediate_size=32),
    "smollm3": dict(no_rope_layers=[1, 0]),  # (its second layer without RoPE)
    "apertus": {}, "arcee": {}, "ministral": {}, "ministral3": {},
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "gemma4_text": GEMMA4, "gemma3n_text": GEMMA3N,
    "minimax": dict(layer_types=["linear_attention", "full_attention"], num_local_experts=4, num_experts_per_tok=2),
    "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),
    "qwen3_next": dict(_LINEAR, **_QWEN_MOE), "qwen3_5_text": _LINEAR, "qwen3_5_moe_text": dict(_LINEAR, **_QWEN_MOE),
    # hybrids of Mamba (or short convolution) layers and attention ones: a Mamba layer, then an attention one (in
    # Falcon-H1 both in every layer, side by side)
    "nemotron_h": dict(hybrid_override_pattern="M*", mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
                       n_groups=1, chunk_size=16),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16,
                             mamba_n_groups=1, mamba_chunk_size=16, num_local_experts=2, num_experts_per_tok=1,
                             shared_intermediate_size=64),
    "falcon_h1": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16,
                      mamba_d_ssm=64, key_multiplier=0.5),  # (its keys scaled after their projection)
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1,
                  mamba_chunk_size=16),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  num_experts=2, num_experts_per_tok=1, mamba_d_state=8, mamba_dt_rank=8),
    # (two layers sharing one attention block, each with adapters of its own, which need as many KV heads as query
    # heads of twice the model's width over the heads, as Zamba2's models have; RoPE)
    "zamba2": dict(layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], hybrid_layer_ids=[1, 3],
                   num_hidden_layers=4, num_key_value_heads=4, head_dim=32, mamba_headdim=16, mamba_d_state=16,
                   n_mamba_heads=8, use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True),
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32, num_dense_layers=1),
    "nemotron": dict(partial_rotary_factor=0.5),
    "cohere": dict(use_qk_norm=True),  # (Command R+: a norm per head of q and k, weights (H, D))
    # (a LayerNorm module per head of q and k; a quarter of each head rotates. Transformers 4.57 fails to build it:
    # its weight initialisation reads the norms' bias, which they do not have)
    "stablelm": dict(qk_layernorm=True) if _TRANSFORMERS_MAJOR >= 5 else {},
    "cohere2": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    **{a: {} for a in ("exaone", "olmo", "olmoe", "flex_olmo", "olmo_hybrid", "phimoe", "granitemoe",
                       "granitemoeshared", "internlm3", "solar_open", "glm", "gemma", "starcoder2",
                       "bitnet", "helium", "jetmoe", "hy_v3", "sarvam_moe")},
    **{a: dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
       for a in ("exaone_moe", "granite_swa", "granitemoe_swa", "cohere2_moe", "cwm")},
    # (value heads of 8 against query / key heads of 16, values scaled; twice the KV heads in its sliding layers)
    "mimo_v2_flash": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"], v_head_dim=8,
                          attention_value_scale=0.5),
    # more decoders under transformers 5 (Lara: a linear-attention layer first; Kolibri's full-attention layers without
    # RoPE beside sliding ones)
    **{a: {} for a in ("diffllama", "persimmon", "phi", "zaya", "hyperclovax", "jais2", "nanochat")},
    **{a: dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
       for a in ("afmoe", "beam", "kolibri1", "mellum", "flint")},
    # (heads of its own per layer, 4 and 8; an output gate per head)
    "laguna": dict(num_attention_heads_per_layer=[4, 8]),
    "lara_mini": dict(layer_types=["linear_attention", "full_attention"]),
    # (their layers outside model.model.layers: GPT-2's, GPT-J's, CodeGen's and StarCoder's in transformer.h,
    # GPT-NeoX's in gpt_neox.layers, OPT's in model.decoder.layers)
    **{a: {} for a in ("gpt2", "gpt_neox", "opt", "gpt_bigcode")},
    **{a: dict(rotary_dim=8) for a in ("gptj", "codegen")},
    # attention logits soft-capped (perturb_attention scales q and k up so that the cap bites)
    **{a: dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=1.0)
       for a in ("gemma2", "vaultgemma")},
}


def tiny_config(arch: str):
    """A tiny config of model type ``arch`` (of OTHER_ARCHS: 2 layers, 4 query / 2 KV heads of 16, unless its entry
    says otherwise), or None where this transformers has no such model."""
    from transformers import AutoConfig

    tiny = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0)
    try:
        return AutoConfig.for_model(arch, **{**tiny, **OTHER_ARCHS[arch]})
    except ValueError:  # (an unknown model type)
        return None


def perturb_attention(model) -> None:
    """Move the attention's norm weights, biases and sinks off their initial values (1, 0 and about 0), so that a
    swap dropping them shows; where the model soft-caps its attention logits (Gemma 2), scale its q and k
    projections by 8, so that the cap changes them (uncapped, a tiny model's logits lie far below it)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    capped = bool(getattr(cfg, "attn_logit_softcapping", None))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "self_attn" in name and "norm" in name:
                p.uniform_(0.5, 2.0)
            elif "self_attn" in name and (name.endswith("bias") or name.endswith("sinks")):
                p.normal_()
            elif capped and ("q_proj" in name or "k_proj" in name):
                p.mul_(8)


def tiny_mla_config(arch: str):
    """A tiny config of another model with MLA attention, for the CPU interpreter (random weights), or None where this
    transformers has no such model. "deepseek_v2": V2-Lite's layout (no q LoRA; YaRN, whose mscale transformers 5
    folds into the softmax scale; complex rotary frequencies on interleaved pairs); "glm4_moe_lite" (GLM-4.7-Flash:
    q/k head dim above v's, 5 heads) and "youtu": DeepSeek-V3's attention under other names; "mistral4" (Mistral
    Small 4): V3's, its queries scaled by position; "minicpm3": V2's with (cos, sin) rotary; "longcat_flash"
    (LongCat-Flash: two attentions a layer, query and latent scaled), "kimi_linear" (NoPE, after a linear layer) and
    "sarvam_mla" (DeepSeek-V3's model under its own config: no q LoRA)."""
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, kv_lora_rank=32,
                  max_position_embeddings=512)
    moe = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    if arch == "deepseek_v2":
        yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128, mscale=0.707,
                    mscale_all_dim=0.707, beta_fast=32.0, beta_slow=1.0)
        rope = dict(rope_parameters=dict(yarn, rope_theta=10000.0)) \
            if int(transformers.__version__.split(".")[0]) >= 5 else dict(rope_scaling=yarn)
        return transformers.DeepseekV2Config(**common, **moe, **rope, num_attention_heads=4, num_key_value_heads=4,
                                             q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32,
                                             v_head_dim=32, first_k_dense_replace=1)
    cls = dict(glm4_moe_lite="Glm4MoeLiteConfig", youtu="YoutuConfig", minicpm3="MiniCPM3Config",
               mistral4="Mistral4Config", longcat_flash="LongcatFlashConfig", kimi_linear="KimiLinearConfig",
               sarvam_mla="SarvamMLAConfig")[arch]
    if not hasattr(transformers, cls):
        return None
    if arch == "longcat_flash":  # two attentions per decoder layer (2 x 1 here), LoRA-scaled query and latent; YaRN
        yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                    mscale_all_dim=1.0, original_max_position_embeddings=128)
        return transformers.LongcatFlashConfig(
            vocab_size=128, hidden_size=64, num_layers=1, num_attention_heads=5, num_key_value_heads=5,
            ffn_hidden_size=128, expert_ffn_hidden_size=32, n_routed_experts=4, zero_expert_num=2, moe_topk=2,
            q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16, head_dim=16, qk_nope_head_dim=48, v_head_dim=32,
            max_position_embeddings=512, pad_token_id=0, rope_parameters=yarn)
    if arch == "kimi_linear":  # a Kimi Delta Attention layer (transformers' torch path), then an MLA one (NoPE)
        return transformers.KimiLinearConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16,
            qk_nope_head_dim=32, v_head_dim=32, num_experts=4, num_experts_per_token=2, linear_head_dim=16,
            linear_num_heads=4, layer_types=["linear_attention", "full_attention"],
            mlp_layer_types=["dense", "sparse"], max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
    extra = moe if arch in ("glm4_moe_lite", "mistral4") else {}
    if arch == "sarvam_mla":  # DeepSeek-V3's model without q LoRA, MoE from its second layer
        return transformers.SarvamMLAConfig(**common, **moe, num_attention_heads=4, num_key_value_heads=4,
                                            q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                                            first_k_dense_replace=1, pad_token_id=0)
    if arch == "mistral4":  # queries scaled by position from token 16 on (Llama 4's scale; 0.1 in its default)
        extra = dict(extra, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0,
                                                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                                 original_max_position_embeddings=16, llama_4_scaling_beta=0.5))
    heads = 4 if arch == "minicpm3" else 5  # (MiniCPM3's config wants hidden_size a multiple of the heads)
    return getattr(transformers, cls)(**common, **extra, num_attention_heads=heads, num_key_value_heads=heads,
                                      q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=48, v_head_dim=32)


def tiny_multimodal_config(arch: str):
    """A tiny multimodal model's config, or None where this transformers has no such model: "qwen2_5_vl" (a vision
    encoder of one layer, multimodal RoPE in the language model: image token 150, vision start / end 152 / 153),
    "gemma3" (Gemma 3: a sliding-window layer then a full one; images of 28 x 28 pixels, 4 tokens each, image token
    150, start / end 152 / 153), "qwen3_5" (Qwen3.5: a linear-attention layer then a full one with a gated output,
    interleaved multimodal RoPE on half the head dims; tokens as Qwen2.5-VL's), "qwen3_vl" (Qwen3-VL: interleaved
    multimodal RoPE, the vision features added to the first layer's input as well) or "kimi_k25" (Kimi K2.5:
    tiny_deepseek_v3_config's language model and a vision encoder of one layer)."""
    import transformers

    if arch == "gemma3":
        text = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                         image_token_index=150, boi_token_index=152, eoi_token_index=153,
                                         pad_token_id=0)
    if arch == "qwen2_5_vl":
        rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
        rope = dict(rope_parameters=rope) if int(transformers.__version__.split(".")[0]) >= 5 else \
            dict(rope_scaling=dict(rope, type="mrope"))
        text = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, **rope)
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=150,
                                             video_token_id=151, vision_start_token_id=152, vision_end_token_id=153,
                                             pad_token_id=0)
    if arch in ("qwen3_5", "qwen3_vl"):
        name = dict(qwen3_5="Qwen3_5Config", qwen3_vl="Qwen3VLConfig")[arch]
        if not hasattr(transformers, name):
            return None
        rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1], mrope_interleaved=True)
        text = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, out_hidden_size=64,
                      num_position_embeddings=16)
        if arch == "qwen3_5":  # (RoPE on half the head dims)
            text.update(rope_parameters=dict(rope, partial_rotary_factor=0.5), **_LINEAR)
        else:  # (RoPE on every head dim; the vision encoder's features also added to the first layer's input)
            rope = dict(rope, mrope_section=[4, 2, 2])
            text.update(dict(rope_parameters=rope) if int(transformers.__version__.split(".")[0]) >= 5 else
                        dict(rope_theta=10000.0, rope_scaling=dict(rope, type="mrope")))
            vision.update(deepstack_visual_indexes=[0])
        cfg = getattr(transformers, name)(text_config=text, vision_config=vision, image_token_id=150,
                                          video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
        cfg.pad_token_id = 0
        return cfg
    if not hasattr(transformers, "Kimi_K25Config"):
        return None
    text = {k: v for k, v in tiny_deepseek_v3_config().to_dict().items()
            if k not in ("architectures", "transformers_version")}
    vision = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    return transformers.Kimi_K25Config(text_config=text, vision_config=vision)


def tiny_gpt_oss_pair(device, impl):
    """A tiny gpt-oss (attention sinks, moved off 0 here; a sliding-window layer then a full one) under eager
    attention, and a copy under longattn's ``impl`` ("longattn", or "moba" through swap_attention with top-k over
    every block: dense)."""
    import copy

    from transformers import AutoModelForCausalLM, GptOssConfig

    import longattn

    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256,
                       layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(device)
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)
    ours = copy.deepcopy(ref)
    if impl == "moba":  # through swap_attention: decoding keeps the pooled keys
        longattn.hf.swap_attention(ours, "moba", block_size=16, topk=64)
    else:
        ours.set_attn_implementation(impl)
    return ref, ours


def tiny_llama4_pair(device, kind):
    """A tiny Llama 4 text model (chunks of 16 tokens in three layers of four, the fourth global without RoPE, with
    temperature tuning of its queries; mixture-of-experts feed-forward every other layer) under eager attention, and a copy through
    ``swap_attention(model, kind)`` ("flash", or "moba" with top-k over every block: dense)."""
    import copy

    from transformers import AutoModelForCausalLM, Llama4TextConfig

    import longattn

    cfg = Llama4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=64, intermediate_size_mlp=64,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2,
                           attention_chunk_size=16, max_position_embeddings=256, pad_token_id=0,
                           floor_scale=4)  # (the temperature grows every 4 positions: 8192 in the real models)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(device)
    ours = copy.deepcopy(ref)
    longattn.hf.swap_attention(ours, kind, **(dict(block_size=16, topk=64) if kind == "moba" else {}))
    return ref, ours


def run_without_gpu_sync(fn):
    """Run fn with every CUDA host synchronisation an error (torch's sync debug mode); on the CPU, just run it.
    What a decoding step may not do in every layer: wait for the GPU (a blocking copy, .item(), .tolist())."""
    if not torch.cuda.is_available():
        return fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def capture_graph(fn):
    """Run ``fn`` once (compilation, autotuning) and capture a second call in a CUDA graph: returns the graph and the
    call's output, which each ``graph.replay()`` rewrites in place."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def replay_decode_step_without_sync(model, ids, cache):
    """Prefill ids[:, :-1] into ``cache``, record layer 0's attention call while the model decodes the last
    token, then run that call again (no padding mask) with every CUDA synchronisation an error."""
    from longattn.rollout import _cache_kw

    kw = {_cache_kw(model): cache, "use_cache": True}
    attn = model.model.layers[0].self_attn
    calls = []
    with torch.no_grad():
        model(ids[:, :-1], **kw)
        hook = attn.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
        try:
            model(ids[:, -1:], **kw)
        finally:
            hook.remove()
        args, kwargs = calls[0]
        kwargs["attention_mask"] = None
        return run_without_gpu_sync(lambda: attn(*args, **kwargs))


def check_cache_reorder(model, ids, order):
    """Beam search's in-place reordering of a transformers cache (``reorder_cache``) must carry longattn's state
    beside it: after a prefill and a decoding step of ``ids``, reordering the rows by ``order`` and decoding the
    last token gives the logits of running ``ids[order]`` from scratch."""
    from transformers import DynamicCache

    from longattn.rollout import _cache_kw

    def run(rows, reorder):
        cache = DynamicCache(config=model.config)
        kw = {_cache_kw(model): cache, "use_cache": True}
        with torch.no_grad():
            model(rows[:, :-2], **kw)
            model(rows[:, -2:-1], **kw)
            if reorder is not None:
                cache.reorder_cache(reorder)
                rows = rows[reorder]
            return model(rows[:, -1:], **kw).logits

    torch.testing.assert_close(run(ids, order), run(ids[order], None), atol=1e-4, rtol=1e-4)


def check_packed_equals_separate(model, lens, *, grads=False, decode_error=True):
    """One row of packed sequences (position_ids restarting at 0, and transformers' ``cu_seq_lens_q`` keywords
    as ``DataCollatorWithFlattening`` gives them) gives each sequence's logits of running it alone (and, with
    ``grads``, the parameters' gradients of a weighted sum of them); with ``decode_error``, decoding from a cache
    the packed row filled is refused."""
    from transformers import DynamicCache

    from longattn.rollout import _cache_kw

    dev = next(model.parameters()).device
    seqs = [torch.randint(1, 128, (1, n), device=dev) for n in lens]
    packed = torch.cat(seqs, 1)
    pos = torch.cat([torch.arange(n, device=dev) for n in lens])[None]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    flat = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    weight = torch.randn(1, packed.shape[1], model.config.vocab_size, device=dev)

    def run(packed_kw):
        model.zero_grad()
        with torch.set_grad_enabled(grads):
            if packed_kw is None:
                parts = [model(s, use_cache=False).logits for s in seqs]
                logits = torch.cat(parts, 1)
            else:
                logits = model(packed, position_ids=pos, use_cache=False, **packed_kw).logits
            if grads:
                (logits.float() * weight).sum().backward()
        found = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), found

    sep, sep_grads = run(None)
    for kw in ({}, flat):
        logits, found = run(kw)
        torch.testing.assert_close(logits, sep, atol=1e-4, rtol=1e-4)
        assert set(found) == set(sep_grads)
        for n in found:
            torch.testing.assert_close(found[n], sep_grads[n], atol=1e-4, rtol=1e-3, msg=n)
    if decode_error:
        import pytest

        cache = DynamicCache(config=model.config)
        kw = {_cache_kw(model): cache, "use_cache": True}
        with torch.no_grad():
            model(packed, position_ids=pos, **kw)
            with pytest.raises(ValueError, match="filled by a packed row"):
                model(packed[:, -1:], **kw)


def check_prompt_lookup_equals_greedy(model, device):
    """Speculative decoding (transformers' prompt lookup: draft tokens copied from the prompt, verified in one
    forward, the rejected ones cut off the cache with ``cache.crop``) gives the greedy tokens: the state kept
    beside the cache must be cut back with it."""
    torch.manual_seed(1)
    ids = torch.randint(1, 128, (1, 12), device=device).repeat(1, 4)  # repetitions: the lookup finds drafts
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        greedy = model.generate(ids, **kw)
        speculative = model.generate(ids, prompt_lookup_num_tokens=5, **kw)
    # transformers 4.x may accept drafts past max_new_tokens (its own models too): compare the greedy run's tokens
    n = greedy.sequences.shape[1]
    assert torch.equal(speculative.sequences[:, :n], greedy.sequences)
    torch.testing.assert_close(torch.cat(speculative.logits[:len(greedy.logits)]), torch.cat(greedy.logits),
                               atol=1e-4, rtol=1e-4)


def assert_first_order_only(fn, inputs, op: str):
    """``fn(*inputs)`` (an op's output, or a tuple whose first item is) differentiates once: its gradients with
    ``create_graph=True`` equal the plain ones, and differentiating them (a gradient penalty, by ``backward()`` or
    by ``autograd.grad`` of the inputs, through a function of them too) raises naming ``op`` instead of taking them
    for constants; another path of the same graph still differentiates twice."""
    w = torch.ones((), device=inputs[0].device, requires_grad=True)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    wrt = [x * w for x in leaves]  # (inputs computed from a leaf: what a penalty reaches through them)
    out = lambda xs: (lambda o: o[0] if isinstance(o, tuple) else o)(
        fn(*[xs.pop(0) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in inputs]))
    loss = lambda: out(list(wrt)).float().square().sum()
    plain = torch.autograd.grad(loss(), wrt, retain_graph=True)
    u = torch.ones((), device=w.device, requires_grad=True)  # (a path of the graph that does not pass the op)
    *grads, gu = torch.autograd.grad(loss() + u ** 3, [*wrt, u], create_graph=True)
    for g, want in zip(grads, plain):
        assert g.requires_grad
        torch.testing.assert_close(g.detach(), want, atol=0, rtol=0)
    penalty = lambda: sum(g.square().sum() for g in grads)
    for differentiate in (lambda: penalty().backward(retain_graph=True),
                          lambda: torch.autograd.grad(penalty(), leaves, retain_graph=True),
                          lambda: torch.autograd.grad(penalty(), w, retain_graph=True)):
        with pytest.raises(RuntimeError, match=f"{re.escape(op)} has no second derivative"):
            differentiate()
    (h,) = torch.autograd.grad(gu, u)  # (d2 u^3 / du2 = 6: the op's backward ran in that graph, without raising)
    assert h.item() == 6


def assert_compiled_matches_eager(fn, inputs, fullgraph: bool = True):
    """``torch.compile(fn)`` (TorchDynamo and AOTAutograd; ``fullgraph``: without a graph break) gives fn's
    outputs and the gradients of a loss over them with respect to every input that requires one, as eager mode
    does (float32 inputs: only the order of gradient sums may differ)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=fullgraph, backend="aot_eager")
    wrt = [t for t in inputs if t.requires_grad]
    results = []
    for f in (fn, compiled):
        outs = f(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = sum(o.float().masked_fill(torch.isinf(o), 0).square().sum() for o in outs)
        results.append((*outs, *torch.autograd.grad(loss, wrt)))
    for i, (eager, got) in enumerate(zip(*results)):
        assert got.dtype == eager.dtype, f"result {i}: dtype {got.dtype} != {eager.dtype}"
        torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-5, msg=f"result {i}")
