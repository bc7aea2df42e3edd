"""Dense flash attention: longattn vs torch SDPA (flash and cuDNN backends) and flash-attn if installed; with
``--softcap`` (soft-capped scores, Gemma 2) vs flex_attention's score_mod and flash-attn's softcap (SDPA has none);
with ``--chunk-size`` (chunked attention, Llama 4's local layers) vs flex_attention with the chunks as its BlockMask
(neither SDPA nor flash-attn has chunks)."""
from __future__ import annotations

import argparse

from .common import (Results, attended_pairs, attention_bytes, device_peaks, fwdbwd_flops, graph_ms, mode_list,
                     parse_ints, peak_memory_mb, require_cuda, roofline, time_ms, without_tma)

COLUMNS = ["impl", "mode", "B", "T", "Hq", "Hkv", "D", "causal", "window", "softcap", "chunk", "ms", "TFLOP/s",
           "x_sdpa_flash", "x_sdpa_cudnn", "x_flash_attn", "x_flex", "%roof", "peak_MB"]
PLOT = dict(x="T", y="ms", series="impl", panels="mode", title="flash attention")


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--seqlens", default="1024,4096,16384", help="comma-separated T values (k suffix allowed)")
    p.add_argument("--tokens", type=int, default=32768, help="batch size is max(1, tokens // T)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--v-head-dim", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--modes", default="fwd,fwdbwd", type=mode_list("fwd", "fwdbwd", "decode"),
                   help="fwd, fwdbwd, decode (one query per sequence against T keys, no gradient: rows decode_b<B>)")
    p.add_argument("--decode-batches", default="1,32")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--softcap", type=float, default=None, help="soft-capped scores: c * tanh(scale * q.k / c)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="chunked attention (Llama 4's local layers: 8192): a query sees its chunk of positions only")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")


def _impls(causal, window, hq, hkv, dqk, dv, softcap=None, cuda=True, chunk=None):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longattn import flash_attention

    impls = {"longattn": lambda q, k, v: flash_attention(q, k, v, causal=causal, window=window, softcap=softcap,
                                                         chunk_size=chunk)}
    if softcap or chunk:
        impls["flex"] = _flex(causal, window, softcap, cuda, chunk)
        if chunk:
            return impls
    elif window is None and dqk == dv:
        def sdpa(backend):
            def run(q, k, v):
                with sdpa_kernel(backend):
                    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       is_causal=causal, enable_gqa=hq != hkv)
                return o.transpose(1, 2)
            return run
        impls["sdpa_flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
        impls["sdpa_cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    try:
        from flash_attn import flash_attn_func

        ws = (window - 1, 0) if window else (-1, -1)
        impls["flash_attn"] = lambda q, k, v: flash_attn_func(q, k, v, causal=causal, window_size=ws,
                                                              softcap=softcap or 0.0)
    except ImportError:
        pass
    return impls


def _flex(causal, window, softcap, cuda, chunk=None):
    """flex_attention with the soft cap (if any) as its score_mod and the causal / window / chunk mask as a BlockMask
    (built per shape, kept), torch.compile'd on CUDA (its fused kernel), eager otherwise."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    fn = torch.compile(flex_attention) if cuda else flex_attention
    masks = {}

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)
    score_mod = score_mod if softcap else None

    def run(q, k, v):
        tq, tk = q.shape[1], k.shape[1]
        if causal and (tq, tk) not in masks:
            def mask_mod(b, h, q_idx, kv_idx):  # queries aligned to the end of the keys
                pos = q_idx + (tk - tq)
                keep = kv_idx <= pos
                if chunk:
                    keep = keep & (kv_idx // chunk == pos // chunk)
                return keep & (kv_idx > pos - window) if window else keep
            masks[tq, tk] = create_block_mask(mask_mod, None, None, tq, tk, device=q.device)
        return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                  block_mask=masks.get((tq, tk)), enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    return run


def run(args, argv=None) -> list[dict]:
    import torch

    dev = require_cuda()
    dtype = getattr(torch, args.dtype)
    hq = args.heads
    hkv = args.kv_heads or hq
    dqk = args.head_dim
    dv = args.v_head_dim or dqk
    causal = not args.no_causal
    modes = args.modes
    impls = _impls(causal, args.window, hq, hkv, dqk, dv, args.softcap, dev.type == "cuda", args.chunk_size)
    impls["longattn_no_tma"] = without_tma(impls["longattn"])  # the forward's key tiles by pointers only
    peaks = device_peaks(dev)
    rows = Results("flash", COLUMNS, argv, out_dir=args.out, plot=PLOT)
    for T in parse_ints(args.seqlens):
        if not [m for m in modes if m != "decode"]:
            break
        B = max(1, args.tokens // T)
        q = torch.randn(B, T, hq, dqk, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, hkv, dqk, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(B, T, hkv, dv, device=dev, dtype=dtype, requires_grad=True)
        do = torch.randn(B, T, hq, dv, device=dev, dtype=dtype)
        pairs = attended_pairs(T, T, causal=causal, window=args.window) if args.chunk_size is None else \
            _chunk_pairs(T, args.chunk_size)
        flops_fwd = 2.0 * (dqk + dv) * pairs * hq * B
        for mode in modes:
            if mode == "decode":
                continue
            for name, fn in impls.items():
                if mode == "fwd":
                    call = lambda: fn(q, k, v)
                    flops = flops_fwd
                else:
                    call = lambda: fn(q, k, v).backward(do)
                    flops = fwdbwd_flops(flops_fwd, dqk, dv)
                try:
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        ms = time_ms(call, grad_to_none=[q, k, v])
                        mem = peak_memory_mb(call)
                except Exception as e:  # a backend that does not support this shape
                    print(f"  {name} {mode} T={T}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    continue
                rows.append(roofline(dict(op="flash", impl=name, mode=mode, B=B, T=T, Hq=hq, Hkv=hkv, D=dqk, Dv=dv,
                                          causal=causal, window=args.window, softcap=args.softcap,
                                          chunk=args.chunk_size, dtype=args.dtype, ms=ms,
                                          **{"TFLOP/s": flops / ms / 1e9}, peak_MB=mem),
                                     attention_bytes(B, T, T, hq, hkv, dqk, dv, mode), flops, peaks))
                print(f"  {name:12s} {mode:7s} B={B} T={T}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s")
    if "decode" in modes:
        _decode_rows(rows, args, hq, hkv, dqk, dv, dtype, dev, peaks)
    _speedups(rows)
    out = rows.finish()
    print(f"results written to {out}")
    return rows


def _chunk_pairs(T: int, chunk: int) -> int:
    """(query, key) pairs causal attention in chunks of ``chunk`` positions attends over T tokens."""
    whole, rest = divmod(T, chunk)
    return whole * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


def _decode_rows(rows, args, hq, hkv, dqk, dv, dtype, dev, peaks):
    """One new query per sequence against T cached keys (the peers without a causal mask: a single query at the
    end sees every key, and SDPA's causal mask is aligned to the top left). ``longattn_paged``: ``flash_decode`` on
    the same keys in a paged cache (64-token pages in random order, no host checks); ``longattn_paged_fp8``: that
    cache quantised to float8 (e4m3, half the bytes, its ``%roof`` counting them). With ``--softcap``, every call
    soft-caps (flex_attention's score_mod among the peers); with ``--chunk-size``, the query sees its chunk only
    (flex_attention with the chunks as its mask the peer)."""
    import torch

    from longattn import flash_attention, flash_decode

    cap, chunk = args.softcap, args.chunk_size
    impls = {**_impls(chunk is not None, None, hq, hkv, dqk, dv, cap, dev.type == "cuda", chunk),
             "longattn": lambda q, k, v: flash_attention(q, k, v, causal=True, window=args.window, softcap=cap,
                                                         chunk_size=chunk)}
    if args.window is not None:
        impls = {"longattn": impls["longattn"]}
    # the same calls replayed from CUDA graphs: the GPU's time alone, without the host's work per call (launches,
    # checks), which at batch 1 can exceed the kernels'
    impls = {**impls, **{f"{name}_graph": fn for name, fn in impls.items() if name in ("longattn", "sdpa_flash")}}
    for T in parse_ints(args.seqlens):
        for B in parse_ints(args.decode_batches):
            q = torch.randn(B, 1, hq, dqk, device=dev, dtype=dtype)
            k = torch.randn(B, T, hkv, dqk, device=dev, dtype=dtype)
            v = torch.randn(B, T, hkv, dv, device=dev, dtype=dtype)
            keys = min(T, args.window or T) if chunk is None else (T - 1) % chunk + 1
            flops = 2.0 * (dqk + dv) * keys * hq * B
            bytes_ = 2 * B * (keys * hkv * (dqk + dv) + hq * (dqk + dv))
            per = -(-T // 64)
            table = torch.randperm(B * per, device=dev, dtype=torch.int32).view(B, per)
            kp, vp = (x.new_zeros(B * per * 64, *x.shape[2:]) for x in (k, v))
            rows_of = (table.long()[:, :, None] * 64 + torch.arange(64, device=dev)).flatten(1)[:, :T]
            kp[rows_of], vp[rows_of] = k, v
            kp, vp = kp.view(B * per, 64, *k.shape[2:]), vp.view(B * per, 64, *v.shape[2:])
            lens = torch.full((B,), T, dtype=torch.int32, device=dev)
            paged = lambda q, k, v: flash_decode(q, kp, vp, cache_seqlens=lens, block_table=table, window=args.window,
                                                 validate=False, softcap=cap, chunk_size=chunk)
            kq, vq = kp.to(torch.float8_e4m3fn), vp.to(torch.float8_e4m3fn)
            fp8 = lambda q, k, v: flash_decode(q, kq, vq, cache_seqlens=lens, block_table=table, window=args.window,
                                               validate=False, softcap=cap, chunk_size=chunk)
            fp8_bytes = B * (keys * hkv * (dqk + dv) + 2 * hq * (dqk + dv))  # one byte a cached value
            for name, fn in {**impls, "longattn_paged": paged, "longattn_paged_fp8": fp8}.items():
                try:
                    with torch.no_grad():
                        ms = (graph_ms if name.endswith("_graph") else time_ms)(lambda: fn(q, k, v))
                except Exception as e:
                    print(f"  {name} decode B={B} T={T}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    continue
                rows.append(roofline(dict(op="flash", impl=name, mode=f"decode_b{B}", B=B, T=T, Hq=hq, Hkv=hkv,
                                          D=dqk, Dv=dv, causal=True, window=args.window, softcap=cap, chunk=chunk,
                                          dtype=args.dtype, ms=ms,
                                          **{"TFLOP/s": flops / ms / 1e9}),
                                     fp8_bytes if name.endswith("fp8") else bytes_, flops, peaks))
                print(f"  {name:12s} decode  B={B} T={T}: {ms:.3f} ms")
            torch.cuda.empty_cache()


def _speedups(rows):
    """x_<peer> = peer ms / longattn ms on the same (mode, T); for longattn_graph, over the peer's graph row."""
    by_key = {(r["mode"], r["T"], r["impl"]): r["ms"] for r in rows}
    for r in rows:
        if r["impl"] not in ("longattn", "longattn_graph"):
            continue
        suffix = r["impl"][len("longattn"):]
        for peer in ("sdpa_flash", "sdpa_cudnn", "flash_attn", "flex"):
            ms = by_key.get((r["mode"], r["T"], peer + suffix))
            r[f"x_{peer}"] = ms / r["ms"] if ms else None
