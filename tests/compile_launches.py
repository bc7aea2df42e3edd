"""Compile for a CUDA GPU (sm_90 by default) every distinct kernel launch a CPU test run made, as Triton's JIT
would specialise it on that GPU, without one.

The CPU suite runs the kernels through Triton's interpreter, which never lowers them; ``tests/cuda_compile.py``
compiles a fixed set of cases. This compiles what the tests themselves launch (with
``LONGATTN_INTERPRET_TILES=gpu``, the tiles a GPU runs without autotuning): a failure the compiler or ptxas
would meet on the GPU (Triton 3.6's ptxas crashed on some shapes of one tile) shows here first.

    LONGATTN_RECORD_LAUNCHES=/tmp/launches.jsonl LONGATTN_INTERPRET_TILES=gpu pytest tests ...
    python tests/compile_launches.py /tmp/launches.jsonl [--arch=90] [--threads=N] [name-filter]

(``make compile-launches [COMPILE_TRITON=3.6.0]`` runs both on the GPU-tile pass of ``make test``.) Each float16
launch is compiled in bfloat16 too (that pass leaves bfloat16 out: too slow through the interpreter). Each launch is
compiled through the kernel's own JIT (``warmup``) against a stand-in driver that names the target: Triton's
specialisation of the arguments (alignment, integers equal to 1 or multiples of 16, constexprs) is the one a GPU
launch gets. Fails (exit 1) on any compile error or shared memory beyond the GPU's. A launch without autotuning
that ptxas fails on takes the next tile instead (``kernels.utils.autotune``): such a failure is reported here all
the same, the tile it names being one the GPU then does without.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.cuda_compile import SMEM_LIMIT  # noqa: E402


class _TargetOnly:
    """What a JIT warm-up asks of the active driver: a device, a stream, the target (nothing is launched)."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _decode(value):
    if isinstance(value, dict) and "tensor" in value:
        base = torch.empty(64, dtype=getattr(torch, value["tensor"]))
        return base if value["aligned"] else base[1:]
    if isinstance(value, dict) and "desc" in value:
        base = torch.empty(64, dtype=getattr(torch, value["desc"]))
        return TensorDescriptor(base if value["aligned"] else base[1:], value["shape"], value["strides"],
                                value["block"])
    return value


def _kernel(name: str):
    module, attr = name.split(":")
    kernel = getattr(importlib.import_module(module), attr)
    while not isinstance(kernel, triton.runtime.jit.JITFunction):  # (an autotuner's JIT function)
        kernel = kernel.fn
    return kernel


def compile_launch(record: dict):
    """Compile one recorded launch; returns the compiled kernel (raises what the compiler raises)."""
    jit = _kernel(record["kernel"])
    args = [_decode(a) for a in record["args"]]
    kwargs = {k: _decode(v) for k, v in record["kwargs"].items()}
    return jit.warmup(*args, grid=(1,), **kwargs)


def main(argv) -> int:
    arch = int(next((a.split("=", 1)[1] for a in argv if a.startswith("--arch=")), "90"))
    threads = int(next((a.split("=", 1)[1] for a in argv if a.startswith("--threads=")), os.cpu_count() or 1))
    rest = [a for a in argv[1:] if not a.startswith("--")]
    path, pattern = rest[0], rest[1] if len(rest) > 1 else ""
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    # each float16 launch also in bfloat16 (the CPU runs bfloat16 on the small tiles only, the GPU on its own)
    lines += [line.replace('"float16"', '"bfloat16"') for line in lines if '"float16"' in line]
    records = [json.loads(r) for r in dict.fromkeys(lines) if pattern in json.loads(r)["kernel"]]
    for name in {r["kernel"] for r in records}:  # imported here, one by one: threads importing at once deadlock
        _kernel(name)
    driver.set_active(_TargetOnly(arch))
    lock, failures, compiled, out = threading.Lock(), [], [], sys.stdout

    def one(record):
        t = time.time()
        try:
            if "unrecorded" in record:
                raise TypeError(f"an argument the recorder could not write: {record['unrecorded']}")
            kernel = compile_launch(record)
            smem = kernel.metadata.shared
            status = "ok" if smem <= SMEM_LIMIT else f"FAIL shared memory {smem} > {SMEM_LIMIT}"
        except Exception as e:  # every failure reported, not only the first
            status = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        consts = {k: v for k, v in record.get("kwargs", {}).items() if k.isupper() or k.startswith("num_")}
        with lock:
            compiled.append(record)
            if not status.startswith("ok"):
                failures.append(record)
                print(f"{record['kernel']} {consts} {time.time() - t:.1f}s {status}", file=out, flush=True)
            elif len(compiled) % 100 == 0:
                print(f"  {len(compiled)} / {len(records)} compiled", file=out, flush=True)

    # (what Triton prints of a failing kernel, its whole PTX, goes to /dev/null: the failures are listed here)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(one, records))
    print(f"{len(records)} launches, {len(failures)} failed (Triton {triton.__version__}, sm_{arch})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
