"""Benchmark helpers that run without a GPU: pair counting (the TFLOP/s denominators) and the CUDA guard."""
import pytest
import torch

from bench.common import NoCudaError, attended_pairs, require_cuda
from bench.moba import _attended_pairs
from longattn.kernels.reference import attention_mask_ref
from longattn.moba import moba_block_selection
from longattn.moba.reference import moba_mask_ref


def test_attended_pairs_matches_mask():
    for tq, tk, causal, window in [(100, 100, True, None), (30, 100, True, 17), (50, 20, True, None),
                                   (40, 60, False, None), (64, 64, True, 64)]:
        mask = attention_mask_ref(tq, tk, causal=causal, window=window)
        assert attended_pairs(tq, tk, causal=causal, window=window) == int(mask.sum())


def test_moba_pairs_match_mask():
    q = torch.randn(2, 90, 2, 16)
    k = torch.randn(2, 90, 1, 16)
    sel = moba_block_selection(q, k, block_size=16, topk=3)
    want = sum(int(moba_mask_ref(sel[b], 90, 90, 16).sum()) for b in range(2))
    assert _attended_pairs(sel, 90, 16) == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_refuses_without_cuda():
    try:
        require_cuda()
    except NoCudaError as e:
        assert "CUDA" in str(e)
    else:
        raise AssertionError("require_cuda() must raise without CUDA")
