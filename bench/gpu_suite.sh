#!/usr/bin/env bash
# One command for a lent GPU: the whole test suite (bf16 included on CUDA), then every benchmark.
# Logs and results go to one folder, packed into one archive so that it fits the device tool's return
# limits:  bash bench/gpu_suite.sh [out_dir]   (default: $OUT if set, else bench/results/run)
# PYTEST_SECONDS / BENCH_SECONDS bound each half (defaults 200 / 360, inside one 10-minute device call);
# BENCH_OPS picks the benchmark (default all; e.g. "flash --seqlens 16k").
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/run}}
mkdir -p "$out/results"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$out/environment.txt" 2>&1
timeout "${PYTEST_SECONDS:-200}" python3 -m pytest -q -x -m "gpu or not gpu" -p no:cacheprovider tests > "$out/pytest.log" 2>&1
echo "pytest exit $?" >> "$out/pytest.log"
tail -5 "$out/pytest.log"
timeout "${BENCH_SECONDS:-360}" python3 -m bench ${BENCH_OPS:-all} --out "$out/results" > "$out/bench.log" 2>&1
echo "bench exit $?" >> "$out/bench.log"
tail -30 "$out/bench.log"
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && echo "archive: $out.tgz"
