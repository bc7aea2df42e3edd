"""NSA end to end (compression + scoring + top-n + selected + window + gates) vs dense SDPA flash."""
from __future__ import annotations

import argparse

from .common import environment, parse_ints, peak_memory_mb, require_cuda, time_ms, write_results

COLUMNS = ["impl", "mode", "B", "T", "Hq", "Hkv", "Dqk", "Dv", "ms", "x_sdpa_flash", "peak_MB"]


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--seqlens", default="8k,16k,32k,64k,128k")
    p.add_argument("--tokens", type=int, default=65536, help="batch size is max(1, tokens // T)")
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4, help="paper: GQA groups of 16")
    p.add_argument("--qk-dim", type=int, default=192)
    p.add_argument("--v-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--out", default=None)


def run(args, argv=None) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longattn.nsa import NSAConfig, nsa_attention

    dev = require_cuda()
    dtype = getattr(torch, args.dtype)
    hq, hkv, dk, dv = args.heads, args.kv_heads, args.qk_dim, args.v_dim
    cfg = NSAConfig()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []

    def sdpa(q, k, v):
        # dense baseline: the flash backend needs one head dim, so v is padded to dk (counted in its time)
        vp = F.pad(v, (0, dk - dv)) if dv < dk else v
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), vp.transpose(1, 2),
                                               is_causal=True, enable_gqa=hq != hkv)
        return o.transpose(1, 2)[..., :dv]

    for T in parse_ints(args.seqlens):
        B = max(1, args.tokens // T)
        q = torch.randn(B, T, hq, dk, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, hkv, dk, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(B, T, hkv, dv, device=dev, dtype=dtype, requires_grad=True)
        gates = [torch.rand(B, T, hq, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]
        do = torch.randn(B, T, hq, dv, device=dev, dtype=dtype)
        impls = {"longattn": lambda q, k, v: nsa_attention(q, k, v, *gates, config=cfg), "sdpa_flash": sdpa}
        for mode in modes:
            times = {}
            for name, fn in impls.items():
                call = (lambda fn=fn: fn(q, k, v)) if mode == "fwd" else (lambda fn=fn: fn(q, k, v).backward(do))
                try:
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        ms = time_ms(call, grad_to_none=[q, k, v] + gates)
                        mem = peak_memory_mb(call)
                except Exception as e:
                    print(f"  {name} {mode} T={T}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    continue
                times[name] = ms
                rows.append(dict(op="nsa", impl=name, mode=mode, B=B, T=T, Hq=hq, Hkv=hkv, Dqk=dk, Dv=dv,
                                 dtype=args.dtype, ms=ms, peak_MB=mem))
                print(f"  {name:10s} {mode:7s} B={B} T={T}: {ms:.3f} ms")
            for r in rows:
                if r["impl"] == "longattn" and r["mode"] == mode and r["T"] == T and "sdpa_flash" in times:
                    r["x_sdpa_flash"] = times["sdpa_flash"] / r["ms"]
        torch.cuda.empty_cache()
    out = write_results("nsa", rows, COLUMNS, environment(argv),
                        plot=dict(x="T", y="ms", series="impl", panels="mode", title="NSA"), out_dir=args.out)
    print(f"results written to {out}")
    return rows
