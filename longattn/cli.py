"""The `longattn` command: `longattn demo` and `longattn bench ...`."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def _demo(args) -> int:
    import torch

    import longattn  # sets TRITON_INTERPRET=1 without CUDA
    from longattn.kernels.reference import attention_ref
    from longattn.kernels.utils import is_interpreter

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    scale_up = 16 if cuda else 1
    lengths = [int(n) * scale_up for n in args.lengths.split(",")]
    hq, hkv, d = 8, 2, 64
    print(f"longattn {longattn.__version__} demo on {torch.cuda.get_device_name(0) if cuda else 'CPU'}: "
          f"{'Triton kernels on the GPU' if cuda else 'Triton kernels through the CPU interpreter (small sizes)' if is_interpreter() else 'Triton kernels'}")
    print(f"packed batch of {len(lengths)} prompts, lengths {lengths}, {hq} query heads / {hkv} KV heads, "
          f"head dim {d}, {str(dtype).replace('torch.', '')}")
    torch.manual_seed(0)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    cu = cu.to(dev)
    total = sum(lengths)
    q = torch.randn(total, hq, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(total, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(total, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    rows = []
    for name, kw in (("flash causal", dict()), (f"flash window {args.window * scale_up}", dict(window=args.window * scale_up)),
                     ("flash bidirectional", dict(causal=False))):
        t0 = time.perf_counter()
        out = longattn.flash_attention(q, k, v, cu_seqlens=cu, **kw)
        _sync(cuda)
        t_fwd = time.perf_counter() - t0
        dout = torch.randn_like(out)
        t0 = time.perf_counter()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        _sync(cuda)
        t_bwd = time.perf_counter() - t0
        qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = attention_ref(qr, kr, vr, cu_seqlens_q=cu, cu_seqlens_k=cu, **kw)
        rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), dout.float())
        diff = max((a.float() - b).abs().max().item() for a, b in ((out, ref), (dq, rq), (dk, rk), (dv, rv)))
        rows.append((name, total, t_fwd * 1e3, t_bwd * 1e3, diff))
    print()
    print(f"{'op':24s} {'tokens':>7s} {'fwd ms':>9s} {'bwd ms':>9s} {'max |diff| vs reference':>24s}")
    for name, n, f, b, diff in rows:
        print(f"{name:24s} {n:7d} {f:9.1f} {b:9.1f} {diff:24.2e}")
    bad = [r for r in rows if not r[4] <= (5e-2 if dtype == torch.bfloat16 else 1e-3)]
    if bad:
        print(f"FAILED: {', '.join(r[0] for r in bad)} differ from the reference", file=sys.stderr)
        return 1
    print("\nall outputs and gradients match the reference")
    return 0


def _sync(cuda: bool):
    if cuda:
        import torch

        torch.cuda.synchronize()


def _bench(extra) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "__main__.py").exists():
        print(f"error: the bench package is not next to longattn (looked in {root}); run from a source checkout",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "bench", *extra], cwd=root)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="longattn", description="longattn: attention kernels for long contexts")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="run the kernels on the embedded default problem and check them")
    demo.add_argument("--lengths", default="37,100,1,160", help="comma-separated prompt lengths (x16 on CUDA)")
    demo.add_argument("--window", type=int, default=32, help="sliding window (x16 on CUDA)")
    sub.add_parser("bench", help="benchmarks (same options as `python -m bench`)", add_help=False)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
