#!/usr/bin/env bash
# Download the optional benchmark peers that the GPU image lacks, as wheels, into .whl/ (git-ignored), for a
# device call to carry: fla's NSA op (flash-linear-attention + fla-core, pure Python on top of Triton), and
# pytest-timeout (gpu_suite.sh's per-test limit).
# bench/gpu_suite.sh installs whatever .whl/ holds before it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && py=.venv/bin/python
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "fla-core==${FLA_VERSION:-0.6.0}" "flash-linear-attention==${FLA_VERSION:-0.6.0}" "pytest-timeout==2.4.0"
ls -la .whl
