"""MLA attention module for transformers' DeepSeek-V3 / V2 (and alike) models: prefill on decompressed K/V through
:func:`mla_prefill`, decoding in the absorbed form through :func:`mla_decode` over a paged latent cache
that holds only ``kv_lora_rank + qk_rope_head_dim`` values per token."""
from __future__ import annotations

import itertools
import sys
from typing import Optional

import torch
from torch import nn

from ..hf.attention import (check_cache_supported, check_not_packed, mark_packed, mask_padding, packed_segments,
                            side_cache)
from ..kernels.utils import FLOAT8_DTYPES, SUPPORTED_DTYPES, device_tensor
from .cache import PagedLatentCache, check_cache_scale, check_page_size
from .ops import MAX_QUERY_TOKENS, mla_decode, mla_prefill

# attentions whose rope part is not rotated (Kimi Linear's MLA layers: NoPE)
NOPE_ATTENTIONS = ("KimiLinearAttention",)
_SUBMODULES = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
               "o_proj")


def _reorder_latent(store: dict, beam_idx: torch.Tensor) -> None:
    """Beam search reordered the cache's rows: row i continues the sequence of row beam_idx[i] (copied, as a
    source row may continue in several rows), and the old sequences' pages are freed."""
    order = beam_idx.tolist()
    for state in store.values():
        pc, ids = state["pc"], state["ids"]
        state["ids"] = [pc.fork(ids[i]) for i in order]
        for sid in ids:
            pc.free(sid)


class MLAAttention(nn.Module):
    """Drop-in replacement of a transformers ``DeepseekV3Attention`` (or the same attention in another model:
    ``Glm4MoeLiteAttention``, ``YoutuAttention``; ``Mistral4Attention``, which also scales its queries by position;
    ``LongcatFlashMLA``, which scales its queries and latent by constants), ``DeepseekV2Attention``,
    ``MiniCPM3Attention`` or ``KimiLinearAttention`` (no rotation: ``position_embeddings`` not needed), sharing its
    weights (same parameter names, so state dicts load unchanged).

    With a transformers cache, the latent of every layer lives in a :class:`PagedLatentCache` (page size
    64) attached to that cache object; the transformers cache itself only counts tokens. Steps with at
    most 16 new tokens per sequence decode in the absorbed form; longer ones (prompts, chunked prefill)
    decompress the latent and run flash attention. A 2-D padding mask (left or right padding) is
    handled by keeping only real tokens in the latent cache. A row of packed sequences (position_ids
    restarting at 0, or transformers' ``cu_seq_lens_q``; training) runs each sequence on its own; a cache it
    filled cannot be decoded from.
    """

    def __init__(self, attn: nn.Module, page_size: int = 64, cache_dtype=None, cache_scale="auto"):
        super().__init__()
        cfg = attn.config
        self.config = cfg
        self.layer_idx = attn.layer_idx
        self.num_heads = attn.num_heads
        self.qk_nope_head_dim = attn.qk_nope_head_dim
        self.qk_rope_head_dim = attn.qk_rope_head_dim
        self.v_head_dim = attn.v_head_dim
        self.kv_lora_rank = attn.kv_lora_rank
        self.scaling = attn.scaling
        self.is_causal = True
        self.page_size = page_size
        self.set_cache_format(cache_dtype, cache_scale)
        for name in _SUBMODULES:
            setattr(self, name, getattr(attn, name, None))
        hf_module = sys.modules[type(attn).__module__]
        name = type(attn).__name__
        # DeepSeek-V2: the position embeddings are complex frequencies (rotating interleaved pairs); V3: (cos, sin),
        # on interleaved pairs where the config says so or the model has no other rotation (LongCat-Flash); Kimi
        # Linear: no rotation at all (NoPE), its rope part a shared key part like any other
        self._rope_freqs = name == "DeepseekV2Attention"
        interleave = getattr(cfg, "rope_interleave", False) or not hasattr(hf_module, "apply_rotary_pos_emb")
        self._rope = None if name in NOPE_ATTENTIONS else hf_module.apply_rotary_emb if self._rope_freqs else \
            hf_module.apply_rotary_pos_emb_interleave if interleave else hf_module.apply_rotary_pos_emb
        # LongCat-Flash: the queries and the normalised latent scaled by (hidden / LoRA rank)^0.5 (q's whole head,
        # before its rotation; the latent before it is cached): the same products with the scales folded in
        self._q_lora_scale = getattr(attn, "mla_scale_q_lora", None)
        self._kv_lora_scale = getattr(attn, "mla_scale_kv_lora", None)
        # Mistral 4: the queries scaled by their position (Llama 4's attention scale, the model's own function)
        self._query_scale = hf_module.get_llama_4_attn_scale if name == "Mistral4Attention" else None

    def _weights(self, like: torch.Tensor, state: Optional[dict] = None):
        """W_UK (H, Dn, R) and W_UV (H, Dv, R), the two parts of kv_b_proj's weight. A kv_b_proj other than a plain
        nn.Linear (a LoRA adapter, a quantised layer such as FP8 checkpoints' linear layers) gives its effective weight,
        the map of the identity (in ``like``'s dtype): its ``weight`` attribute alone would drop the adapter."""
        lin = self.kv_b_proj
        if type(lin) is nn.Linear:
            w = lin.weight
        else:
            # a (R x R) @ (R x H*(Dn+Dv)) product: kept without gradients in the layer's ``state`` on a transformers
            # cache (one generation's decoding steps) while the wrapper's tensors stay the same (in-place updates
            # change their versions); made anew for another cache (between generations adapters are switched on or
            # off, weights synchronised through .data) and for calls without one
            tensors = (*lin.parameters(), *lin.buffers())
            key = (like.dtype, like.device, tuple((t.data_ptr(), t._version) for t in tensors))
            kept = state.get("w") if state is not None else None
            if kept is not None and kept[0] == key and not torch.is_grad_enabled():
                w = kept[1]
            else:
                w = lin(torch.eye(self.kv_lora_rank, dtype=like.dtype, device=like.device)).T
                if state is not None and not torch.is_grad_enabled():
                    state["w"] = (key, w)
        w = w.reshape(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, :self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    @property
    def page_size(self) -> int:
        """Tokens per page of the latent cache: a power of two from 16 to 256 (default 64)."""
        return self._page_size

    @page_size.setter
    def page_size(self, value) -> None:
        self._page_size = check_page_size(value)

    def set_cache_format(self, cache_dtype=None, cache_scale="auto") -> None:
        """The latent cache's dtype (None: the model's; float16 / bfloat16 / float32 another, the decoding queries
        then taken in it; a float8 one quantises it, ``cache_scale`` its dequantisation scale: stored = latent /
        scale, ``"auto"`` calibrated on the prefill, see :class:`PagedLatentCache`; other scales refused for other
        dtypes), as a torch dtype or its name ("float8_e4m3fn")."""
        if isinstance(cache_dtype, str):
            cache_dtype = getattr(torch, cache_dtype.removeprefix("torch."), cache_dtype)
        if cache_dtype is not None and cache_dtype not in SUPPORTED_DTYPES + FLOAT8_DTYPES:
            raise TypeError(f"cache_dtype must be None, float16, bfloat16, float32, float8_e4m3fn or float8_e5m2, got "
                            f"{cache_dtype!r}")
        cache_scale = check_cache_scale(cache_scale, "cache_scale")
        if cache_scale != "auto" and cache_dtype not in FLOAT8_DTYPES:
            raise ValueError(f"cache_scale applies to a float8 latent cache (cache_dtype torch.float8_e4m3fn / "
                             f"float8_e5m2), got {cache_scale!r} with cache_dtype {cache_dtype!r}")
        self.cache_dtype, self.cache_scale = cache_dtype, cache_scale

    def _latent_cache(self, cache, batch: int, dtype, device):
        store = side_cache(cache, "_longattn_mla", _reorder_latent)
        state = store.get(self.layer_idx)
        if state is None:
            pc = PagedLatentCache(max(4, batch * 4), page_size=self.page_size, kv_lora_rank=self.kv_lora_rank,
                                  rope_dim=self.qk_rope_head_dim, dtype=self.cache_dtype or dtype, device=device,
                                  growable=True, scale=self.cache_scale)
            # seen: the transformers cache's length after this layer's last call
            state = store[self.layer_idx] = dict(pc=pc, ids=[pc.new_sequence() for _ in range(batch)], seen=0)
        return state

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                attention_mask: Optional[torch.Tensor] = None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        B, T = hidden_states.shape[:2]
        H, Dn, Dr = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if self.q_proj is not None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        if self._q_lora_scale is not None:
            q = q * self._q_lora_scale
        q = q.view(B, T, H, Dn + Dr).transpose(1, 2)
        q_nope, q_rot = q.split([Dn, Dr], -1)
        ckv = self.kv_a_proj_with_mqa(hidden_states)
        c_kv, k_rot = ckv.split([self.kv_lora_rank, Dr], -1)
        c_kv = self.kv_a_layernorm(c_kv)
        if self._kv_lora_scale is not None:
            c_kv = c_kv * self._kv_lora_scale
        if self._rope is not None:
            if position_embeddings is None:
                raise ValueError("this model's attention rotates its queries and keys: position_embeddings is "
                                 "required")
            pe = (position_embeddings,) if self._rope_freqs else position_embeddings
            q_rot, k_rot = self._rope(q_rot, k_rot.view(B, 1, T, Dr), *pe)
        if self._query_scale is not None:
            if kwargs.get("position_ids") is None:
                raise ValueError("this model's attention scales its queries by position: position_ids is required")
            rope = self.config.rope_parameters
            scale = self._query_scale(kwargs["position_ids"], rope.get("llama_4_scaling_beta"),
                                      rope.get("original_max_position_embeddings")).to(q_rot.dtype)  # (B, 1, T, 1)
            q_nope, q_rot = q_nope * scale, q_rot * scale
        q_nope, q_rot = q_nope.transpose(1, 2), q_rot.transpose(1, 2)  # (B, T, H, *)
        k_rot = k_rot.view(B, T, Dr)

        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("MLAAttention expects a 2-D padding mask; swap it in with longattn.hf.swap_attention")
        padded, _, real = mask_padding(attention_mask, T)  # read once per forward, not in every layer
        mask = None if padded is None else attention_mask[:, -T:].bool()
        lengths = [T] * B if mask is None else real if real is not None else mask.sum(1).tolist()
        state = None
        if cache is not None:
            check_cache_supported(cache, "mla")
            state = self._latent_cache(cache, B, c_kv.dtype, c_kv.device)
        w_uk, w_uv = self._weights(c_kv, state)

        if state is not None:
            pc, ids = state["pc"], state["ids"]
            cut = state["seen"] - cache.get_seq_length(self.layer_idx)
            if cut > 0:  # the cache was cut back (assisted decoding rejecting draft tokens: cache.crop): the latent too
                for sid in ids:
                    pc.truncate(sid, max(0, pc.seqlen(sid) - cut))
            has_past = any(pc.seqlen(i) > 0 for i in ids)
            if has_past:
                check_not_packed(cache, self.layer_idx)
            if mask is None:  # every token real: no boolean indexing (it synchronises with the GPU)
                pc.append(ids, c_kv.reshape(B * T, -1), k_rot.reshape(B * T, -1), lengths)
            else:
                pc.append(ids, c_kv[mask], k_rot[mask], lengths)
            # transformers' cache only counts tokens here: one value per token (with none, an empty tensor, its
            # get_seq_length reads 0, so a model called without position_ids would decode at position 0, and
            # reorder_cache leaves the layer alone)
            count = c_kv.new_zeros(B, 1, T, 1)
            cache.update(count, count, self.layer_idx)
            state["seen"] = cache.get_seq_length(self.layer_idx)
            seqlens = pc.seqlens(ids)
            if has_past and T <= MAX_QUERY_TOKENS and min(lengths) == T:  # (with padding: as a longer chunk)
                q_lat = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)
                if pc.kv.dtype not in (q_lat.dtype, *FLOAT8_DTYPES):  # (a 16 / 32-bit cache of another dtype)
                    q_lat, q_rot = q_lat.to(pc.kv.dtype), q_rot.to(pc.kv.dtype)
                # lengths and pages come from our own cache, consistent by construction: no check (it would
                # synchronise with the GPU in every layer at every step)
                o_lat = mla_decode(q_lat, q_rot, pc.kv, cache_seqlens=seqlens, block_table=pc.block_table(ids),
                                   scale=self.scaling, kv_scale=pc.scale, validate=False).to(q_nope.dtype)
                out = torch.einsum("bshr,hdr->bshd", o_lat, w_uv)
                return self.o_proj(out.reshape(B, T, H * self.v_head_dim)), None
            if has_past:  # a long chunk after a cached prefix: decompress the whole latent of each sequence
                return self._prefill_with_prefix(q_nope, q_rot, mask, lengths, pc, ids, w_uk, w_uv), None
        cu = packed_segments(kwargs, B, T, T)[0] if mask is None else None  # a row of packed sequences
        if cu is not None:
            if cache is not None:
                mark_packed(cache, self.layer_idx)
            out = mla_prefill(q_nope[0], q_rot[0], c_kv[0], k_rot[0], w_uk, w_uv, scale=self.scaling,
                              cu_seqlens=cu)[None]
        else:
            out = self._prefill(q_nope, q_rot, c_kv, k_rot, mask, lengths, w_uk, w_uv)
        return self.o_proj(out.reshape(B, T, H * self.v_head_dim)), None

    def _prefill(self, q_nope, q_rot, c_kv, k_rot, mask, lengths, w_uk, w_uv):
        if mask is None:
            return mla_prefill(q_nope, q_rot, c_kv, k_rot, w_uk, w_uv, scale=self.scaling)
        cu = device_tensor([0, *itertools.accumulate(lengths)], torch.int32, q_nope.device)
        packed = mla_prefill(q_nope[mask], q_rot[mask], c_kv[mask], k_rot[mask], w_uk, w_uv, scale=self.scaling,
                             cu_seqlens=cu)
        out = packed.new_zeros(*q_nope.shape[:3], self.v_head_dim)
        out[mask] = packed
        return out

    def _prefill_with_prefix(self, q_nope, q_rot, mask, lengths, pc, ids, w_uk, w_uv):
        B, T = q_nope.shape[:2]
        sel = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=q_nope.device)
        lens_k = [pc.seqlen(i) for i in ids]
        latent = pc.tokens(ids, q_nope.dtype)
        cu_q = device_tensor([0, *itertools.accumulate(lengths)], torch.int32, q_nope.device)
        cu_k = device_tensor([0, *itertools.accumulate(lens_k)], torch.int32, q_nope.device)
        packed = mla_prefill(q_nope[sel], q_rot[sel], latent[:, :self.kv_lora_rank], latent[:, self.kv_lora_rank:],
                             w_uk, w_uv, scale=self.scaling, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        out = packed.new_zeros(B, T, self.num_heads, self.v_head_dim)
        out[sel] = packed
        return self.o_proj(out.reshape(B, T, -1))


__all__ = ["MLAAttention"]
