"""Benchmark helpers that run without a GPU: pair counting (the TFLOP/s denominators) and the CUDA guard."""
import warnings

import pytest
import torch
import triton.language as tl

from bench.common import NoCudaError, attended_pairs, parse_ints, require_cuda
from bench.moba import _attended_pairs
from longattn.kernels.reference import attention_mask_ref
from longattn.moba import moba_block_selection
from longattn.moba.reference import moba_mask_ref


def test_attended_pairs_matches_mask():
    for tq, tk, causal, window in [(100, 100, True, None), (30, 100, True, 17), (50, 20, True, None),
                                   (40, 60, False, None), (64, 64, True, 64)]:
        mask = attention_mask_ref(tq, tk, causal=causal, window=window)
        assert attended_pairs(tq, tk, causal=causal, window=window) == int(mask.sum())


def test_moba_pairs_match_mask(device):
    q = torch.randn(2, 90, 2, 16, device=device)
    k = torch.randn(2, 90, 1, 16, device=device)
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


def _dry_run(monkeypatch, module):
    """Run a benchmark's glue code on the CPU: every call once (through the interpreter); the n-th timing
    is n ms."""
    import itertools

    import bench.common as common

    clock = itertools.count(1)
    fake = {"require_cuda": lambda: torch.device("cpu"), "time_ms": lambda fn, **kw: (fn(), float(next(clock)))[1],
            "graph_ms": lambda fn: (fn(), float(next(clock)))[1],
            "peak_memory_mb": lambda fn: (fn(), 0.0)[1], "held_memory_mb": lambda fn: (fn(), 0.0)[1],
            "device_peaks": lambda dev: {"copy_GBs": 3000.0, "matmul_TFLOPs": 700.0, "l2_GBs": 6000.0},
            "environment": lambda argv=None: {"device": "cpu (dry run)", "torch": torch.__version__, "triton": "-",
                                              "cuda": None, "date": "-", "command": "dry run"}}
    for name, fn in fake.items():
        for mod in (common, module):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, fn)


DRY_RUNS = {
    "flash": ["--seqlens", "128", "--tokens", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
              "--dtype", "float16", "--modes", "fwd,fwdbwd,decode", "--decode-batches", "2"],
    "flash-softcap": ["--seqlens", "128", "--tokens", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
                      "--dtype", "float16", "--modes", "fwd,fwdbwd,decode", "--decode-batches", "2", "--softcap", "5"],
    "flash-chunk": ["--seqlens", "128", "--tokens", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
                    "--dtype", "float16", "--modes", "fwd,fwdbwd,decode", "--decode-batches", "2",
                    "--chunk-size", "48"],
    "moba": ["--seqlens", "256", "--configs", "64:2", "--tokens", "256", "--heads", "2", "--kv-heads", "1",
             "--head-dim", "32", "--dtype", "float16", "--modes", "fwd,fwdbwd,decode", "--decode-batches", "2"],
    "mla": ["--batches", "2", "--contexts", "100", "--query-tokens", "1,2", "--heads", "16", "--prefill-seqlens", "64",
            "--prefill-heads", "2", "--prefill-tokens", "64", "--dtype", "float16"],
    "nsa": ["--seqlens", "96", "--tokens", "96", "--heads", "4", "--kv-heads", "1", "--qk-dim", "32", "--v-dim", "16",
            "--dtype", "float16", "--decode-batches", "1,2", "--flex-max-seqlen", "0", "--inputs", "smooth",
            "--modes", "fwd,fwdbwd,slc,decode,chunk", "--chunk-tokens", "40"],
    "memory": ["--seqlens", "96", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--ops",
               "flash,moba,mla_prefill", "--dtype", "float16"],
    "rollout": ["--prompts", "48", "--batch", "2", "--new-tokens", "3", "--layers", "1", "--hidden", "64", "--heads",
                "4", "--kv-heads", "2", "--vocab", "128", "--moba", "16:2", "--dtype", "float16",
                "--prefill-chunk", "40"],
    "profile": ["--cases", "nsa_fwd,nsa_decode_b1,moba_fwdbwd,mla_decode_s1,mla_decode_b1,rollout_step,"
                "rollout_step_dynamic,rollout_step_flash",
                "--seqlen", "96", "--nsa-heads", "4,1", "--nsa-dims", "32,16", "--moba-seqlen", "128", "--moba-config",
                "32,2,2,1,16", "--mla", "2,70,16", "--rollout", "2,40",
                "--rollout-model", "--layers 1 --hidden 64 --heads 4 --kv-heads 2 --vocab 128", "--iters", "1",
                "--dtype", "float16"],
}
EXPECTED_ROWS = {"memory": [("flash", "fwd"), ("flash", "fwdbwd"), ("moba", "fwdbwd"), ("mla_prefill", "fwdbwd"),
                            ("mla_prefill", "held")],
                 "flash": [("longattn", "fwd"), ("longattn", "fwdbwd"), ("longattn_no_tma", "fwd"),
                           ("longattn", "decode_b2"), ("longattn_graph", "decode_b2"), ("longattn_paged", "decode_b2"),
                           ("longattn_paged_fp8", "decode_b2")],
                 "flash-softcap": [("longattn", "fwd"), ("longattn", "fwdbwd"), ("longattn", "decode_b2"),
                                   ("flex", "decode_b2"), ("longattn_paged", "decode_b2")],  # flex: no CPU backward
                 "flash-chunk": [("longattn", "fwd"), ("longattn", "fwdbwd"), ("longattn", "decode_b2"),
                                 ("flex", "decode_b2"), ("longattn_paged", "decode_b2")],  # flex: no CPU backward
                 "profile": [],
                 "rollout": [(kind, "rollout") for kind in ("sdpa", "sdpa_dynamic", "flash", "flash_fp8", "moba", "nsa")],
                 "moba": [("longattn", "fwd"), ("longattn", "fwdbwd"), ("longattn", "decode_b2"),
                          ("longattn_pool", "decode_b2"), ("longattn_graph", "decode_b2")],  # flex: no CPU backward
                 "mla": [("longattn", "fwd"), ("longattn", "fwdbwd"), ("longattn_graph", "fwd"),
                         ("longattn_fp8", "fwd"), ("longattn_no_tma", "fwd"), ("longattn_unchecked_no_tma", "fwd")],
                 "nsa": [("longattn", m) for m in ("fwd", "fwdbwd", "bwd", "slc_fwd", "slc_fwdbwd", "decode_b1",
                                                   "decode_b2")]
                 + [("longattn_kv_major", "slc_fwd"), ("longattn_query4", "slc_fwd"), ("longattn_graph", "decode_b1"),
                    ("longattn_no_tma", "fwd"), ("longattn_no_tma", "slc_fwd"), ("longattn_sinks", "fwd"),
                    ("longattn_sinks", "fwdbwd"), ("longattn", "chunk_c40"),
                    ("longattn_decode_rows", "chunk_c40"), ("longattn_flash", "chunk_c40")]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dry run (the kernels need the interpreter there); "
                                                    "a GPU runs the benchmarks themselves")
@pytest.mark.parametrize("op", sorted(DRY_RUNS))
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # (CPU: flex's unfused path)
def test_bench_dry_run(op, monkeypatch, tmp_path):
    """Each benchmark's glue (argument parsing, peers, roofline and speedup columns, result files) on tiny
    CPU shapes."""
    import argparse
    import importlib

    module = importlib.import_module(f"bench.{op.split('-')[0]}")  # ("flash-softcap": bench.flash)
    _dry_run(monkeypatch, module)
    p = argparse.ArgumentParser()
    module.add_args(p)
    rows = module.run(p.parse_args(DRY_RUNS[op] + ["--out", str(tmp_path)]), [op.split("-")[0]])
    if op == "profile":  # every case timed, its CPU ops listed
        cases = DRY_RUNS[op][1].split(",")
        assert [r["case"] for r in rows if r["kernel"].startswith("(wall")] == cases
        assert all(sum(r["case"] == c for r in rows) > 2 for c in cases)
        # and its host side: a call's time to return, and the Python functions taking most of it
        assert [r["case"] for r in rows if r["kernel"] == "(host: a call's time to return)"] == cases
        assert all(any(r["case"] == c and r["kernel"].startswith("host ") for r in rows) for c in cases)
    got = {(r["impl"], r["mode"]) for r in rows if "impl" in r}
    for want in EXPECTED_ROWS[op]:
        assert want in got, f"missing row {want}: {sorted(got)}"
    assert (tmp_path / f"{module.__name__[6:]}.md").exists() and (tmp_path / f"{module.__name__[6:]}.json").exists()
    assert all(r["%roof"] > 0 for r in rows if "%roof" in r)
    if op == "rollout":  # greedy completions compared with transformers' SDPA attention's (NSA: another model)
        agree = {r["impl"]: r.get("agree") for r in rows}
        assert agree["sdpa"] == 1 and agree["nsa"] is None and all(0 <= a <= 1 for a in agree.values() if a is not None)
        assert agree["flash"] == 1
    if op == "nsa":  # the selected branch's gather against the L2 bandwidth
        assert {r["impl"] for r in rows if r.get("%l2")} == {"longattn", "longattn_no_tma", "longattn_query4"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dry run")
def test_bench_rollout_on_mla_model(monkeypatch, tmp_path):
    """`python -m bench rollout --arch deepseek_v3`: a DeepSeek-V3-style model (MLA), its kinds (transformers' SDPA,
    longattn's MLA module, MoBA) on tiny CPU shapes; kinds of the other arch refused."""
    import argparse

    from bench import rollout as bench_rollout

    _dry_run(monkeypatch, bench_rollout)
    p = argparse.ArgumentParser()
    bench_rollout.add_args(p)
    argv = ["--arch", "deepseek_v3", "--prompts", "40", "--batch", "2", "--new-tokens", "3", "--layers", "1",
            "--hidden", "64", "--heads", "2", "--vocab", "128", "--moba", "16:2", "--dtype", "float16",
            "--kinds", "sdpa,mla,moba", "--out", str(tmp_path)]
    import longattn.mla.module as mla_module

    calls = []
    decode = mla_module.mla_decode
    monkeypatch.setattr(mla_module, "mla_decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    rows = bench_rollout.run(p.parse_args(argv), ["rollout"])
    assert len(calls) == 2 * 2  # the mla kind's 2 decoding steps after its prefill, warm-up and timed run
    assert [(r["impl"], r["arch"], r["Hkv"], r["D"]) for r in rows] == \
        [(k, "deepseek_v3", 2, 192) for k in ("sdpa", "mla", "moba")]
    assert all(r["step_ms"] > 0 and r["prefill_ms"] > 0 for r in rows)
    # longattn's MLA module computes transformers' attention: the same greedy tokens, log-probs within rounding
    assert rows[0]["agree"] == rows[1]["agree"] == 1 and rows[0]["dlogp"] == 0 and rows[1]["dlogp"] < 0.05
    with pytest.raises(ValueError, match="not among the kinds of --arch deepseek_v3"):
        bench_rollout.run(p.parse_args(argv[:-3] + ["nsa", "--out", str(tmp_path)]), ["rollout"])


def test_rollout_agreement():
    """bench rollout's agree / dlogp: the share of each completion before its first difference from the reference's,
    and the mean |log p difference| over those tokens."""
    from bench.rollout import _agreement
    from longattn.rollout import Rollout

    ref = Rollout([[1, 2, 3, 4], [5, 6]], [[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0]])
    got = Rollout([[1, 2, 9, 4], [7, 6]], [[-1.5, -2.0, -0.5, -4.0], [-3.0, -1.0]])
    assert _agreement(got, ref) == pytest.approx(((2 / 4 + 0 / 2) / 2, 0.25))
    assert _agreement(ref, ref) == (1.0, 0.0)
    assert _agreement(Rollout([[5], [7]], [[0.0], [0.0]]), ref) == (0.0, None)


@pytest.mark.parametrize("block,topk,hq,hkv,shared", [(256, 2, 4, 2, False), (64, 3, 2, 1, True),
                                                      (128, 4, 2, 2, False)])
def test_flex_selection_mask(block, topk, hq, hkv, shared, device):
    """The flex peer's BlockMask, built from the selection (per query head, or shared by a GQA group): every
    attended pair lies in a listed tile, every full tile is attended throughout, and flex_attention (eager)
    equals the reference on the same selection."""
    from bench.common import flex_selection
    from longattn.moba.reference import moba_attention_ref

    T, tile = 512, 128
    q, k, v = (torch.randn(1, T, h, 32, device=device) for h in (hq, hkv, hkv))
    sel = moba_block_selection(q, k, block_size=block, topk=topk)
    if shared:  # one list per KV head, as NSA's selected branch
        sel = sel[:, :, ::hq // hkv]
    run = flex_selection(sel, block, hq, compile=False)
    per_head = sel.repeat_interleave(hq // sel.shape[2], dim=2)
    bm, nt = run.block_mask, T // tile
    mask = moba_mask_ref(per_head[0], T, T, block)
    for h in range(hq):
        tiles = mask[h].view(nt, tile, nt, tile).permute(0, 2, 1, 3)
        for qt in range(nt):
            listed = set(bm.kv_indices[0, h, qt, :int(bm.kv_num_blocks[0, h, qt])].tolist())
            full = set(bm.full_kv_indices[0, h, qt, :int(bm.full_kv_num_blocks[0, h, qt])].tolist())
            assert not listed & full
            for kt in range(nt):
                assert kt in listed | full or not tiles[qt, kt].any(), (h, qt, kt)
                assert kt not in full or tiles[qt, kt].all(), (h, qt, kt)
    if topk * block >= T:  # every block selected: all tiles below the diagonal are full
        assert int(bm.full_kv_num_blocks.sum()) == hq * nt * (nt - 1) // 2
    with warnings.catch_warnings():  # eager flex_attention (unfused)
        warnings.simplefilter("ignore", UserWarning)
        out = run(q, k, v)
    want = moba_attention_ref(q, k, v, block_size=block, topk=topk, selection=per_head)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_autotune_report(tmp_path):
    """`python -m bench autotune` lists every candidate Triton timed (its on-disk autotune cache, as Triton 3.6-3.9
    write it), fastest first per key, with its time over the fastest's; a candidate that failed is listed last."""
    import json

    from bench import __main__ as cli

    def tuned(folder, kernel, key, timings):
        configs = [({"kwargs": kw, "num_warps": w, "num_stages": s, "num_ctas": 1, "maxnreg": r, "pre_hook": None},
                    t) for kw, w, s, r, t in timings]
        (tmp_path / "cache" / folder).mkdir(parents=True)
        (tmp_path / "cache" / folder / f"{kernel}.autotune.json").write_text(
            json.dumps({"key": key, "configs_timings": configs}))

    tuned("a1", "_mla_decode_kernel", [64, 1, "torch.bfloat16"],
          [({"BLOCK_N": 64, "SHARED_P": False}, 8, 2, None, [0.6, 0.55, 0.65]),
           ({"BLOCK_N": 64, "SHARED_P": True}, 8, 2, None, [0.5, 0.45, 0.55]),
           ({"BLOCK_N": 16, "SHARED_P": True}, 8, 6, 128, [float("inf")] * 3)])
    tuned("b2", "_flash_fwd_kernel", [128, 0, 128, "torch.float16"], [({"BLOCK_M": 64}, 4, 3, None, [2.0, 1.9, 2.1])])
    out = tmp_path / "out"
    assert cli.main(["autotune", "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    rows = json.loads((out / "autotune.json").read_text())["rows"]
    assert [(r["kernel"], r["config"], r["ms"], r["x_best"]) for r in rows] == [
        ("_flash_fwd_kernel", "BLOCK_M=64 w4 s3", 2.0, 1.0),
        ("_mla_decode_kernel", "BLOCK_N=64 SHARED_P=True w8 s2", 0.5, 1.0),
        ("_mla_decode_kernel", "BLOCK_N=64 SHARED_P=False w8 s2", 0.6, pytest.approx(1.2)),
        ("_mla_decode_kernel", "BLOCK_N=16 SHARED_P=True w8 s6 r128", None, None)]
    assert rows[1]["key"] == "(64, 1, 'torch.bfloat16')"
    assert "| _mla_decode_kernel |" in (out / "autotune.md").read_text()


def test_gpu_run_order(monkeypatch, tmp_path):
    """On a GPU (bench/gpu_suite.sh) the tests run GPU-only ones first, then bfloat16 / dtype-less, then the float16
    / float32 ones, each group first those no earlier run's log (LONGATTN_TEST_DURATIONS) timed, in their collected
    order, then the longest first as the logs timed them; under xdist's n workers, the first 2n paired longest with
    shortest (each worker's first two)."""
    import os
    from types import SimpleNamespace

    from conftest import _sort_for_gpu

    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)

    names = [("t.py::a[float16]", set()), ("t.py::b[bfloat16]", set()), ("t.py::c", {"gpu"}), ("t.py::d", set()),
             ("t.py::e[float32-x]", set()), ("t.py::f[float32]", {"gpu"}), ("t.py::test_bfloat16_x[float32]", set()),
             ("t.py::g[q[1, 2]]", set())]
    items = [SimpleNamespace(nodeid=n, keywords=k) for n, k in names]
    _sort_for_gpu(items)
    assert [i.nodeid[6] for i in items] == list("cfbdtgae")
    log = tmp_path / "tests.log"
    log.write_text("passed      1.50s t.py::d (call)\nfailed      9.00s t.py::a[float16] (call)\nboom\n"
                   "passed      2.25s t.py::g[q[1, 2]] (call)\nskipped     0.00s t.py::c (call)\n"
                   "passed      7.00s t.py::f[float32] (setup)\n")
    later = tmp_path / "later.log"  # a later run's times win; a file that cannot be read is passed over
    later.write_text("passed      0.50s t.py::g[q[1, 2]] (call)\npassed      0.75s t.py::b[bfloat16] (call)\n")
    monkeypatch.setenv("LONGATTN_TEST_DURATIONS", os.pathsep.join([str(log), str(tmp_path / "missing"), str(later)]))
    _sort_for_gpu(items)  # (f, t, e: not timed, first in their groups)
    assert [i.nodeid[6] for i in items] == list("fctdbgea")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    _sort_for_gpu(items)
    assert [i.nodeid[6] for i in items] == list("fdctbgea")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "5")  # more workers than pairs: the order as it was
    _sort_for_gpu(items)
    assert [i.nodeid[6] for i in items] == list("fctdbgea")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dry run")
def test_bench_stopped_keeps_its_rows(monkeypatch, tmp_path):
    """A benchmark stopped by a time limit's SIGTERM (gpu_suite.sh) writes the rows it measured, marked as cut
    short, and `python -m bench` exits with 130; the signal's handler is restored afterwards."""
    import json
    import os
    import signal

    import bench.flash as flash
    from bench import __main__ as cli

    _dry_run(monkeypatch, flash)
    calls = []

    def time_ms(fn, **kw):
        calls.append(fn())
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return float(len(calls))

    monkeypatch.setattr(flash, "time_ms", time_ms)
    before = signal.getsignal(signal.SIGTERM)
    argv = ["flash"] + DRY_RUNS["flash"] + ["--out", str(tmp_path)]
    assert cli.main(argv) == 130
    assert signal.getsignal(signal.SIGTERM) is before
    rows = json.loads((tmp_path / "flash.json").read_text())["rows"]
    assert [r["ms"] for r in rows] == [1.0, 2.0]
    assert "cut short" in (tmp_path / "flash.md").read_text()


def test_bench_rows_written_as_they_come(monkeypatch, tmp_path):
    """Each row is written as it is measured, marked as cut short (a run killed outright keeps them); the run's end
    replaces the files, unmarked, with the plot."""
    import argparse
    import json

    import bench.flash as flash

    _dry_run(monkeypatch, flash)
    seen = []

    def time_ms(fn, **kw):  # the files as they stand when each timing starts
        path = tmp_path / "flash.json"
        seen.append(len(json.loads(path.read_text())["rows"]) if path.exists() else 0)
        assert not path.exists() or "cut short" in (tmp_path / "flash.md").read_text()
        fn()
        return float(len(seen))

    monkeypatch.setattr(flash, "time_ms", time_ms)
    p = argparse.ArgumentParser()
    flash.add_args(p)
    rows = flash.run(p.parse_args(DRY_RUNS["flash"] + ["--out", str(tmp_path)]), ["flash"])
    assert seen[:2] == [0, 1] and max(seen) >= 2 and seen == sorted(seen)  # (a peer that fails adds no row)
    assert len(json.loads((tmp_path / "flash.json").read_text())["rows"]) == len(rows)
    assert "cut short" not in (tmp_path / "flash.md").read_text() and (tmp_path / "flash.png").exists()


def test_l2_read_kernel_reads_everything(device):
    """The L2-bandwidth kernel of the roofline reads every element of its buffer once per pass (its programs'
    sums add up to passes x the buffer's sum), whatever the programs per chunk."""
    from bench.common import l2_read

    x = torch.rand(8 * 64, device=device)
    for programs in (3, 8, 20):
        out = torch.full((programs,), float("nan"), device=device)
        l2_read(x, out, reps=3, chunk=64)
        used = min(programs, 8)
        torch.testing.assert_close(out[:used].sum(), 3 * x.sum(), rtol=1e-5, atol=1e-4)


def test_every_autotuner_compiles_ahead_in_bench(monkeypatch, device):
    """`python -m bench` makes any Triton autotuner (a peer's too) compile its candidates ahead with the launch's
    own arguments, and only while it runs."""
    import triton
    from triton.runtime.autotuner import Autotuner

    import bench.common as common
    from longattn.kernels import utils

    @triton.autotune(configs=[triton.Config({"B": 16}), triton.Config({"B": 32})], key=[],
                     do_bench=utils.AUTOTUNE_BENCH)
    @triton.jit
    def peer(X, n, B: tl.constexpr):  # (tl: a module global, where the compiler looks names up)
        pass

    compiled = []  # the parameters of each launch compiled ahead (compile_candidates uses only those)
    monkeypatch.setattr(utils, "compile_candidates", lambda fn, configs, args: compiled.append(
        (fn, configs, {k: v for k, v in args.items() if k in fn.arg_names})))
    original = Autotuner.prune_configs
    x = torch.zeros(4, device=device)
    with common.every_autotuner_compiling_ahead():
        peer[(1,)](x, 4)
    assert Autotuner.prune_configs is original
    assert compiled == [(peer.fn, peer.configs, {"X": x, "n": 4})]
    peer.cache.clear()
    peer[(1,)](x, 4)
    assert len(compiled) == 1
    # longattn's own autotuners compile theirs ahead already: not twice
    ours = utils.autotune(peer.configs, [], lambda configs, named_args, **kw: configs)(peer.fn)
    with common.every_autotuner_compiling_ahead():
        ours[(1,)](x, 4)
    assert len(compiled) == 2 and compiled[1][0] is peer.fn


def test_gpu_suite_default_benchmarks_parse():
    """Each entry of gpu_suite.sh's default BENCH_OPS is a valid `python -m bench` command line (a typo there would
    cost a lent GPU's benchmark its share of the call)."""
    import re
    import shlex
    from pathlib import Path

    from bench.__main__ import parser

    script = (Path(__file__).parents[1] / "bench" / "gpu_suite.sh").read_text()
    (default,) = re.findall(r'\$\{BENCH_OPS:-([^}]*)\}', script)
    entries = [re.sub(r"^[1-9][0-9]*:\s*", "", e.strip()) for e in default.split(";")]  # an optional weight first
    assert len(entries) >= 5 and all(entries)
    parse = parser()[0].parse_args
    for entry in entries:
        args = parse(shlex.split(entry) + ["--out", "x"])
        assert args.op == entry.split()[0]
        for name in ("seqlens", "contexts", "batches", "prompts", "prefill_seqlens"):  # comma lists of sizes
            if isinstance(getattr(args, name, None), str):
                assert parse_ints(getattr(args, name)), (entry, name)
    with pytest.raises(SystemExit):  # a mode the benchmark does not know is refused, not skipped
        parse(["nsa", "--modes", "fwd,slc_fwd"])
    assert parse(["nsa", "--modes", "fwd, slc"]).modes == ["fwd", "slc"]


def test_nsa_flop_model_counts_attended_pairs(device):
    """bench nsa's FLOP model counts the pairs the op attends: compressed blocks ended at or before the query, the
    selected blocks (the op's own selection; causal in the query's block), the window."""
    from bench.nsa import _flops, _slc_pairs
    from longattn.nsa import NSAConfig, nsa_attention

    cfg = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=3, window=20)
    T = 100
    q, k, v = (torch.randn(1, T, h, 16, device=device) for h in (2, 1, 1))
    gates = [torch.rand(1, T, 2, device=device) for _ in range(3)]
    _, sel = nsa_attention(q, k, v, *gates, config=cfg, return_selection=True)
    t = torch.arange(T)
    blocks = sel[0, :, 0].cpu()  # (T, topk), the one KV head's
    starts = blocks.clamp(min=0) * cfg.slc_block
    slc = ((torch.minimum(starts + cfg.slc_block, t[:, None] + 1) - starts) * (blocks >= 0)).sum(1)
    assert torch.equal(_slc_pairs(t.double(), cfg.slc_block, cfg.slc_topk).long(), slc)
    cmp = torch.tensor([sum(j * cfg.cmp_stride + cfg.cmp_block - 1 <= i for j in range(T)) for i in range(T)])
    swa = (t + 1).clamp(max=cfg.window)
    assert _flops(cfg, T, 1, 2, 16, 16) == 2.0 * 32 * int((cmp + slc + swa).sum()) * 2
