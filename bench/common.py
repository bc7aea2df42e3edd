"""Shared benchmark plumbing: environment record, timing, FLOP counting, result files and plots."""
from __future__ import annotations

import datetime
import json
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


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
    try:
        import flash_attn  # noqa: F401

        env["flash_attn"] = flash_attn.__version__
    except Exception:
        env["flash_attn"] = None
    return env


def time_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100, grad_to_none=None) -> float:
    """Median time of fn in milliseconds (CUDA events through triton.testing.do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def attended_pairs(q_len: int, k_len: int, *, causal: bool, window: Optional[int] = None) -> int:
    """Number of (query, key) pairs attended, queries aligned to the end of the keys."""
    import torch

    pos = torch.arange(q_len, dtype=torch.int64) + (k_len - q_len)
    hi = pos.clamp(max=k_len - 1) if causal else torch.full_like(pos, k_len - 1)
    lo = (pos - window + 1).clamp(min=0) if window is not None else torch.zeros_like(pos)
    return int((hi - lo + 1).clamp(min=0).sum())


def peak_memory_mb(fn: Callable[[], object]) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def write_results(name: str, rows: list[dict], columns: Sequence[str], env: dict, *,
                  plot: Optional[dict] = None, out_dir: Optional[Path] = None) -> Path:
    """Write ``<name>.json``, ``<name>.md`` and (if ``plot``) ``<name>.png`` under results/<device>/."""
    out = Path(out_dir) if out_dir else RESULTS / device_slug()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    md = [f"# {name}", "", f"- device: {env['device']}", f"- torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, flash-attn {env['flash_attn'] or 'not installed'}",
          f"- date: {env['date']}", f"- command: `{env['command']}`", "",
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
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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

