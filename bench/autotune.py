"""The autotuner's timing of every candidate, read from Triton's autotune cache on disk.

With ``TRITON_CACHE_AUTOTUNING=1`` (``bench/gpu_suite.sh`` sets it for its benchmarks) Triton keeps, for each
kernel and key, the median time of every candidate it tried (``<cache>/<hash>/<kernel>.autotune.json``), and a
later process with the same key reuses the choice instead of timing again. This lists them: per kernel and key
each candidate's ms and its time over the fastest's, the data for dropping candidates that never win and for
putting the usual winner first (what runs without autotuning, ``LONGATTN_AUTOTUNE=0``). Reads files only: no
GPU needed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from .common import environment, write_results

COLUMNS = ["kernel", "key", "config", "ms", "x_best"]


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--cache", default=None, help="Triton's cache folder (default: $TRITON_CACHE_DIR, else "
                                                  "~/.triton/cache)")
    p.add_argument("--out", default=None)


def cache_dir(path=None) -> Path:
    return Path(path or os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def describe(config: dict) -> str:
    """A candidate as its meta-parameters, then warps (w), stages (s) and a register limit (r) if any."""
    parts = [f"{k}={v}" for k, v in sorted(config.get("kwargs", {}).items())]
    parts += [f"w{config.get('num_warps')}", f"s{config.get('num_stages')}"]
    if config.get("maxnreg"):
        parts.append(f"r{config['maxnreg']}")
    return " ".join(parts)


def collect(folder: Path) -> list[dict]:
    """One row per (kernel, key, candidate), fastest first within a key; a candidate that failed to compile or
    run has ms None (Triton times it as infinite)."""
    rows = []
    for path in sorted(folder.glob("*/*.autotune.json")):
        data = json.loads(path.read_text())
        kernel = path.name[: -len(".autotune.json")]
        timed = []
        for config, t in data["configs_timings"]:
            ms = t[0] if isinstance(t, (list, tuple)) else t  # Triton stores (median, p20, p80)
            timed.append((describe(config), ms if math.isfinite(ms) else None))
        finite = [ms for _, ms in timed if ms is not None]
        best = min(finite) if finite else None
        for config, ms in sorted(timed, key=lambda c: (c[1] is None, c[1] or 0.0)):
            rows.append(dict(kernel=kernel, key=str(tuple(data["key"])), config=config, ms=ms,
                             x_best=ms / best if ms is not None and best else None))
    rows.sort(key=lambda r: (r["kernel"], r["key"]))  # stable: each key's candidates stay fastest first
    return rows


def run(args, argv=None):
    import torch
    import triton

    folder = cache_dir(args.cache)
    rows = collect(folder)
    if not rows:
        print(f"no autotune results under {folder} (Triton writes them with TRITON_CACHE_AUTOTUNING=1)")
        return rows
    cuda = torch.cuda.is_available()
    env = environment(argv) if cuda else {"device": "(not recorded: read without CUDA)", "torch": torch.__version__,
                                           "triton": triton.__version__, "cuda": None, "date": "-",
                                           "command": "python -m bench " + " ".join(argv or ["autotune"])}
    # without CUDA there is no device to name the results folder after: the current folder
    out = write_results("autotune", rows, COLUMNS, env, out_dir=args.out or (None if cuda else Path(".")))
    print(f"{len(rows)} candidates of {len({(r['kernel'], r['key']) for r in rows})} tuned launches -> {out}")
    return rows
