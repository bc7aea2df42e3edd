"""Shared benchmark plumbing: environment record, timing, FLOP counting, result files and plots."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import triton
import triton.language as tl

RESULTS = Path(__file__).resolve().parent / "results"


PEERS = {"flash_attn": "flash_attn", "fla": "fla", "flashinfer": "flashinfer"}  # optional peers, when installed


class NoCudaError(RuntimeError):
    pass


def require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise NoCudaError("the benchmarks need a CUDA GPU: torch.cuda.is_available() is False on this machine "
                          "(the Triton interpreter is far too slow for timing)")
    return torch.device("cuda")


def device_slug() -> str:
    import torch

    name = torch.cuda.get_device_name(0)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(argv: Optional[Sequence[str]] = None) -> dict:
    import torch
    import triton

    env = {
        "device": torch.cuda.get_device_name(0),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    }
    for peer, module in PEERS.items():
        try:
            env[peer] = __import__(module).__version__
        except Exception:
            env[peer] = None
    if _PEAKS:
        env.update(_PEAKS)
    return env


def time_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100, grad_to_none=None) -> float:
    """Median time of fn in milliseconds (CUDA events through triton.testing.do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def graph_ms(fn: Callable[[], object]) -> float:
    """Median time of fn captured once in a CUDA graph and replayed: the GPU work alone, without the host
    work of a call (what a serving loop that replays captured decoding steps pays). fn must not synchronise."""
    import torch

    fn()  # compile and autotune outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay)


def without_tma(fn: Callable) -> Callable:
    """``fn`` run with ``LONGATTN_TMA=0``: the kernels load every tile by per-thread pointers (no TMA descriptors;
    on Hopper the autotuners may otherwise pick tiles copied by TMA), to see what TMA brings."""
    def run(*args, **kwargs):
        before = os.environ.get("LONGATTN_TMA")
        os.environ["LONGATTN_TMA"] = "0"
        try:
            return fn(*args, **kwargs)
        finally:
            if before is None:
                del os.environ["LONGATTN_TMA"]
            else:
                os.environ["LONGATTN_TMA"] = before
    return run


def attended_pairs(q_len: int, k_len: int, *, causal: bool, window: Optional[int] = None) -> int:
    """Number of (query, key) pairs attended, queries aligned to the end of the keys."""
    import torch

    pos = torch.arange(q_len, dtype=torch.int64) + (k_len - q_len)
    hi = pos.clamp(max=k_len - 1) if causal else torch.full_like(pos, k_len - 1)
    lo = (pos - window + 1).clamp(min=0) if window is not None else torch.zeros_like(pos)
    return int((hi - lo + 1).clamp(min=0).sum())


_PEAKS: dict = {}


@triton.jit
def _l2_read_kernel(X, OUT, n_chunks, REPS: tl.constexpr, CHUNK: tl.constexpr):
    """Read X (n_chunks chunks of CHUNK float32) REPS times over, each program a different chunk at each pass (no
    reuse within an SM) with loads that skip L1 (.cg), and write each program's sum (nothing is left unread)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    acc = tl.zeros([CHUNK], tl.float32)
    for r in range(REPS):
        for c in range(pid, n_chunks, tl.num_programs(0)):
            acc += tl.load(X + ((c + r) % n_chunks) * CHUNK + offs, cache_modifier=".cg")
    tl.store(OUT + pid, tl.sum(acc, 0))


def l2_read(x, out, *, reps: int, chunk: int = 4096):
    """Launch ``_l2_read_kernel`` over the float32 tensor ``x`` (a multiple of ``chunk`` elements), one program
    per ``out`` element (at most the number of chunks)."""
    from longattn.kernels.utils import COMPILE_OPTIONS

    n_chunks = x.numel() // chunk
    _l2_read_kernel[(min(out.numel(), n_chunks),)](x, out, n_chunks, REPS=reps, CHUNK=chunk, **COMPILE_OPTIONS)


@contextlib.contextmanager
def every_autotuner_compiling_ahead():
    """Within it, every Triton autotuner of this process compiles its candidates side by side before timing them,
    as longattn's own kernels do (``longattn.kernels.utils.compile_candidates``): the peers' too (fla's NSA),
    whose tuning compiles one candidate at a time (its backward's outlasted a device call). The same candidates
    are timed and the same one chosen; only the compiling moves ahead. Patches Triton's
    ``Autotuner.prune_configs`` (Triton 3.6-3.9) for its duration; without that method, nothing changes."""
    from triton.runtime.autotuner import Autotuner

    from longattn.kernels.utils import compile_candidates

    prune = getattr(Autotuner, "prune_configs", None)
    if prune is None:
        yield
        return

    def prune_configs(self, kwargs):
        configs = prune(self, kwargs)
        if len(configs) > 1 and not getattr(self.early_config_prune, "compiles_ahead", False):  # not longattn's
            compile_candidates(self.fn, configs, {**self.nargs, **kwargs})
        return configs

    Autotuner.prune_configs = prune_configs
    try:
        yield
    finally:
        Autotuner.prune_configs = prune


def device_peaks(dev) -> dict:
    """The device's measured copy bandwidth (GB/s, bytes read plus written) and dense bf16 matmul rate
    (TFLOP/s), measured once per process: the roofline every result row is compared with; and its L2 read
    bandwidth (GB/s: a 16 MB buffer, half the H100's L2, re-read by every SM), the floor of kernels that gather the
    same data into many programs (NSA's selected blocks)."""
    import torch

    if not _PEAKS:
        x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        y = torch.empty_like(x)
        _PEAKS["copy_GBs"] = 2 * x.numel() / time_ms(lambda: y.copy_(x)) / 1e6
        del x, y
        n = 8192
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        _PEAKS["matmul_TFLOPs"] = 2 * n ** 3 / time_ms(lambda: a @ b) / 1e9
        del a, b
        x = torch.ones(1 << 22, device=dev)
        out = torch.empty(8 * torch.cuda.get_device_properties(dev).multi_processor_count, device=dev)
        _PEAKS["l2_GBs"] = 50 * x.numel() * 4 / time_ms(lambda: l2_read(x, out, reps=50)) / 1e6
        del x, out
        torch.cuda.empty_cache()
        print(f"  device roofline: copy {_PEAKS['copy_GBs']:.0f} GB/s, "
              f"bf16 matmul {_PEAKS['matmul_TFLOPs']:.0f} TFLOP/s, L2 read {_PEAKS['l2_GBs']:.0f} GB/s")
    return dict(_PEAKS)


def fwdbwd_flops(fwd_flops: float, dk: int, dv: int) -> float:
    """Forward + backward FLOPs of attention from the forward's, 2 (dk + dv) a pair: the backward recomputes the
    scores (dk) and does dP = dO V^T and dV = P^T dO (dv each), dQ = dS K and dK = dS^T Q (dk each): 2 (3 dk + 2 dv)
    a pair (2.5x the forward at dk = dv; 2.6x at 192 / 128)."""
    return fwd_flops * (4 * dk + 3 * dv) / (dk + dv)


def attention_bytes(B: int, tq: int, tk: int, hq: int, hkv: int, dk: int, dv: int, mode: str, elt: int = 2) -> int:
    """Least HBM traffic of attention: the forward reads q, k, v and writes o; the backward reads q, k, v,
    o, do and writes dq, dk, dv."""
    q_side, k_side = B * tq * hq * (dk + dv), B * tk * hkv * (dk + dv)
    return elt * ((q_side + k_side) if mode == "fwd" else 3 * (q_side + k_side))


def roofline(row: dict, bytes_: float, flops: float, peaks: dict) -> dict:
    """Add the roofline columns to a result row: the work (GB, GFLOP), the floor time on this device
    (max of bytes / copy bandwidth and FLOPs / matmul rate) and the % of that floor achieved."""
    floor_ms = max(bytes_ / peaks["copy_GBs"] / 1e6, flops / peaks["matmul_TFLOPs"] / 1e9)
    row.update(GB=bytes_ / 1e9, GFLOP=flops / 1e9, floor_ms=floor_ms, **{"%roof": 100 * floor_ms / row["ms"]})
    return row


def flex_selection(sel, block: int, num_heads: int, *, tile: int = 128, compile: Optional[bool] = None):
    """flex_attention over per-(query, head) selected key blocks, causal, built from the selection itself.

    sel: (B, T, H, k) integer block indices (-1 = unused), H dividing num_heads (query head h uses row
    h // (num_heads // H)); block and the flex tile (128) must divide one another and tile must divide T. The
    BlockMask comes straight from the selection (no T x T evaluation of a mask function, which dominates at 128k):
    a (query tile, key tile) pair is full when every query of the tile selected every block overlapping the key tile
    and the tile lies below the diagonal, partial (mask applied per token) when some query selected one of them,
    skipped otherwise. Returns run(q, k, v) on (B, T, heads, D) tensors (its BlockMask as run.block_mask),
    through torch.compile'd flex_attention (the fused kernel; default on CUDA) or eager (``compile=False``)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    B, T, H, _ = sel.shape
    if T % tile or (block % tile and tile % block):
        raise ValueError(f"flex_selection: T={T} must be a multiple of {tile}, and block={block} a multiple or "
                         f"divisor of it")
    g, nb, nt = num_heads // H, -(-T // block), T // tile
    s = sel.permute(0, 2, 1, 3).long()
    chosen = torch.zeros(B, H, T, nb + 1, dtype=torch.bool, device=sel.device)
    chosen.scatter_(3, torch.where(s < 0, torch.full_like(s, nb), s), True)
    count = chosen.view(B, H, nt, tile, nb + 1).sum(3, dtype=torch.int32)[..., :nb]  # queries of a tile per block
    if block >= tile:
        count = count.repeat_interleave(block // tile, dim=-1)[..., :nt]
        some, every = count > 0, count == tile
    else:
        count = count.view(B, H, nt, nt, tile // block)
        some, every = (count > 0).any(-1), (count == tile).all(-1)
    pos = torch.arange(nt, device=sel.device)
    full = every & (pos[None, :] < pos[:, None])
    partial = some & (pos[None, :] <= pos[:, None]) & ~full

    def pack(m):
        m = m.repeat_interleave(g, dim=1)
        order = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True)
        return m.sum(-1, dtype=torch.int32), order.to(torch.int32).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & chosen[b, h // g, q_idx, kv_idx // block]

    block_mask = BlockMask.from_kv_blocks(*pack(partial), *pack(full), BLOCK_SIZE=tile, mask_mod=mask_mod)
    fn = torch.compile(flex_attention) if (sel.is_cuda if compile is None else compile) else flex_attention

    def run(q, k, v):
        return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                  enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    run.block_mask = block_mask
    return run


def peak_memory_mb(fn: Callable[[], object]) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def held_memory_mb(fn: Callable[[], object]) -> float:
    """MB that ``fn()`` leaves allocated while its result lives (a forward with gradients: its output and what
    autograd keeps for the backward)."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    held = (torch.cuda.memory_allocated() - base) / 2**20
    del result
    return held


class Results(list):
    """One benchmark run's rows and where they go. ``finish()`` writes them (``write_results``) at the run's end;
    a run stopped before (Ctrl-C, or SIGTERM from a time limit such as gpu_suite.sh's) still leaves the rows it
    measured: ``python -m bench`` writes every unfinished run's (``write_unfinished``), marked as cut short. Each
    row is also written as it comes (the JSON and markdown, marked as cut short, without the plot; replaced at the
    end): a run killed outright, or one whose signal handler never ran (the H100's fifth run lost two benchmarks'
    rows so, each stopped inside native code), leaves them too."""
    unfinished: list = []

    def __init__(self, name: str, columns: Sequence[str], argv: Optional[Sequence[str]], *,
                 out_dir: Optional[Path] = None, plot: Optional[dict] = None):
        super().__init__()
        self.name, self.columns, self.argv, self.out_dir, self.plot = name, columns, argv, out_dir, plot
        Results.unfinished.append(self)

    def append(self, row: dict) -> None:
        super().append(row)
        try:
            write_results(self.name, self, self.columns, {**environment(self.argv), "cut_short": True},
                          out_dir=self.out_dir)
        except Exception as e:  # noqa: BLE001 - the run matters more than its progress files
            print(f"{self.name}: rows so far not written: {e!r}", file=sys.stderr)

    def finish(self, *, cut_short: bool = False) -> Path:
        Results.unfinished = [r for r in Results.unfinished if r is not self]  # (lists compare by content)
        env = environment(self.argv)
        if cut_short:
            env["cut_short"] = True
        return write_results(self.name, self, self.columns, env, plot=self.plot, out_dir=self.out_dir)


def write_unfinished() -> None:
    """Write the rows of every benchmark run not finished (see ``Results``)."""
    for rows in list(Results.unfinished):
        if rows:
            try:
                print(f"{rows.name}: stopped after {len(rows)} rows, written to {rows.finish(cut_short=True)}")
            except Exception as e:  # noqa: BLE001 - what stopped the run matters more
                print(f"{rows.name}: its {len(rows)} rows could not be written: {e!r}", file=sys.stderr)
    Results.unfinished = []


def write_results(name: str, rows: list[dict], columns: Sequence[str], env: dict, *,
                  plot: Optional[dict] = None, out_dir: Optional[Path] = None) -> Path:
    """Write ``<name>.json``, ``<name>.md`` and (if ``plot``) ``<name>.png`` under results/<device>/."""
    out = Path(out_dir) if out_dir else RESULTS / device_slug()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    md = [f"# {name}", "", f"- device: {env['device']}", f"- torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, " + ", ".join(f"{p} {env.get(p) or 'not installed'}" for p in PEERS),
          f"- date: {env['date']}", f"- command: `{env['command']}`"]
    if env.get("cut_short"):
        md.append("- **cut short**: the run was stopped before its end; these are the rows measured until then "
                  "(columns derived from several rows, such as speedups, may be missing)")
    if "copy_GBs" in env:
        md.append(f"- roofline of this device, measured in the same run: copy {env['copy_GBs']:.0f} GB/s, dense bf16 "
                  f"matmul {env['matmul_TFLOPs']:.0f} TFLOP/s; `%roof` = the row's floor time (its bytes at that "
                  f"bandwidth or its FLOPs at that rate, whichever is longer) / its time")
    if "l2_GBs" in env:
        md.append(f"- L2 read bandwidth, measured in the same run: {env['l2_GBs']:.0f} GB/s; `%l2` = a gather's bytes "
                  f"from L2 at that bandwidth / its time")
    md += ["",
          "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        md.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    if plot:
        _plot(rows, out / f"{name}.png", **plot)
    return out


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def _plot(rows, path: Path, *, x: str, y: str, series: str, panels: str, title: str):
    """Log-log plot of y against x, one line per value of ``series``, one panel per value of ``panels``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return
    panel_vals = sorted({r[panels] for r in rows}, key=str)
    fig, axes = plt.subplots(1, len(panel_vals), figsize=(5 * len(panel_vals), 4), squeeze=False)
    for ax, pv in zip(axes[0], panel_vals):
        for sv in sorted({r[series] for r in rows if r[panels] == pv}, key=str):
            pts = sorted((r[x], r[y]) for r in rows if r[panels] == pv and r[series] == sv and r.get(y))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=str(sv))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(f"{title}: {pv}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel without any timed series has no legend
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mode_list(*allowed: str):
    """An argparse ``type``: a comma-separated list of ``allowed`` names (a name outside them is an error at parse
    time, not a mode silently left out)."""
    def parse(text: str) -> list:
        names = [m.strip() for m in text.split(",") if m.strip()]
        unknown = [m for m in names if m not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
        return names
    return parse


def parse_ints(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1
        if part.endswith("k"):
            mult, part = 1024, part[:-1]
        out.append(int(part) * mult)
    return out

