"""Every Triton kernel compiles for sm_90 (checked on the CPU, without a GPU)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARDS = 4


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:
        return False


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton has no NVIDIA backend here")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run every kernel")
@pytest.mark.parametrize("shard", range(SHARDS))
def test_kernels_compile_for_sm90(shard):
    """Every case of cuda_compile.py, in SHARDS parts that pytest-xdist's workers share."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("cuda_compile.py")
    proc = subprocess.run([sys.executable, str(script), f"--shard={shard}/{SHARDS}"], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert proc.stdout.count(" ok") >= 20, proc.stdout  # (about 55 cases a shard)


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton has no NVIDIA backend here")
def test_hot_loops_are_pipelined():
    """The hot loops keep their tiles in flight (multi-buffered shared memory), as compiled for sm_90, the
    kernels kept out of Triton's chained-product layout compute each product once (cuda_compile.UNDUPLICATED),
    and those of cuda_compile.NO_LOOP_SPILLS spill no register inside their loops."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("cuda_compile.py")
    proc = subprocess.run([sys.executable, str(script), "--pipelined"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert proc.stdout.count(" ok") >= 13, proc.stdout
