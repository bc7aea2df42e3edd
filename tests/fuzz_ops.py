"""Randomized comparison of the public ops against their references (a script, not part of the suite).

    python tests/fuzz_ops.py OP [--count N] [--seed S]   OP: flash, moba, nsa, moba_decode, nsa_decode, mla_decode,
                                                          flash_decode, mla_prefill

Each draw picks a combination of the features the suite's cases test one at a time (dtype, GQA group, head dims
with dv != dk, causal / window / chunks, soft caps, varlen with empty sequences, Tq != Tk, block sizes, top-k, NSA's
strides and forced blocks, cache offsets, page tables in random order, 1-4 query tokens, ...), runs the op through the
Triton kernels (the interpreter without a GPU, outputs poisoned with NaN before each launch) and compares the outputs
and gradients with the float32 reference. Prints each mismatch with its configuration; exits 1 if there was one.
Draws the op refuses with a ValueError (an invalid configuration) are counted, not compared.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the test harness's interpreter, as the suite runs it (before anything imports triton): outputs poisoned with NaN,
# bfloat16 computed as on a GPU, its lighter bookkeeping
import conftest  # noqa: E402, F401
import longattn  # noqa: E402
from helpers import rel_err, sorted_selection  # noqa: E402
from longattn.kernels.reference import attention_ref  # noqa: E402
from longattn.mla.reference import mla_decode_ref  # noqa: E402
from longattn.moba.reference import moba_attention_ref  # noqa: E402
from longattn.nsa import NSAConfig  # noqa: E402
from longattn.nsa.reference import nsa_attention_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _lengths(rng, varlen, n_seq, longest):
    """Sequence lengths: varlen ones may be 0 (not all), a padded batch's are equal and positive."""
    if not varlen:
        return [rng.randint(1, longest)] * n_seq
    lens = [rng.randint(0, longest) for _ in range(n_seq)]
    lens[0] = max(lens[0], 1 if sum(lens) == 0 else 0)
    return lens


def _inputs(shape_q, shape_k, hq, hkv, dk, dv, dtype):
    q = torch.randn(*shape_q, hq, dk, device=DEVICE, dtype=dtype)
    k = torch.randn(*shape_k, hkv, dk, device=DEVICE, dtype=dtype)
    v = torch.randn(*shape_k, hkv, dv, device=DEVICE, dtype=dtype)
    return q, k, v


def _grads(out, leaves, dout):
    return torch.autograd.grad(out, leaves, dout)


def _float_leaves(tensors):
    return [t.detach().float().requires_grad_() for t in tensors]


def draw_flash(rng, dtype, hq, hkv):
    dk = rng.choice([16, 32, 48, 64, 80])
    dv = rng.choice([dk, 16, 32])
    causal = rng.random() < 0.7
    window = rng.choice([None, None, 1, 7, 33, 100]) if causal else None
    varlen, n_seq = rng.random() < 0.5, rng.randint(1, 3)
    lq = _lengths(rng, varlen, n_seq, 150)
    lk = [max(a, rng.randint(1, 150)) for a in lq] if rng.random() < 0.3 else lq  # Tq <= Tk (bottom-right causal)
    if not causal and rng.random() < 0.5:
        lk = [rng.randint(1, 150) for _ in lq]
    if not varlen:
        lk = [lk[0]] * n_seq
    softcap = rng.choice([None, None, None, 0.5, 5.0, 30.0])
    chunks = {}
    if causal and window is None and rng.random() < 0.4:  # chunked attention, its chunking shifted per sequence
        offsets = [rng.choice([0, rng.randint(0, 70)]) for _ in lq]
        chunks = dict(chunk_size=rng.choice([1, 5, 16, 37, 64, 200]),
                      chunk_offsets=torch.tensor(offsets, dtype=torch.int32, device=DEVICE))
    cfg = dict(hq=hq, hkv=hkv, dk=dk, dv=dv, lq=lq, lk=lk, causal=causal, window=window, varlen=varlen,
               softcap=softcap, chunks={n: v if isinstance(v, int) else v.tolist() for n, v in chunks.items()})
    if varlen:
        q, k, v = _inputs((sum(lq),), (sum(lk),), hq, hkv, dk, dv, dtype)
        ref_kw = dict(cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk))
        kw = dict(ref_kw, max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    else:
        q, k, v = _inputs((n_seq, lq[0]), (n_seq, lk[0]), hq, hkv, dk, dv, dtype)
        kw = ref_kw = {}
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = longattn.flash_attention(*leaves, causal=causal, window=window, return_lse=True, softcap=softcap,
                                        **chunks, **kw)
    dout = torch.randn_like(out)
    ref_leaves = _float_leaves(leaves)
    out_r, lse_r = attention_ref(*ref_leaves, causal=causal, window=window, return_lse=True, softcap=softcap,
                                 **chunks, **ref_kw)
    checks = [("out", out, out_r, 1), ("lse", lse, lse_r, 1)]
    checks += [(f"d{n}", a, b, 2) for n, a, b in zip("qkv", _grads(out, leaves, dout),
                                                       _grads(out_r, ref_leaves, dout.float()))]
    return cfg, checks


def draw_moba(rng, dtype, hq, hkv):
    dk = rng.choice([16, 32, 64])
    dv = rng.choice([dk, 16])
    block, topk = rng.choice([16, 32, 64]), rng.randint(1, 4)
    varlen, n_seq = rng.random() < 0.5, rng.randint(1, 3)
    lens = _lengths(rng, varlen, n_seq, 200)
    softcap = rng.choice([None, None, None, 0.5, 5.0, 30.0])
    cfg = dict(hq=hq, hkv=hkv, dk=dk, dv=dv, lens=lens, block=block, topk=topk, varlen=varlen, softcap=softcap)
    shape = (sum(lens),) if varlen else (n_seq, lens[0])
    kw = dict(cu_seqlens=_cu(lens), softcap=softcap) if varlen else dict(softcap=softcap)
    leaves = [t.requires_grad_() for t in _inputs(shape, shape, hq, hkv, dk, dv, dtype)]
    out = longattn.moba_attention(*leaves, block_size=block, topk=topk, **kw)
    dout = torch.randn_like(out)
    # the reference on the op's own dtype: the gate's top-k then sees the same pooled keys (no near-tie flips)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out_r = moba_attention_ref(*ref_leaves, block_size=block, topk=topk, **kw)
    checks = [("out", out, out_r, 1)]
    checks += [(f"d{n}", a, b, 2) for n, a, b in zip("qkv", _grads(out, leaves, dout), _grads(out_r, ref_leaves, dout))]
    return cfg, checks


def draw_nsa(rng, dtype, hq, hkv):
    dk, dv = rng.choice([32, 64]), rng.choice([16, 32, 64])
    stride = rng.choice([8, 16])
    cmp_block = stride * rng.choice([1, 2])
    config = NSAConfig(cmp_block=cmp_block, cmp_stride=stride, slc_block=max(cmp_block, stride * rng.choice([2, 4])),
                       slc_topk=rng.randint(1, 5), window=rng.choice([16, 64, 512]), init_blocks=rng.randint(0, 1),
                       local_blocks=rng.randint(1, 2))  # may be refused (top-n below the forced blocks)
    varlen, n_seq = rng.random() < 0.5, rng.randint(1, 3)
    lens = _lengths(rng, varlen, n_seq, 300)
    cfg = dict(hq=hq, hkv=hkv, dk=dk, dv=dv, lens=lens, config=config, varlen=varlen)
    shape = (sum(lens),) if varlen else (n_seq, lens[0])
    kw = dict(cu_seqlens=_cu(lens)) if varlen else {}
    gates = [torch.rand(*shape, hq, device=DEVICE, dtype=dtype) for _ in range(3)]
    # attention sinks (in each branch's softmax) half the time, a head without one (-inf) among them
    sinks = None
    if rng.random() < 0.5:
        sinks = torch.randn(hq, device=DEVICE) * 2
        sinks[rng.randrange(hq)] = float("-inf")
    cfg["sinks"] = sinks is not None
    # soft-capped scores a quarter of the time (caps that do not flatten the compressed probabilities into ties)
    softcap = cfg["softcap"] = rng.choice([None, None, None, 2.0, 5.0, 30.0])
    leaves = [t.requires_grad_() for t in (*_inputs(shape, shape, hq, hkv, dk, dv, dtype), *gates)]
    sink_leaf = lambda: dict(sinks=sinks.clone().requires_grad_()) if sinks is not None else {}
    sink_kw = sink_leaf()
    out, sel = longattn.nsa_attention(*leaves, config=config, return_selection=True, softcap=softcap, **kw, **sink_kw)
    dout = torch.randn_like(out)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref_kw = sink_leaf()
    out_r, sel_r = nsa_attention_ref(*ref_leaves, config=config, return_selection=True, softcap=softcap, **kw,
                                     **ref_kw)
    checks = [("out", out, out_r, 1), ("selection", sorted_selection(sel), sorted_selection(sel_r), 0)]
    names = ["q", "k", "v", "g_cmp", "g_slc", "g_swa"] + (["sinks"] if sinks is not None else [])
    checks += [(f"d{n}", a, b, 3) for n, a, b in zip(names, _grads(out, leaves + list(sink_kw.values()), dout),
                                                      _grads(out_r, ref_leaves + list(ref_kw.values()), dout))]
    if rng.random() < 0.5:  # the last tokens of each sequence as a chunk of queries after a prefix
        rows = torch.zeros(*shape, 1, 1, device=DEVICE)  # 1 on the chunk's rows
        if varlen:
            lq = [rng.randint(0, n) for n in lens]
            ends = _cu(lens)[1:].tolist()
            picked = torch.cat([torch.arange(e - n, e) for n, e in zip(lq, ends)]).to(DEVICE)
            pick, kw = (lambda t: t[picked]), dict(cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lens))
            rows[picked] = 1
        else:
            c = rng.randint(1, lens[0])
            lq, pick, kw = [c] * n_seq, (lambda t: t[:, lens[0] - c:]), {}
            rows[:, lens[0] - c:] = 1
        chunk_leaves = [t.detach().clone().requires_grad_() for t in leaves]
        q, k, v, *g = chunk_leaves
        grad = rng.random() < 0.5  # with gradients (the chunk's rows' share of the whole call's) or without
        with torch.set_grad_enabled(grad):
            part, part_sel = longattn.nsa_attention(pick(q), k, v, *map(pick, g), config=config, return_selection=True,
                                                    sinks=sinks, softcap=softcap, **kw)
        cfg["chunk"], cfg["chunk_grad"] = lq, grad
        checks += [("chunk out", part, pick(out_r.detach()), 1),
                   ("chunk selection", sorted_selection(part_sel), sorted_selection(pick(sel_r)), 0)]
        if grad and part.numel():
            ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
            out_r = nsa_attention_ref(*ref_leaves, config=config, sinks=sinks, softcap=softcap,
                                      **(dict(cu_seqlens=_cu(lens)) if varlen else {}))
            checks += [(f"chunk d{n}", a, b, 3) for n, a, b in zip(
                ("q", "k", "v", "g_cmp", "g_slc", "g_swa"), _grads(part, chunk_leaves, pick(dout)),
                _grads(out_r, ref_leaves, dout * rows))]
    return cfg, checks


def _to_pages(k, v, lens, offsets, page, seed):
    """Row b's tokens of caches k/v (B, L, H, D) (offsets[b] .. + lens[b]) moved into pages of ``page`` tokens in
    random order, NaN where no token is, -1 in the block table past each length: (k_pages, v_pages, block_table)."""
    per = -(-k.shape[1] // page)
    n_pages = k.shape[0] * per + 2
    kp = torch.full((n_pages, page, *k.shape[2:]), float("nan"), device=k.device, dtype=k.dtype)
    vp = torch.full((n_pages, page, *v.shape[2:]), float("nan"), device=v.device, dtype=v.dtype)
    order = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed)).tolist()
    table = torch.full((k.shape[0], per), -1, dtype=torch.int32)
    for b, (n, o) in enumerate(zip(lens, offsets)):
        for j in range(-(-n // page)):
            p, used, t = order.pop(), min(page, n - j * page), o + j * page
            table[b, j] = p
            kp[p, :used], vp[p, :used] = k[b, t:t + used], v[b, t:t + used]
    return kp, vp, table.to(k.device)


def draw_moba_decode(rng, dtype, hq, hkv):
    dk = rng.choice([16, 32, 64])
    dv = rng.choice([dk, 16])
    batch, block, topk = rng.randint(1, 4), rng.choice([16, 32, 64]), rng.randint(1, 5)
    lens = [rng.randint(1, 300) for _ in range(batch)]
    offsets = [rng.randint(0, 20) for _ in range(batch)]
    L = max(n + o for n, o in zip(lens, offsets)) + rng.randint(0, 10)
    keep_means = rng.random() < 0.5
    page = rng.choice([0, 0, 8, 16])  # > 0: the tokens moved into a paged cache (block_table)
    softcap = rng.choice([None, None, None, 0.5, 5.0, 30.0])
    cfg = dict(hq=hq, hkv=hkv, dk=dk, dv=dv, lens=lens, offsets=offsets, L=L, block=block, topk=topk,
               keep_means=keep_means, page=page, softcap=softcap)
    k_cache = torch.randn(batch, L, hkv, dk, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(batch, L, hkv, dv, device=DEVICE, dtype=dtype)
    # a quantised cache (float8 with per-tensor scales) against the keys/values dequantised (kd, vd)
    (k_cache, v_cache), (kd, vd), scales = _maybe_quantised(rng, k_cache, v_cache, cfg)
    q = torch.randn(batch, hq, dk, device=DEVICE, dtype=dtype)
    k_mean = None
    if keep_means:
        k_mean = torch.zeros(batch, max(1, max((n - 1) // block for n in lens)), hkv, dk, device=DEVICE, dtype=dtype)
        for b in range(batch):
            for j in range((lens[b] - 1) // block):
                rows = kd[b, offsets[b] + j * block: offsets[b] + (j + 1) * block]
                k_mean[b, j] = rows.float().mean(0).to(dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    cache = dict(k_cache=k_cache, v_cache=v_cache,
                 cache_offsets=torch.tensor(offsets, dtype=torch.int32, device=DEVICE))
    if page:
        kp, vp, table = _to_pages(k_cache, v_cache, lens, offsets, page, rng.randint(0, 2 ** 31))
        cache = dict(k_cache=kp, v_cache=vp, block_table=table)
    out = longattn.moba_decode(q, cache.pop("k_cache"), cache.pop("v_cache"), cache_seqlens=seqlens, block_size=block,
                               topk=topk, k_mean=k_mean, softcap=softcap, **scales, **cache)
    checks = []
    for b in range(batch):  # the last row of the prefill reference on the sequence
        keys = slice(offsets[b], offsets[b] + lens[b])
        qs = torch.zeros(1, lens[b], hq, dk, device=DEVICE, dtype=dtype)
        qs[0, -1] = q[b]
        ref = moba_attention_ref(qs, kd[b:b + 1, keys], vd[b:b + 1, keys],
                                 block_size=block, topk=topk, softcap=softcap)
        checks.append((f"out[{b}]", out[b], ref[0, -1], 1))
    return cfg, checks


def _maybe_quantised(rng, k, v, cfg):
    """Three times in ten, the caches k / v quantised to float8 with per-tensor scales (recorded in cfg): ((k8, v8),
    their tokens dequantised in k's dtype (exact: a float8 value times a scale of at most two significant bits), the
    scales as the ops take them); else ((k, v), (k, v), {})."""
    if rng.random() >= 0.3:
        return (k, v), (k, v), {}
    fp8 = rng.choice([torch.float8_e4m3fn, torch.float8_e5m2])
    scales = dict(k_scale=rng.choice([0.25, 1.0, 3.0]), v_scale=rng.choice([0.5, 2.0, 0.75]))
    k8, v8 = (k.float() / scales["k_scale"]).to(fp8), (v.float() / scales["v_scale"]).to(fp8)
    cfg.update(cache=str(fp8), **scales)
    dequantised = (k8.float() * scales["k_scale"]).to(k.dtype), (v8.float() * scales["v_scale"]).to(v.dtype)
    return (k8, v8), dequantised, scales


def draw_nsa_decode(rng, dtype, hq, hkv):
    dk, dv = rng.choice([16, 32, 48, 64]), rng.choice([16, 32, 64])
    stride = rng.choice([8, 16])
    cmp_block = stride * rng.choice([1, 2])
    config = NSAConfig(cmp_block=cmp_block, cmp_stride=stride, slc_block=max(cmp_block, stride * rng.choice([2, 4])),
                       slc_topk=rng.randint(2, 6), window=rng.choice([1, 16, 64, 512]), init_blocks=rng.randint(0, 1),
                       local_blocks=rng.randint(1, 2))  # may be refused (top-n below the forced blocks)
    n_seq, chunk = rng.randint(1, 3), rng.choice([1, 1, 3])  # chunk > 1: the last tokens of each sequence (cache_rows)
    lens = [rng.randint(chunk, 300) for _ in range(n_seq)]
    offsets = [rng.randint(0, 20) for _ in range(n_seq)]
    L = max(n + o for n, o in zip(lens, offsets)) + rng.randint(0, 10)
    splits = rng.choice([None, 1, 2, 5])
    page = rng.choice([0, 0, 8, 24, 64])  # > 0: the tokens moved into a paged cache (block_table)
    cfg = dict(hq=hq, hkv=hkv, dk=dk, dv=dv, lens=lens, offsets=offsets, L=L, config=config, splits=splits, chunk=chunk,
               page=page)
    # caches NaN outside each sequence's tokens and blocks (nothing there may be read)
    k = torch.full((n_seq, L, hkv, dk), float("nan"), device=DEVICE, dtype=dtype)
    v = torch.full((n_seq, L, hkv, dv), float("nan"), device=DEVICE, dtype=dtype)
    n_cmp = [config.num_cmp_blocks(n) for n in lens]
    kc = torch.full((n_seq, max(n_cmp) + 1, hkv, dk), float("nan"), device=DEVICE, dtype=dtype)
    vc = torch.full((n_seq, max(n_cmp) + 1, hkv, dv), float("nan"), device=DEVICE, dtype=dtype)
    for b, (n, o, c) in enumerate(zip(lens, offsets, n_cmp)):
        k[b, o:o + n], v[b, o:o + n] = torch.randn(n, hkv, dk, device=DEVICE), torch.randn(n, hkv, dv, device=DEVICE)
        kc[b, :c], vc[b, :c] = torch.randn(c, hkv, dk, device=DEVICE), torch.randn(c, hkv, dv, device=DEVICE)
    # a quantised cache (float8 with per-tensor scales; the compressed keys in q's dtype) against the keys/values
    # dequantised (kd, vd)
    (k, v), (kd, vd), scales = _maybe_quantised(rng, k, v, cfg)
    rows = [b for b in range(n_seq) for _ in range(chunk)]
    seqs = [lens[b] - chunk + 1 + i for b in range(n_seq) for i in range(chunk)]
    q = torch.randn(len(rows), hq, dk, device=DEVICE, dtype=dtype)
    gates = [torch.rand(len(rows), hq, device=DEVICE, dtype=dtype) for _ in range(3)]
    sinks = torch.randn(hq, device=DEVICE, dtype=dtype) * 2 if rng.random() < 0.5 else None
    cfg["sinks"] = sinks is not None
    softcap = cfg["softcap"] = rng.choice([None, None, None, 2.0, 5.0, 30.0])
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)
    cache = dict(k_cache=k, v_cache=v, cache_offsets=i32([offsets[b] for b in rows]))
    if page:
        kp, vp, table = _to_pages(k, v, lens, offsets, page, rng.randint(0, 2 ** 31))
        cache = dict(k_cache=kp, v_cache=vp, block_table=table)
    out, sel = longattn.nsa_decode(q, cache.pop("k_cache"), cache.pop("v_cache"), kc, vc, *gates,
                                   cache_seqlens=i32(seqs), cache_rows=i32(rows) if chunk > 1 else None, config=config,
                                   num_splits=splits, sinks=sinks, softcap=softcap, return_selection=True, **scales,
                                   **cache)
    checks = []
    for r, (b, n) in enumerate(zip(rows, seqs)):  # the reference's last row on the sequence's first n tokens
        o, c = offsets[b], config.num_cmp_blocks(n)
        ref, sel_r = nsa_attention_ref(q[r, None, None].float(), kd[b, None, o:o + n].float(),
                                       vd[b, None, o:o + n].float(), *(g[r, None, None].float() for g in gates),
                                       k_cmp=kc[b, None, :c].float(), v_cmp=vc[b, None, :c].float(), config=config,
                                       sinks=None if sinks is None else sinks.float(), softcap=softcap,
                                       return_selection=True)
        checks += [(f"out[{r}]", out[r], ref[0, 0], 1),
                   (f"selection[{r}]", sorted_selection(sel[r]), sorted_selection(sel_r[0, 0]), 0)]
    return cfg, checks


def draw_mla_decode(rng, dtype, hq, hkv):
    heads, tokens, batch = rng.choice([1, 4, 16, 20, 64, 128]), rng.randint(1, 4), rng.randint(1, 4)
    rank, rope = rng.choice([(512, 64), (64, 16), (32, 16)])
    page, paged = rng.choice([16, 64]), rng.random() < 0.7
    lens = [rng.randint(tokens, 300) for _ in range(batch)]
    cfg = dict(heads=heads, tokens=tokens, batch=batch, rank=rank, rope=rope, page=page, lens=lens, paged=paged)
    q_latent = torch.randn(batch, tokens, heads, rank, device=DEVICE, dtype=dtype)
    q_rope = torch.randn(batch, tokens, heads, rope, device=DEVICE, dtype=dtype)
    table = None
    if paged:  # pages in random order, a spare page per sequence at random, unused entries 0 or -1
        pages = [-(-n // page) + rng.randint(0, 1) for n in lens]
        order = torch.randperm(sum(pages) + 3).tolist()
        table = torch.full((batch, max(pages)), rng.choice([0, -1]), dtype=torch.int32)
        for b in range(batch):
            table[b, :pages[b]] = torch.tensor(order[sum(pages[:b]):sum(pages[:b + 1])], dtype=torch.int32)
        table = table.to(DEVICE)
        cache = torch.randn(len(order), page, rank + rope, device=DEVICE, dtype=dtype)
    else:
        cache = torch.randn(batch, max(lens) + rng.randint(0, 5), rank + rope, device=DEVICE, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = (rank + rope) ** -0.5
    out, lse = longattn.mla_decode(q_latent, q_rope, cache, cache_seqlens=seqlens, block_table=table, scale=scale,
                                   return_lse=True)
    out_r, lse_r = mla_decode_ref(q_latent.float(), q_rope.float(), cache.float(), cache_seqlens=seqlens,
                                  block_table=table, scale=scale, kv_lora_rank=rank)
    return cfg, [("out", out, out_r, 1), ("lse", lse, lse_r, 1)]


def draw_mla_prefill(rng, dtype, hq, hkv):
    heads = rng.choice([1, 3, 4, 16])
    nope, rope, rank, dv = rng.choice([16, 32, 64]), rng.choice([8, 16, 32]), rng.choice([16, 48, 64]), \
        rng.choice([16, 32, 64])
    varlen, n_seq = rng.random() < 0.5, rng.randint(1, 3)
    lq = _lengths(rng, varlen, n_seq, 150)
    lk = [a + rng.randint(0, 80) for a in lq] if rng.random() < 0.5 else lq  # chunks after a cached prefix
    if not varlen:
        lk = [lk[0]] * n_seq
    chunk = rng.choice([16, 24, 64, 16384])  # prefixes of that many keys or more decompressed in pieces
    cfg = dict(heads=heads, nope=nope, rope=rope, rank=rank, dv=dv, lq=lq, lk=lk, varlen=varlen, prefix_chunk=chunk)
    shape_q, shape_k = ((sum(lq),), (sum(lk),)) if varlen else ((n_seq, lq[0]), (n_seq, lk[0]))
    x = [torch.randn(*shape, device=DEVICE, dtype=dtype) for shape in (
        (*shape_q, heads, nope), (*shape_q, heads, rope), (*shape_k, rank), (*shape_k, rope))]
    x += [torch.randn(heads, d, rank, device=DEVICE, dtype=dtype) / rank ** 0.5 for d in (nope, dv)]
    kw = dict(cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk)) if varlen else {}
    scale = (nope + rope) ** -0.5
    leaves = [t.requires_grad_() for t in x]
    out, lse = longattn.mla_prefill(*leaves, scale=scale, return_lse=True, prefix_chunk=chunk, **kw)
    dout = torch.randn_like(out)
    ref_leaves = _float_leaves(leaves)
    qn, qr, c, kr, w_uk, w_uv = ref_leaves
    k = torch.cat([torch.einsum("...r,hdr->...hd", c, w_uk), kr.unsqueeze(-2).expand(*kr.shape[:-1], heads, rope)], -1)
    v = torch.einsum("...r,hdr->...hd", c, w_uv)
    out_r, lse_r = attention_ref(torch.cat([qn, qr], -1), k, v, causal=True, scale=scale, return_lse=True, **kw)
    checks = [("out", out, out_r, 1), ("lse", lse, lse_r, 1)]
    names = ("q_nope", "q_rope", "c_kv", "k_rope", "w_uk", "w_uv")
    checks += [(f"d{n}", a, b, 2) for n, a, b in zip(names, _grads(out, leaves, dout),
                                                      _grads(out_r, ref_leaves, dout.float()))]
    return cfg, checks


def draw_flash_decode(rng, dtype, hq, hkv):
    batch, tokens = rng.randint(1, 4), rng.choice([1, 1, 2, 4, 7, 16])
    dk, dv = rng.choice([16, 32, 48, 64, 128, 192]), rng.choice([16, 32, 64, 128])
    page, paged = rng.choice([1, 7, 16, 64]), rng.random() < 0.6
    causal = rng.random() < 0.8
    window = rng.choice([None, None, 1, 17, 100]) if causal else None
    lens = [rng.randint(tokens, 300) for _ in range(batch)]
    offsets = [rng.randint(0, 40) for _ in range(batch)] if not paged and rng.random() < 0.5 else None
    softcap = rng.choice([None, None, None, 0.5, 5.0, 30.0])
    chunk, shifts = None, None
    if causal and window is None and rng.random() < 0.4:  # chunked attention, its chunking shifted per sequence
        chunk, shifts = rng.choice([1, 7, 16, 64, 130]), [rng.choice([0, rng.randint(0, 200)]) for _ in range(batch)]
    cfg = dict(batch=batch, tokens=tokens, dk=dk, dv=dv, page=page, paged=paged, causal=causal, window=window,
               lens=lens, offsets=offsets, softcap=softcap, chunk=chunk, shifts=shifts)
    keys = [torch.randn(n, hkv, dk, device=DEVICE, dtype=dtype) for n in lens]
    vals = [torch.randn(n, hkv, dv, device=DEVICE, dtype=dtype) for n in lens]
    table = offs = None
    if paged:  # pages in random order, unused entries 0 or -1
        per = [-(-n // page) for n in lens]
        order = torch.randperm(sum(per) + 3).tolist()
        kc = torch.randn(len(order), page, hkv, dk, device=DEVICE, dtype=dtype)
        vc = torch.randn(len(order), page, hkv, dv, device=DEVICE, dtype=dtype)
        table = torch.full((batch, max(per) + rng.randint(0, 2)), rng.choice([0, -1]), dtype=torch.int32)
        for b, n in enumerate(lens):
            for j in range(per[b]):
                p = table[b, j] = order.pop()
                kc[p, :min(page, n - j * page)] = keys[b][j * page:(j + 1) * page]
                vc[p, :min(page, n - j * page)] = vals[b][j * page:(j + 1) * page]
        table = table.to(DEVICE)
    else:
        o = offsets or [0] * batch
        kc = torch.randn(batch, max(a + n for a, n in zip(o, lens)) + rng.randint(0, 5), hkv, dk, device=DEVICE,
                         dtype=dtype)
        vc = torch.randn(*kc.shape[:3], dv, device=DEVICE, dtype=dtype)
        for b, (a, n) in enumerate(zip(o, lens)):
            kc[b, a:a + n], vc[b, a:a + n] = keys[b], vals[b]
        offs = torch.tensor(offsets, dtype=torch.int32, device=DEVICE) if offsets else None
    scales = {}
    if rng.random() < 0.3:  # a quantised cache: float8 with per-tensor scales, against the dequantised keys/values
        fp8 = rng.choice([torch.float8_e4m3fn, torch.float8_e5m2])
        scales = dict(k_scale=rng.choice([0.25, 1.0, 3.0]), v_scale=rng.choice([0.5, 2.0]))
        kc, vc = (kc.float() / scales["k_scale"]).to(fp8), (vc.float() / scales["v_scale"]).to(fp8)
        kd, vd = kc.float() * scales["k_scale"], vc.float() * scales["v_scale"]
        for b, n in enumerate(lens):  # the keys/values as the cache now holds them
            if paged:
                rows = table[b].clamp(min=0).long()
                keys[b], vals[b] = kd[rows].flatten(0, 1)[:n], vd[rows].flatten(0, 1)[:n]
            else:
                a = offsets[b] if offsets else 0
                keys[b], vals[b] = kd[b, a:a + n], vd[b, a:a + n]
        cfg.update(cache=str(fp8), **scales)
    q = torch.randn(batch, tokens, hq, dk, device=DEVICE, dtype=dtype)
    shifts = None if shifts is None else torch.tensor(shifts, dtype=torch.int32, device=DEVICE)
    out, lse = longattn.flash_decode(q, kc, vc, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                                     block_table=table, cache_offsets=offs, causal=causal, window=window,
                                     return_lse=True, softcap=softcap, chunk_size=chunk, chunk_offsets=shifts,
                                     **scales)
    refs = [attention_ref(q[b:b + 1].float(), keys[b][None].float(), vals[b][None].float(), causal=causal,
                          window=window, return_lse=True, softcap=softcap, chunk_size=chunk,
                          chunk_offsets=None if shifts is None else shifts[b:b + 1]) for b in range(batch)]
    return cfg, [("out", out, torch.cat([r[0] for r in refs]), 1), ("lse", lse, torch.cat([r[1] for r in refs]), 1)]


DRAWS = {"flash": draw_flash, "moba": draw_moba, "nsa": draw_nsa, "moba_decode": draw_moba_decode,
         "nsa_decode": draw_nsa_decode, "mla_decode": draw_mla_decode, "flash_decode": draw_flash_decode,
         "mla_prefill": draw_mla_prefill}


def mismatch(actual, expected, dtype, factor):
    """Why ``actual`` is not ``expected`` within the dtype's relative tolerance x factor (0: equal), or None.
    Gradients that are exactly 0 in exact arithmetic (a window of 1) are compared absolutely."""
    if factor == 0:
        return None if torch.equal(actual, expected) else "differs"
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    if not torch.equal(torch.isfinite(actual), finite):
        return "non-finite values where the reference has none (or the reverse)"
    a, e = actual[finite].double(), expected[finite].double()
    if e.numel() == 0 or (a - e).abs().max() <= 1e-4 * max(1.0, e.abs().max().item()):
        return None
    err = rel_err(a, e)
    return f"relative error {err:.3g}" if err > TOL[dtype] * factor else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=sorted(DRAWS))
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    failures = refused = 0
    for i in range(args.count):
        seed = args.seed * 100_000 + i
        rng = random.Random(seed)
        torch.manual_seed(seed)
        dtype, hkv, group = rng.choice(dtypes), rng.choice([1, 2]), rng.choice([1, 2, 4, 16])
        try:
            cfg, checks = DRAWS[args.op](rng, dtype, hkv * group, hkv)
        except ValueError as e:
            refused += 1
            print(f"draw {i} (seed {seed}): refused: {e}")
            continue
        for name, actual, expected, factor in checks:
            why = mismatch(actual, expected, dtype, factor)
            if why:
                failures += 1
                print(f"draw {i} (seed {seed}) {name}: {why}; {dtype} {cfg}", flush=True)
    print(f"{args.op}: {args.count} draws, {refused} refused, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
