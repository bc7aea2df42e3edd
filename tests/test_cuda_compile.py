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
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiles only, as the CPU suite does (47 s of a GPU run's time)")
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


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton has no NVIDIA backend here")
@pytest.mark.skipif(torch.cuda.is_available(), reason="records launches through the interpreter")
def test_recorded_launches_compile_for_sm90(tmp_path, monkeypatch):
    """A launch through the interpreter is recorded (LONGATTN_RECORD_LAUNCHES: arguments as what specialises them)
    and compiled for sm_90 by tests/compile_launches.py, in float16 and bfloat16; a launch the GPU could not load
    (shared memory beyond it) fails the script."""
    import json

    from conftest import _record_launches
    from triton.runtime import interpreter

    from longattn import flash_attention

    path = tmp_path / "launches.jsonl"
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", interpreter.InterpretedFunction.run)  # (restored)
    _record_launches(str(path))
    q, k, v = (torch.randn(1, 77, 2, 64, dtype=torch.float16) for _ in range(3))
    flash_attention(q, k, v, causal=True)
    flash_attention(q, k, v, causal=True)  # the same launch again: recorded once
    (line,) = [r for r in path.read_text().splitlines() if "_flash_fwd_kernel" in r]
    record = json.loads(line)
    assert record["args"][0] == {"tensor": "float16", "aligned": True}
    ints = [a for a in record["args"] if isinstance(a, int) and not isinstance(a, bool)]
    assert ints and set(ints) <= {1, 3, 16}  # (77 rows: 3; strides: multiples of 16)
    assert record["kwargs"]["DQK"] == 64 and record["kwargs"]["CAUSAL"] is True  # constexprs as they are
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_launches.py")
    run = lambda f: subprocess.run([sys.executable, str(script), str(f), "_flash_fwd_kernel"], env=env,
                                   capture_output=True, text=True, timeout=600)
    proc = run(path)
    assert proc.returncode == 0 and "2 launches, 0 failed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    record["kwargs"].update(BLOCK_M=256, BLOCK_N=256, num_stages=4, HAS_TMA=False, USE_TMA=False)
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps(record) + "\n")
    proc = run(big)
    assert proc.returncode == 1 and "FAIL shared memory" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
