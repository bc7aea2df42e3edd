"""``swap_attention``: put longattn's attention into a transformers model in place."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

from torch import nn

# NSA's module takes the q/k/v/o projections (biases too; Phi-3/4's fused qkv projection), q/k norms (per head before
# RoPE: Qwen3, Gemma 3; over all heads' dims: OLMo-2/3, MiniMax-M2; per head after RoPE: Hunyuan), the model's own RoPE
# function (partial rotary too: GLM-4, Phi-4-mini, MiniMax-M2) and layers without RoPE (SmolLM3; the full attention of
# EXAONE-4 and Command R7B / A beside sliding-window layers); the sliding-window layers of models that mix them with
# full ones stay, and MiniMax-M1's lightning-attention (linear) layers; gpt-oss's attention sinks (a logit per head)
# enter the softmax of each NSA branch
NSA_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "qwen2_moe", "qwen3_moe", "mixtral", "glm4", "glm4_moe", "seed_oss",
             "ernie4_5", "ernie4_5_moe", "granite", "apertus", "arcee", "ministral", "ministral3", "phi3", "olmo2",
             "minimax_m2", "hunyuan_v1_dense", "hunyuan_v1_moe", "smollm3", "olmo3", "exaone4", "gemma3_text",
             "cohere2", "minimax", "gpt_oss")
# and under transformers 5: EXAONE 3.5 / EXAONE-MoE, OLMo / OLMoE / FlexOlmo / OLMo hybrid (its linear-attention
# layers kept), Phi-3.5-MoE, Granite MoE (shared experts too), InternLM3, Solar Open, Command R, Cohere2-MoE, GLM,
# Gemma, StarCoder2, Helium, CWM (its sliding-window layers kept), Hunyuan V3, Sarvam-MoE, Nemotron-4 (partial
# rotary), BitNet (a norm of the attention's output before o_proj), Granite (MoE) with sliding windows (attention
# sinks), MiMo-V2-Flash (value heads narrower than the query / key heads, scaled values; its sliding-window layers
# kept), Gemma 4 (its global layers: head dims and KV heads of their own, normed values, values that are the keys'
# projection) and Gemma 3n, whose layers that take another layer's keys and values (E2B / E4B) stay as they are,
# reading those of NSA's layers; StableLM (a LayerNorm per head of q and k); HyperCLOVA X, Jais 2, Mellum (q/k norms;
# its sliding-window layers kept), NanoChat (q/k norms after RoPE, without weights: the same before it), Kolibri
# (q/k norms; its full-attention layers without RoPE beside sliding-window ones, kept), JetMoE (a mixture of
# attention heads: experts map each token's queries and reduce the heads' outputs), AFMoE (an output gate; its global
# layers without RoPE), Laguna (a softplus output gate; heads per layer), Flint (sinks; its global layers without RoPE)
NSA_DECODER_ARCHS = ("exaone", "exaone_moe", "olmo", "olmoe", "flex_olmo", "olmo_hybrid", "phimoe", "granitemoe",
                     "granitemoeshared", "internlm3", "solar_open", "cohere", "cohere2_moe", "glm", "gemma",
                     "starcoder2", "helium", "cwm", "hy_v3", "sarvam_moe", "nemotron", "bitnet", "granite_swa",
                     "granitemoe_swa", "mimo_v2_flash", "gemma4_text", "gemma3n_text", "stablelm", "hyperclovax",
                     "jais2", "mellum", "nanochat", "kolibri1", "jetmoe", "afmoe", "laguna", "flint")
# and the hybrids Qwen3-Next and Qwen3.5 (dense, MoE): their full-attention layers (a gated output: the attention's
# output times a sigmoid gate that q_proj gives beside each head's query) become NSA layers, the linear-attention ones
# (Gated DeltaNet) stay
NSA_LINEAR_HYBRID_ARCHS = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
NSA_ARCHS += NSA_DECODER_ARCHS + NSA_LINEAR_HYBRID_ARCHS
# MLA: DeepSeek-V3's attention, the same in GLM-4.7-Flash (glm4_moe_lite), Youtu-LLM and Sarvam's MLA models
# (sarvam_mla: DeepSeek-V3's model, no q LoRA), and in Mistral Small 4 (mistral4) with queries scaled by position;
# DeepSeek-V2's with complex rotary frequencies; MiniCPM3's with V3's (cos, sin) rotary; LongCat-Flash's (two per
# decoder layer) with its query and latent scaled; Kimi Linear's layers of it without rotation (NoPE), between
# linear-attention ones (left as they are)
MLA_ATTENTIONS = {"deepseek_v3": "DeepseekV3Attention", "deepseek_v2": "DeepseekV2Attention",
                  "glm4_moe_lite": "Glm4MoeLiteAttention", "youtu": "YoutuAttention", "minicpm3": "MiniCPM3Attention",
                  "mistral4": "Mistral4Attention", "longcat_flash": "LongcatFlashMLA",
                  "kimi_linear": "KimiLinearAttention", "sarvam_mla": "DeepseekV3Attention"}
MLA_ARCHS = tuple(MLA_ATTENTIONS)
# the language models of multimodal models whose attention rotates by multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL):
# MoBA's and flash's attention functions take them (the model rotates); NSA's module under transformers 5, where the
# model's rotary embedding lays out the multimodal sections and the attention applies a plain rotary function (under
# transformers 4 their attention splits the sections itself)
VL_TEXT_ARCHS = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text", "qwen3_vl_moe_text")
NSA_ARCHS += VL_TEXT_ARCHS
# hybrids whose other layers are Mamba layers (Nemotron-H, Granite 4.0, Bamba, Jamba, Zamba2's shared attention
# blocks; Falcon-H1 with a Mamba mixer beside the attention in each layer) or short convolutions (LFM2): the attention
# layers take longattn's attention, the others stay as they are
HYBRID_ARCHS = ("nemotron_h", "granitemoehybrid", "falcon_h1", "bamba", "jamba", "zamba2", "lfm2", "lfm2_moe")
# NSA's module on those too: Nemotron-H's and Jamba's attention without RoPE, Granite 4.0's with or without, Falcon-H1's
# keys scaled (key_multiplier), LFM2's q/k norms and output projection under names of their own, Zamba2's attention
# blocks (each layer's its own NSA module, the q/k/v/o weights and adapters tied as the model ties them; the module
# keeping each layer's compressed cache under the layer index the model calls it with)
NSA_ARCHS += HYBRID_ARCHS
# models with chunked-attention layers (Llama 4's local layers: chunks of config.attention_chunk_size tokens), which
# transformers marks as not taking flash attention's conventions for that reason alone: longattn's attention takes
# chunks (flash_attention's chunk_size); MoBA replaces their full-attention layers, the chunked ones stay chunked
CHUNKED_ARCHS = ("llama4_text",)
# NSA's module replaces Llama 4's global layers (no RoPE; queries scaled by position), its chunked layers kept
NSA_ARCHS += CHUNKED_ARCHS
# other decoders whose attention goes through transformers' attention functions as it is (their sliding-window layers
# staying so), under transformers 5: DiffLlama (differential attention: two softmaxes a head), Persimmon, Phi-1/2,
# Beam, Zaya, Lara (its linear-attention layers kept), GPT-2, GPT-J, GPT-NeoX, OPT, CodeGen, StarCoder (gpt_bigcode)
DECODER_ARCHS = ("diffllama", "persimmon", "phi", "beam", "zaya", "lara_mini",
                 "gpt2", "gptj", "gpt_neox", "opt", "codegen", "gpt_bigcode")
# (transformers 4 builds the 4-D masks of some of these itself or their attention modules with the model, and its
# LFM2 masks padding otherwise)
V5_ARCHS = NSA_DECODER_ARCHS + HYBRID_ARCHS + DECODER_ARCHS
# models whose attention soft-caps its logits (Gemma 2, VaultGemma: cap * tanh(scores / cap), the cap their config's
# attn_logit_softcapping; in each NSA branch's softmax), their sliding-window layers staying so
SOFTCAP_ARCHS = ("gemma2", "vaultgemma")
NSA_ARCHS += SOFTCAP_ARCHS
# MoBA is an attention function: also models whose attention NSA's module does not reproduce, their sliding-window
# layers staying so, the hybrids and decoders above, and the MLA models (on the keys and values their attention
# decompresses: q/k 192, v 128 in DeepSeek-V3)
MOBA_ARCHS = tuple(dict.fromkeys(NSA_ARCHS + HYBRID_ARCHS + DECODER_ARCHS + MLA_ARCHS + VL_TEXT_ARCHS + CHUNKED_ARCHS))
KINDS = ("flash", "moba", "nsa", "mla")
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # the cache argument's names across transformers 4.x-5.x


def _set_impl(model: nn.Module, name: str, text_key: Optional[str] = None) -> None:
    """Make ``name`` the attention implementation of ``model`` (of its sub-model ``text_key`` alone when given)."""
    from . import register

    register()
    if text_key is not None:
        model.set_attn_implementation({text_key: name})
    elif hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def _language_model(model: nn.Module):
    """``(module, config, decoder layers, sub-config key)`` of the language model of ``model``: a causal LM itself (key
    None; layers None where they are not ``model.model.layers``, which the flash and MoBA kinds do without), or a
    multimodal model's text model (its vision encoder keeps its attention: bidirectional, and not long)."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if text is cfg:
        return model, cfg, getattr(getattr(model, "model", None), "layers", None), None
    key = next((k for k in getattr(cfg, "sub_configs", {}) if getattr(cfg, k, None) is text), None)
    lm = getattr(getattr(model, "model", None), "language_model", None)
    if key is None or lm is None or not hasattr(lm, "layers"):
        raise ValueError(f"found no language model in this {cfg.model_type} model (model.model.language_model with "
                         f"its layers and config.{key or 'text_config'})")
    return lm, text, lm.layers, key


def _whole_kv_shared_inputs(module: nn.Module) -> None:
    """Gemma 4 (its E2B / E4B models) runs its KV-shared layers, which write no cache, at the kept logits' positions
    only (``_maybe_slice_kv_shared_inputs``): it slices their inputs, the layers' 4-D masks included, except under
    flash-attention or flex_attention; longattn's masks are 2-D padding masks, which that slicing fails on
    (IndexError). As under flash-attention, ``module`` then keeps their inputs whole (the same logits)."""
    method = getattr(type(module), "_maybe_slice_kv_shared_inputs", None)
    if method is None or "_maybe_slice_kv_shared_inputs" in vars(module):
        return
    sig = inspect.signature(method)
    names = list(sig.parameters)[1:]
    if "logits_to_keep" not in names:  # (a form not known here: left as it is)
        return
    kept = names[:names.index("logits_to_keep")]  # the inputs it returns, sliced or not

    def whole(*args, **kwargs):
        bound = sig.bind(module, *args, **kwargs).arguments
        return tuple(bound[name] for name in kept)
    module._maybe_slice_kv_shared_inputs = whole


def _attention_slot(layer: nn.Module) -> Optional[tuple]:
    """``(module, attribute)`` holding the attention of decoder layer ``layer``: its ``self_attn`` (JetMoE's
    ``self_attention``), or ``mixer`` where that is an attention (Nemotron-H's attention blocks), or its shared
    block's ``self_attn`` (Zamba2's hybrid layers: ``shared_transformer``, whose weights several layers share); None
    where it has none (the other layers of hybrids)."""
    shared = getattr(layer, "shared_transformer", None)
    if isinstance(shared, nn.Module) and getattr(shared, "self_attn", None) is not None:
        return shared, "self_attn"
    for name in ("self_attn", "self_attention"):
        if getattr(layer, name, None) is not None:
            return layer, name
    mixer = getattr(layer, "mixer", None)
    if mixer is not None and (type(mixer).__name__.endswith("Attention") or hasattr(mixer, "nsa")):
        return layer, "mixer"
    return None


def _attention_modules(lm: nn.Module, layers) -> list:
    """The attention modules of language model ``lm``: each decoder layer's in ``layers`` (``model.model.layers``;
    hybrids' linear-attention or state-space layers have none, LongCat-Flash's have two), or where the layers lie
    elsewhere (GPT-2's ``transformer.h``, GPT-NeoX's ``gpt_neox.layers``, OPT's ``model.decoder.layers``) every
    module of it named ...Attention that has a layer index."""
    if layers is None:
        return [m for m in lm.modules() if type(m).__name__.endswith("Attention") and
                isinstance(getattr(m, "layer_idx", None), int)]
    found = []
    for layer in layers:
        slot = _attention_slot(layer)
        attn = getattr(*slot) if slot else None
        found += list(attn) if isinstance(attn, nn.ModuleList) else [attn] if attn is not None else []
    return found


def _pin_tied_weights(lm: nn.Module) -> None:
    """Zamba2 ties each layer's shared attention block to the first by module prefix, which transformers expands
    over the block's parameters whenever it ties them again (``tie_weights()``): pinned to the parameters the block
    has before NSA's module is put in, so that each layer's own NSA parameters stay its own."""
    for module in lm.modules():  # (the base model's mapping: Zamba2Model's)
        expand = getattr(module, "get_expanded_tied_weights_keys", None)
        if expand is not None and getattr(module, "_tied_weights_keys", None):
            module._tied_weights_keys = expand(all_submodels=False)


def _remember_cache(module, args, kwargs):
    module._longattn_cache = None
    # (the cache's layer where the model names it in the call: Zamba2's attention blocks, whose own layer_idx is -1)
    module._longattn_layer = kwargs.get("layer_idx")
    for name in CACHE_KWARGS:  # (a loop: TorchDynamo before torch 2.6 cannot trace next() with a default)
        if kwargs.get(name) is not None:
            module._longattn_cache = kwargs[name]
            break


def _forget_cache(module, args, kwargs, output):
    module._longattn_cache = module._longattn_layer = None


def _record_cache(attn: nn.Module) -> None:
    """Let the attention function see the transformers cache ``attn`` is called with (``attn._longattn_cache``
    during its forward, and the cache's layer index where the call names it, ``attn._longattn_layer``): MoBA keeps
    the pooled keys of the cache's blocks there between decoding steps."""
    if getattr(attn, "_longattn_records_cache", False):
        return
    attn.register_forward_pre_hook(_remember_cache, with_kwargs=True)
    attn.register_forward_hook(_forget_cache, with_kwargs=True, always_call=True)
    attn._longattn_records_cache = True


def swap_attention(model: nn.Module, kind: str, **options) -> nn.Module:
    """Replace the attention of every layer of a transformers causal LM, in place; returns the model.

    kinds:
        ``"flash"``: longattn's dense flash attention (any decoder model that uses transformers'
            attention interface; Gemma 2's soft-capped logits, Llama 4's chunked layers too); exact.
        ``"moba"``: MoBA for the model types in ``MOBA_ARCHS`` (those of NSA below, Gemma 4's and Gemma 3n's KV-shared
            layers too: sliding-window and chunked layers stay so, the linear-attention layers of hybrids too; under
            transformers 5 also the Mamba hybrids Nemotron-H, Granite 4.0, Falcon-H1, Bamba, Jamba, Zamba2 and the
            convolution ones LFM2 / LFM2-MoE, their other layers kept, and the decoders of ``DECODER_ARCHS``:
            DiffLlama, Persimmon, Phi-1/2, Beam, Zaya, Lara, GPT-2, GPT-J, GPT-NeoX, OPT, CodeGen, StarCoder; and those
            of MLA below, on the keys and values their attention decompresses,
            which transformers 5 decompresses from its latent cache at every decoding step); options ``block_size``
            (default 512) and ``topk`` (default 3), stored in ``model.config.moba_block_size``/``moba_topk``.
            Decoding keeps the pooled keys of each layer's complete blocks on the transformers cache, so a step reads
            the selected blocks only (``attn_implementation="moba"`` alone pools every block of the cache at each
            step).
        ``"nsa"``: Native Sparse Attention for the model types in ``NSA_ARCHS`` (Llama, Qwen2/3, Mistral, Ministral and
            their MoE variants, GLM-4/4.5, Seed-OSS, ERNIE-4.5, Granite, Apertus, Arcee, Phi-3/4, OLMo-2/3, MiniMax-M2,
            Hunyuan, SmolLM3, EXAONE-4, Gemma 3, Command R7B / A, gpt-oss (its attention sinks in each branch's
            softmax), Gemma 2 and VaultGemma (their soft-capped logits in each branch), MiniMax-M1 (its
            lightning-attention layers kept), Llama 4 (its global layers, without RoPE and with their queries'
            temperature tuning; its RoPE layers, chunked or not, kept), the hybrids Qwen3-Next and Qwen3.5 (gated
            output; their linear-attention layers kept); under transformers 5 also EXAONE 3.5 / EXAONE-MoE, the OLMo
            family, Phi-3.5-MoE, Granite MoE, InternLM3, Solar Open, Command R, Cohere2-MoE, GLM, Gemma, StarCoder2,
            Helium, CWM, Hunyuan V3, Sarvam-MoE, Nemotron-4, BitNet, Granite (MoE) with sliding windows, MiMo-V2-Flash,
            Gemma 4 and Gemma 3n (their KV-shared layers kept), StableLM, HyperCLOVA X, Jais 2, Mellum, NanoChat,
            Kolibri, JetMoE, AFMoE, Laguna, Flint (``NSA_DECODER_ARCHS``), the attention layers of the hybrids
            Nemotron-H, Granite 4.0, Falcon-H1, Bamba, Jamba, Zamba2 (its shared attention blocks: an NSA module per
            layer calling one) and LFM2 / LFM2-MoE (their Mamba and convolution layers kept) and the language models
            of Qwen2-VL, Qwen2.5-VL and Qwen3-VL): each attention becomes a
            :class:`longattn.nsa.module.NativeSparseAttention` keeping the q/k/v/o weights (and q/k norms), with new
            compressor and gate parameters (every gate 1/3 at first: the branches' average); option ``config`` (an
            ``NSAConfig``). A model mixing sliding-window and full-attention layers (Gemma 2 / 3, OLMo-3, EXAONE-4,
            Command R7B, gpt-oss) keeps its sliding ones (exact, through the ``"longattn"`` attention function) and NSA
            replaces the full ones; where every layer slides (Mistral 7B v0.1, Ministral), all become NSA layers
            (``config.sliding_window`` / ``layer_types`` updated: caches keep every token).
        ``"mla"``: DeepSeek-V3 and V2 models, those with V3's attention (GLM-4.7-Flash, Youtu-LLM, Mistral Small 4,
            LongCat-Flash, Sarvam's sarvam_mla), MiniCPM3 and Kimi Linear (its MLA layers; the linear-attention ones
            stay): each such attention (``DeepseekV3Attention``, ``DeepseekV2Attention``, ...) becomes an
            :class:`longattn.mla.module.MLAAttention` sharing its weights (prefill on decompressed K/V,
            absorbed decoding over a paged latent cache); options ``page_size`` (a power of two from 16 to 256,
            default 64), ``cache_dtype`` (the latent cache's, default the model's; another 16 / 32-bit one takes the
            decoding queries in it; ``torch.float8_e4m3fn`` quantises it: half the bytes) and ``cache_scale`` (a
            float8 cache's dequantisation scale, default ``"auto"``: calibrated on each prefill, see
            :class:`longattn.mla.PagedLatentCache`; refused for other dtypes; a ``cache_dtype`` given without it
            resets it to ``"auto"``).
    A multimodal model (Qwen2.5-VL, Qwen3-VL, Gemma 3, Mistral 3, ...) has its language model's attention swapped (the
    kinds' model types are its language model's); its vision encoder keeps its own. Where the language model's mask
    lets queries see later keys (Gemma 3 among an image's tokens) the forward raises ValueError: longattn's attention
    is causal.
    The swap is recorded in ``model.config.longattn`` (kind and options), so that a model saved with
    ``save_pretrained`` loads back swapped through :func:`from_pretrained`. Swapping the same kind again is a no-op.
    Raises ValueError for an unknown kind, an unsupported architecture (for every kind, a model that transformers
    marks as not taking flash-attention's conventions, ``_supports_flash_attn = False``; for "flash" and "moba", a
    model whose attention modules were picked when it was built, which an attention implementation set afterwards
    would not reach: transformers 4's Nemotron and Jamba), an unknown option, or a model whose attention is already
    another kind's module (NSA, MLA).
    """
    import transformers

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    top = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or top is None:
        raise ValueError(f"model must be a transformers PreTrainedModel (with a config), got {type(model).__name__}")
    swapped = {type(m).__name__ for m in model.modules()} & {"NativeSparseAttention", "MLAAttention"}
    if swapped and swapped != {dict(nsa="NativeSparseAttention", mla="MLAAttention").get(kind)}:
        raise ValueError(f"this model's attention is already longattn's {swapped.pop()}: swap into a fresh model")
    lm, cfg, layers, text_key = _language_model(model)  # (of a multimodal model: its language model's)
    arch = getattr(cfg, "model_type", None)
    if not (getattr(lm, "_supports_flash_attn", False) or getattr(lm, "_supports_flash_attn_2", False) or
            arch in CHUNKED_ARCHS):
        # (transformers' own mark: BLOOM, MPT and the like never call the attention functions, Doge makes 4-D masks of
        # its own, DeepSeek-V4 appends compressed entries to the keys after the mask is made)
        raise ValueError(f"{type(lm).__name__} does not take flash-attention's conventions (transformers marks it "
                         "_supports_flash_attn = False: its attention does not go through transformers' attention "
                         "functions, or needs more than causal attention under a 2-D padding mask), which every kind "
                         "of swap_attention relies on")
    if kind in ("flash", "moba") and not getattr(type(lm), "_can_set_attn_implementation", lambda: True)():
        # (transformers only warns: the swap would leave every layer's attention as it was)
        raise ValueError(f"{type(lm).__name__} picks its attention modules when it is built (in this transformers, "
                         f"{transformers.__version__}, it does not call transformers' attention functions): kind "
                         f"{kind!r} could not reach them; build the model with transformers 5")
    if (kind in ("moba", "nsa") and arch in V5_ARCHS or kind == "nsa" and arch in VL_TEXT_ARCHS) and \
            int(transformers.__version__.split(".")[0]) < 5:
        raise ValueError(f"kind {kind!r} takes {arch} models under transformers >= 5, found {transformers.__version__}")
    allowed = {"flash": (), "moba": ("block_size", "topk"), "nsa": ("config",),
               "mla": ("page_size", "cache_dtype", "cache_scale")}[kind]
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"unknown option(s) for kind {kind!r}: {sorted(unknown)}; allowed: {list(allowed)}")
    if kind == "flash":
        if arch in MLA_ARCHS:
            raise ValueError(f"use kind='mla' for {arch} models (their attention is MLA)")
        _set_impl(model, "longattn", text_key)
    elif kind == "moba":
        if arch not in MOBA_ARCHS:
            raise ValueError(f"kind 'moba' supports model types {MOBA_ARCHS}, got {arch!r}")
        bs = options.get("block_size", getattr(cfg, "moba_block_size", 512))
        topk = options.get("topk", getattr(cfg, "moba_topk", 3))
        from ..kernels.utils import check_positive_int
        from ..moba.ops import _check_block_size

        _check_block_size(bs)  # (as the op checks them: here, before the config keeps them)
        check_positive_int(topk, "topk")
        cfg.moba_block_size, cfg.moba_topk = bs, topk
        _set_impl(model, "moba", text_key)
        for module in _attention_modules(lm, layers):
            _record_cache(module)
    elif kind == "nsa":
        if arch not in NSA_ARCHS:
            raise ValueError(f"kind 'nsa' supports model types {NSA_ARCHS}, got {arch!r}")
        from ..nsa.module import NativeSparseAttention
        from ..nsa.reference import NSAConfig

        config = options.get("config", NSAConfig())
        if not isinstance(config, NSAConfig):
            raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
        # a model mixing sliding-window and full-attention layers keeps its sliding ones (local already; Gemma 3's and
        # OLMo-3's with a RoPE of their own) and NSA replaces the full ones; where every layer slides (Mistral 7B
        # v0.1, Ministral), NSA replaces them all (its own window is a branch) and the transformers cache must keep
        # every token (a sliding layer's cache keeps only its window; layer_types decide the cache's layers where the
        # config has them, else sliding_window does)
        types = getattr(cfg, "layer_types", None)
        keep_sliding = types is not None and "sliding_attention" in types and "full_attention" in types
        rotary = getattr(lm, "rotary_emb", None) or getattr(getattr(lm, "model", None), "rotary_emb", None)
        rope_types = getattr(rotary, "layer_types", None)
        if types is not None and not keep_sliding and "sliding_attention" in types and rope_types is not None and \
                "full_attention" not in rope_types:
            # (Gemma 3's rotary embedding holds a RoPE per layer type present: the full-attention layers NSA's would
            # become have none, and taking the sliding layers' for them would need a cache keeping every token of
            # layers the config calls sliding)
            raise ValueError(f"kind 'nsa' does not take a {arch} model whose every layer slides (its rotary embedding "
                             "has a RoPE for sliding-window layers only); its released configurations mix "
                             "sliding-window and full-attention layers")
        # every new layer built before any is put in (a layer the module refuses leaves the model as it was)
        new = []
        for i, layer in enumerate(layers):
            slot = _attention_slot(layer)
            if keep_sliding and types[i] == "sliding_attention" or slot is None or \
                    types is not None and types[i] in ("linear_attention", "chunked_attention"):
                # (hybrids: the linear-attention and Mamba layers; MiniMax-M1's lightning attention; Llama 4's chunked
                # layers, local already)
                continue
            attn = getattr(*slot)
            if arch in CHUNKED_ARCHS and getattr(attn, "use_rope", False):
                continue  # (Llama 4: its RoPE layers, chunked or, without chunks, full, rotate by complex frequencies)
            if getattr(attn, "is_kv_shared_layer", False):
                continue  # (Gemma 4's and 3n's layers that attend to an earlier layer's keys and values: NSA's there)
            if not isinstance(attn, NativeSparseAttention):
                new.append((*slot, NativeSparseAttention(attn, config)))
            elif attn.nsa != config:
                raise ValueError(f"this model's NSA layers have {attn.nsa}, not {config}")
        if types is not None and not keep_sliding and "sliding_attention" in types:
            cfg.layer_types = ["full_attention" if t == "sliding_attention" else t for t in types]
        elif types is None and getattr(cfg, "sliding_window", None) is not None:
            cfg.sliding_window = None
        if new and arch == "zamba2":
            _pin_tied_weights(lm)
        for parent, name, module in new:
            setattr(parent, name, module)
        _set_impl(model, "longattn", text_key)  # 2-D padding masks
        options = {"config": dataclasses.asdict(config)}
    else:
        if arch not in MLA_ARCHS:
            raise ValueError(f"kind 'mla' supports model types {MLA_ARCHS}, got {arch!r}")
        from ..mla.cache import check_page_size
        from ..mla.module import MLAAttention

        if "page_size" in options:  # (checked before any layer changes, as the cache format is below)
            check_page_size(options["page_size"])
        mla_modules = []
        for layer in layers:
            # (LongCat-Flash: a list of two attentions per decoder layer)
            parent = layer.self_attn if isinstance(layer.self_attn, nn.ModuleList) else layer
            for name, module in list(parent.named_children()):
                if type(module).__name__ == MLA_ATTENTIONS[arch]:
                    module = MLAAttention(module, **options)
                    setattr(parent, name, module)
                if isinstance(module, MLAAttention):
                    # (a scale goes with its dtype: a new cache_dtype alone takes "auto")
                    module.set_cache_format(options.get("cache_dtype", module.cache_dtype), options.get(
                        "cache_scale", "auto" if "cache_dtype" in options else module.cache_scale))
                    module.page_size = options.get("page_size", module.page_size)
                    mla_modules.append(module)
        if not mla_modules:
            raise ValueError(f"found no {MLA_ATTENTIONS[arch]} layer to replace")
        # the layers' options as they are now (a swap again with some of them leaves the others as they were), the
        # dtype by name (the config is saved as JSON)
        first = mla_modules[0]
        dtype = None if first.cache_dtype is None else str(first.cache_dtype).removeprefix("torch.")
        options = {"page_size": first.page_size, "cache_dtype": dtype, "cache_scale": first.cache_scale}
        _set_impl(model, "longattn", text_key)  # 2-D padding masks, as MLAAttention expects
    if kind == "moba":
        options = {"block_size": cfg.moba_block_size, "topk": cfg.moba_topk}
    for module in model.modules():
        _whole_kv_shared_inputs(module)
    top.longattn = {"kind": kind, **options}  # saved by save_pretrained: longattn.hf.from_pretrained redoes the swap
    return model


def from_pretrained(name_or_path, *args, **kwargs) -> nn.Module:
    """Load a causal LM (or a multimodal model of ``AutoModelForImageTextToText``) saved after :func:`swap_attention`
    (``model.save_pretrained``): its config records the swap (``config.longattn``), which is redone while the model is
    built, so that the weights the swap added (NSA's compressors and gates) load from the checkpoint. Arguments as
    ``AutoModelForCausalLM.from_pretrained``; a model saved without a swap loads as it does there.

    (``AutoModelForCausalLM.from_pretrained`` alone builds the original attention and drops NSA's weights.)
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code",
                                  "subfolder") if k in kwargs}
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(name_or_path, **hub)
    spec = dict(getattr(config, "longattn", None) or {})
    if not spec:
        return AutoModelForCausalLM.from_pretrained(name_or_path, *args, config=config, **kwargs)
    kind = spec.pop("kind")
    if kind == "nsa":
        from ..nsa.reference import NSAConfig

        spec["config"] = NSAConfig(**spec["config"])
    # the class the checkpoint was saved from (Qwen3.5's config maps to a causal LM and to the multimodal model)
    mappings = (AutoModelForCausalLM._model_mapping, AutoModelForImageTextToText._model_mapping)
    classes = [m[type(config)] for m in mappings if type(config) in m]
    if not classes:
        raise ValueError(f"{name_or_path}: a {type(config).__name__} is neither a causal LM's config nor a multimodal "
                         "model's (AutoModelForCausalLM, AutoModelForImageTextToText)")
    base = next((c for c in classes if c.__name__ in (getattr(config, "architectures", None) or ())), classes[0])

    class Swapped(base):
        def __init__(self, config, *a, **k):
            super().__init__(config, *a, **k)
            swap_attention(self, kind, **spec)

    # (named as the base, and of its module: transformers finds a class's checkpoint key conversions by them)
    Swapped.__name__, Swapped.__qualname__, Swapped.__module__ = base.__name__, base.__qualname__, base.__module__
    model = Swapped.from_pretrained(name_or_path, *args, config=config, **kwargs)
    model.__class__ = base  # a plain transformers class again (pickling, isinstance checks by name)
    return swap_attention(model, kind, **spec)  # the attention implementation, as the loading left it


__all__ = ["swap_attention", "from_pretrained", "KINDS"]
