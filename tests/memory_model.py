"""Peak memory of an op's forward and forward + backward (and what a forward with gradients leaves held for its
backward, mode ``held``), counted on the CPU without running its kernels.

Every Triton launch is skipped (the interpreter's launch does nothing), so an op's host code allocates what it
allocates on a GPU (the GPU's tiles, ``LONGATTN_INTERPRET_TILES=gpu``, and an H100's 132 SMs for the split-KV and
partial-sum sizes), and torch.profiler's memory events of the CPU allocator give its peak beyond the inputs, as
``python -m bench memory`` measures it on a GPU (same shapes: ``bench.memory``). The values the kernels would write
are left unwritten; the selections that host code reads (NSA's, MoBA's gate's) are replaced by valid ones (the
blocks just before each query's own). For the code of the H100's sixth run this gives NSA (64 / 4 heads, d 192 /
128) 140.5 KB per token in fwd+bwd at 64k and MoBA (block 4096, top 4) 41.8 / 77.1 in fwd / fwd+bwd at 32k, where
that run measured 141 (at 128k) and 41.8 / 77.1. (An elementwise op on the CPU whose inputs differ in dtype
allocates a converted copy, which on a GPU it does not: such ops would count more here.)

    python tests/memory_model.py [--ops nsa,moba,flash,mla_prefill,mla_prefix] [--seqlen 65536] [--by-call]

``--by-call`` lists every allocation of at least 1 KB per token with the running total. The ops' own torch work
runs for real: NSA's mean pooling is light, MLA prefill's decompression (``mla_prefill``) takes minutes at long
lengths.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ["LONGATTN_INTERPRET_TILES"] = "gpu"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import longattn  # noqa: E402,F401
from bench.memory import _ops  # noqa: E402

SMS = 132  # an H100's


def _stub_launches():
    """No kernel runs; the launch sizes take an H100's SM count."""
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    for name, module in list(sys.modules.items()):
        if name.startswith("longattn") and hasattr(module, "num_sms"):
            module.num_sms = lambda device: SMS

    import longattn.nsa.ops as nsa_ops

    def select(q, k_cmp, lse_cmp, cu_q, cu_cmp, max_q, heads_kv, config, scale):
        cu = cu_q.tolist()
        pos = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
        sel = pos[:, None] // config.slc_block - torch.arange(config.slc_topk)[None, :]
        sel = torch.where(sel >= 0, sel, -1).to(torch.int32)
        return sel[:, None, :].expand(q.shape[0], heads_kv, config.slc_topk).contiguous()

    nsa_ops.nsa_select = select

    import longattn.moba.ops as moba_ops

    def moba_select(q, k, plan, dims, block_size, ksel):
        cu = plan.cu_q.tolist()
        own = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])]) // block_size
        sel = own[:, None] - 1 - torch.arange(ksel)[None, :]
        sel = torch.where(sel >= 0, sel, -1).to(torch.int32)
        return sel[:, None, :].expand(q.shape[0], dims.heads_q, ksel).contiguous()

    moba_ops._select = moba_select


def _peak(fn, by_call: bool, tokens: int, held: bool = False) -> float:
    """Bytes per token at the peak of what torch allocates during ``fn()`` (from 0 at its start), or with
    ``held`` what is still allocated at its end while its result lives."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
        if by_call and abs(e.nbytes()) >= tokens * 1024:
            print(f"    {e.nbytes() / tokens / 1024:+8.1f} KB/token -> {now / tokens / 1024:7.1f}")
    del result
    return (now if held else peak) / tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="nsa,moba,flash", help="of nsa, moba, flash, mla_prefill, mla_prefix")
    p.add_argument("--seqlen", type=int, default=65536)
    p.add_argument("--by-call", action="store_true")
    args = p.parse_args(argv)
    names = [o.strip() for o in args.ops.split(",") if o.strip()]
    if not set(names) <= {"nsa", "moba", "flash", "mla_prefill", "mla_prefix"}:
        p.error(f"--ops: choose from nsa, moba, flash, mla_prefill, mla_prefix, got {args.ops}")
    _stub_launches()
    T = args.seqlen
    for name, (make, fn, _) in _ops(names, 32, 8, 128).items():
        ins = make(T, "cpu", torch.float16)
        with torch.no_grad():
            dout = torch.randn_like(fn(*ins))
        for mode in ("fwd", "held", "fwdbwd"):
            def call():
                if mode == "fwd":
                    with torch.no_grad():
                        return fn(*ins)
                if mode == "held":  # the output and what autograd keeps for the backward
                    return fn(*ins)
                fn(*ins).backward(dout)
            kb = _peak(call, args.by_call, T, held=mode == "held") / 1024
            for t in ins:
                t.grad = None
            print(f"{name:12s} {mode:7s} T={T}: {kb:.1f} KB per token beyond the inputs", flush=True)


if __name__ == "__main__":
    main()
