"""NSA attention module: replaces the self-attention of a Llama/Qwen2-style transformers layer.

Parameters: the layer's q/k/v/o projections (shared, so their weights carry over), a learnable
compressor per K and V (an intra-block position embedding plus a linear map of the flattened block,
initialised to mean pooling) and a sigmoid gate MLP (initialised to zero, so every gate starts at 0.5).

Prefill and training run :func:`longattn.nsa_attention` (left-padded batches through its varlen layout).
With a transformers cache, raw K/V live in that cache and the compressed K/V of the completed blocks of
each row in a side cache attached to it; decoding a token reads the compressed keys, the selected blocks
and the window only.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from .ops import nsa_attention
from .reference import NSAConfig


class NativeSparseAttention(nn.Module):
    def __init__(self, attn: nn.Module, config: NSAConfig = NSAConfig()):
        super().__init__()
        hf_cfg = attn.config
        self.config = hf_cfg
        self.nsa = config
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.num_heads = hf_cfg.num_attention_heads
        self.num_kv_heads = hf_cfg.num_key_value_heads
        self.scaling = attn.scaling
        self.is_causal = True
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, getattr(attn, name))
        w = attn.q_proj.weight
        d, l = self.head_dim, config.cmp_block
        self.k_pos = nn.Parameter(torch.zeros(l, d, dtype=w.dtype, device=w.device))
        self.v_pos = nn.Parameter(torch.zeros(l, d, dtype=w.dtype, device=w.device))
        mean = torch.eye(d, dtype=w.dtype, device=w.device).repeat(1, l) / l  # (d, l*d): mean over the block
        self.k_compress = nn.Linear(l * d, d, bias=False, dtype=w.dtype, device=w.device)
        self.v_compress = nn.Linear(l * d, d, bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            self.k_compress.weight.copy_(mean)
            self.v_compress.weight.copy_(mean)
        self.gate = nn.Linear(hf_cfg.hidden_size, 3 * self.num_heads, dtype=w.dtype, device=w.device)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self._rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def compress(self, x: torch.Tensor, pos: torch.Tensor, lin: nn.Linear, first: int = 0,
                 last: Optional[int] = None) -> torch.Tensor:
        """Compressed blocks ``first .. last - 1`` (default: all complete blocks) of x (B, T, H, D) ->
        (B, n, H, D): the learnable compressor of each block ``[j*d, j*d + l)``."""
        cfg = self.nsa
        last = cfg.num_cmp_blocks(x.shape[1]) if last is None else last
        if last <= first:
            return x.new_zeros(x.shape[0], 0, *x.shape[2:])
        span = x[:, first * cfg.cmp_stride:(last - 1) * cfg.cmp_stride + cfg.cmp_block]
        blocks = span.unfold(1, cfg.cmp_block, cfg.cmp_stride).permute(0, 1, 2, 4, 3) + pos  # (B, n, H, l, D)
        return lin(blocks.flatten(-2))

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask: Optional[torch.Tensor] = None,
                cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        B, T = hidden_states.shape[:2]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(hidden_states).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, T, Hkv, D).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, Hkv, D).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        gates = torch.sigmoid(self.gate(hidden_states)).view(B, T, 3, H)
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, L, D) with the new tokens
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T|L, H, D)
        L = k.shape[1]
        real = self._real_lengths(attention_mask, B, L, T)
        if past == 0:
            out = self._prefill(q, k, v, gates, real, cache)
        else:
            out = self._decode(q, k, v, gates, real, cache)
        return self.o_proj(out.reshape(B, T, H * D)), None

    @staticmethod
    def _real_lengths(mask, B: int, L: int, T: int) -> Optional[list]:
        """Real tokens per row under a left-padding mask (None without padding)."""
        if mask is None or mask.dim() != 2 or bool(mask.bool().all()):
            return None
        m = mask[:, -L:].bool()
        n = m.sum(1)
        pos = torch.arange(L, device=m.device)
        first = torch.where(m, pos, L).min(1).values
        if bool(((n > 0) & (first != L - n)).any()) or (T < L and bool((n < T).any())):
            raise ValueError("NativeSparseAttention supports left padding only (each row's real tokens end at the "
                             "last position, and every new token is real)")
        return n.tolist()

    def _prefill(self, q, k, v, gates, real, cache):
        B, T, H, D = q.shape
        lens = real if real is not None else [T] * B
        kc = [self.compress(k[b:b + 1, T - n:], self.k_pos, self.k_compress) for b, n in enumerate(lens)]
        vc = [self.compress(v[b:b + 1, T - n:], self.v_pos, self.v_compress) for b, n in enumerate(lens)]
        if cache is not None:
            if not hasattr(cache, "_longattn_nsa"):
                cache._longattn_nsa = {}
            cache._longattn_nsa[self.layer_idx] = [(a.detach(), b.detach()) for a, b in zip(kc, vc)]
        g = [gates[:, :, i] for i in range(3)]
        if real is None:
            return nsa_attention(q, k, v, *g, config=self.nsa, k_cmp=torch.cat(kc), v_cmp=torch.cat(vc),
                                 scale=self.scaling)
        sel = torch.zeros(B, T, dtype=torch.bool, device=q.device)
        for b, n in enumerate(lens):
            sel[b, T - n:] = True
        cu = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
        cu[1:] = torch.tensor(lens, device=q.device).cumsum(0)
        packed = nsa_attention(q[sel], k[sel], v[sel], *(x[sel] for x in g), config=self.nsa,
                               k_cmp=torch.cat([c[0] for c in kc]), v_cmp=torch.cat([c[0] for c in vc]),
                               cu_seqlens=cu, scale=self.scaling)
        out = packed.new_zeros(B, T, H, packed.shape[-1])
        out[sel] = packed
        return out

    def _decode(self, q, k, v, gates, real, cache):
        """New tokens after a cached prefix, one at a time: compressed keys (extended as blocks complete),
        the selected blocks and the window; nothing else of the cache is read."""
        cfg = self.nsa
        B, T = q.shape[:2]
        L = k.shape[1]
        lens = real if real is not None else [L] * B
        store = cache._longattn_nsa[self.layer_idx]
        rows = []
        for b, n in enumerate(lens):
            kb, vb = k[b:b + 1, L - n:], v[b:b + 1, L - n:]
            k_cmp, v_cmp = store[b]
            n_now = cfg.num_cmp_blocks(n)
            if n_now > k_cmp.shape[1]:  # blocks completed by the new tokens
                first = k_cmp.shape[1]
                k_cmp = torch.cat([k_cmp, self.compress(kb, self.k_pos, self.k_compress, first, n_now)], 1)
                v_cmp = torch.cat([v_cmp, self.compress(vb, self.v_pos, self.v_compress, first, n_now)], 1)
                store[b] = (k_cmp, v_cmp)
            rows.append(torch.stack([self._decode_one(q[b:b + 1, i], kb, vb, k_cmp, v_cmp, gates[b:b + 1, i],
                                                      n - T + i) for i in range(T)], 1))
        return torch.cat(rows, 0)

    def _decode_one(self, q, k, v, k_cmp, v_cmp, gates, t):
        """q (B, H, D) at position t; k/v (B, L, Hkv, D); returns (B, H, D)."""
        cfg, scale = self.nsa, self.scaling
        B, H, D = q.shape
        Hkv = k.shape[2]
        G = H // Hkv
        qf = q.float().view(B, Hkv, G, D)
        # compressed branch over the blocks that ended at or before t
        n_vis = cfg.num_cmp_blocks(t + 1)
        o_cmp = q.new_zeros(B, H, D, dtype=torch.float32)
        p_cmp = None
        if n_vis:
            kc, vc = k_cmp[:, :n_vis].float(), v_cmp[:, :n_vis].float()  # (B, n, Hkv, D)
            s = torch.einsum("bkgd,bnkd->bkgn", qf, kc) * scale
            p_cmp = torch.softmax(s, -1)
            o_cmp = torch.einsum("bkgn,bnkd->bkgd", p_cmp, vc).reshape(B, H, D)
        # selection scores (Eq. 9, summed over the group) and top-n
        n_slc = t // cfg.slc_block + 1
        scores = q.new_zeros(B, Hkv, n_slc, dtype=torch.float32)
        if p_cmp is not None:
            p = p_cmp.sum(2)  # (B, Hkv, n_vis): summed over the group's heads
            ratio = cfg.slc_block // cfg.cmp_stride
            for i, w in enumerate(cfg.score_weights().tolist()):
                idx = torch.arange(n_slc, device=q.device) * ratio - i
                ok = (idx >= 0) & (idx < n_vis)
                scores += w * torch.where(ok, p[..., idx.clamp(0, n_vis - 1)], torch.zeros((), device=q.device))
        blk = torch.arange(n_slc, device=q.device)
        own = t // cfg.slc_block
        forced = (blk < cfg.init_blocks) | (blk > own - cfg.local_blocks)
        scores = torch.where(forced, torch.full_like(scores, float("inf")), scores)
        n_take = min(cfg.slc_topk, n_slc)
        sel = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_take]  # (B, Hkv, n)
        tok = (sel[..., None] * cfg.slc_block + torch.arange(cfg.slc_block, device=q.device)).flatten(-2)
        valid = tok <= t
        tok = tok.clamp(max=t)
        gather = lambda x: torch.gather(x.float().permute(0, 2, 1, 3), 2, tok[..., None].expand(-1, -1, -1, D))
        ks, vs = gather(k), gather(v)  # (B, Hkv, n*bs, D)
        s = torch.einsum("bkgd,bknd->bkgn", qf, ks) * scale
        s = s.masked_fill(~valid[:, :, None], float("-inf"))
        o_slc = torch.einsum("bkgn,bknd->bkgd", torch.softmax(s, -1), vs).reshape(B, H, D)
        # sliding window
        lo = max(0, t - cfg.window + 1)
        kw, vw = k[:, lo:t + 1].float(), v[:, lo:t + 1].float()
        s = torch.einsum("bkgd,bnkd->bkgn", qf, kw) * scale
        o_swa = torch.einsum("bkgn,bnkd->bkgd", torch.softmax(s, -1), vw).reshape(B, H, D)
        g = gates.float()
        out = g[:, 0, :, None] * o_cmp + g[:, 1, :, None] * o_slc + g[:, 2, :, None] * o_swa
        return out.to(q.dtype)


__all__ = ["NativeSparseAttention"]
