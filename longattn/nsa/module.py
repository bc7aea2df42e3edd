"""NSA attention module: replaces the self-attention of a Llama/Qwen2-style transformers layer (and the like: Phi-3's
fused projection, OLMo-2's, Hunyuan's, Gemma 3's and LFM2's q/k norms, SmolLM3's, EXAONE-4's, Nemotron-H's and Jamba's
layers without RoPE, the gated output of Qwen3-Next's and Qwen3.5's full-attention layers, Falcon-H1's scaled keys,
gpt-oss's attention sinks, MiMo-V2-Flash's narrower values, Gemma 4's global layers, Gemma 3n's and StableLM's, Gemma
2's soft-capped logits, JetMoE's mixture of attention heads, AFMoE's and Laguna's gated outputs, Zamba2's attention
blocks shared by several layers: their adapters per layer, the cache's layer the index the model calls them with).

Parameters: the layer's q/k/v/o projections (shared, so their weights carry over; q/k norms and sinks too), a
learnable compressor per K and V (an intra-block position embedding plus a linear map of the flattened block,
initialised to mean pooling) and a sigmoid gate MLP (weights zero, biases -log 2: every gate starts at 1/3).

Prefill and training run :func:`longattn.nsa_attention`; left-padded batches and a row of packed sequences
(position_ids restarting at 0, or transformers' ``cu_seq_lens_q``) through its varlen layout, each sequence
compressed and attended on its own.
With a transformers cache, raw K/V live in that cache and the compressed K/V of the completed blocks of
each row in a side cache attached to it ((B, capacity, Hkv, D) tensors plus a count per row); decoding
runs :func:`longattn.nsa.nsa_decode`, which reads the compressed keys, the selected blocks and the window
only; a longer chunk after a cached prefix (more than NSA_DECODE_TOKENS new tokens a row: chunked prefill, a
conversation continued) runs :func:`longattn.nsa_attention` on its queries against the row's cached tokens.
"""
from __future__ import annotations

import inspect
import itertools
import math
import sys
from typing import Optional

import torch
from torch import nn

from ..hf.attention import (check_cache_supported, check_not_packed, mark_packed, mask_padding, packed_segments,
                            padding_runs, side_cache, static_cache_view)
from ..hf.cache import dequant_scale, dequantised
from ..kernels.utils import FLOAT8_DTYPES, device_tensor
from .ops import nsa_attention, nsa_decode
from .reference import NSAConfig

# new tokens per row up to which a call after a cached prefix runs nsa_decode (each token a query row of its own,
# reading the cache in place); longer chunks run nsa_attention on their queries, whose programs share each loaded
# block among many queries, on each row's tokens gathered into the varlen layout (a copy of the cached K/V)
NSA_DECODE_TOKENS = 16


def _reorder_compressed(store: dict, beam_idx: torch.Tensor) -> None:
    """Beam search reordered the cache's rows: the compressed blocks and their counts follow."""
    order = beam_idx.tolist()
    for layer in store.values():
        idx = beam_idx.to(layer["k"].device)
        layer["k"], layer["v"] = layer["k"].index_select(0, idx), layer["v"].index_select(0, idx)
        layer["n"] = [layer["n"][i] for i in order]


def _query_rows(cache, pairs: list, lens: list, B: int, T: int, L: int, device) -> tuple:
    """nsa_decode's per-query-row tensors for the real new tokens ``pairs`` ((row, token) of B rows of T new tokens,
    rows of ``lens`` real tokens in a cache of L): the rows picked from the B * T (None when all are), each one's
    cache row (None for one token a row), length and offset. Every layer of a forward asks for the same ones: they
    are made (copied to the device) once and kept on the transformers cache until the next ask differs."""
    key = (tuple(lens), T, L, B, len(pairs), str(device))
    kept = cache.__dict__.get("_longattn_nsa_rows")
    if kept is not None and kept[0] == key:
        return kept[1]
    whole = len(pairs) == B * T
    made = (None if whole else device_tensor([b * T + i for b, i in pairs], torch.long, device),
            device_tensor([b for b, _ in pairs], torch.int32, device) if T > 1 or not whole else None,
            device_tensor([lens[b] - T + i + 1 for b, i in pairs], torch.int32, device),
            device_tensor([L - lens[b] for b, _ in pairs], torch.int32, device))
    cache.__dict__["_longattn_nsa_rows"] = (key, made)
    return made


def _rotates(attn: nn.Module) -> bool:
    """Whether transformers attention ``attn`` applies RoPE: not SmolLM3's NoPE layers (``use_rope`` False), the
    full-attention layers of EXAONE-4 / EXAONE-MoE, Kolibri and Command R7B / A (Cohere2, Cohere2-MoE, unless
    ``force_rope``) beside sliding-window ones, AFMoE's and Flint's full-attention layers, nor an attention that takes
    no position embeddings (Nemotron-H's, Jamba's)."""
    name = type(attn).__name__
    if not getattr(attn, "use_rope", True):
        return False
    if name in ("Exaone4Attention", "ExaoneMoeAttention", "Kolibri1Attention") and attn.sliding_window is not None \
            and not attn.is_sliding:
        return False
    if name in ("Cohere2Attention", "Cohere2MoeAttention") and attn.sliding_window is None and not getattr(
            attn, "force_rope", False):
        return False
    if name == "AfmoeAttention" and not attn.is_local_attention or name == "FlintAttention" and \
            attn.sliding_window is None:  # (their global layers: NoPE)
        return False
    return "position_embeddings" in inspect.signature(type(attn).forward).parameters


class NativeSparseAttention(nn.Module):
    """Drop-in replacement of a transformers self-attention ``attn`` (of a model type in
    ``longattn.hf.swap.NSA_ARCHS``; ``swap_attention(model, "nsa")`` builds one per layer) by NSA under ``config``
    (default: the paper's, :class:`NSAConfig`). Keeps ``attn``'s projections and q/k norms (same parameter names:
    their weights are shared), attention sinks (gpt-oss's ``sinks``, in each branch's softmax), scale and RoPE
    function; adds ``k_pos`` / ``v_pos`` (cmp_block, head_dim / v_head_dim), the
    compressors ``k_compress`` / ``v_compress`` (Linear cmp_block * d -> d of keys / values, mean pooling at first)
    and ``gate`` (Linear hidden -> 3 * heads, weights zero: every gate 1/3 at first), in the dtype and on the device of
    ``attn``'s weights. ``forward`` takes what the model's decoder layer passes its attention (hidden states
    (B, T, hidden), RoPE's (cos, sin), a 2-D padding mask or None, the transformers cache) and returns
    ``(output (B, T, hidden), None)``."""

    def __init__(self, attn: nn.Module, config: NSAConfig = NSAConfig()):
        super().__init__()
        hf_cfg = attn.config
        self.config = hf_cfg
        self.nsa = config
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        # values narrower than the keys (MiMo-V2-Flash: 128 against 192), scaled after their projection
        self.v_head_dim = getattr(attn, "v_head_dim", None) or self.head_dim
        scale = getattr(attn, "v_scale", 1.0)  # (a number: not a quantised cache's per-tensor scale of that name)
        self._value_scale = float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else 1.0
        # (the layer's own count where it keeps one: Laguna's differ from layer to layer)
        heads = getattr(attn, "num_heads", None)
        self.num_heads = heads if isinstance(heads, int) and heads > 0 else hf_cfg.num_attention_heads
        # the layer's own KV heads where it says (Gemma 4's global layers, MiMo-V2-Flash's sliding ones: not the
        # config's count)
        groups = getattr(attn, "num_key_value_groups", None)
        self.num_kv_heads = self.num_heads // groups if isinstance(groups, int) and groups > 0 else \
            hf_cfg.num_key_value_heads
        # a mixture of attention heads (JetMoE): its experts map each token to top_k slots of queries (a head per KV
        # head each, query head e * Hkv + j attending to KV head j) and reduce the heads' outputs, gated, back to the
        # hidden size; keys and values from kv_proj
        moa = getattr(attn, "experts", None)
        self._moa_slots = attn.top_k if hasattr(moa, "map") and hasattr(moa, "reduce") else None
        if self._moa_slots:
            self.experts, self.kv_proj = moa, attn.kv_proj
            self.num_kv_heads = attn.num_key_value_heads
            if self.num_heads != self._moa_slots * self.num_kv_heads:
                raise ValueError(f"{type(attn).__name__}: {self.num_heads} query heads, expected top_k x KV heads = "
                                 f"{self._moa_slots} x {self.num_kv_heads}")
        if getattr(attn, "is_kv_shared_layer", False):
            raise ValueError(f"NativeSparseAttention does not take the keys and values of another layer; this "
                             f"{type(attn).__name__} (layer {attn.layer_idx}) does (KV-shared layers: Gemma 4 E2B / "
                             "E4B, Gemma 3n)")
        # the last layer of its type before KV-shared layers hands its keys and values on to them (Gemma 4, Gemma 3n:
        # shared_kv_states; Gemma 4 also where no layer shares them, for assistant models)
        self._shares_kv = getattr(attn, "store_full_length_kv", False)
        # (under the layer's type; before transformers 5.24 Gemma 3n's under the layer's index, which the layers
        # that take them name as their kv_shared_layer_index)
        self._kv_key = attn.layer_idx if hasattr(attn, "kv_shared_layer_index") else \
            getattr(attn, "layer_type", None) or "full_attention"
        if getattr(attn, "is_causal", True) is False:
            raise ValueError(f"NativeSparseAttention replaces causal attention; this {type(attn).__name__} is "
                             "bidirectional")
        # attention logits soft-capped (Gemma 2, VaultGemma: cap * tanh(scores / cap)), in every branch
        cap = getattr(attn, "attn_logit_softcapping", getattr(hf_cfg, "attn_logit_softcapping", None))
        self.softcap = float(cap) if cap else None
        self.scaling = attn.scaling
        self.is_causal = True
        # a full-attention layer, as decoder layers and models may ask (OLMo-3 under transformers 4.57 picks the mask
        # and RoPE of each layer by its attention's attention_type)
        self.attention_type, self.is_sliding, self.sliding_window = "full_attention", False, None
        # the layer's projections (Phi-3: q, k and v as one, qkv_proj; LFM2's output projection out_proj) and q/k
        # norms, kept under their names with their weights: before RoPE per head (Qwen3; LFM2's q_layernorm /
        # k_layernorm) or over all the heads' dims at once (OLMo-2, MiniMax-M2: a norm of H * D values), after RoPE per
        # head (Hunyuan's query_layernorm / key_layernorm); a norm of the values per head (Gemma 4's v_norm)
        for name in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "out_proj", "q_norm", "k_norm",
                     "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm", "v_norm"):
            setattr(self, name, getattr(attn, name, None))
        # values that are the keys' projection (Gemma 4's global layers with attention_k_eq_v: no v_proj), normed
        self._values_are_keys = self.k_proj is not None and self.v_proj is None and self.qkv_proj is None
        self._out_name = "o_proj" if self.o_proj is not None else "out_proj"
        self._norm_names = ("q_norm", "k_norm") if self.q_norm is not None else (
            ("q_layernorm", "k_layernorm") if self.q_layernorm is not None else None)
        norm = getattr(self, self._norm_names[0]) if self._norm_names else None
        # a norm module per head, on (B, H, T, D) (StableLM's qk_layernorm)
        self._norm_modules_per_head = isinstance(getattr(norm, "norms", None), nn.ModuleList)
        weight = getattr(norm, "weight", None)
        self._norms_across_heads = (weight is not None and  # (Command R's per head: weights (H, D))
                                    weight.shape[-1] != self.head_dim)
        # attention sinks (gpt-oss: a learned logit per head), in the softmax of each branch
        self.sinks = getattr(attn, "sinks", None)
        # partial rotary done by the attention itself, on the first rotary_ndims dims of each head (StableLM; other
        # models' rotary functions take the whole head and rotate the part their tables cover)
        self._rotary_dims = getattr(attn, "rotary_ndims", None)
        # keys scaled after their projection (Falcon-H1)
        self._key_multiplier = getattr(attn, "key_multiplier", None)
        # a gated output (Qwen3-Next, Qwen3.5): q_proj gives each head its query and a gate, side by side, and the
        # attention's output is multiplied by the gate's sigmoid before o_proj
        self._output_gate = (self.q_proj is not None and
                             getattr(self.q_proj, "out_features", None) == 2 * self.num_heads * self.head_dim)
        self._use_rope = _rotates(attn)  # (and where the model passes position embeddings: not Granite 4.0's NoPE)
        # Llama 4's global layers (no RoPE) scale their queries by position (temperature tuning): by
        # 1 + attn_scale * log(1 + floor((t + 1) / floor_scale)) at cache position t
        self._temperature = ((attn.attn_scale, attn.floor_scale) if getattr(attn, "attn_temperature_tuning", False)
                             and not self._use_rope else None)
        # Zamba2's attention blocks, each shared by several layers: low-rank adapters added to their q/k/v projections,
        # one per layer the block serves (by the model's layer index: layer_dic), kept under their names
        self._adapter_slots = getattr(attn, "layer_dic", None) if getattr(
            hf_cfg, "use_shared_attention_adapter", False) else None
        if self._adapter_slots is not None:
            for name in ("linear_q_adapter_list", "linear_k_adapter_list", "linear_v_adapter_list"):
                setattr(self, name, getattr(attn, name))
        # a norm of the attention's output before o_proj (BitNet)
        self.attn_sub_norm = getattr(attn, "attn_sub_norm", None)
        # a gate on the attention's output from a projection of its own: AFMoE's sigmoid of gate_proj (per value),
        # Laguna's softplus of g_proj (per head, or per value)
        name = type(attn).__name__
        self.gate_proj = attn.gate_proj if name == "AfmoeAttention" else None
        self.g_proj = attn.g_proj if name == "LagunaAttention" else None
        # the new parameters in the layer's compute dtype: its output projection's weights', or where those are packed
        # integers (BitNet's BitLinear) the dtype the layer computes in
        out_proj = getattr(self, self._out_name) if not self._moa_slots else self.kv_proj
        dtype, device = out_proj.weight.dtype, out_proj.weight.device
        if not dtype.is_floating_point:
            dtype = getattr(out_proj, "dtype", None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"{type(attn).__name__}'s {self._out_name} holds {out_proj.weight.dtype} weights and "
                                 "names no floating-point dtype it computes in: NSA's parameters need one")
        l = config.cmp_block
        for name, d in (("k", self.head_dim), ("v", self.v_head_dim)):
            setattr(self, f"{name}_pos", nn.Parameter(torch.zeros(l, d, dtype=dtype, device=device)))
            lin = nn.Linear(l * d, d, bias=False, dtype=dtype, device=device)
            with torch.no_grad():  # (d, l*d): the mean over the block
                lin.weight.copy_(torch.eye(d, dtype=dtype, device=device).repeat(1, l) / l)
            setattr(self, f"{name}_compress", lin)
        # (on the attention's input: Zamba2's is twice the model's width, the hidden states and the embeddings)
        width = getattr(attn, "attention_hidden_size", None) or hf_cfg.hidden_size
        self.gate = nn.Linear(width, 3 * self.num_heads, dtype=dtype, device=device)
        # every gate 1/3 at first: the gated sum an average of the branches, at the scale of the attention replaced
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, -math.log(2.0))
        self._rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if self._use_rope and self._rope is None:  # (transformers 4's Qwen2-VL: a rotary function of its own)
            raise ValueError(f"NativeSparseAttention applies RoPE by its model's apply_rotary_pos_emb, which "
                             f"{type(attn).__module__} does not have")
        if self._rope is not None and next(iter(inspect.signature(self._rope).parameters)) == "x":
            one = self._rope  # (Gemma 4's rotates one tensor at a time)
            self._rope = lambda q, k, cos, sin: (one(q, cos, sin), one(k, cos, sin))

    def compress(self, x: torch.Tensor, pos: torch.Tensor, lin: nn.Linear, first: int = 0,
                 last: Optional[int] = None) -> torch.Tensor:
        """Compressed blocks ``first .. last - 1`` (default: all complete blocks) of x (B, T, H, D) ->
        (B, n, H, D): the learnable compressor of each block ``[j*d, j*d + l)``."""
        cfg = self.nsa
        last = cfg.num_cmp_blocks(x.shape[1]) if last is None else last
        if last <= first:
            return x.new_zeros(x.shape[0], 0, *x.shape[2:])
        span = dequantised(x[:, first * cfg.cmp_stride:(last - 1) * cfg.cmp_stride + cfg.cmp_block], pos.dtype)
        blocks = span.unfold(1, cfg.cmp_block, cfg.cmp_stride).permute(0, 1, 2, 4, 3) + pos  # (B, n, H, l, D)
        return lin(blocks.flatten(-2))

    def _compress_segments(self, x: torch.Tensor, pos: torch.Tensor, lin: nn.Linear, segments: list) -> torch.Tensor:
        """The compressed blocks of every segment (row, start, length) of x (B, T, H, D), one segment after another:
        (their total block count, H, D), from one gather and one linear map (a packed row may hold thousands of
        sequences: no loop over them on the device)."""
        cfg = self.nsa
        rows, starts = [], []
        for b, s, n in segments:
            m = cfg.num_cmp_blocks(n)
            rows += [b] * m
            starts += range(s, s + m * cfg.cmp_stride, cfg.cmp_stride)
        dev = x.device
        tok = device_tensor(starts, torch.long, dev)[:, None] + torch.arange(cfg.cmp_block, device=dev)  # (N, l)
        blocks = x[device_tensor(rows, torch.long, dev)[:, None], tok].transpose(1, 2) + pos  # (N, H, l, D)
        return lin(blocks.flatten(-2))

    def _project(self, hidden_states: torch.Tensor, layer: int):
        """q (B, H, T, D), k (B, Hkv, T, D) and v (B, Hkv, T, Dv) of the layer's projections and q/k norms, before
        RoPE, the output gate's logits (B, T, H * D) (None without one) and a mixture of attention heads' routing
        (None without one)."""
        B, T = hidden_states.shape[:2]
        H, Hkv, D, Dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        gate = routing = None
        if self._moa_slots:  # (the query heads grouped by KV head, NSA's GQA layout: head j * top_k + e)
            q, _, routing = self.experts.map(hidden_states)  # (B, T, top_k, Hkv * D)
            q = q.view(B, T, self._moa_slots, Hkv, D).transpose(2, 3).reshape(B, T, H * D)
            k, v = self.kv_proj(hidden_states).chunk(2, -1)
        elif self.qkv_proj is not None:
            q, k, v = self.qkv_proj(hidden_states).split([H * D, Hkv * D, Hkv * Dv], -1)
        else:
            q, k = self.q_proj(hidden_states), self.k_proj(hidden_states)
            v = k if self._values_are_keys else self.v_proj(hidden_states)
        if self._adapter_slots is not None:  # (Zamba2: the adapters of the layer calling the shared block)
            i = self._adapter_slots[layer]
            q = q + self.linear_q_adapter_list[i](hidden_states)
            k = k + self.linear_k_adapter_list[i](hidden_states)
            v = v + self.linear_v_adapter_list[i](hidden_states)
        if self._output_gate:
            q, gate = q.view(B, T, H, 2 * D).chunk(2, -1)
            q, gate = q.reshape(B, T, H * D), gate.reshape(B, T, H * D)
        q_norm, k_norm = (getattr(self, n) for n in self._norm_names) if self._norm_names else (None, None)
        if self._norms_across_heads:
            q, k = q_norm(q), k_norm(k)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, Dv)
        if self.v_norm is not None:
            v = self.v_norm(v)
        if self._value_scale != 1.0:
            v = v * self._value_scale
        if q_norm is not None and not self._norms_across_heads and not self._norm_modules_per_head:
            q, k = q_norm(q), k_norm(k)
        if self._key_multiplier is not None:
            k = k * self._key_multiplier
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self._norm_modules_per_head:
            q, k = q_norm(q), k_norm(k)
        return q, k, v, gate, routing

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                attention_mask: Optional[torch.Tensor] = None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        B, T = hidden_states.shape[:2]
        H = self.num_heads
        # the cache's layer: the attention's own, or where an attention block serves several layers (Zamba2's shared
        # blocks) the index the model calls it with
        layer = kwargs.get("layer_idx")
        layer = self.layer_idx if layer is None else layer
        if isinstance(layer, int) and layer < 0:
            raise ValueError(f"this {type(self).__name__} stands for an attention block several layers share (its "
                             "layer_idx is -1): the model must name the layer calling it (layer_idx=)")
        q, k, v, out_gate, routing = self._project(hidden_states, layer)
        if self._use_rope and position_embeddings is not None:
            cos, sin = position_embeddings
            r = self._rotary_dims
            if r is not None:  # (StableLM: the attention hands its rotary function the first r dims of each head)
                q_rot, k_rot = self._rope(q[..., :r], k[..., :r], cos, sin)
                q, k = torch.cat([q_rot, q[..., r:]], -1), torch.cat([k_rot, k[..., r:]], -1)
            else:
                q, k = self._rope(q, k, cos, sin)
        if self.query_layernorm is not None:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        gates = torch.sigmoid(self.gate(hidden_states)).view(B, T, 3, H)
        if cache is not None:
            check_cache_supported(cache, "nsa")
        past = cache.get_seq_length(layer) if cache is not None else 0
        if self._temperature is not None:  # (by the cache's columns, padding included, as Llama 4 does)
            attn_scale, floor_scale = self._temperature
            t = torch.arange(past, past + T, device=q.device, dtype=torch.float32)
            q = (q * (torch.log1p(torch.floor((t + 1.0) / floor_scale)) * attn_scale + 1.0)[:, None]).to(q.dtype)
        if past:
            check_not_packed(cache, layer)
        if cache is not None:
            k, v = cache.update(k, v, layer)  # (B, Hkv, L, D) with the new tokens
        if self._shares_kv and kwargs.get("shared_kv_states") is not None:
            kwargs["shared_kv_states"][self._kv_key] = k, v
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T|L, H, D)
        k, v = static_cache_view(attention_mask, k, v)
        L = k.shape[1]
        if past == 0:  # (a float8 cache's keys and values widened: the prefill attends to them as the cache holds them)
            out = self._prefill(q, dequantised(k, q.dtype), dequantised(v, q.dtype), gates,
                                self._segments(attention_mask, kwargs, B, T), cache, layer)
        else:
            out = self._decode(q, k, v, gates, self._real_lengths(attention_mask, L, T), cache, layer)
        out = out.reshape(B, T, H * self.v_head_dim)
        if out_gate is not None:
            out = out * torch.sigmoid(out_gate)
        if self.gate_proj is not None:
            out = out * torch.sigmoid(self.gate_proj(hidden_states))
        if self.g_proj is not None:
            g = nn.functional.softplus(self.g_proj(hidden_states).float()).to(out.dtype)
            out = (out.view(B, T, H, -1) * g[..., None]).view(B, T, -1) if g.shape[-1] == H else out * g
        if self.attn_sub_norm is not None:
            out = self.attn_sub_norm(out)
        if routing is not None:  # (JetMoE's layer takes its attention's output, weights and router logits)
            slots = self._moa_slots
            out = out.view(B, T, self.num_kv_heads, slots, -1).transpose(2, 3).reshape(B, T, slots, -1)
            return self.experts.reduce(out, routing), None, None
        return getattr(self, self._out_name)(out), None

    @staticmethod
    def _real_lengths(mask, L: int, T: int) -> Optional[list]:
        """Real tokens per row under a left-padding mask (None without padding), for decoding (the new tokens of a
        row with fewer real tokens than them, a chunk of a padded prompt, are padding up to its real ones)."""
        padded, _, real = mask_padding(mask, L) if mask is not None and mask.dim() == 2 else (None, None, None)
        if padded is None:  # (read once per forward, not in every layer)
            return None
        if real is None:
            raise ValueError("NativeSparseAttention decodes after left padding only (each row's real tokens end at "
                             "the last position)")
        return real

    @staticmethod
    def _segments(mask, kwargs, B: int, T: int) -> Optional[list]:
        """(row, start, length) of each sequence of a prompt: one per row under a padding mask (left padding:
        batched generation; right padding: training batches), several in a packed row, None when every row is one
        whole sequence."""
        padded, _, real = mask_padding(mask, T) if mask is not None and mask.dim() == 2 else (None, None, None)
        if padded is not None:
            if real is not None:  # left padding
                return [(b, T - n, n) for b, n in enumerate(real)]
            return [(b, start, n) for b, (start, n) in enumerate(padding_runs(padded))]
        cu, lens = packed_segments(kwargs, B, T, T)
        return None if cu is None else [(0, s, n) for s, n in zip(itertools.accumulate([0] + lens), lens)]

    def _prefill(self, q, k, v, gates, segments, cache, layer: int):
        """``segments``: None when every row is one whole sequence, else (row, start, length) of each sequence (left
        padding: one per row, at its end; right padding: at its start; a packed row: several)."""
        B, T, H, D = q.shape
        g = [gates[:, :, i] for i in range(3)]
        if segments is None:
            kc = self.compress(k, self.k_pos, self.k_compress)
            vc = self.compress(v, self.v_pos, self.v_compress)
            if cache is not None:
                self._store(cache, layer, [kc[b] for b in range(B)], [vc[b] for b in range(B)])
            return nsa_attention(q, k, v, *g, config=self.nsa, k_cmp=kc, v_cmp=vc, scale=self.scaling,
                                 sinks=self.sinks, softcap=self.softcap)
        kc = self._compress_segments(k, self.k_pos, self.k_compress, segments)
        vc = self._compress_segments(v, self.v_pos, self.v_compress, segments)
        lens = [n for _, _, n in segments]
        cu = device_tensor([0] + list(itertools.accumulate(lens)), torch.int32, q.device)
        opts = dict(config=self.nsa, k_cmp=kc, v_cmp=vc, cu_seqlens=cu, scale=self.scaling, sinks=self.sinks,
                    softcap=self.softcap)
        if len(segments) > B:  # one packed row: its tokens are already the varlen layout
            if cache is not None:
                mark_packed(cache, layer)
            return nsa_attention(q[0], k[0], v[0], *(x[0] for x in g), **opts)[None]
        if cache is not None:
            counts = [self.nsa.num_cmp_blocks(n) for n in lens]
            self._store(cache, layer, list(kc.split(counts)), list(vc.split(counts)))
        sel = torch.zeros(B, T, dtype=torch.bool, device=q.device)
        for b, s, n in segments:
            sel[b, s:s + n] = True
        packed = nsa_attention(q[sel], k[sel], v[sel], *(x[sel] for x in g), **opts)
        out = packed.new_zeros(B, T, H, packed.shape[-1])
        out[sel] = packed
        return out

    def _store(self, cache, layer: int, kc: list, vc: list) -> None:
        """Keep each row's compressed blocks (kc[b], vc[b]: (n_b, Hkv, D)) on the transformers cache (as the blocks
        of its ``layer``), with room to grow."""
        counts = [c.shape[0] for c in kc]
        cap = max(counts) + 8
        pad = lambda parts: torch.stack([torch.cat([c.detach(), c.new_zeros(cap - c.shape[0], *c.shape[1:])])
                                         for c in parts])
        side_cache(cache, "_longattn_nsa", _reorder_compressed)[layer] = {"k": pad(kc), "v": pad(vc), "n": counts}

    def _compress_one_block(self, k, v, store, rows: list, starts: list) -> None:
        """Compress, for each row b of ``rows``, the block of cmp_block tokens at cache row ``starts[i]`` into its
        next compressed slot (``store["n"][b]``): one gather and one compression for all rows."""
        l = self.nsa.cmp_block
        dev = k.device
        rows_t = device_tensor(rows, torch.long, dev)
        tok = device_tensor(starts, torch.long, dev)[:, None] + torch.arange(l, device=dev)  # (R, l)
        slot = device_tensor([store["n"][b] for b in rows], torch.long, dev)
        for x, pos, lin, name in ((k, self.k_pos, self.k_compress, "k"), (v, self.v_pos, self.v_compress, "v")):
            if x.dtype in FLOAT8_DTYPES:  # (a float8 cache: gathered through its bytes, widened, dequantised)
                x = x.view(torch.uint8)[rows_t[:, None], tok].view(x.dtype).to(pos.dtype) * dequant_scale(x)
            else:
                x = x[rows_t[:, None], tok]
            blocks = x.permute(0, 2, 1, 3) + pos  # (R, H, l, D)
            store[name][rows_t, slot] = lin(blocks.flatten(-2))

    def _decode(self, q, k, v, gates, real, cache, layer: int):
        """New tokens after a cached prefix (one per row when decoding; a chunk, speculative tokens): up to
        NSA_DECODE_TOKENS a row in one :func:`nsa_decode` call, each token a query row of its own, more through
        :func:`nsa_attention` (see _chunk); the compressed cache is extended first with the blocks the new tokens
        complete."""
        cfg = self.nsa
        B, T = q.shape[:2]
        L = k.shape[1]
        lens = real if real is not None else [L] * B
        new = [min(T, n) for n in lens]  # each row's real new tokens (the last ones: left padding)
        store = cache._longattn_nsa[layer]
        # the blocks complete before these tokens are all the kept ones when decoding goes on; fewer when the cache
        # was cut back (assisted decoding rejecting draft tokens: transformers' cache.crop): those past them are
        # dropped, they were compressed from tokens no longer there
        store["n"] = [min(have, cfg.num_cmp_blocks(n - m)) for have, n, m in zip(store["n"], lens, new)]
        needs = [cfg.num_cmp_blocks(n) for n in lens]
        cap = store["k"].shape[1]
        if max(needs) > cap:  # grow the capacity geometrically (at least to what is needed)
            extra = max(max(needs), 2 * cap) - cap
            grow = lambda x: torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], 1)
            store["k"], store["v"] = grow(store["k"]), grow(store["v"])
        rows = [b for b in range(B) if needs[b] > store["n"][b]]
        if rows and all(needs[b] == store["n"][b] + 1 for b in rows):
            # a decoding step completes at most one block per row: all of them in one gather and compression
            self._compress_one_block(k, v, store, rows, [L - lens[b] + store["n"][b] * cfg.cmp_stride for b in rows])
        else:
            for b in rows:  # several new tokens: each row's new blocks
                have, need, n = store["n"][b], needs[b], lens[b]
                kb, vb = k[b:b + 1, L - n:], v[b:b + 1, L - n:]
                store["k"][b, have:need] = self.compress(kb, self.k_pos, self.k_compress, have, need)[0]
                store["v"][b, have:need] = self.compress(vb, self.v_pos, self.v_compress, have, need)[0]
        for b in rows:
            store["n"][b] = needs[b]
        if T > NSA_DECODE_TOKENS:
            return self._chunk(q, k, v, gates, lens, new, store)
        # real token i of row b is a query row reading cache row b with its own length: one call for all (padding
        # tokens, before a row's real ones in a chunk of a padded prompt, are left out: their outputs 0)
        pairs = [(b, i) for b in range(B) for i in range(T - new[b], T)]
        whole = len(pairs) == B * T
        q, gates = q.reshape(B * T, *q.shape[2:]), gates.reshape(B * T, *gates.shape[2:])
        if not pairs:
            return q.new_zeros(B, T, *q.shape[1:-1], v.shape[-1])
        pick, query_rows, seqlens, offsets = _query_rows(cache, pairs, lens, B, T, L, q.device)
        if not whole:
            q, gates = q[pick], gates[pick]
        # lengths, offsets and compressed blocks are this module's own bookkeeping, consistent by construction: no
        # check (it would synchronise with the GPU in every layer at every step)
        out = nsa_decode(q, k, v, store["k"], store["v"], *gates.unbind(1), cache_seqlens=seqlens,
                         cache_offsets=offsets, cache_rows=query_rows, config=cfg, scale=self.scaling,
                         sinks=self.sinks, softcap=self.softcap, k_scale=dequant_scale(k), v_scale=dequant_scale(v),
                         validate=False)
        if not whole:
            out = out.new_zeros(B * T, *out.shape[1:]).index_copy_(0, pick, out)
        return out.view(B, T, *out.shape[1:])

    def _chunk(self, q, k, v, gates, lens: list, new: list, store: dict):
        """A chunk after a cached prefix: nsa_attention on each row's real new tokens (the last ``new[b]``) against
        its ``lens[b]`` cached tokens (the last of the cache's L rows) and its compressed blocks, in the varlen
        layout; without gradients, as nsa_decode (the cache holds no autograd history). Padding tokens' outputs
        are 0."""
        B, T = q.shape[:2]
        L = k.shape[1]
        k, v = dequantised(k, q.dtype), dequantised(v, q.dtype)  # (a float8 cache: a copy)
        # each row's span of x, one after another (a view for a single row: its cache is not copied)
        gather = lambda x, spans: x[0, spans[0]] if B == 1 else torch.cat([x[b, s] for b, s in enumerate(spans)])
        keys = lambda x: gather(x, [slice(L - n, L) for n in lens])
        queries = lambda x: gather(x, [slice(T - n, T) for n in new])
        blocks = lambda x: gather(x, [slice(0, n) for n in store["n"]])
        dev = q.device
        cu_k = device_tensor([0, *itertools.accumulate(lens)], torch.int32, dev)
        cu_q = device_tensor([0, *itertools.accumulate(new)], torch.int32, dev)
        with torch.no_grad():
            out = nsa_attention(queries(q), keys(k), keys(v), *queries(gates).unbind(1), config=self.nsa,
                                k_cmp=blocks(store["k"]), v_cmp=blocks(store["v"]), cu_seqlens_q=cu_q,
                                cu_seqlens_k=cu_k, scale=self.scaling, sinks=self.sinks, softcap=self.softcap)
        if all(n == T for n in new):
            return out.view(B, T, *out.shape[1:])
        full = out.new_zeros(B, T, *out.shape[1:])
        for b, (n, part) in enumerate(zip(new, out.split(new))):
            full[b, T - n:] = part
        return full


__all__ = ["NativeSparseAttention"]
