"""MoBA: longattn end to end (gate + top-k + sparse attention + merge) vs dense SDPA flash and flex_attention."""
from __future__ import annotations

import argparse

from .common import (Results, attention_bytes, device_peaks, flex_selection, fwdbwd_flops, graph_ms, mode_list,
                     parse_ints, peak_memory_mb, require_cuda, roofline, time_ms)

COLUMNS = ["impl", "mode", "B", "T", "Hq", "Hkv", "D", "block", "topk", "density", "ms", "TFLOP/s", "x_sdpa_flash",
           "x_flex", "%roof", "peak_MB"]
PLOT = dict(x="T", y="ms", series="series", panels="mode", title="MoBA")


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--seqlens", default="8k,32k,128k")
    p.add_argument("--configs", default="512:3,4096:4", help="comma-separated block_size:topk pairs")
    p.add_argument("--tokens", type=int, default=131072, help="batch size is max(1, tokens // T)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--modes", default="fwd,fwdbwd", type=mode_list("fwd", "fwdbwd", "decode"),
                   help="fwd, fwdbwd, decode (one new token per sequence against a cache of T tokens: rows "
                        "decode_b<B>)")
    p.add_argument("--decode-batches", default="1,32")
    p.add_argument("--flex-max-seqlen", type=int, default=131072,
                   help="skip flex_attention above this T")
    p.add_argument("--out", default=None)


def _attended_pairs(sel, T, bs):
    """Pairs attended by each (query, head) from the selection (B, T, H, topk): full earlier blocks plus
    the causal part of the own block."""
    import torch

    pos = torch.arange(T, device=sel.device)
    own = pos // bs
    earlier = ((sel >= 0) & (sel != own[None, :, None, None])).sum(-1)  # (B, T, H)
    return int((earlier * bs).sum() + ((pos - own * bs + 1)[None, :, None] * torch.ones_like(earlier)).sum())


def run(args, argv=None) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longattn import moba_attention
    from longattn.moba import moba_block_selection

    dev = require_cuda()
    dtype = getattr(torch, args.dtype)
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    modes = args.modes
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",") if c.strip()]
    peaks = device_peaks(dev)
    rows = Results("moba", COLUMNS, argv, out_dir=args.out, plot=PLOT)

    def sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=hq != hkv).transpose(1, 2)

    for T in parse_ints(args.seqlens):
        if "decode" in modes:
            for B in parse_ints(args.decode_batches):
                for bs, topk in configs:
                    _decode_rows(rows, B, T, bs, topk, hq, hkv, d, dtype, args.dtype, dev, peaks)
        if not [m for m in modes if m != "decode"]:
            continue
        B = max(1, args.tokens // T)
        q = torch.randn(B, T, hq, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, hkv, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(B, T, hkv, d, device=dev, dtype=dtype, requires_grad=True)
        do = torch.randn(B, T, hq, d, device=dev, dtype=dtype)
        dense_pairs = T * (T + 1) // 2 * B * hq
        for bs, topk in configs:
            with torch.no_grad():
                sel = moba_block_selection(q, k, block_size=bs, topk=topk)
            pairs = _attended_pairs(sel, T, bs)
            impls = {"longattn": lambda q, k, v, bs=bs, topk=topk: moba_attention(q, k, v, block_size=bs, topk=topk),
                     "sdpa_flash": sdpa}
            if T <= args.flex_max_seqlen:
                try:
                    impls["flex"] = flex_selection(sel, bs, hq)
                except Exception as e:
                    print(f"  flex T={T} bs={bs}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            del sel
            for mode in (m for m in modes if m != "decode"):
                for name, fn in impls.items():
                    p = dense_pairs if name == "sdpa_flash" else pairs
                    flops = 4.0 * d * p if mode == "fwd" else fwdbwd_flops(4.0 * d * p, d, d)
                    call = (lambda fn=fn: fn(q, k, v)) if mode == "fwd" else (lambda fn=fn: fn(q, k, v).backward(do))
                    try:
                        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                            ms = time_ms(call, grad_to_none=[q, k, v])
                            mem = peak_memory_mb(call)
                    except Exception as e:
                        print(f"  {name} {mode} T={T}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                        continue
                    row = dict(op="moba", impl=name, series=f"{name} bs{bs}/top{topk}", mode=mode, B=B, T=T, Hq=hq,
                               Hkv=hkv, D=d, block=bs, topk=topk, density=pairs / dense_pairs, dtype=args.dtype,
                               ms=ms, **{"TFLOP/s": flops / ms / 1e9}, peak_MB=mem)
                    rows.append(roofline(row, attention_bytes(B, T, T, hq, hkv, d, d, mode), flops, peaks))
                    print(f"  {name:10s} {mode:7s} T={T} bs={bs} topk={topk}: {ms:.3f} ms")
        torch.cuda.empty_cache()
    _speedups(rows)
    out = rows.finish()
    print(f"results written to {out}")
    return rows


def _group_keys(q, k_mean, hkv: int, bs: int, topk: int, T: int) -> float:
    """Keys a decoding step reads per (sequence, KV head), on average: the own block and every block one of the
    group's heads selected (each read once for the group; heads that select apart, as on random inputs, make it
    more than ``topk`` blocks). The selection as moba_decode makes it: top ``topk - 1`` pooled keys per head."""
    import torch

    B, hq, _ = q.shape
    n_cand = k_mean.shape[1]
    ksel = min(topk - 1, n_cand)
    if ksel <= 0:
        return float(min(bs, T))
    scores = torch.einsum("bhd,bnhd->bhn", q.float(), k_mean.float().repeat_interleave(hq // hkv, dim=2))
    chosen = scores.topk(ksel, dim=-1).indices.view(B, hkv, -1).sort(-1).values
    distinct = 1 + (chosen[..., 1:] != chosen[..., :-1]).sum(-1)
    return min(float(1 + distinct.float().mean()) * bs, float(T))


def _speedups(rows):
    """x_<peer> = peer ms / longattn ms on the same (mode, T, block)."""
    by = {(r["mode"], r["T"], r["block"], r["impl"]): r["ms"] for r in rows}
    for r in rows:
        if r["impl"] == "longattn":
            for peer in ("sdpa_flash", "flex"):
                ms = by.get((r["mode"], r["T"], r["block"], peer))
                r[f"x_{peer}"] = ms / r["ms"] if ms else None


def _decode_rows(rows, B, T, bs, topk, hq, hkv, d, dtype, dtype_name, dev, peaks):
    """One new token per sequence against a transformers-layout cache (B, Hkv, T, D) of T tokens: moba_decode
    with the pooled keys kept by the caller (``longattn``, as after ``swap_attention(model, "moba")``), pooling
    every block at each step (``longattn_pool``, attn_implementation="moba" alone), the same replayed from a
    CUDA graph (``longattn_graph``: no host work), and dense SDPA over the whole cache."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longattn.moba import moba_decode
    from longattn.moba.ops import pool_cache_blocks

    if 2 * B * T * hkv * d * 2 > 16e9:
        print(f"  decode B={B} T={T}: skipped (cache above 16 GB)")
        return
    k = torch.randn(B, hkv, T, d, device=dev, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, hkv, T, d, device=dev, dtype=dtype).transpose(1, 2)
    q = torch.randn(B, hq, d, device=dev, dtype=dtype)
    seqlens = torch.full((B,), T, dtype=torch.int32, device=dev)
    offsets = torch.zeros(B, dtype=torch.int32, device=dev)
    n_cand = (T - 1) // bs
    k_mean = torch.empty(B, n_cand, hkv, d, device=dev, dtype=dtype)
    pool_cache_blocks(k, seqlens, offsets, bs, k_mean)
    keys = min(topk * bs, T)  # keys each head attends (the own block counts fully: a token at the end of a block)
    read = _group_keys(q, k_mean, hkv, bs, topk, T)  # keys each KV head's group reads
    kw = dict(cache_seqlens=seqlens, block_size=bs, topk=topk, validate=False)
    impls = {"longattn": (lambda: moba_decode(q, k, v, k_mean=k_mean, **kw), 2 * read + n_cand, False),
             "longattn_pool": (lambda: moba_decode(q, k, v, **kw), 2 * read + T, False),
             "longattn_graph": (lambda: moba_decode(q, k, v, k_mean=k_mean, **kw), 2 * read + n_cand, True)}
    if T % 64 == 0 and 2 * B * T * hkv * d * 2 <= 8e9:  # the cache copied into shuffled 64-token pages, from a graph
        kp, vp = (x.contiguous().view(B * T // 64, 64, hkv, d) for x in (k, v))
        table = torch.randperm(B * T // 64, device=dev).to(torch.int32).view(B, T // 64)
        impls["longattn_paged"] = (lambda: moba_decode(q, kp, vp, k_mean=k_mean, block_table=table, **kw),
                                   2 * read + n_cand, True)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                                  enable_gqa=hq != hkv)

    impls["sdpa_flash"] = (sdpa, 2 * T, False)
    for name, (fn, key_rows, graph) in impls.items():
        try:
            with torch.no_grad():
                ms = graph_ms(fn) if graph else time_ms(fn)
        except Exception as e:
            print(f"  {name} decode B={B} T={T}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        # key_rows: rows of D values read per (sequence, KV head): K and V of the keys read, and the pooled keys or
        # the keys pooled at this step
        bytes_ = 2 * B * hkv * d * key_rows
        flops = 4.0 * B * hq * d * (keys if name != "sdpa_flash" else T)
        row = dict(op="moba", impl=name, series=f"{name} bs{bs}/top{topk}", mode=f"decode_b{B}", B=B, T=T, Hq=hq,
                   Hkv=hkv, D=d, block=bs, topk=topk, density=keys / T, dtype=dtype_name, ms=ms,
                   **{"TFLOP/s": flops / ms / 1e9})
        rows.append(roofline(row, bytes_, flops, peaks))
        print(f"  {name:14s} decode B={B} T={T} bs={bs} topk={topk}: {ms:.3f} ms")
    torch.cuda.empty_cache()
