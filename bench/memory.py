"""Peak GPU memory of every op, fwd and fwd+bwd, as T grows to 128k: MB beyond the inputs, and per 1k tokens
(a flat MB/ktok column means O(T) memory); mode ``held``: what a forward with gradients leaves allocated until
its backward (its output and what autograd keeps), what each attention layer of a model in training holds. The
kernels run their first tile candidate, untimed (as with LONGATTN_AUTOTUNE=0; `--autotune` times them all first,
which takes minutes at these lengths): memory is what is measured, and the tile changes at most the size of a few
float32 partial-sum buffers (counted per key block)."""
from __future__ import annotations

import argparse

from .common import Results, held_memory_mb, parse_ints, peak_memory_mb, require_cuda

COLUMNS = ["impl", "mode", "T", "Hq", "Hkv", "D", "peak_MB", "MB/ktok"]
PLOT = dict(x="T", y="peak_MB", series="impl", panels="mode", title="peak memory")


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--seqlens", default="16k,32k,64k,128k")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ops", default="flash,moba,nsa,mla_prefill,mla_prefix")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--autotune", action="store_true", help="time every tile candidate first (as in use)")
    p.add_argument("--out", default=None)


def _ops(names, hq, hkv, d):
    """name -> (builder of the inputs for T, function of those inputs, (Hq, Hkv, D) for the table)."""
    import torch

    from longattn import flash_attention, mla_prefill, moba_attention, nsa_attention

    def qkv(T, dev, dtype, hq=hq, hkv=hkv, dk=d, dv=d, extra=()):
        mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype, requires_grad=True)
        return [mk(1, T, hq, dk), mk(1, T, hkv, dk), mk(1, T, hkv, dv)] + [mk(*s) for s in extra]

    table = {
        "flash": (lambda T, dev, dt: qkv(T, dev, dt), lambda q, k, v: flash_attention(q, k, v, causal=True),
                  (hq, hkv, d)),
        "moba": (lambda T, dev, dt: qkv(T, dev, dt),
                 lambda q, k, v: moba_attention(q, k, v, block_size=4096, topk=4), (hq, hkv, d)),
        # NSA at its paper shape: 64 query heads in groups of 16, d_qk 192, d_v 128, gates per head
        "nsa": (lambda T, dev, dt: qkv(T, dev, dt, 64, 4, 192, 128, extra=[(1, T, 64)] * 3),
                lambda q, k, v, *g: nsa_attention(q, k, v, *g), (64, 4, 192)),
        # MLA prefill on the latent: q_nope, q_rope, c_kv, k_rope, w_uk, w_uv
        "mla_prefill": (lambda T, dev, dt: [torch.randn(*s, device=dev, dtype=dt, requires_grad=True) for s in
                                            [(1, T, hq, 128), (1, T, hq, 64), (1, T, 512), (1, T, 64),
                                             (hq, 128, 512), (hq, 128, 512)]],
                        lambda qn, qr, c, kr, wk, wv: mla_prefill(qn, qr, c, kr, wk, wv, scale=192 ** -0.5),
                        (hq, 1, 576)),
        # the same, 4k queries after a cached prefix of T - 4k tokens (decompressed 16k tokens at a time)
        "mla_prefix": (lambda T, dev, dt: [torch.randn(*s, device=dev, dtype=dt, requires_grad=True) for s in
                                           [(1, min(T, 4096), hq, 128), (1, min(T, 4096), hq, 64), (1, T, 512),
                                            (1, T, 64), (hq, 128, 512), (hq, 128, 512)]],
                       lambda qn, qr, c, kr, wk, wv: mla_prefill(qn, qr, c, kr, wk, wv, scale=192 ** -0.5),
                       (hq, 1, 576)),
    }
    unknown = set(names) - set(table)
    if unknown:
        raise ValueError(f"--ops: unknown {sorted(unknown)}; choose from {sorted(table)}")
    return {n: table[n] for n in names}


def run(args, argv=None) -> list[dict]:
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, {} if args.autotune else {"LONGATTN_AUTOTUNE": "0"}):
        return _run(args, argv)


def _run(args, argv) -> list[dict]:
    import torch

    dev = require_cuda()
    dtype = getattr(torch, args.dtype)
    ops = _ops([o.strip() for o in args.ops.split(",") if o.strip()], args.heads, args.kv_heads, args.head_dim)
    rows = Results("memory", COLUMNS, argv, out_dir=args.out, plot=PLOT)
    # each op at every length before the next op (its kernels compiled once): a run stopped early still has whole
    # ops, their scaling with T included
    for name, (make, fn, (hq, hkv, d)) in ops.items():
        for T in parse_ints(args.seqlens):
            ins = make(T, dev, dtype)
            with torch.no_grad():
                do = torch.randn_like(fn(*ins))  # allocated before the measurement, like the inputs
            for mode in ("fwd", "held", "fwdbwd"):
                def call():
                    if mode == "fwd":
                        with torch.no_grad():
                            return fn(*ins)
                    if mode == "held":
                        return fn(*ins)
                    fn(*ins).backward(do)
                try:
                    call()  # compiled and autotuned first: tuning's copies of the outputs are not the op's memory
                    for t in ins:
                        t.grad = None
                    mb = (held_memory_mb if mode == "held" else peak_memory_mb)(call)
                except Exception as e:
                    print(f"  {name} {mode} T={T}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    continue
                for t in ins:
                    t.grad = None
                rows.append(dict(op="memory", impl=name, mode=mode, T=T, Hq=hq, Hkv=hkv, D=d, peak_MB=mb,
                                 **{"MB/ktok": mb / T * 1024}))
                print(f"  {name:12s} {mode:7s} T={T}: {mb:.0f} MB beyond the inputs")
            ins = do = None
            torch.cuda.empty_cache()
    out = rows.finish()
    print(f"results written to {out}")
    return rows
