# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install longattn with its extras into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Without an NVIDIA driver we install the CPU build of torch; the Triton kernels then run
# through Triton's interpreter. Override with `make test TORCH_SPEC=...`.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
TORCH_SPEC ?= torch>=2.5
else
TORCH_SPEC ?= torch==2.13.0
endif
PYTEST_ARGS ?= -n 2
# each xdist worker single-threaded (torch's and numpy's thread pools): two workers on two cores otherwise oversubscribe
# them, the suite 10-17% slower
TEST_ENV ?= OMP_NUM_THREADS=1

.PHONY: demo test test-oldest test-triton compile-launches bench install clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/longattn demo

# Without a GPU the kernel tests run a second time with the GPU's tile sizes (the first autotune candidate)
# through the interpreter: the default small tiles exercise many tiles on small shapes, these the tiles a
# GPU runs. bfloat16 takes the float16 tiles, so its cases are left to the first pass; float32's GPU tiles are
# small ones like the interpreter's (products on CUDA cores), so its cases are too (they took 42% of this pass);
# tests that set the GPU tiles themselves (*gpu_candidates, *autotuning*, *gpu_tiles, the selected branch's
# split_scores and per_query) run once.
KERNEL_TESTS := tests/test_decode.py tests/test_flash.py tests/test_merge.py tests/test_mla.py tests/test_moba.py tests/test_nsa.py \
	tests/test_sparse.py

GPU_TILE_TESTS := not bfloat16 and not float32 and not gpu_candidates and not autotuning and not split_scores and \
	not per_query and not gpu_tiles and not torch_compile and not custom_op

test: $(VENV)/.installed
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS) tests
ifneq ($(HAS_CUDA),1)
	$(TEST_ENV) LONGATTN_INTERPRET_TILES=gpu $(PY) -m pytest $(PYTEST_ARGS) -k "$(GPU_TILE_TESTS)" $(KERNEL_TESTS)
endif

# Every distinct kernel launch of that GPU-tile pass (recorded through the interpreter), in float16 and bfloat16,
# compiled for sm_90 as Triton's JIT would specialise it on the GPU (tests/compile_launches.py): what the compiler or
# ptxas would fail on there shows here, without one (about 10 minutes on 2 cores; not part of `make test`). With
# the venv's Triton, or another release: `make compile-launches COMPILE_TRITON=3.6.0` (the GPU image's).
COMPILE_TRITON ?=
compile-launches: $(VENV)/.installed
	rm -f .launches.jsonl
	LONGATTN_RECORD_LAUNCHES=$(CURDIR)/.launches.jsonl LONGATTN_INTERPRET_TILES=gpu $(PY) -m pytest $(PYTEST_ARGS) -q \
		-k "$(GPU_TILE_TESTS)" $(KERNEL_TESTS)
ifneq ($(COMPILE_TRITON),)
	test -d .triton-$(COMPILE_TRITON) || $(PY) -m pip install -q --no-deps --target .triton-$(COMPILE_TRITON) \
		"triton==$(COMPILE_TRITON)" "numpy<2.4"
	PYTHONPATH=$(CURDIR)/.triton-$(COMPILE_TRITON) $(PY) tests/compile_launches.py .launches.jsonl
else
	$(PY) tests/compile_launches.py .launches.jsonl
endif

# The oldest supported stack, in a venv of its own: torch 2.5 with Triton 3.6 (torch 2.5 asks for Triton 3.1; the
# kernels need >= 3.6), transformers 4.57 (the last release for torch 2.5) and numpy < 2.4 (Triton 3.6's
# interpreter). Not part of `make test`: it downloads torch's CUDA build (several GB).
OLDEST_VENV ?= .venv-oldest
test-oldest:
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q "torch==2.5.1" "transformers==4.57.6" "numpy<2.4" einops matplotlib \
		pytest pytest-benchmark pytest-xdist hypothesis
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps "triton==3.6.0"
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps -e .
	$(TEST_ENV) $(OLDEST_VENV)/bin/python -m pytest $(PYTEST_ARGS) -W ignore::DeprecationWarning tests

# The suite under another Triton release beside the venv's (the kernels support 3.6 to 3.9; `make test` runs the
# venv's, `test-oldest` 3.6), e.g. `make test-triton TRITON=3.8.0`; with numpy < 2.4, which 3.6's interpreter needs.
# The sm_90 compile checks (tests/test_cuda_compile.py) then compile with that release too.
TRITON ?= 3.8.0
test-triton: $(VENV)/.installed
	test -d .triton-$(TRITON) || $(PY) -m pip install -q --no-deps --target .triton-$(TRITON) "triton==$(TRITON)" "numpy<2.4"
	$(TEST_ENV) PYTHONPATH=$(CURDIR)/.triton-$(TRITON) $(PY) -m pytest $(PYTEST_ARGS) tests

bench: $(VENV)/.installed
	$(PY) -m bench all

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .triton-* build *.egg-info .pytest_cache
