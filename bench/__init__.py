"""longattn benchmarks: `python -m bench <op> ...` (GPU only). Results go to bench/results/<device>/."""
