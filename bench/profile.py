"""Where each op's time goes: its GPU kernels (share of GPU time, calls) and the host time around them.

Each case runs once to compile, then a few times under torch.profiler; the table lists every kernel with its
GPU time per call of the op, and the op's wall time (do_bench) beside the sum of its kernels' times: the
difference is host work (argument checks, allocations, launches, synchronisations) the GPU waits for. Then the
host side alone: the time a call takes to return (calls back to back, none waiting for the GPU unless the op
itself does), and the Python functions (cProfile) that take most of it, each with its own time per call of the
op (its callees' apart; Triton's launcher and torch's operators show as built-in methods).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shlex
import time

from .common import Results, parse_ints, require_cuda, time_ms

COLUMNS = ["case", "kernel", "calls", "ms", "%gpu"]
CASES = ("nsa_fwd", "nsa_fwdbwd", "nsa_decode_b1", "nsa_decode_b32", "moba_fwd", "moba_fwdbwd", "mla_decode_s1",
         "mla_decode_s4", "mla_decode_b1", "mla_prefill_fwd", "mla_prefill_fwdbwd", "rollout_step",
         "rollout_step_dynamic", "rollout_step_flash")


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--seqlen", default="64k", help="NSA prefill and decode context (paper shape)")
    p.add_argument("--nsa-heads", default="64,4", help="query heads, KV heads")
    p.add_argument("--nsa-dims", default="192,128", help="d_qk, d_v")
    p.add_argument("--moba-seqlen", default="128k", help="MoBA block 4096, topk 4, 32 / 8 heads, d 128")
    p.add_argument("--moba-config", default="4096,4,32,8,128", help="block, topk, heads, KV heads, d")
    p.add_argument("--mla", default="64,8k,128", help="decode batch, context, heads (mla_decode_b1: batch 1, one "
                   "token)")
    p.add_argument("--mla-prefill", default="16k,32", help="prefill T, heads")
    p.add_argument("--rollout", default="8,8k", help="rollout_step*: prompts, longest prompt (the `rollout` "
                   "benchmark's model with transformers' SDPA attention; one decoding step with the rollout's "
                   "InPlaceCache, or with DynamicCache for rollout_step_dynamic; rollout_step_flash: longattn's "
                   "flash swapped in, InPlaceCache; each call one token longer, as in a rollout: a new length every "
                   "call)")
    p.add_argument("--rollout-model", default="", help="the `rollout` benchmark's model options, e.g. '--layers 2'")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--host-top", type=int, default=8, help="Python functions listed per case by their host time")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", default=None)


def _backward(forward, do, leaves):
    """``forward().backward(do)`` with the leaves' gradients dropped first: each call computes them anew (a training
    step after ``zero_grad(set_to_none=True)``), not added to the last call's."""
    def run():
        for x in leaves:
            x.grad = None
        forward().backward(do)
    return run


def _cases(args, dev, dtype):
    """name -> a function of no arguments that runs the op once (inputs built here, once)."""
    import torch

    from longattn import mla_decode, mla_prefill, moba_attention, nsa_attention
    from longattn.nsa import NSAConfig, nsa_decode

    mk = lambda *s, grad=False: torch.randn(*s, device=dev, dtype=dtype, requires_grad=grad)  # noqa: E731
    hq, hkv = parse_ints(args.nsa_heads)
    dk, dv = parse_ints(args.nsa_dims)
    T = parse_ints(args.seqlen)[0]
    cfg = NSAConfig()

    def nsa_inputs():
        q, k, v = mk(1, T, hq, dk, grad=True), mk(1, T, hkv, dk, grad=True), mk(1, T, hkv, dv, grad=True)
        gates = [torch.rand(1, T, hq, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]
        return q, k, v, gates, mk(1, T, hq, dv)

    def nsa_fwd():
        q, k, v, g, _ = nsa_inputs()
        return lambda: nsa_attention(q, k, v, *g, config=cfg)

    def nsa_fwdbwd():
        q, k, v, g, do = nsa_inputs()
        return _backward(lambda: nsa_attention(q, k, v, *g, config=cfg), do, [q, k, v, *g])

    def nsa_decode_case(B):
        def build():
            n = cfg.num_cmp_blocks(T)
            k, v, kc, vc = mk(B, T, hkv, dk), mk(B, T, hkv, dv), mk(B, n, hkv, dk), mk(B, n, hkv, dv)
            q = mk(B, hq, dk)
            gates = [torch.rand(B, hq, device=dev, dtype=dtype) for _ in range(3)]
            lens = torch.full((B,), T, dtype=torch.int32, device=dev)
            return lambda: nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=lens, config=cfg)
        return build

    bs, topk, mh, mkv, md = parse_ints(args.moba_config)
    Tm = parse_ints(args.moba_seqlen)[0]

    def moba(backward):
        def build():
            q, k, v = mk(1, Tm, mh, md, grad=True), mk(1, Tm, mkv, md, grad=True), mk(1, Tm, mkv, md, grad=True)
            do = mk(1, Tm, mh, md)
            if backward:
                return _backward(lambda: moba_attention(q, k, v, block_size=bs, topk=topk), do, [q, k, v])
            return lambda: moba_attention(q, k, v, block_size=bs, topk=topk)
        return build

    B, L, H = parse_ints(args.mla)

    def mla_dec(S, B=B):
        def build():
            page = 64
            pages = -(-L // page)
            cache = mk(B * pages, page, 576)
            table = torch.randperm(B * pages, device=dev, dtype=torch.int32).view(B, pages)
            ql, qr = mk(B, S, H, 512), mk(B, S, H, 64)
            lens = torch.full((B,), L, dtype=torch.int32, device=dev)
            return lambda: mla_decode(ql, qr, cache, cache_seqlens=lens, block_table=table, scale=192 ** -0.5)
        return build

    Tp, Hp = parse_ints(args.mla_prefill)

    def mla_pre(backward):
        def build():
            xs = [mk(*s, grad=True) for s in [(1, Tp, Hp, 128), (1, Tp, Hp, 64), (1, Tp, 512), (1, Tp, 64),
                                                (Hp, 128, 512), (Hp, 128, 512)]]
            do = mk(1, Tp, Hp, 128)
            if backward:
                return _backward(lambda: mla_prefill(*xs, scale=192 ** -0.5), do, xs)
            return lambda: mla_prefill(*xs, scale=192 ** -0.5)
        return build

    def rollout_step(kind):
        def build():
            from transformers import DynamicCache

            from longattn.hf import known_left_padding
            from longattn.hf.cache import InPlaceCache
            from longattn.rollout import _cache_kw

            from . import rollout as rollout_bench

            p = argparse.ArgumentParser()
            rollout_bench.add_args(p)
            model = rollout_bench._model("flash" if kind == "flash" else "sdpa",
                                         p.parse_args(shlex.split(args.rollout_model)), dev, dtype)
            batch, longest = parse_ints(args.rollout)
            gen = torch.Generator().manual_seed(0)
            lens = torch.randint(max(1, longest // 2), longest + 1, (batch,), generator=gen).to(dev)
            lens[0] = longest
            mask = torch.arange(longest, device=dev) >= longest - lens[:, None]  # left-padded, boolean (as a rollout)
            ids = torch.randint(0, model.config.vocab_size, (batch, longest), generator=gen).to(dev) * mask
            real = lens.tolist()
            # room for the steps timed (each adds a token)
            cache = DynamicCache(config=model.config) if kind == "sdpa_dynamic" else \
                InPlaceCache(config=model.config, max_cache_len=longest + 4096)
            kw = {_cache_kw(model): cache, "use_cache": True}
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), **kw)
            state = dict(mask=mask, pos=lens[:, None])
            tok = ids[:, -1:]

            def step():  # (as a rollout's: the mask's padding marked, not read back)
                state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(batch, 1)], 1)
                real[:] = [n + 1 for n in real]
                known_left_padding(state["mask"], real)
                model(input_ids=tok, attention_mask=state["mask"], position_ids=state["pos"], **kw)
                state["pos"] = state["pos"] + 1
            return step
        return build

    cases = {"nsa_fwd": nsa_fwd, "nsa_fwdbwd": nsa_fwdbwd, "nsa_decode_b1": nsa_decode_case(1),
             "nsa_decode_b32": nsa_decode_case(32), "moba_fwd": moba(False), "moba_fwdbwd": moba(True),
             "mla_decode_s1": mla_dec(1), "mla_decode_s4": mla_dec(4), "mla_decode_b1": mla_dec(1, 1),
             "mla_prefill_fwd": mla_pre(False),
             "mla_prefill_fwdbwd": mla_pre(True), "rollout_step": rollout_step("sdpa"),
             "rollout_step_dynamic": rollout_step("sdpa_dynamic"), "rollout_step_flash": rollout_step("flash")}
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(names) - set(cases)
    if unknown:
        raise ValueError(f"--cases: unknown {sorted(unknown)}; choose from {', '.join(CASES)}")
    return [(n, cases[n]) for n in names]


def _kernels(prof, iters: int, cuda: bool) -> list[tuple[str, float, float]]:
    """(kernel, calls per op call, ms per op call) for every GPU kernel (CPU ops when there is no GPU)."""
    out = []
    for e in prof.key_averages():
        if cuda:
            if "cuda" not in str(getattr(e, "device_type", "")).lower():
                continue
            us = getattr(e, "self_device_time_total", None)
            us = us if us is not None else getattr(e, "self_cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        if us > 0:
            out.append((e.key, e.count / iters, us / 1e3 / iters))
    return sorted(out, key=lambda r: -r[2])


def _host(fn, iters: int, top: int, cuda: bool) -> tuple[float, list[tuple[str, float, float]]]:
    """ms a call takes to return on the host (the median of ``iters`` calls back to back, the GPU left to catch up
    after them), and the ``top`` Python functions by their own time in those calls under cProfile: (function,
    calls per op call, ms per op call)."""
    import statistics

    import torch

    spent = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        spent.append(time.perf_counter() - t)
    if cuda:
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        fn()
    prof.disable()
    if cuda:
        torch.cuda.synchronize()
    funcs = []
    for (path, line, name), (_, calls, own, _, _) in pstats.Stats(prof).stats.items():
        where = name if path == "~" else f"{_short(path)}:{line}({name})"
        funcs.append((where, calls / iters, own * 1e3 / iters))
    return statistics.median(spent) * 1e3, sorted(funcs, key=lambda f: -f[2])[:top]


def _short(path: str) -> str:
    """A source path from its package on (``longattn/...``, ``triton/...``, ``torch/...``)."""
    parts = path.replace(os.sep, "/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("longattn", "bench", "triton", "torch", "transformers"):
            return "/".join(parts[i:])
    return parts[-1]


def run(args, argv=None) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    dev = require_cuda()
    dtype = getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows = Results("profile", COLUMNS, argv, out_dir=args.out)
    for name, build in _cases(args, dev, dtype):
        try:
            fn = build()
            grad = torch.enable_grad() if "bwd" in name else torch.no_grad()
            with grad:
                fn()  # compile, autotune
                wall = time_ms(fn)
                if cuda:
                    torch.cuda.synchronize()
                with profile(activities=activities) as prof:
                    for _ in range(args.iters):
                        fn()
                    if cuda:
                        torch.cuda.synchronize()
        except Exception as e:
            print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            continue
        kernels = _kernels(prof, args.iters, cuda)
        busy = sum(ms for _, _, ms in kernels) if cuda else None
        print(f"== {name}: {wall:.3f} ms per call" + (f", kernels {busy:.3f} ms" if busy is not None else ""))
        rows.append(dict(case=name, kernel="(wall time, do_bench)", calls=None, ms=wall, **{"%gpu": None}))
        if busy is not None:
            rows.append(dict(case=name, kernel="(host and gaps: wall - kernels)", calls=None,
                             ms=max(wall - busy, 0.0), **{"%gpu": None}))
        for kname, calls, ms in kernels[:15]:
            pct = 100 * ms / busy if busy else None
            rows.append(dict(case=name, kernel=kname[:80], calls=calls, ms=ms, **{"%gpu": pct}))
            print(f"  {ms:9.3f} ms  {calls:5.1f}x  " + (f"{pct:5.1f}%  " if pct is not None else "") + kname[:100])
        try:
            with grad:
                host, funcs = _host(fn, args.iters, args.host_top, cuda)
        except Exception as e:
            print(f"  {name}: host profile skipped ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        else:
            print(f"  host: {host:.3f} ms for a call to return")
            rows.append(dict(case=name, kernel="(host: a call's time to return)", calls=None, ms=host,
                             **{"%gpu": None}))
            for fname, calls, ms in funcs:
                rows.append(dict(case=name, kernel=f"host {fname}"[:80], calls=calls, ms=ms, **{"%gpu": None}))
                print(f"  {ms:9.3f} ms  {calls:5.1f}x  host {fname[:100]}")
        del fn
        if cuda:
            torch.cuda.empty_cache()
    out = rows.finish()
    print(f"results written to {out}")
    return rows
