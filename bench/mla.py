"""MLA: absorbed paged decode (GB/s, % of measured copy bandwidth, TFLOP/s) vs SDPA and FlashInfer (if installed);
prefill fwd/fwd+bwd vs SDPA."""
from __future__ import annotations

import argparse

from .common import (Results, device_peaks, fwdbwd_flops, graph_ms, parse_ints, peak_memory_mb, require_cuda,
                     roofline, time_ms, without_tma)

COLUMNS = ["impl", "op", "mode", "B", "L", "S", "H", "ms", "GB/s", "%copy_bw", "TFLOP/s", "%roof", "x_sdpa",
           "x_flashinfer", "peak_MB", "config"]
PLOT = dict(x="L", y="ms", series="series", panels="op", title="MLA")


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--batches", default="1,8,64,128")
    p.add_argument("--contexts", default="1k,8k,64k")
    p.add_argument("--query-tokens", default="1,4")
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--prefill-seqlens", default="4k,16k")
    p.add_argument("--prefill-heads", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=16384, help="prefill batch size is max(1, tokens // T)")
    p.add_argument("--max-cache-gb", type=float, default=24.0, help="skip decode shapes whose cache is larger")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", default=None)


def _flashinfer_decode(cache, table, L, q_lat, q_rope, scale):
    """FlashInfer's MLA paged decode on the same pages and queries (None when flashinfer is not installed
    or cannot plan this shape). Its cache is split into latent and rotary parts beforehand (not timed)."""
    try:
        import torch
        from flashinfer.mla import BatchMLAPagedAttentionWrapper
    except Exception:
        return None
    B, S, H, R = q_lat.shape
    dev, page = cache.device, cache.shape[1]
    try:
        ckv, kpe = cache[..., :R].contiguous(), cache[..., R:].contiguous()
        wrapper = BatchMLAPagedAttentionWrapper(torch.empty(128 << 20, dtype=torch.int8, device=dev))
        pages = table.shape[1]
        wrapper.plan(torch.arange(B + 1, dtype=torch.int32, device=dev) * S,
                     torch.arange(B + 1, dtype=torch.int32, device=dev) * pages, table.reshape(-1).contiguous(),
                     torch.full((B,), L, dtype=torch.int32, device=dev), H, R, kpe.shape[-1], page, S > 1, scale,
                     q_lat.dtype, cache.dtype)
        qn, qp = q_lat.reshape(B * S, H, R).contiguous(), q_rope.reshape(B * S, H, -1).contiguous()
        return lambda: wrapper.run(qn, qp, ckv, kpe)
    except Exception as e:
        print(f"  flashinfer decode skipped ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
        return None


def _tuned_config() -> str:
    """The decode kernel's configuration picked by the autotuner for the last launch: tokens per tile, warps,
    pipeline stages, ``p`` where the scores were split between the warpgroups (SHARED_P), ``t`` where the tiles came
    by TMA (USE_TMA)."""
    from longattn.mla.kernels import _mla_decode_tuned

    c = getattr(_mla_decode_tuned, "best_config", None)
    if c is None:
        return ""
    return (f"n{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}{'p' if c.kwargs.get('SHARED_P') else ''}"
            f"{'t' if c.kwargs.get('USE_TMA') else ''}")


def run(args, argv=None) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from longattn.mla import mla_decode, mla_prefill

    dev = require_cuda()
    dtype = getattr(torch, args.dtype)
    R, E, Dn, Dv, page = 512, 64, 128, 128, 64
    scale = (Dn + E) ** -0.5
    peaks = device_peaks(dev)
    bw = peaks["copy_GBs"]
    rows = Results("mla", COLUMNS, argv, out_dir=args.out, plot=PLOT)
    H = args.heads
    for L in parse_ints(args.contexts):
        for B in parse_ints(args.batches):
            n_pages = B * (-(-L // page))
            if n_pages * page * (R + E) * 2 / 1e9 > args.max_cache_gb:
                print(f"  decode B={B} L={L}: skipped (cache above --max-cache-gb)")
                continue
            cache = torch.randn(n_pages, page, R + E, device=dev, dtype=dtype)
            table = torch.randperm(n_pages, device=dev, dtype=torch.int32).view(B, -1)
            seqlens = torch.full((B,), L, dtype=torch.int32, device=dev)
            for S in parse_ints(args.query_tokens):
                q_lat = torch.randn(B, S, H, R, device=dev, dtype=dtype)
                q_rope = torch.randn(B, S, H, E, device=dev, dtype=dtype)
                bytes_ = B * L * (R + E) * 2 + 2 * B * S * H * (R + E) * 2
                flops = 2.0 * B * S * H * L * (R + E + R)
                def decode_row(impl, ms, cache_bytes=2, **extra):  # cache_bytes: per cached value (float8: 1)
                    moved = bytes_ - B * L * (R + E) * (2 - cache_bytes)
                    return roofline(dict(op="decode", impl=impl, mode="fwd", B=B, L=L, S=S, H=H, ms=ms,
                                         **{"GB/s": moved / ms / 1e6, "%copy_bw": 100 * moved / ms / 1e6 / bw,
                                            "TFLOP/s": flops / ms / 1e9}, series=f"{impl} S={S}", **extra),
                                    moved, flops, peaks)

                fn = lambda: mla_decode(q_lat, q_rope, cache, cache_seqlens=seqlens, block_table=table, scale=scale)
                ms = time_ms(fn)
                row = decode_row("longattn", ms, peak_MB=peak_memory_mb(fn), config=_tuned_config())
                rows.append(row)
                print(f"  decode B={B} L={L} S={S}: {ms:.3f} ms, {row['GB/s']:.0f} GB/s "
                      f"({row['%copy_bw']:.0f}% of copy), {row['TFLOP/s']:.0f} TFLOP/s")
                # without the host-side checks (no synchronisation: what a CUDA-graph decode loop runs)
                unchecked = lambda: mla_decode(q_lat, q_rope, cache, cache_seqlens=seqlens, block_table=table,
                                               scale=scale, validate=False)
                rows.append(decode_row("longattn_unchecked", time_ms(unchecked)))
                # replayed from a CUDA graph: the GPU time alone, no host work (as a serving loop runs it)
                rows.append(decode_row("longattn_graph", graph_ms(unchecked)))
                # the same with the tiles loaded by pointers only (no TMA descriptors), to see what TMA brings
                rows.append(decode_row("longattn_no_tma", graph_ms(without_tma(unchecked)), config=_tuned_config()))
                # and called from the host, as longattn_unchecked: what the TMA descriptors cost a launch on the host
                rows.append(decode_row("longattn_unchecked_no_tma", time_ms(without_tma(unchecked))))
                # the cache quantised to float8 (e4m3): half the bytes, widened to bf16 as they are read
                cache8 = cache.to(torch.float8_e4m3fn)
                rows.append(decode_row("longattn_fp8", graph_ms(
                    lambda: mla_decode(q_lat, q_rope, cache8, cache_seqlens=seqlens, block_table=table, scale=scale,
                                       validate=False)), cache_bytes=1, config=_tuned_config()))
                cache8 = None
                if B * L <= 64 * 8192:  # the baseline materialises the gathered cache
                    kv = cache[table.long()].view(B, -1, R + E)[:, :L]
                    q = torch.cat([q_lat, q_rope], -1).transpose(1, 2)
                    k = kv[:, None]
                    v = kv[:, None, :, :R]

                    def sdpa():
                        return F.scaled_dot_product_attention(q, k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1),
                                                              scale=scale)
                    try:
                        ms_b = time_ms(sdpa)
                        rows.append(roofline(dict(op="decode", impl="sdpa", mode="fwd", B=B, L=L, S=S, H=H, ms=ms_b,
                                                  **{"GB/s": bytes_ / ms_b / 1e6}, series=f"sdpa S={S}"),
                                             bytes_, flops, peaks))
                        row["x_sdpa"] = ms_b / ms
                    except Exception as e:
                        print(f"  sdpa decode skipped ({type(e).__name__})")
                fi = _flashinfer_decode(cache, table, L, q_lat, q_rope, scale)
                if fi is not None:
                    try:
                        ms_f = time_ms(fi)
                        rows.append(decode_row("flashinfer", ms_f))
                        row["x_flashinfer"] = ms_f / ms
                    except Exception as e:
                        print(f"  flashinfer decode skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            torch.cuda.empty_cache()
    Hp = args.prefill_heads
    for T in parse_ints(args.prefill_seqlens):
        B = max(1, args.prefill_tokens // T)
        qn = torch.randn(B, T, Hp, Dn, device=dev, dtype=dtype, requires_grad=True)
        qr = torch.randn(B, T, Hp, E, device=dev, dtype=dtype, requires_grad=True)
        c = torch.randn(B, T, R, device=dev, dtype=dtype, requires_grad=True)
        kr = torch.randn(B, T, E, device=dev, dtype=dtype, requires_grad=True)
        w_uk = (torch.randn(Hp, Dn, R, device=dev, dtype=dtype) / R ** 0.5).requires_grad_()
        w_uv = (torch.randn(Hp, Dv, R, device=dev, dtype=dtype) / R ** 0.5).requires_grad_()
        do = torch.randn(B, T, Hp, Dv, device=dev, dtype=dtype)

        def ours():
            return mla_prefill(qn, qr, c, kr, w_uk, w_uv, scale=scale)

        def sdpa():
            k = torch.cat([torch.einsum("btr,hdr->bthd", c, w_uk), kr[:, :, None].expand(-1, -1, Hp, -1)], -1)
            v = torch.einsum("btr,hdr->bthd", c, w_uv)
            q = torch.cat([qn, qr], -1)
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, scale=scale).transpose(1, 2)
        flops = 2.0 * (Dn + E + Dv) * T * (T + 1) / 2 * Hp * B
        for mode in ("fwd", "fwdbwd"):
            times = {}
            for name, fn in (("longattn", ours), ("sdpa", sdpa)):
                call = fn if mode == "fwd" else (lambda fn=fn: fn().backward(do))
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    times[name] = time_ms(call, grad_to_none=[qn, qr, c, kr, w_uk, w_uv])
                f = flops if mode == "fwd" else fwdbwd_flops(flops, Dn + E, Dv)
                rows.append(roofline(dict(op="prefill", impl=name, mode=mode, B=B, L=T, S=T, H=Hp, ms=times[name],
                                          **{"TFLOP/s": f / times[name] / 1e9}, series=f"{name} prefill {mode}"),
                                     (1 if mode == "fwd" else 3) * 2 * B * T * (Hp * (Dn + E + Dv) + R + E), f, peaks))
                print(f"  prefill {name} {mode} T={T}: {times[name]:.3f} ms")
            rows[-2]["x_sdpa"] = times["sdpa"] / times["longattn"]
    out = rows.finish()
    print(f"results written to {out}")
    return rows
