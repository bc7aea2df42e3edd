"""NSA end to end (compression + scoring + top-n + selected + window + gates) vs dense SDPA flash and fla's NSA;
the selected branch alone vs flex_attention; one-token decode vs dense SDPA."""
from __future__ import annotations

import argparse
import os

from .common import (Results, attention_bytes, device_peaks, flex_selection, fwdbwd_flops, graph_ms, mode_list,
                     parse_ints, peak_memory_mb, require_cuda, roofline, time_ms, without_tma)

COLUMNS = ["impl", "mode", "B", "T", "Hq", "Hkv", "Dqk", "Dv", "ms", "TFLOP/s", "x_sdpa_flash", "x_sdpa_cudnn",
           "x_flash", "x_fla", "x_flex", "x_kv_major", "x_query4", "x_decode_rows", "%roof", "%l2", "peak_MB"]
PLOT = dict(x="T", y="ms", series="impl", panels="mode", title="NSA")


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--seqlens", default="8k,16k,32k,64k,128k")
    p.add_argument("--tokens", type=int, default=65536, help="batch size is max(1, tokens // T)")
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4, help="paper: GQA groups of 16")
    p.add_argument("--qk-dim", type=int, default=192)
    p.add_argument("--v-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--modes", default="fwd,fwdbwd,slc,decode",
                   type=mode_list("fwd", "fwdbwd", "slc", "decode", "chunk"),
                   help="fwd, fwdbwd (bwd rows are derived: fwdbwd - fwd), slc (selected branch alone, fwd and "
                        "fwd+bwd, vs the block-sparse engine and flex), "
                        "decode (one token per sequence against a cache of T tokens), chunk (the last "
                        "--chunk-tokens of T tokens after a cached prefix, inference: nsa_attention on the chunk's "
                        "queries vs nsa_decode with a query row per token)")
    p.add_argument("--decode-batches", default="1,32", help="batch sizes of the decode rows")
    p.add_argument("--chunk-tokens", default="16,64,1024,4096",
                   help="chunk sizes of the chunk rows (one sequence)")
    p.add_argument("--inputs", default="random", choices=["random", "smooth"],
                   help="random: independent q/k per token, so consecutive queries select unrelated blocks; smooth: "
                        "q/k vary slowly along the sequence (a 256-token moving average plus noise), so consecutive "
                        "queries select mostly the same blocks, as in trained models")
    p.add_argument("--flex-max-seqlen", type=int, default=131072,
                   help="skip flex_attention above this T")
    p.add_argument("--fla-fwdbwd", action="store_true",
                   help="time fla's NSA in fwdbwd too (its backward's autotuning takes minutes; default: fwd only)")
    p.add_argument("--out", default=None)


def _four_queries_per_program(call):
    """``call`` with the selected branch's kernels taking four queries per program (forward and backward)."""
    def run():
        os.environ["LONGATTN_NSA_QUERY_BLOCK"] = "4"
        try:
            return call()
        finally:
            del os.environ["LONGATTN_NSA_QUERY_BLOCK"]
    return run


def _inputs(kind: str, shape, dev, dtype, window: int = 256):
    """Unit-variance inputs (B, T, H, D), independent per token or (``smooth``) 0.8 * a moving average over
    ``window`` tokens of white noise + 0.6 * white noise: neighbouring tokens are alike."""
    import torch

    x = torch.randn(shape, device=dev, dtype=torch.float32)
    if kind == "smooth":
        c = torch.nn.functional.pad(x.cumsum(1), (0, 0, 0, 0, window, 0))
        x = 0.8 * (c[:, window:] - c[:, :-window]) / window ** 0.5 + 0.6 * torch.randn_like(x)
    return x.to(dtype).requires_grad_()


def _distinct_blocks(sel, n: int) -> float:
    """The mean count of distinct blocks that runs of ``n`` consecutive queries select (``sel`` (B, T, Hkv, topk),
    -1 padded): the blocks a program of n queries loads, against n x topk when neighbours select apart."""
    B, T, H, K = sel.shape
    t = T // n * n
    if t == 0:
        return float("nan")
    s = sel[:, :t].reshape(B, t // n, n, H, K).transpose(2, 3).reshape(B, t // n, H, n * K).sort(-1).values
    distinct = ((s[..., 1:] != s[..., :-1]) & (s[..., 1:] >= 0)).sum(-1) + (s[..., 0] >= 0)
    return distinct.float().mean().item()


def _slc_pairs(t, block: int, topk: int):
    """Keys the selected branch attends for queries at positions ``t`` (a float64 tensor): every token up to the
    query's while its block and those before it are at most ``topk``, else topk - 1 whole blocks and its own up to
    it (the selection fills every slot)."""
    return (t + 1).minimum((topk - 1) * block + t % block + 1)


def _flops(cfg, T, B, hq, dk, dv, cmp_block=None, cmp_stride=None):
    """Forward FLOPs of the three branches (attended pairs x 2 (dk + dv)), queries at every position: compressed
    blocks ended at or before the query (block j covers [j d, j d + l)), the selected blocks (causal in the
    query's own), the window. ``cmp_block`` / ``cmp_stride``: another compression's (fla's: non-overlapping blocks
    of slc_block tokens)."""
    import torch

    l, d = cmp_block or cfg.cmp_block, cmp_stride or cfg.cmp_stride
    t = torch.arange(T, dtype=torch.float64)
    cmp_pairs = ((t - l + 1) // d + 1).clamp(min=0)
    slc_pairs = _slc_pairs(t, cfg.slc_block, cfg.slc_topk)
    swa_pairs = (t + 1).clamp(max=cfg.window)
    return 2.0 * (dk + dv) * float((cmp_pairs + slc_pairs + swa_pairs).sum()) * B * hq


def _padded(v, dk: int):
    """v padded with zeros to dk dims, a leaf of its own made before any timing (SDPA's flash backend takes one head
    dim), or v itself."""
    import torch.nn.functional as F

    if v.shape[-1] >= dk:
        return v
    return F.pad(v.detach(), (0, dk - v.shape[-1])).requires_grad_(v.requires_grad)


def _fla(cfg, hq, hkv):
    """fla's parallel_nsa (its compression is mean pooling over non-overlapping blocks of slc_block tokens, so
    it does less work than the paper's overlapping 32/16 compression); its window needs flash-attn, so without
    flash-attn the window branch is added through longattn's flash (same work). None when fla is missing."""
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception:
        return None, None
    g = hq // hkv
    if g < 16 or g & (g - 1):
        return None, None
    try:
        import flash_attn  # noqa: F401
        has_fa = True
    except ImportError:
        has_fa = False
    from longattn import flash_attention

    def run(q, k, v, gc, gs, gw):
        o = parallel_nsa(q, k, v, gc, gs, gw if has_fa else None, block_counts=cfg.slc_topk,
                         block_size=cfg.slc_block, window_size=cfg.window if has_fa else 0)
        if not has_fa:
            o = o + gw.unsqueeze(-1) * flash_attention(q, k, v, window=cfg.window)
        return o
    return run, "fla" if has_fa else "fla+longattn_swa"


def _time(rows, name, mode, call, grads, *, B, T, dims, flops, bytes_, peaks, dtype, memory=True, graph=False,
          l2_bytes=None):
    import torch

    hq, hkv, dk, dv = dims
    try:
        with torch.enable_grad() if mode.endswith("fwdbwd") else torch.no_grad():
            ms = graph_ms(call) if graph else time_ms(call, grad_to_none=grads)
            mem = peak_memory_mb(call) if memory else None
    except Exception as e:
        print(f"  {name} {mode} T={T}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None
    rows.append(roofline(dict(op="nsa", impl=name, mode=mode, B=B, T=T, Hq=hq, Hkv=hkv, Dqk=dk, Dv=dv, dtype=dtype,
                              ms=ms, **{"TFLOP/s": flops / ms / 1e9}, peak_MB=mem), bytes_, flops, peaks))
    if l2_bytes and peaks.get("l2_GBs"):  # the gather's floor: its bytes at the measured L2 read bandwidth
        rows[-1].update(L2_GB=l2_bytes / 1e9, **{"%l2": 100 * l2_bytes / peaks["l2_GBs"] / 1e6 / ms})
    print(f"  {name:16s} {mode:8s} B={B} T={T}: {ms:.3f} ms")
    return ms


def run(args, argv=None) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longattn import flash_attention
    from longattn.kernels.sparse import block_sparse_attention
    from longattn.nsa import NSAConfig, nsa_attention, nsa_decode, nsa_selected_attention

    dev = require_cuda()
    dtype = getattr(torch, args.dtype)
    hq, hkv, dk, dv = args.heads, args.kv_heads, args.qk_dim, args.v_dim
    dims = (hq, hkv, dk, dv)
    cfg = NSAConfig()
    modes = args.modes
    peaks = device_peaks(dev)
    fla, fla_name = _fla(cfg, hq, hkv)
    rows = Results("nsa", COLUMNS, argv, out_dir=args.out, plot=PLOT)

    def sdpa(q, k, v, backends=(SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)):
        """Dense SDPA, causal, its output's first dv dims (v padded to dk for the flash backend, which takes one
        head dim: see _padded)."""
        with sdpa_kernel(list(backends)):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=q.shape[1] > 1, enable_gqa=hq != hkv)
        return o.transpose(1, 2)[..., :dv]

    for T in parse_ints(args.seqlens):
        B = max(1, args.tokens // T)
        q = _inputs(args.inputs, (B, T, hq, dk), dev, dtype)
        k = _inputs(args.inputs, (B, T, hkv, dk), dev, dtype)
        v = torch.randn(B, T, hkv, dv, device=dev, dtype=dtype, requires_grad=True)
        gates = [torch.rand(B, T, hq, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]
        do = torch.randn(B, T, hq, dv, device=dev, dtype=dtype)
        # dense baselines on the same problem: SDPA's flash backend on v padded to dk (before the timing; its
        # products over v then take dk / dv times the work), SDPA's cuDNN backend and longattn's flash on v as it is
        vp = _padded(v, dk)
        impls = {"longattn": lambda q, k, v: nsa_attention(q, k, v, *gates, config=cfg),
                 "sdpa_flash": lambda q, k, v: sdpa(q, k, vp),
                 "sdpa_cudnn": lambda q, k, v: sdpa(q, k, v, (SDPBackend.CUDNN_ATTENTION,)),
                 "longattn_flash": lambda q, k, v: flash_attention(q, k, v)}
        if fla is not None:
            impls[fla_name] = lambda q, k, v: fla(q, k, v, *gates)
        # the forward with every tile loaded by pointers (no TMA descriptors), to see what TMA brings, and with
        # attention sinks (gpt-oss's), what they cost (last: the peers first where a time limit stops the run)
        impls["longattn_no_tma"] = without_tma(impls["longattn"])
        sinks = torch.randn(hq, device=dev, requires_grad=True)
        impls["longattn_sinks"] = lambda q, k, v: nsa_attention(q, k, v, *gates, config=cfg, sinks=sinks)
        flops = {"longattn": _flops(cfg, T, B, hq, dk, dv), "dense": 2.0 * (dk + dv) * T * (T + 1) / 2 * B * hq,
                 # (fla's compression: mean pooling over non-overlapping blocks of slc_block tokens)
                 "fla": _flops(cfg, T, B, hq, dk, dv, cfg.slc_block, cfg.slc_block)}
        for mode in (m for m in ("fwd", "fwdbwd") if m in modes):
            for name, fn in impls.items():
                if mode != "fwd" and (name == "longattn_no_tma" or name.startswith("fla") and not args.fla_fwdbwd):
                    continue
                call = (lambda fn=fn: fn(q, k, v)) if mode == "fwd" else (lambda fn=fn: fn(q, k, v).backward(do))
                f = flops["dense" if name in ("sdpa_flash", "sdpa_cudnn", "longattn_flash") else
                          "fla" if name.startswith("fla") else "longattn"]
                _time(rows, name, mode, call, [q, k, v, vp] + gates, B=B, T=T, dims=dims,
                      flops=f if mode == "fwd" else fwdbwd_flops(f, dk, dv),
                      bytes_=attention_bytes(B, T, T, hq, hkv, dk, dv, mode), peaks=peaks, dtype=args.dtype)
        if "fwd" in modes or "slc" in modes:  # how alike neighbouring queries select on these inputs
            with torch.no_grad():
                _, sel = nsa_attention(q, k, v, *gates, config=cfg, return_selection=True)
            print(f"  selection T={T}: " + " / ".join(f"{_distinct_blocks(sel, n):.1f}" for n in (1, 2, 4, 8))
                  + " distinct blocks selected by 1 / 2 / 4 / 8 consecutive queries (a KV head's group)")
        if "slc" in modes:  # the selected branch alone, same selection for every implementation
            with torch.no_grad():
                own = (torch.arange(T, device=dev) // cfg.slc_block)[None, :, None, None]
                listed = torch.where(sel == own, -1, sel).repeat_interleave(hq // hkv, dim=2).contiguous()
            t = torch.arange(T, dtype=torch.float64)
            pairs = float(_slc_pairs(t, cfg.slc_block, cfg.slc_topk).sum()) * B * hq
            # query-major forward: each query's selected K/V blocks (whole) travel from L2 to its program (fewer
            # when the queries of one program select alike: 4 per program load the union of theirs)
            loaded = float((t // cfg.slc_block + 1).clamp(max=cfg.slc_topk).sum()) * cfg.slc_block
            gather = B * hkv * loaded * (dk + dv) * 2
            ours = lambda q, k, v: nsa_selected_attention(q, k, v, sel, block_size=cfg.slc_block)
            # longattn_query4: the same kernels with four queries per program (a block selected by several of
            # them loaded once for all: fewer loads when neighbours select alike, 4x the rows per block otherwise)
            slc = {"longattn": ours, "longattn_no_tma": without_tma(ours), "longattn_query4": ours,
                   # the block-sparse engine (organised by key block, per-head lists) on the same blocks
                   "longattn_kv_major": lambda q, k, v: block_sparse_attention(q, k, v, listed,
                                                                               block_size=cfg.slc_block)}
            if T <= args.flex_max_seqlen:
                try:
                    slc["flex"] = flex_selection(sel, cfg.slc_block, hq)
                except Exception as e:
                    print(f"  flex T={T}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            for name, fn in slc.items():
                for mode in ("slc_fwd",) if name == "longattn_no_tma" else ("slc_fwd", "slc_fwdbwd"):
                    call = (lambda fn=fn: fn(q, k, v)) if mode == "slc_fwd" else \
                        (lambda fn=fn: fn(q, k, v).backward(do))
                    if name == "longattn_query4":
                        call = _four_queries_per_program(call)
                    f = 2.0 * (dk + dv) * pairs
                    _time(rows, name, mode, call, [q, k, v], B=B, T=T, dims=dims,
                          flops=f if mode == "slc_fwd" else fwdbwd_flops(f, dk, dv),
                          bytes_=attention_bytes(B, T, T, hq, hkv, dk, dv, mode[4:]), peaks=peaks, dtype=args.dtype,
                          l2_bytes=gather if mode == "slc_fwd" and name in ("longattn", "longattn_no_tma",
                                                                            "longattn_query4") else None)
            listed = slc = None
        q = k = v = vp = gates = do = sel = None  # free the prefill inputs before the decode cache
        if "decode" in modes:
            for batch in parse_ints(args.decode_batches):
                _decode_rows(rows, cfg, T, batch, dims, dtype, args.dtype, dev, peaks, sdpa, nsa_decode)
        if "chunk" in modes:
            for c in parse_ints(args.chunk_tokens):
                if c <= T:
                    _chunk_rows(rows, cfg, T, c, dims, dtype, args.dtype, dev, peaks)
        torch.cuda.empty_cache()
    _derive(rows)
    out = rows.finish()
    print(f"results written to {out}")
    return rows


def _decode_rows(rows, cfg, T, B, dims, dtype, dtype_name, dev, peaks, sdpa, nsa_decode):
    """One new token per sequence against caches of T tokens: nsa_decode vs dense SDPA over the whole cache (its
    values padded to dk beforehand, as the flash backend needs)."""
    import torch

    hq, hkv, dk, dv = dims
    if B * T * hkv * (2 * dk + dv) * 2 > 16e9:
        print(f"  decode B={B} T={T}: skipped (cache and its padded values above 16 GB)")
        return
    k = torch.randn(B, T, hkv, dk, device=dev, dtype=dtype)
    v = torch.randn(B, T, hkv, dv, device=dev, dtype=dtype)
    n = cfg.num_cmp_blocks(T)
    kc = torch.randn(B, n, hkv, dk, device=dev, dtype=dtype)
    vc = torch.randn(B, n, hkv, dv, device=dev, dtype=dtype)
    q = torch.randn(B, hq, dk, device=dev, dtype=dtype)
    gates = [torch.rand(B, hq, device=dev, dtype=dtype) for _ in range(3)]
    seqlens = torch.full((B,), T, dtype=torch.int32, device=dev)
    # raw tokens read, besides the compressed: the window, and the selected blocks but the local ones (within it);
    # attended: the selected branch's and the window's, each its own
    read = min(T, cfg.window + (cfg.slc_topk - cfg.local_blocks) * cfg.slc_block)
    bytes_ = 2 * B * hkv * (dk + dv) * (read + n)
    pairs = min(cfg.slc_topk * cfg.slc_block, T) + min(cfg.window, T)
    flops = 2.0 * B * hq * ((dk + dv) * (pairs + n) + dk * n)  # the scores recompute q.k_cmp once
    mode = f"decode_b{B}"
    _time(rows, "longattn", mode,
          lambda: nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seqlens, config=cfg), None, B=B, T=T, dims=dims,
          flops=flops, bytes_=bytes_, peaks=peaks, dtype=dtype_name)
    # the same without the host-side checks (no synchronisation: what a CUDA-graph decode loop runs)
    _time(rows, "longattn_unchecked", mode,
          lambda: nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seqlens, config=cfg, validate=False), None, B=B,
          T=T, dims=dims, flops=flops, bytes_=bytes_, peaks=peaks, dtype=dtype_name)
    # replayed from a CUDA graph: the GPU time alone, no host work (as a serving loop runs it)
    _time(rows, "longattn_graph", mode,
          lambda: nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seqlens, config=cfg, validate=False), None, B=B,
          T=T, dims=dims, flops=flops, bytes_=bytes_, peaks=peaks, dtype=dtype_name, memory=False, graph=True)
    if T % 64 == 0:  # the same cache as pages of 64 tokens in shuffled order (block_table), from a graph
        kp, vp = k.view(B * T // 64, 64, hkv, dk), v.view(B * T // 64, 64, hkv, dv)
        table = torch.randperm(B * T // 64, device=dev).to(torch.int32).view(B, T // 64)
        _time(rows, "longattn_paged", mode,
              lambda: nsa_decode(q, kp, vp, kc, vc, *gates, cache_seqlens=seqlens, block_table=table, config=cfg,
                                 validate=False), None, B=B, T=T, dims=dims, flops=flops, bytes_=bytes_, peaks=peaks,
              dtype=dtype_name, memory=False, graph=True)
    vp = _padded(v, dk)
    _time(rows, "sdpa_flash", mode, lambda: sdpa(q[:, None], k, vp), None, B=B, T=T, dims=dims,
          flops=2.0 * B * hq * (dk + dv) * T, bytes_=2 * B * hkv * (dk + dv) * T, peaks=peaks, dtype=dtype_name)


def _chunk_rows(rows, cfg, T, C, dims, dtype, dtype_name, dev, peaks):
    """The last C of T tokens of one sequence after a cached prefix (chunked prefill, a conversation continued;
    inference): nsa_attention on the chunk's queries (``longattn``) against nsa_decode with each token a query row
    of its own (``longattn_decode_rows``, what the NSA module runs for up to NSA_DECODE_TOKENS new tokens) and
    longattn's dense flash attention on the same chunk (``longattn_flash``)."""
    import torch

    from longattn import flash_attention, nsa_attention, nsa_decode

    hq, hkv, dk, dv = dims
    q = torch.randn(C, hq, dk, device=dev, dtype=dtype)
    k = torch.randn(T, hkv, dk, device=dev, dtype=dtype)
    v = torch.randn(T, hkv, dv, device=dev, dtype=dtype)
    n = cfg.num_cmp_blocks(T)
    kc = torch.randn(n, hkv, dk, device=dev, dtype=dtype)
    vc = torch.randn(n, hkv, dv, device=dev, dtype=dtype)
    gates = [torch.rand(C, hq, device=dev, dtype=dtype) for _ in range(3)]
    cu_q = torch.tensor([0, C], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, T], dtype=torch.int32, device=dev)
    seqlens = torch.arange(T - C + 1, T + 1, dtype=torch.int32, device=dev)
    rows_ = torch.zeros(C, dtype=torch.int32, device=dev)
    pairs = min(cfg.slc_topk * cfg.slc_block, T) + min(cfg.window, T)  # raw tokens each query attends
    flops = 2.0 * C * hq * ((dk + dv) * (pairs + n) + dk * n)
    call = lambda **kw: nsa_attention(q, k, v, *gates, config=cfg, k_cmp=kc, v_cmp=vc, cu_seqlens_q=cu_q,
                                      cu_seqlens_k=cu_k, **kw)
    # the least traffic: the compressed blocks and, per KV head, the tokens some query of the chunk selects or
    # has in its window, each read once
    with torch.no_grad():
        sel = call(return_selection=True)[1]  # (C, Hkv, topk)
    nb = -(-T // cfg.slc_block)
    picked = torch.zeros(hkv, nb + 1, dtype=torch.bool, device=dev)
    picked.scatter_(1, torch.where(sel >= 0, sel, nb).permute(1, 0, 2).reshape(hkv, -1).long(), True)
    tokens = picked[:, :nb].repeat_interleave(cfg.slc_block, 1)[:, :T]
    tokens[:, max(0, T - C - cfg.window + 1):] = True
    bytes_ = 2 * (dk + dv) * (int(tokens.sum()) + hkv * n)
    mode = f"chunk_c{C}"
    kw = dict(B=1, T=T, dims=dims, flops=flops, bytes_=bytes_, peaks=peaks, dtype=dtype_name)
    _time(rows, "longattn", mode, call, None, **kw)
    _time(rows, "longattn_decode_rows", mode,
          lambda: nsa_decode(q, k[None], v[None], kc[None], vc[None], *gates, cache_seqlens=seqlens, cache_rows=rows_,
                             config=cfg, validate=False), None, **kw)
    _time(rows, "longattn_flash", mode, lambda: flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), None,
          **dict(kw, flops=2.0 * hq * (dk + dv) * (C * T - C * (C - 1) / 2), bytes_=2 * hkv * (dk + dv) * T))


def _derive(rows):
    """bwd rows (fwdbwd - fwd) and the x_<peer> speedup columns (peer ms / longattn ms, same mode and T)."""
    by = {(r["mode"], r["T"], r["impl"]): r for r in rows}
    for (mode, T, impl), r in list(by.items()):
        f = by.get(("fwd", T, impl))
        if mode == "fwdbwd" and f is not None and r["ms"] > f["ms"]:
            b = dict(r, mode="bwd", ms=r["ms"] - f["ms"], peak_MB=None)
            fwdbwd = r["TFLOP/s"] * r["ms"]  # (GFLOP), the backward's share of it from fwdbwd_flops's factor
            b["TFLOP/s"] = fwdbwd * (1 - 1 / fwdbwd_flops(1.0, r["Dqk"], r["Dv"])) / b["ms"]
            for key in ("GB", "GFLOP", "floor_ms", "%roof"):
                b.pop(key, None)
            rows.append(b)
            by[("bwd", T, impl)] = b
    peers = {"sdpa_flash": "x_sdpa_flash", "sdpa_cudnn": "x_sdpa_cudnn", "longattn_flash": "x_flash", "flex": "x_flex",
             "fla": "x_fla", "fla+longattn_swa": "x_fla", "longattn_kv_major": "x_kv_major",
             "longattn_query4": "x_query4", "longattn_decode_rows": "x_decode_rows"}
    for (mode, T, impl), r in by.items():
        if impl != "longattn":
            continue
        for peer, col in peers.items():
            p = by.get((mode, T, peer))
            if p is not None:
                r[col] = p["ms"] / r["ms"]
