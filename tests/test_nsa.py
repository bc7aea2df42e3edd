"""NSA op (Triton branches) against the PyTorch reference: output, selection, every gradient."""
import dataclasses
import itertools

import pytest
import torch

from longattn import flash_attention
from longattn.nsa import NSAConfig, nsa_attention, nsa_attention_ref, nsa_decode
from longattn.nsa.reference import compress_mean_ref
from longattn.nsa.kernels import SELECT_TILES
from longattn.nsa.ops import _gates, _mean_compress
from helpers import (assert_close, assert_compiled_matches_eager, assert_first_order_only, assert_same_as_widened,
                     capture_graph, leaf, sorted_selection)

CFG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=4, window=16)


def _rounded_mean(x, dtype, config, lens):
    """Mean-pooled blocks (float32) rounded to ``dtype``: dense (B, T, H, D) or packed with ``lens``."""
    if lens is None:
        return torch.stack([compress_mean_ref(xb, config) for xb in x]).to(dtype).float()
    return torch.cat([compress_mean_ref(s, config) for s in x.split(lens)]).to(dtype).float()


def _check(q, k, v, gates, dtype, *, config=CFG, learnable=False, sinks=None, softcap=None, **varlen):
    lens = None
    if "cu_seqlens" in varlen:
        cu = varlen["cu_seqlens"].tolist()
        lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    kc = vc = None
    if learnable:  # stand-in for a learnable compressor's output: any tensors of the right shape
        n = sum(config.num_cmp_blocks(x) for x in lens) if lens else config.num_cmp_blocks(k.shape[1])
        shape_k = (n,) + k.shape[-2:] if lens else (k.shape[0], n) + k.shape[-2:]
        shape_v = (n,) + v.shape[-2:] if lens else (v.shape[0], n) + v.shape[-2:]
        kc, vc = torch.randn(shape_k, dtype=dtype, device=q.device), torch.randn(shape_v, dtype=dtype, device=q.device)
    ins = [q, k, v] + gates + ([kc, vc] if learnable else []) + ([sinks] if sinks is not None else [])
    ours = [leaf(t) for t in ins]
    refs = [leaf(t, torch.float32) for t in ins]
    extra = dict(k_cmp=ours[6], v_cmp=ours[7]) if learnable else {}
    if sinks is not None:
        varlen = dict(varlen, sinks=ours[-1])
    # the op rounds its mean-pooled keys to the input dtype (bf16 moves scores by ~0.4%, enough to flip
    # near-tied blocks): the reference gets the same rounding, differentiable (a cast passes gradients through)
    extra_r = dict(k_cmp=refs[6], v_cmp=refs[7]) if learnable else \
        dict(k_cmp=_rounded_mean(refs[1], dtype, config, lens), v_cmp=_rounded_mean(refs[2], dtype, config, lens))
    out, sel = nsa_attention(*ours[:6], config=config, return_selection=True, softcap=softcap, **extra, **varlen)
    out_r, sel_r = nsa_attention_ref(*refs[:6], config=config, return_selection=True, softcap=softcap, **extra_r,
                                     **dict(varlen, sinks=refs[-1]) if sinks is not None else varlen)
    assert torch.equal(sorted_selection(sel), sorted_selection(sel_r)), "selection differs from the reference"
    assert out.dtype == dtype
    assert_close(out, out_r, dtype, "out")
    dout = torch.randn_like(out_r)
    (out.float() * dout).sum().backward()
    (out_r * dout).sum().backward()
    names = ["dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa"] + (["dk_cmp", "dv_cmp"] if learnable else []) + \
        (["dsinks"] if sinks is not None else [])
    assert len(names) == len(ours)
    for name, a, b in zip(names, ours, refs):
        assert_close(a.grad, b.grad, dtype, name, factor=2)


def test_nsa_strided_inputs(device):
    """q, k, v and the gates as views into fused projections (strided, as a layer's split of them gives them): the
    output and every gradient (q's accumulated over the three branches in place) equal those of contiguous copies."""
    B, T, Hq, Hkv, D = 1, 100, 4, 2, 32
    fused = torch.randn(B, T, Hq + 2 * Hkv, D, device=device)
    fused_gates = torch.rand(B, T, 3, Hq, device=device)
    dout = torch.randn(B, T, Hq, D, device=device)

    def run(make):
        base, gbase = leaf(fused), leaf(fused_gates)
        q, k, v = (make(base[:, :, a:b]) for a, b in ((0, Hq), (Hq, Hq + Hkv), (Hq + Hkv, Hq + 2 * Hkv)))
        out = nsa_attention(q, k, v, *(make(gbase[:, :, i]) for i in range(3)), config=CFG)
        out.backward(dout)
        return out, base.grad, gbase.grad

    for name, a, b in zip(("out", "d(qkv)", "d(gates)"), run(lambda t: t), run(lambda t: t.contiguous())):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("B,T,Hq,Hkv,D", [(2, 100, 4, 2, 32), (1, 130, 2, 2, 16), (1, 90, 16, 1, 16)],
                         ids=["gqa2", "gqa1", "gqa16"])
def test_nsa_dense(B, T, Hq, Hkv, D, dtype, device):
    q = torch.randn(B, T, Hq, D, device=device, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, device=device, dtype=dtype)
    gates = [torch.rand(B, T, Hq, device=device) for _ in range(3)]
    _check(q, k, v, gates, dtype)


def test_nsa_varlen_learnable_compression(dtype, device):
    lens = [70, 5, 41]  # the middle sequence is shorter than a compressed block
    cu = torch.tensor([0, 70, 75, 116], dtype=torch.int32, device=device)
    q = torch.randn(116, 4, 32, device=device, dtype=dtype)
    k = torch.randn(116, 2, 32, device=device, dtype=dtype)
    v = torch.randn(116, 2, 16, device=device, dtype=dtype)
    gates = [torch.rand(116, 4, device=device) for _ in range(3)]
    _check(q, k, v, gates, dtype, learnable=True, cu_seqlens=cu)
    assert sum(lens) == 116


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_nsa_sinks(layout, dtype, device):
    """Attention sinks (a logit per query head in each branch's softmax, gpt-oss's): output and every gradient, the
    sinks' too, equal the reference's; a head without a sink (-inf), a sequence shorter than a compressed block
    (its compressed branch sees no key: 0 whatever the sink), GQA 2 (dense) and 4 (varlen, learnable compression)."""
    if layout == "dense":
        q, k, v = (torch.randn(2, 100, h, 32, device=device, dtype=dtype) for h in (4, 2, 2))
        gates = [torch.rand(2, 100, 4, device=device) for _ in range(3)]
        sinks = torch.tensor([0.5, -1.0, 2.0, float("-inf")], device=device)
        _check(q, k, v, gates, dtype, sinks=sinks)
        return
    cu = torch.tensor([0, 70, 75, 116], dtype=torch.int32, device=device)
    q = torch.randn(116, 8, 32, device=device, dtype=dtype)
    k, v = torch.randn(116, 2, 32, device=device, dtype=dtype), torch.randn(116, 2, 16, device=device, dtype=dtype)
    gates = [torch.rand(116, 8, device=device) for _ in range(3)]
    _check(q, k, v, gates, dtype, learnable=True, cu_seqlens=cu, sinks=torch.randn(8, device=device) * 2)


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_nsa_softcap(layout, dtype, device):
    """Soft-capped scores in every branch (Gemma 2's ``c * tanh(scale * q.k / c)``; a cap of 1.5 against scores of
    about 1: it changes them), the compressed probabilities that score the selection too: output, selection and
    every gradient equal the reference's; GQA 2 (dense), GQA 4 with learnable compression and sinks (varlen); a
    chunk of queries after a prefix equals the whole sequences' rows."""
    cap = 1.5
    if layout == "dense":
        q, k, v = (torch.randn(2, 100, h, 32, device=device, dtype=dtype) for h in (4, 2, 2))
        gates = [torch.rand(2, 100, 4, device=device) for _ in range(3)]
        _check(q, k, v, gates, dtype, softcap=cap)
        f = [t.float() for t in (q, k, v, *gates)]
        assert (nsa_attention_ref(*f, config=CFG, softcap=cap) - nsa_attention_ref(*f, config=CFG)).abs().max() > 0.05
        if dtype == torch.float16:  # (the chunk's kernels are the same in every dtype)
            _check_chunk(q, k, v, gates, 33, [100, 100], dtype, softcap=cap)
        return
    cu = torch.tensor([0, 70, 75, 116], dtype=torch.int32, device=device)
    q = torch.randn(116, 8, 32, device=device, dtype=dtype)
    k, v = torch.randn(116, 2, 32, device=device, dtype=dtype), torch.randn(116, 2, 16, device=device, dtype=dtype)
    gates = [torch.rand(116, 8, device=device) for _ in range(3)]
    _check(q, k, v, gates, dtype, learnable=True, cu_seqlens=cu, sinks=torch.randn(8, device=device) * 2,
           softcap=cap)


def test_nsa_keeps_two_branch_outputs_for_backward(device):
    """Between forward and backward nsa_attention holds, beside its inputs and the mean-pooled keys, the compressed
    and selected branches' outputs and lse and the selection: not the window branch's output (the backward computes
    it again; test_nsa_dense and the rest check the gradients this gives)."""
    B, T, Hq, Hkv, D, Dv = 1, 100, 4, 2, 32, 16
    x = [leaf(torch.randn(B, T, h, d, device=device)) for h, d in ((Hq, D), (Hkv, D), (Hkv, Dv))]
    gates = [leaf(torch.rand(B, T, Hq, device=device)) for _ in range(3)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = nsa_attention(*x, *gates, config=CFG)
    outputs = [t for t in saved if tuple(t.shape) == (B * T, Hq, Dv)]
    assert len(outputs) == 2, [tuple(t.shape) for t in saved]
    assert all(t.numel() <= T * Hq * D for t in saved), [tuple(t.shape) for t in saved]  # nothing beyond q's size
    out.sum().backward()
    assert all(t.grad is not None for t in x + gates)


def test_nsa_degenerate_branches_equal_dense(device):
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=8, window=128)
    q, k, v = torch.randn(1, 100, 4, 16, device=device), torch.randn(1, 100, 2, 16, device=device), \
        torch.randn(1, 100, 2, 16, device=device)
    one, zero = torch.ones(1, 100, 4, device=device), torch.zeros(1, 100, 4, device=device)
    dense = flash_attention(q, k, v)
    torch.testing.assert_close(nsa_attention(q, k, v, zero, one, zero, config=cfg), dense, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(nsa_attention(q, k, v, zero, zero, one, config=cfg), dense, atol=2e-5, rtol=1e-4)


def test_nsa_inference_equals_reference(device):
    """Without gradients the selected branch's launch writes the gated sum over the compressed branch's output
    (the selected branch's own output is never stored)."""
    q, k, v = (torch.randn(1, 90, h, 32, device=device) for h in (4, 2, 2))
    gates = [torch.rand(1, 90, 4, device=device) for _ in range(3)]
    with torch.no_grad():
        out = nsa_attention(q, k, v, *gates, config=CFG)
    torch.testing.assert_close(out, nsa_attention_ref(q, k, v, *gates, config=CFG), atol=2e-5, rtol=1e-4)


def _check_chunk(q, k, v, gates, lq, lk, dtype, grads=True, **kw):
    """nsa_attention on the last lq[b] tokens of each sequence (varlen when lq is a list of several) equals the rows
    of the call on the whole sequences, its selection too; with ``grads`` so do the gradients of q, k, v, the gates
    and k_cmp / v_cmp (when given) from an output gradient on those rows (the other rows' q and gates get none in
    either call)."""
    cfg = kw.pop("config", CFG)
    comp = {n: kw.pop(n) for n in ("k_cmp", "v_cmp") if n in kw}
    if q.dim() == 4:  # dense: the last lq tokens of every row
        rows, whole_lens, part_lens = (slice(None), slice(q.shape[1] - lq, None)), {}, {}
    else:
        cu_k = torch.tensor([0, *itertools.accumulate(lk)], dtype=torch.int32, device=q.device)
        rows = (torch.cat([torch.arange(e - n, e) for n, e in zip(lq, cu_k[1:].tolist())]).to(q.device),)
        cu_q = torch.tensor([0, *itertools.accumulate(lq)], dtype=torch.int32, device=q.device)
        whole_lens, part_lens = dict(cu_seqlens=cu_k), dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    per_query = (True, False, False, True, True, True)  # q and the gates are the queries' rows

    def run(whole: bool, dout=None):
        ins = [leaf(t) for t in (q, k, v, *gates)]
        cmp_ins = {n: leaf(t) for n, t in comp.items()}
        args = [t if whole or not cut else t[rows] for t, cut in zip(ins, per_query)]
        with torch.set_grad_enabled(grads):
            out, sel = nsa_attention(*args, config=cfg, return_selection=True, **cmp_ins,
                                     **(whole_lens if whole else part_lens), **kw)
        if whole:
            out, sel = out[rows], sel[rows]
        if not grads:
            return out, sel, None, []
        dout = torch.randn(out.shape, device=out.device) if dout is None else dout
        (out.float() * dout).sum().backward()
        return out.detach(), sel, dout, [t.grad for t in ins + list(cmp_ins.values())]

    part, sel, dout, got = run(False)
    want, want_sel, _, wanted = run(True, dout)
    assert_close(part, want, dtype, "chunk")
    same = torch.equal(sorted_selection(sel), sorted_selection(want_sel))
    if dtype == torch.bfloat16:  # (a near tie may go the other way: the compressed branch's lse rounds alike)
        assert _rows_apart(sel, want_sel) <= 1
    else:
        assert same
    if same:  # (the gradients of a row that selected other blocks differ)
        for name, a, b in zip(["dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa", "dk_cmp", "dv_cmp"], got, wanted):
            assert_close(a, b, dtype, name, factor=2)


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_nsa_chunk_after_prefix(layout, dtype, device):
    """Queries that are the last tokens of their sequences (a chunk after a cached prefix, inference): the rows of
    the call on the whole sequences, selection included; chunks crossing selection and compressed blocks, a whole
    sequence and one without queries among them (varlen, with learnable compressed keys), GQA 2."""
    if layout == "dense":
        q, k, v = (torch.randn(2, 90, h, d, device=device, dtype=dtype) for h, d in ((4, 32), (2, 32), (2, 16)))
        gates = [torch.rand(2, 90, 4, device=device) for _ in range(3)]
        _check_chunk(q, k, v, gates, 33, [90, 90], dtype)
        return
    lk, lq = [90, 37, 64, 20], [33, 37, 0, 5]
    q, k, v = (torch.randn(sum(lk), h, d, device=device, dtype=dtype) for h, d in ((4, 32), (2, 32), (2, 16)))
    gates = [torch.rand(sum(lk), 4, device=device) for _ in range(3)]
    n_cmp = sum(CFG.num_cmp_blocks(n) for n in lk)
    kc, vc = (torch.randn(n_cmp, 2, d, device=device, dtype=dtype) for d in (32, 16))
    _check_chunk(q, k, v, gates, lq, lk, dtype, k_cmp=kc, v_cmp=vc)


def _force_per_query(monkeypatch, queries: int, heads: int = 16) -> list:
    """The selected branch's forward launched with a tile per query (PER_QUERY), ``queries`` queries of a group of
    ``heads`` per program, in place of the autotuner's choice; returns a list that records each such launch."""
    from longattn.kernels.utils import COMPILE_OPTIONS, cdiv
    from longattn.nsa import ops
    from longattn.nsa.kernels import _nsa_selected_fwd_tuned, selected_rows

    original = ops._launch_selected

    def launch(tuned, args, meta, max_q, programs_h, n_seq, group_heads):
        if tuned is not _nsa_selected_fwd_tuned:
            return original(tuned, args, meta, max_q, programs_h, n_seq, group_heads)
        assert group_heads == heads
        tuned.fn[(cdiv(max_q, queries), programs_h, n_seq)](*args, **meta, QB=queries,
                                                            ROWS=selected_rows(queries, heads), SPLIT_SCORES=False,
                                                            PER_QUERY=True, **COMPILE_OPTIONS)
        launched.append(queries)

    launched = []
    monkeypatch.setattr(ops, "_launch_selected", launch)
    return launched


@pytest.mark.parametrize("queries", [1, 2, 4])
def test_nsa_chunk_after_prefix_gpu_tiles(queries, monkeypatch, device):
    """The same through the interpreter with the GPU's tiles (the selection's first candidate, the flash kernels'),
    the selected branch by 1 query per program (its shared tile) or 2 and 4 (a tile per query), a group of 16; the
    gradients once (the backward's kernels are the same for the three)."""
    monkeypatch.setenv("LONGATTN_INTERPRET_TILES", "gpu")
    launched = _force_per_query(monkeypatch, queries) if queries > 1 else [None]
    lk, lq = [150, 70], [61, 70]
    dtype = torch.float16
    q, k, v = (torch.randn(sum(lk), h, d, device=device, dtype=dtype) for h, d in ((16, 32), (1, 32), (1, 16)))
    gates = [torch.rand(sum(lk), 16, device=device) for _ in range(3)]
    _check_chunk(q, k, v, gates, lq, lk, dtype, grads=queries == 1)
    assert launched


@pytest.mark.parametrize("cfg", [NSAConfig(cmp_block=16, cmp_stride=4, slc_block=16, slc_topk=5, window=16),
                                 NSAConfig(cmp_block=32, cmp_stride=16, slc_block=16, slc_topk=3, window=16),
                                 NSAConfig(cmp_block=8, cmp_stride=8, slc_block=32, slc_topk=4, window=16,
                                           init_blocks=0, local_blocks=1)],
                         ids=["taps7", "ratio1", "ratio4-no-init"])
def test_nsa_selection_configs(cfg, device):
    """Selection against the reference for configs whose Eq. 9 band differs from the default's (more taps
    reaching into the previous chunk, one compressed block per selection block, no forced first block), over
    several chunks, with a head dim the kernel splits into two tiles (48 = 32 + 16)."""
    T, Hq, Hkv, D = 200, 4, 2, 48
    q = torch.randn(1, T, Hq, D, device=device)
    k, v = torch.randn(1, T, Hkv, D, device=device), torch.randn(1, T, Hkv, 16, device=device)
    g = torch.rand(1, T, Hq, device=device)
    _, sel = nsa_attention(q, k, v, g, g, g, config=cfg, return_selection=True)
    _, sel_r = nsa_attention_ref(q, k, v, g, g, g, config=cfg, return_selection=True)
    assert torch.equal(sorted_selection(sel), sorted_selection(sel_r))


def _rows_apart(sel: torch.Tensor, sel_r: torch.Tensor) -> int:
    """The most blocks one row of ``sel`` (rows, n) holds that the same row of ``sel_r`` does not (-1 ignored)."""
    n = int(max(sel.max(), sel_r.max())) + 2
    held = [torch.zeros(s.shape[0], n, dtype=torch.bool).scatter_(1, s.long().cpu() + 1, True)[:, 1:]
            for s in (sel.flatten(0, -2), sel_r.flatten(0, -2))]
    return int((held[0] & ~held[1]).sum(1).max())


@pytest.mark.parametrize("tile,dtype,softcap", [(t, torch.float16, None) for t in SELECT_TILES] +
                         [(t, torch.bfloat16, None) for t in SELECT_TILES if t[5]] +
                         [(SELECT_TILES[0], torch.float16, 1.5), (next(t for t in SELECT_TILES if t[5]),
                                                                   torch.float16, 1.5)],
                         ids=lambda x: "m{}c{}w{}s{}r{}{}".format(*x[:5], "h" * x[5]) if isinstance(x, tuple)
                         else "softcap" if isinstance(x, float) else "plain" if x is None else str(x).split(".")[-1])
def test_nsa_select_gpu_candidates(tile, dtype, softcap, monkeypatch, device):
    """Each tile the selection kernel's autotuner may take on a GPU (query tokens, blocks per chunk, warps,
    stages, register limit, (token, head) rows) selects as the reference, in float16 (and the (token, head) rows
    tiles in bfloat16, which only they do not run in the GPU's other tests: a near-tie may then go the other way,
    one block apart): two packed sequences (100 and 300 tokens: ragged row tiles, the second over two chunks of
    16 blocks, one of 32), Eq. 9 taps reaching two blocks back, GQA (groups of 3; a (token, head) rows tile the
    group whose 256 rows it takes: 16 with 16 tokens, 6 padded to 8 with 32, 3 padded to 4 with 64, the padding
    heads masked); two of them with soft-capped scores."""
    from longattn.nsa import kernels as K
    from longattn.nsa import ops

    monkeypatch.setenv("LONGATTN_INTERPRET_TILES", "gpu")  # the GPU's tuned launch through the interpreter
    monkeypatch.setattr(K, "SELECT_TILES", (tile,))
    monkeypatch.setattr(K._nsa_select_tuned, "cache", {})  # no tile chosen by an earlier call
    if device == "cpu":  # only the selection is checked: the selected branch (most of the interpreter's time) skipped
        monkeypatch.setattr(ops, "_selected_forward", lambda *args, **kwargs: (None, None))
    cfg = NSAConfig(cmp_block=16, cmp_stride=4, slc_block=16, slc_topk=5, window=16)
    lens, D = [100, 300], 48
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=device)
    Hq, Hkv = {16: (16, 1), 32: (12, 2)}.get(tile[0], (6, 2)) if tile[5] else (6, 2)
    q = torch.randn(sum(lens), Hq, D, device=device, dtype=dtype)
    k = torch.randn(sum(lens), Hkv, D, device=device, dtype=dtype)
    v = torch.randn(sum(lens), Hkv, 16, device=device, dtype=dtype)
    g = torch.rand(sum(lens), Hq, device=device, dtype=dtype)
    _, sel = nsa_attention(q, k, v, g, g, g, config=cfg, cu_seqlens=cu, softcap=softcap, return_selection=True)
    ref = [t.float() for t in (q, k, v, g)]
    _, sel_r = nsa_attention_ref(*ref, ref[3], ref[3], config=cfg, cu_seqlens=cu, softcap=softcap,
                                 return_selection=True,
                                 k_cmp=_rounded_mean(ref[1], dtype, cfg, lens),
                                 v_cmp=_rounded_mean(ref[2], dtype, cfg, lens))
    if dtype == torch.float16:
        assert torch.equal(sorted_selection(sel), sorted_selection(sel_r))
    else:
        assert _rows_apart(sel, sel_r) <= 1


def test_nsa_autotuning_keeps_results(monkeypatch, device):
    """Autotuning the selection and the selected branch's kernels times each candidate on the call's own buffers,
    repeating the launch: outputs and gradients stay those of a single launch (the selected dq adds to the own
    blocks' part already in its output, which the autotuner must restore). Without a GPU the interpreter runs the
    GPU tiles and a stand-in timer that launches each candidate once (before the launch that counts)."""
    from longattn.nsa import kernels as K

    cfg = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topk=4, window=16)
    T, Hq, Hkv = 100 if device == "cpu" else 2048, 4, 1
    dt = torch.float16
    ins = [torch.randn(1, T, Hq, 32), torch.randn(1, T, Hkv, 32), torch.randn(1, T, Hkv, 16)]
    ins = [t.to(device, dt).requires_grad_() for t in ins]
    gates = [torch.rand(1, T, Hq, device=device) for _ in range(3)]
    dout = torch.randn(1, T, Hq, 16, device=device, dtype=dt)

    def run():
        for t in ins:
            t.grad = None
        out, sel = nsa_attention(*ins, *gates, config=cfg, return_selection=True)
        out.backward(dout)
        return [out, sel] + [t.grad for t in ins]

    monkeypatch.setenv("LONGATTN_AUTOTUNE", "0")
    monkeypatch.setenv("LONGATTN_INTERPRET_TILES", "gpu")
    single = run()
    monkeypatch.setattr(K, "autotune_enabled", lambda: True)  # these kernels only (flash's stay untimed)
    for kernel in (K._nsa_select_tuned, K._nsa_selected_fwd_tuned, K._nsa_selected_dq_tuned):
        monkeypatch.setattr(kernel, "cache", {})
        if device == "cpu":  # nothing to time: run each candidate once, all tie
            def once(kernel_call, quantiles):
                kernel_call()
                return [0.0] * len(quantiles)
            settable = "_do_bench" if isinstance(getattr(type(kernel), "do_bench", None), property) else "do_bench"
            monkeypatch.setattr(kernel, settable, once)
    tuned = run()
    assert torch.equal(tuned[1], single[1])
    for name, a, b in zip(["out", "dq", "dk", "dv"], tuned[:1] + tuned[2:], single[:1] + single[2:]):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2, msg=name)


@pytest.mark.parametrize("block,stride", [(32, 16), (48, 16), (16, 16)])
def test_mean_compression_matches_reference(block, stride, device):
    """Packed sequences (one too short for a block), forward and gradient, blocks of 1 to 3 strides."""
    cfg = NSAConfig(cmp_block=block, cmp_stride=stride, slc_block=64, slc_topk=3, window=16)
    lengths = [70, 5, 49]
    k = leaf(torch.randn(sum(lengths), 2, 8, device=device))
    out = _mean_compress(k, lengths, cfg)
    k_r = leaf(k.detach())
    ref = torch.cat([compress_mean_ref(s, cfg) for s in k_r.split(lengths)])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(k.grad, k_r.grad)


def test_nsa_bad_arguments(device):
    q = torch.randn(1, 40, 2, 16, device=device)
    g = torch.rand(1, 40, 2, device=device)
    with pytest.raises(TypeError, match="config must be an NSAConfig"):
        nsa_attention(q, q, q, g, g, g, config={"window": 4})
    with pytest.raises(ValueError, match="g_slc must have shape"):
        nsa_attention(q, q, q, g, g[:, :5], g, config=CFG)
    with pytest.raises(ValueError, match="g_cmp is on meta but q is on"):
        nsa_attention(q, q, q, g.to("meta"), g, g, config=CFG)
    with pytest.raises(ValueError, match="at most as many queries as keys"):
        nsa_attention(q, q[:, :20], q[:, :20], g, g, g, config=CFG)
    with pytest.raises(ValueError, match="pass both k_cmp and v_cmp"):
        nsa_attention(q, q, q, g, g, g, config=CFG, k_cmp=torch.randn(1, 9, 2, 16, device=device))
    for sinks, err, match in ((torch.zeros(3, device=device), ValueError, r"sinks must have shape \(2,\)"),
                              (torch.zeros(1, 2, device=device), ValueError, r"sinks must have shape \(2,\)"),
                              (torch.zeros(2, dtype=torch.int64, device=device), TypeError, "sinks must have dtype"),
                              ([0.0, 0.0], TypeError, "sinks must be a torch.Tensor"),
                              (torch.zeros(2, device="meta"), ValueError, "sinks is on meta but q is on")):
        with pytest.raises(err, match=match):
            nsa_attention(q, q, q, g, g, g, config=CFG, sinks=sinks)
    with pytest.raises(ValueError, match="k_cmp/v_cmp must hold 9 compressed blocks"):
        nsa_attention(q, q, q, g, g, g, config=CFG, k_cmp=torch.randn(1, 3, 2, 16, device=device),
                      v_cmp=torch.randn(1, 3, 2, 16, device=device))


def _decode_case(lens, offsets, L, Hq, Hkv, dk, dv, dtype, device, config):
    """Random decode inputs in a transformers-style cache (B, Hkv, L, D) seen as (B, L, Hkv, D), with NaN
    everywhere outside each sequence's tokens and compressed blocks (so any stray read shows)."""
    B = len(lens)
    k = torch.full((B, Hkv, L, dk), float("nan"), dtype=dtype, device=device)
    v = torch.full((B, Hkv, L, dv), float("nan"), dtype=dtype, device=device)
    n_max = max(config.num_cmp_blocks(n) for n in lens) + 2
    kc = torch.full((B, n_max, Hkv, dk), float("nan"), dtype=dtype, device=device)
    vc = torch.full((B, n_max, Hkv, dv), float("nan"), dtype=dtype, device=device)
    for b, (n, o) in enumerate(zip(lens, offsets)):
        k[b, :, o:o + n] = torch.randn(Hkv, n, dk, dtype=dtype, device=device)
        v[b, :, o:o + n] = torch.randn(Hkv, n, dv, dtype=dtype, device=device)
        c = config.num_cmp_blocks(n)
        kc[b, :c] = torch.randn(c, Hkv, dk, dtype=dtype, device=device)
        vc[b, :c] = torch.randn(c, Hkv, dv, dtype=dtype, device=device)
    q = torch.randn(B, Hq, dk, dtype=dtype, device=device)
    gates = [torch.rand(B, Hq, device=device) for _ in range(3)]
    return q, k.transpose(1, 2), v.transpose(1, 2), kc, vc, gates


def _decode_ref(q, k, v, kc, vc, gates, b, n, o, config, sinks=None, softcap=None):
    """The reference's last row (and selection) for sequence b of a decode case: n tokens from cache row o."""
    c = config.num_cmp_blocks(n)
    return nsa_attention_ref(q[b, None, None].float(), k[b, None, o:o + n].float(), v[b, None, o:o + n].float(),
                             *(g[b, None, None] for g in gates), k_cmp=kc[b, None, :c].float(),
                             v_cmp=vc[b, None, :c].float(), config=config, sinks=sinks, softcap=softcap,
                             return_selection=True)


RAGGED = ([300, 37, 5, 64], [10, 0, 300, 100], 320)  # 5 tokens: no compressed block yet


@pytest.mark.parametrize("case,Hq,Hkv,splits", [(RAGGED, 8, 2, 1), (RAGGED, 16, 1, 1), (RAGGED, 8, 2, 3),
                                                 (([600], [0], 600), 4, 1, None)],
                         ids=["gqa4", "gqa16", "gqa4-split3", "one-sequence-auto-split"])
def test_nsa_decode_matches_reference(case, Hq, Hkv, splits, dtype, device):
    """Fused path, split-KV path (compressed and candidate blocks spread over several programs, lse merge,
    top-n of the splits' candidates) and the automatic choice (one sequence: split), against the reference."""
    lens, offsets, L = case
    q, k, v, kc, vc, gates = _decode_case(lens, offsets, L, Hq, Hkv, 32, 16, dtype, device, CFG)
    seq = torch.tensor(lens, dtype=torch.int32, device=device)
    off = torch.tensor(offsets, dtype=torch.int32, device=device)
    out, sel = nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seq, cache_offsets=off, config=CFG,
                          num_splits=splits, return_selection=True)
    assert out.dtype == dtype and out.shape == (len(lens), Hq, 16)
    for b, (n, o) in enumerate(zip(lens, offsets)):
        ref, sel_r = _decode_ref(q, k, v, kc, vc, gates, b, n, o, CFG)
        assert torch.equal(sorted_selection(sel[b]), sorted_selection(sel_r[0, 0])), f"sequence {b}: selection differs"
        assert_close(out[b], ref[0, 0], dtype, f"sequence {b}")
    # unchecked (no host synchronisation; work sized for the cache's length, the caches NaN past each sequence)
    out2, sel2 = nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seq, cache_offsets=off, config=CFG,
                            num_splits=splits, return_selection=True, validate=False)
    assert torch.equal(sorted_selection(sel2), sorted_selection(sel))
    assert_close(out2, out, dtype, "validate=False")
    # gates as evenly spaced views of one tensor (the module's): read in place, not stacked
    g = torch.stack(gates, 1)  # (B, 3, Hq)
    views = g.unbind(1)
    assert _gates(*views).data_ptr() == g.data_ptr()
    out3 = nsa_decode(q, k, v, kc, vc, *views, cache_seqlens=seq, cache_offsets=off, config=CFG, num_splits=splits)
    assert torch.equal(out3, out)


@pytest.mark.parametrize("splits", [1, 3], ids=["fused", "split3"])
def test_nsa_decode_sinks(splits, dtype, device):
    """Attention sinks in each branch's softmax when decoding, fused and split-KV (the sinks applied after the
    pieces' merge): the reference's last rows; a head without a sink (-inf), a sequence with no compressed block
    (its compressed branch 0 whatever the sink)."""
    lens, offsets, L = RAGGED
    q, k, v, kc, vc, gates = _decode_case(lens, offsets, L, 8, 2, 32, 16, dtype, device, CFG)
    sinks = torch.tensor([0.5, -1.0, 2.0, float("-inf"), 0.0, 3.0, -2.0, 1.0], device=device, dtype=dtype)
    out = nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
                     cache_offsets=torch.tensor(offsets, dtype=torch.int32, device=device), config=CFG, sinks=sinks,
                     num_splits=splits)
    for b, (n, o) in enumerate(zip(lens, offsets)):
        ref = _decode_ref(q, k, v, kc, vc, gates, b, n, o, CFG, sinks=sinks.float())[0]
        assert_close(out[b], ref[0, 0], dtype, f"sequence {b}")


@pytest.mark.parametrize("splits", [1, 3], ids=["fused", "split3"])
def test_nsa_decode_softcap(splits, dtype, device):
    """Soft-capped scores when decoding, fused and split-KV (the compressed probabilities of the selection, merged
    from the splits, capped too): the reference's last rows and selections; a sequence without compressed blocks."""
    lens, offsets, L = RAGGED
    q, k, v, kc, vc, gates = _decode_case(lens, offsets, L, 8, 2, 32, 16, dtype, device, CFG)
    out, sel = nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
                          cache_offsets=torch.tensor(offsets, dtype=torch.int32, device=device), config=CFG,
                          softcap=1.5, num_splits=splits, return_selection=True)
    for b, (n, o) in enumerate(zip(lens, offsets)):
        ref, sel_r = _decode_ref(q, k, v, kc, vc, gates, b, n, o, CFG, softcap=1.5)
        assert torch.equal(sorted_selection(sel[b]), sorted_selection(sel_r[0, 0])), f"sequence {b}: selection differs"
        assert_close(out[b], ref[0, 0], dtype, f"sequence {b}")


@pytest.mark.parametrize("splits,window", [(1, 32), (3, 32), (3, 2 ** 31 - 1)])
def test_nsa_decode_long_selection_blocks(splits, window, device):
    """Selection blocks of 64 keys, which the GPU tiles of float32 cut into several key tiles (fused and split
    paths); a window longer than any context (the split path's window pieces: as many as the keys need, not the
    window's length)."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=64, slc_topk=3, window=window)
    lens, offsets = [300, 100], [0, 20]
    q, k, v, kc, vc, gates = _decode_case(lens, offsets, 320, 4, 1, 32, 16, torch.float32, device, cfg)
    out, sel = nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
                          cache_offsets=torch.tensor(offsets, dtype=torch.int32, device=device), config=cfg,
                          num_splits=splits, return_selection=True)
    for b, (n, o) in enumerate(zip(lens, offsets)):
        ref, sel_r = _decode_ref(q, k, v, kc, vc, gates, b, n, o, cfg)
        assert torch.equal(sorted_selection(sel[b]), sorted_selection(sel_r[0, 0])), f"sequence {b}: selection differs"
        assert_close(out[b], ref[0, 0], torch.float32, f"sequence {b}")


@pytest.mark.parametrize("splits", [1, 3])
def test_nsa_decode_cache_rows(splits, device):
    """The last 3 tokens of each sequence as query rows reading their sequence's cache row (``cache_rows``), each
    with its own length, in one call: each equals the reference at its position (fused and split paths)."""
    lens, offsets, L, Hq, Hkv, chunk = [300, 37, 64], [10, 0, 200], 320, 8, 2, 3
    _, k, v, kc, vc, _ = _decode_case(lens, offsets, L, Hq, Hkv, 32, 16, torch.float32, device, CFG)
    rows = [b for b in range(len(lens)) for _ in range(chunk)]
    seqs = [lens[b] - chunk + 1 + i for b in range(len(lens)) for i in range(chunk)]
    q = torch.randn(len(rows), Hq, 32, device=device)
    gates = [torch.rand(len(rows), Hq, device=device) for _ in range(3)]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    kw = dict(cache_seqlens=i32(seqs), cache_offsets=i32([offsets[b] for b in rows]), config=CFG, num_splits=splits)
    out, sel = nsa_decode(q, k, v, kc, vc, *gates, cache_rows=i32(rows), return_selection=True, **kw)
    for r, (b, n) in enumerate(zip(rows, seqs)):
        o, c = offsets[b], CFG.num_cmp_blocks(n)
        ref, sel_r = nsa_attention_ref(q[r, None, None], k[b, None, o:o + n], v[b, None, o:o + n],
                                       *(g[r, None, None] for g in gates), k_cmp=kc[b, None, :c], v_cmp=vc[b, None, :c],
                                       config=CFG, return_selection=True)
        assert torch.equal(sorted_selection(sel[r]), sorted_selection(sel_r[0, 0])), f"row {r}: selection differs"
        assert_close(out[r], ref[0, 0], torch.float32, f"row {r}")
    with pytest.raises(ValueError, match="cache_rows must lie in \\[0, 3\\)"):
        nsa_decode(q, k, v, kc, vc, *gates, cache_rows=i32([3] + rows[1:]), **kw)
    with pytest.raises(TypeError, match="cache_rows must be an int32"):
        nsa_decode(q, k, v, kc, vc, *gates, cache_rows=i32(rows).long(), **kw)


def _paged(k, v, lens, offsets, page, gen):
    """The tokens of each cache row of a contiguous decode case (row b's at offsets[b] .. + lens[b]) moved into
    pages of ``page`` tokens in random order, with spare pages; NaN wherever no token is (unused pages, slots past
    each length) and -1 in the block-table entries past each length. Returns (k_pages, v_pages, block_table)."""
    per = -(-k.shape[1] // page)
    n_pages = len(lens) * per + 3
    kp = torch.full((n_pages, page, *k.shape[2:]), float("nan"), dtype=k.dtype, device=k.device)
    vp = torch.full((n_pages, page, *v.shape[2:]), float("nan"), dtype=v.dtype, device=v.device)
    order = torch.randperm(n_pages, generator=gen).tolist()
    table = torch.full((len(lens), per), -1, dtype=torch.int32)
    for b, (n, o) in enumerate(zip(lens, offsets)):
        for j in range(-(-n // page)):
            p, used = order.pop(), min(page, n - j * page)
            table[b, j] = p
            kp[p, :used] = k[b, o + j * page:o + j * page + used]
            vp[p, :used] = v[b, o + j * page:o + j * page + used]
    return kp, vp, table.to(k.device)


@pytest.mark.parametrize("page,splits,Hq,Hkv", [(8, 1, 8, 2), (24, 1, 16, 1), (32, 3, 8, 2), (16, 3, 4, 1)],
                         ids=["page8", "page24-gqa16", "page32-split3", "page16-split3"])
def test_nsa_decode_paged(page, splits, Hq, Hkv, dtype, device):
    """A paged KV cache (block_table; pages smaller than, straddling and larger than a selection block, in random
    order, NaN wherever no token is) gives the contiguous cache's results on the same tokens (fused and split
    paths, checked and unchecked, and with cache_rows), which equal the reference's."""
    lens, offsets, L = RAGGED
    gen = torch.Generator().manual_seed(page)
    q, k, v, kc, vc, gates = _decode_case(lens, offsets, L, Hq, Hkv, 32, 16, dtype, device, CFG)
    kp, vp, table = _paged(k, v, lens, offsets, page, gen)
    seq = torch.tensor(lens, dtype=torch.int32, device=device)
    want, sel_w = nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seq,
                             cache_offsets=torch.tensor(offsets, dtype=torch.int32, device=device), config=CFG,
                             num_splits=splits, return_selection=True)
    for validate in (True, False):
        out, sel = nsa_decode(q, kp, vp, kc, vc, *gates, cache_seqlens=seq, block_table=table, config=CFG,
                              num_splits=splits, return_selection=True, validate=validate)
        assert torch.equal(sorted_selection(sel), sorted_selection(sel_w)), f"validate={validate}: selection differs"
        assert_close(out, want, dtype, f"validate={validate}")
    ref, _ = _decode_ref(q, k, v, kc, vc, gates, 0, lens[0], offsets[0], CFG)
    assert_close(out[0], ref[0, 0], dtype, "sequence 0")
    # two query rows reading cache row 2 (the block table's row too), each with its own length
    rows = torch.tensor([2, 2, 0], dtype=torch.int32, device=device)
    n2 = torch.tensor([lens[2] - 1, lens[2], lens[0]], dtype=torch.int32, device=device)
    out = nsa_decode(q[:3], kp, vp, kc, vc, *(g[:3] for g in gates), cache_seqlens=n2, block_table=table,
                     cache_rows=rows, config=CFG, num_splits=splits)
    for r, (b, n) in enumerate(zip(rows.tolist(), n2.tolist())):
        c, o = CFG.num_cmp_blocks(n), offsets[b]
        ref, _ = nsa_attention_ref(q[r, None, None].float(), k[b, None, o:o + n].float(), v[b, None, o:o + n].float(),
                                   *(g[r, None, None] for g in gates), k_cmp=kc[b, None, :c].float(),
                                   v_cmp=vc[b, None, :c].float(), config=CFG, return_selection=True)
        assert_close(out[r], ref[0, 0], dtype, f"row {r}")


@pytest.mark.parametrize("cache_dtype,dtype", [(torch.float8_e4m3fn, torch.bfloat16),
                                               (torch.float8_e5m2, torch.float16)], ids=["e4m3", "e5m2"])
def test_nsa_decode_float8_cache(cache_dtype, dtype, device):
    """A quantised KV cache (float8 keys and values; the compressed keys in q's dtype) gives what the same values
    widened to q's dtype give (bit for bit through the interpreter: the widening is exact), fused and split-KV,
    left-padded and paged, at scale 1 or with its dequantisation scales; mixed caches and float8 compressed keys are
    refused."""
    lens, offsets, L = RAGGED
    q, k, v, kc, vc, gates = _decode_case(lens, offsets, L, 8, 2, 32, 16, dtype, device, CFG)
    k8, v8 = k.to(cache_dtype), v.to(cache_dtype)
    seq = torch.tensor(lens, dtype=torch.int32, device=device)
    off = torch.tensor(offsets, dtype=torch.int32, device=device)
    kp, vp, table = _paged(k8, v8, lens, offsets, 16, torch.Generator().manual_seed(0))
    for splits in (1, 3):
        kw = dict(config=CFG, num_splits=splits)
        want = nsa_decode(q, k8.to(dtype), v8.to(dtype), kc, vc, *gates, cache_seqlens=seq, cache_offsets=off, **kw)
        for cache in (dict(k_cache=k8, v_cache=v8, cache_offsets=off), dict(k_cache=kp, v_cache=vp, block_table=table)):
            assert_same_as_widened(nsa_decode(q, k_cmp=kc, v_cmp=vc, g_cmp=gates[0], g_slc=gates[1], g_swa=gates[2],
                                              cache_seqlens=seq, **cache, **kw), want, dtype, f"{list(cache)}, {splits}")
        # with dequantisation scales (the cache's tokens k8 * k_scale, v8 * v_scale; the compressed blocks as they
        # are), soft-capped scores or attention sinks too: what the tokens dequantised give (powers of two: exact)
        sinks = torch.linspace(-2.0, 2.0, q.shape[1], device=device)
        for softcap, sink in ((None, None), (20.0, None), (None, sinks)):
            kw = dict(config=CFG, num_splits=splits, softcap=softcap, sinks=sink)
            want = nsa_decode(q, k8.to(dtype) * 2.0 ** -5, v8.to(dtype) * 8.0, kc, vc, *gates, cache_seqlens=seq,
                              cache_offsets=off, **kw)
            got = nsa_decode(q, k8, v8, kc, vc, *gates, cache_seqlens=seq, cache_offsets=off, k_scale=2.0 ** -5,
                             v_scale=8.0, **kw)
            assert_same_as_widened(got, want, dtype, f"scaled, splits {splits}, softcap {softcap}, sinks {sink is not None}")
    with pytest.raises(TypeError, match="k_cache and v_cache must share one dtype"):
        nsa_decode(q, k8, v8.to(dtype), kc, vc, *gates, cache_seqlens=seq, cache_offsets=off, config=CFG)
    with pytest.raises(TypeError, match="k_cmp must have dtype in"):
        nsa_decode(q, k8, v8, kc.to(cache_dtype), vc, *gates, cache_seqlens=seq, cache_offsets=off, config=CFG)


def test_nsa_decode_paged_errors(device):
    """A block table of the wrong type or rows, pages outside the cache, lengths past the table and offsets on a
    paged cache are refused."""
    lens, offsets, L = [40, 17], [0, 0], 48
    q, k, v, kc, vc, gates = _decode_case(lens, offsets, L, 4, 1, 32, 16, torch.float32, device, CFG)
    kp, vp, table = _paged(k, v, lens, offsets, 16, torch.Generator().manual_seed(0))
    seq = torch.tensor(lens, dtype=torch.int32, device=device)
    run = lambda **kw: nsa_decode(q, kp, vp, kc, vc, *gates, config=CFG, **{"cache_seqlens": seq, **kw})
    with pytest.raises(TypeError, match="block_table must be an int32 tensor of shape \\(2, max_pages\\)"):
        run(block_table=table.long())
    with pytest.raises(TypeError, match="block_table must be an int32"):
        run(block_table=table[:1])
    with pytest.raises(ValueError, match="cache_offsets applies to contiguous caches"):
        run(block_table=table, cache_offsets=torch.zeros(2, dtype=torch.int32, device=device))
    bad = table.clone()
    bad[1, 1] = kp.shape[0]  # the second page of a 17-token sequence: used
    with pytest.raises(ValueError, match="block_table\\[1\\] points outside the cache"):
        run(block_table=bad)
    bad[1, 1], bad[1, 2] = table[1, 1], -5  # past its length: not read, not checked
    torch.testing.assert_close(run(block_table=bad), run(block_table=table))
    with pytest.raises(ValueError, match="seqlen <= 48"):
        run(block_table=table, cache_seqlens=torch.tensor([49, 17], dtype=torch.int32, device=device))


def test_nsa_decode_equals_last_row_of_prefill(device):
    """Mean-pooled compressed blocks, no offsets: decode == the last row of nsa_attention."""
    T, Hq, Hkv = 150, 4, 2
    q, k, v = (torch.randn(1, T, h, 16, device=device) for h in (Hq, Hkv, Hkv))
    gates = [torch.rand(1, T, Hq, device=device) for _ in range(3)]
    full = nsa_attention(q, k, v, *gates, config=CFG)
    kc, vc = _mean_compress(k[0], [T], CFG)[None], _mean_compress(v[0], [T], CFG)[None]
    out = nsa_decode(q[:, -1], k, v, kc, vc, *(g[:, -1] for g in gates),
                     cache_seqlens=torch.tensor([T], dtype=torch.int32, device=device), config=CFG)
    torch.testing.assert_close(out, full[:, -1], atol=2e-5, rtol=1e-4)


def test_nsa_empty_inputs_and_bad_compressed_blocks(device):
    """No token (T = 0, B = 0): empty results that backpropagate; k_cmp/v_cmp of another layout, type or dtype,
    and a selected branch without a slot for the own block, are refused."""
    from longattn.nsa import nsa_selected_attention

    for B, T in ((2, 0), (0, 5)):
        q, k, v = (leaf(torch.randn(B, T, h, 16, device=device)) for h in (4, 2, 2))
        gates = [leaf(torch.rand(B, T, 4, device=device)) for _ in range(3)]
        out, sel = nsa_attention(q, k, v, *gates, config=CFG, return_selection=True)
        assert out.shape == (B, T, 4, 16) and sel.shape == (B, T, 2, CFG.slc_topk)
        out.sum().backward()
        assert q.grad.shape == q.shape
    B, T = 2, 40
    q, k, v = (torch.randn(B, T, h, 16, device=device) for h in (4, 2, 2))
    gates = [torch.rand(B, T, 4, device=device) for _ in range(3)]
    n = CFG.num_cmp_blocks(T)
    kc, vc = torch.randn(B, n, 2, 16, device=device), torch.randn(B, n, 2, 16, device=device)
    with pytest.raises(ValueError, match="k_cmp/v_cmp must hold 18 compressed blocks: shapes \\(2, 9, 2, 16\\)"):
        nsa_attention(q, k, v, *gates, config=CFG, k_cmp=kc.transpose(0, 1), v_cmp=vc.transpose(0, 1))
    with pytest.raises(TypeError, match="k_cmp must be a torch.Tensor"):
        nsa_attention(q, k, v, *gates, config=CFG, k_cmp=kc.tolist(), v_cmp=vc)
    with pytest.raises(TypeError, match="k_cmp has dtype torch.float16"):
        nsa_attention(q, k, v, *gates, config=CFG, k_cmp=kc.half(), v_cmp=vc)
    with pytest.raises(ValueError, match="needs at least one slot"):
        nsa_selected_attention(q, k, v, torch.zeros(B, T, 2, 0, dtype=torch.int32, device=device), block_size=16)


def test_nsa_no_second_derivative(device):
    """Gradients through nsa_attention (gates and learnable compressed blocks too) and the selected branch alone
    differentiate no further: a gradient penalty raises."""
    from longattn.nsa import nsa_selected_attention

    B, T = 1, 40
    q, k, v = (leaf(torch.randn(B, T, h, 16, device=device)) for h in (4, 2, 2))
    gates = [leaf(torch.rand(B, T, 4, device=device)) for _ in range(3)]
    n = CFG.num_cmp_blocks(T)
    kc, vc = leaf(torch.randn(B, n, 2, 16, device=device)), leaf(torch.randn(B, n, 2, 16, device=device))
    assert_first_order_only(lambda *x: nsa_attention(*x[:6], config=CFG, k_cmp=x[6], v_cmp=x[7]),
                            (q, k, v, *gates, kc, vc), "nsa_attention")
    own = torch.arange(T, device=device) // 16  # each query's own block, and the first where it is another
    sel = torch.stack([own, torch.where(own > 0, 0, -1)], -1).to(torch.int32)[None, :, None].expand(B, T, 2, 2)
    assert_first_order_only(lambda *x: nsa_selected_attention(*x, sel, block_size=16), (q, k, v),
                            "nsa_selected_attention")


def test_nsa_decode_bad_arguments(device):
    q, k, v, kc, vc, gates = _decode_case([40], [0], 48, 2, 1, 16, 16, torch.float32, device, CFG)
    seq = torch.tensor([40], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="cache_seqlens must be an int32"):
        nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seq.long(), config=CFG)
    with pytest.raises(ValueError, match="offset \\+ seqlen <= 48"):
        nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seq, cache_offsets=seq - 30, config=CFG)
    with pytest.raises(ValueError, match="needs 9"):
        nsa_decode(q, k, v, kc[:, :5], vc[:, :5], *gates, cache_seqlens=seq, config=CFG)
    with pytest.raises(ValueError, match="g_swa must have shape"):
        nsa_decode(q, k, v, kc, vc, *gates[:2], gates[2][:, :1], cache_seqlens=seq, config=CFG)
    with pytest.raises(ValueError, match="g_slc is on meta but q is on"):
        nsa_decode(q, k, v, kc, vc, gates[0], gates[1].to("meta"), gates[2], cache_seqlens=seq, config=CFG)
    with pytest.raises(TypeError, match="v_cache must be a torch.Tensor, got NoneType"):
        nsa_decode(q, k, None, kc, vc, *gates, cache_seqlens=seq, config=CFG)
    with pytest.raises(ValueError, match="v_cache must be"):
        nsa_decode(q, k, v[:, :20], kc, vc, *gates, cache_seqlens=seq, config=CFG)
    with pytest.raises(ValueError, match=r"sinks must have shape \(2,\)"):
        nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seq, config=CFG, sinks=torch.zeros(1, device=device))
    with pytest.raises(TypeError, match="sinks must have dtype"):
        nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seq, config=CFG, sinks=torch.zeros(2, dtype=torch.int32,
                                                                                               device=device))
    empty = [t[:0] for t in (q, k, v, kc, vc, *gates)]
    out, sel = nsa_decode(*empty, cache_seqlens=seq[:0], config=CFG, return_selection=True)
    assert out.shape == (0, 2, 16) and sel.shape == (0, 1, CFG.slc_topk)


@pytest.mark.gpu
@pytest.mark.parametrize("T,Hq,Hkv", [(1024, 16, 1), (777, 8, 2)])
def test_nsa_gpu_defaults(T, Hq, Hkv, dtype):
    cfg = NSAConfig(window=128)
    q = torch.randn(1, T, Hq, 192, device="cuda", dtype=dtype)
    k = torch.randn(1, T, Hkv, 192, device="cuda", dtype=dtype)
    v = torch.randn(1, T, Hkv, 128, device="cuda", dtype=dtype)
    gates = [torch.rand(1, T, Hq, device="cuda") for _ in range(3)]
    _check(q, k, v, gates, dtype, config=cfg)
    _check_chunk(q, k, v, gates, T - 300, [T], dtype, config=cfg)  # (the last T - 300 tokens after a prefix)


@pytest.mark.gpu
@pytest.mark.parametrize("extra", ["sinks", "softcap"])
def test_nsa_gpu_sinks_softcap(extra, dtype):
    """Attention sinks, or soft-capped scores (bfloat16: the GPU's tanh.approx), with the GPU's tiles, paper
    configuration, a group of 16, d_qk 192 / d_v 128: nsa_attention's output, selection and every gradient (the
    sinks' too), and nsa_decode fused and split, against the reference."""
    cfg, T = NSAConfig(window=128), 1024
    opts = dict(sinks=torch.randn(16, device="cuda") * 2) if extra == "sinks" else dict(softcap=1.5)
    q, k = (torch.randn(1, T, h, 192, device="cuda", dtype=dtype) for h in (16, 1))
    v = torch.randn(1, T, 1, 128, device="cuda", dtype=dtype)
    gates = [torch.rand(1, T, 16, device="cuda") for _ in range(3)]
    _check(q, k, v, gates, dtype, config=cfg, **opts)
    lens, offsets = [4096, 1500, 33], [0, 2596, 4000]
    q, k, v, kc, vc, gates = _decode_case(lens, offsets, 4096, 16, 1, 192, 128, dtype, "cuda", cfg)
    for splits in (1, None):
        out = nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device="cuda"),
                         cache_offsets=torch.tensor(offsets, dtype=torch.int32, device="cuda"), config=cfg,
                         num_splits=splits, **opts)
        for b, (n, o) in enumerate(zip(lens, offsets)):
            ref = _decode_ref(q, k, v, kc, vc, gates, b, n, o, cfg, **opts)[0]
            assert_close(out[b], ref[0, 0], dtype, f"splits {splits}, sequence {b}", factor=2)


@pytest.mark.gpu
def test_nsa_gpu_chunked_dkdv(monkeypatch, dtype):
    """The selected branch's dK/dV with every (block, KV head) segment cut into chunks of 2 entry tiles: on a
    GPU only blocks that thousands of queries select are (NSA's first block at 64k), beyond these sizes."""
    from longattn.kernels import sparse

    monkeypatch.setattr(sparse, "CHUNK_TILES", 2)
    test_nsa_gpu_defaults(777, 8, 2, dtype)


@pytest.mark.gpu
def test_nsa_decode_gpu_cache_rows(dtype):
    """Paper configuration: the last 4 tokens of each sequence in one call (cache_rows) equal one call per token."""
    cfg = NSAConfig()
    lens, offsets, chunk = [4096, 1500], [0, 2596], 4
    _, k, v, kc, vc, _ = _decode_case(lens, offsets, 4096, 16, 1, 192, 128, dtype, "cuda", cfg)
    rows = [b for b in range(2) for _ in range(chunk)]
    seqs = [lens[b] - chunk + 1 + i for b in range(2) for i in range(chunk)]
    q = torch.randn(len(rows), 16, 192, device="cuda", dtype=dtype)
    gates = [torch.rand(len(rows), 16, device="cuda") for _ in range(3)]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")
    out = nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=i32(seqs), cache_offsets=i32([offsets[b] for b in rows]),
                     cache_rows=i32(rows), config=cfg)
    for r, (b, n) in enumerate(zip(rows, seqs)):
        one = nsa_decode(q[r:r + 1], k[b:b + 1], v[b:b + 1], kc[b:b + 1], vc[b:b + 1], *(g[r:r + 1] for g in gates),
                         cache_seqlens=i32([n]), cache_offsets=i32([offsets[b]]), config=cfg)
        assert_close(out[r], one[0], dtype, f"row {r}")


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, None], ids=["fused", "auto-split"])
def test_nsa_decode_gpu_defaults(splits, dtype):
    """Paper configuration, group of 16, d_qk 192 / d_v 128, contexts up to 4k with left padding."""
    cfg = NSAConfig()
    lens, offsets = [4096, 1500, 33], [0, 2596, 4000]
    q, k, v, kc, vc, gates = _decode_case(lens, offsets, 4096, 16, 1, 192, 128, dtype, "cuda", cfg)
    seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
    off = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    out, sel = nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seq, cache_offsets=off, config=cfg,
                          num_splits=splits, return_selection=True)
    for b, (n, o) in enumerate(zip(lens, offsets)):
        ref, sel_r = _decode_ref(q, k, v, kc, vc, gates, b, n, o, cfg)
        # bf16 scores may order a near-tie differently: at most one block apart
        differ = len(set(sel[b].flatten().tolist()) - set(sel_r[0, 0].flatten().tolist()))
        assert differ <= (1 if dtype == torch.bfloat16 else 0), f"sequence {b}: selection differs"
        assert_close(out[b], ref[0, 0], dtype, f"sequence {b}", factor=2)
    # the same tokens in a paged cache (shuffled 64-token pages, block_table): the same results
    kp, vp, table = _paged(k, v, lens, offsets, 64, torch.Generator().manual_seed(1))
    paged, sel_p = nsa_decode(q, kp, vp, kc, vc, *gates, cache_seqlens=seq, block_table=table, config=cfg,
                              num_splits=splits, return_selection=True)
    assert torch.equal(sorted_selection(sel_p), sorted_selection(sel)), "paged: selection differs"
    assert_close(paged, out, dtype, "paged")


def _random_selection(lens, hkv, n, block, device):
    """Per (token, KV head): the own block, then distinct random earlier blocks, -1 padded (packed rows)."""
    rows = []
    for T in lens:
        for t in range(T):
            own = t // block
            for _ in range(hkv):
                earlier = torch.randperm(own)[:n - 1].tolist() if own else []
                blocks = [own] + earlier
                rows.append(blocks + [-1] * (n - len(blocks)))
    return torch.tensor(rows, dtype=torch.int64, device=device).view(sum(lens), hkv, n)


def _check_selected(ins, sel, lens, block, dtype):
    """nsa_selected_attention on packed (q, k, v) ``ins`` of sequences ``lens`` with selection ``sel``: output and
    gradients against the masked dense reference."""
    from longattn.kernels.reference import block_mask_ref, masked_attention_ref
    from longattn.nsa import nsa_selected_attention

    group, d = ins[0].shape[1] // ins[1].shape[1], ins[0].shape[2]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=ins[0].device)
    ours, refs = [leaf(t) for t in ins], [leaf(t, torch.float32) for t in ins]
    out = nsa_selected_attention(*ours, sel, block_size=block, cu_seqlens=cu)
    parts = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        mask = block_mask_ref(sel[a:b].repeat_interleave(group, dim=1), b - a, b - a, block)
        parts.append(masked_attention_ref(refs[0][a:b], refs[1][a:b], refs[2][a:b], mask, d ** -0.5)[0])
    ref = torch.cat(parts)
    assert_close(out, ref, dtype, "out")
    dout = torch.randn_like(ref)
    (out.float() * dout).sum().backward()
    (ref * dout).sum().backward()
    for name, a, b in zip(["dq", "dk", "dv"], ours, refs):
        assert_close(a.grad, b.grad, dtype, name, factor=2)


@pytest.mark.parametrize("Hq,Hkv,lens,D", [(8, 2, [110, 37], 32), (2, 2, [110, 37], 32), (16, 1, [70, 37], 48)],
                         ids=["gqa4", "mha", "group16-d48"])
def test_nsa_selected_attention_matches_reference(Hq, Hkv, lens, D, dtype, device):
    """Group entries in the backward; a head dim the kernels split into two tiles (48 = 32 + 16)."""
    _check_selected_case(Hq, Hkv, lens, D, dtype, device)


# (on the CPU float16 only: the other dtypes take the same path there, and 72 heads through the interpreter are slow;
# on a GPU float32 cuts the group into smaller slices than the others)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16] if torch.cuda.is_available() else
                         [torch.float16], ids=lambda dt: str(dt).removeprefix("torch."))
def test_nsa_selected_attention_group72(dtype, device):
    """A group larger than an entry tile (72 heads) falls back to per-head entries in the backward, and is cut into
    slices of heads (programs of their own) in the forward and dq."""
    _check_selected_case(72, 1, [40, 7], 32, dtype, device)


def _check_selected_case(Hq, Hkv, lens, D, dtype, device):
    from longattn.nsa import nsa_selected_attention

    block, n = 16, 4
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=device)
    sel = _random_selection(lens, Hkv, n, block, device)
    ins = [torch.randn(sum(lens), h, d, device=device, dtype=dtype) for h, d in ((Hq, D), (Hkv, D), (Hkv, 16))]
    _check_selected(ins, sel, lens, block, dtype)
    a = lens[0]
    dense = nsa_selected_attention(*(t[None, :a] for t in ins), sel[None, :a], block_size=block)
    torch.testing.assert_close(dense[0], nsa_selected_attention(*(t[:a] for t in ins), sel[:a], block_size=block,
                                                                cu_seqlens=cu[:2]))


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # (the interpreter's max over the NaN sequence's rows)
def test_nsa_selected_tma_stays_in_its_sequence(device, monkeypatch):
    """The selected blocks loaded by TMA (K/V's row descriptors: every sequence's rows in one matrix) never reach
    another sequence: NaN in one sequence's keys and values leaves the others' outputs as the reference's, and as
    with pointer loads only (LONGATTN_TMA=0); lengths not multiples of the block (the last query's block, partial,
    comes by masked loads)."""
    from longattn.kernels.reference import block_mask_ref, masked_attention_ref
    from longattn.kernels.utils import row_descriptors
    from longattn.nsa import nsa_selected_attention

    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9")
    lens, block, Hq, Hkv = [45, 70, 37], 16, 8, 2
    q, k, v = (torch.randn(sum(lens), h, d, device=device, dtype=torch.float16) for h, d in ((Hq, 32), (Hkv, 32),
                                                                                             (Hkv, 16)))
    k[45:115], v[45:115] = float("nan"), float("nan")  # the second sequence
    sel = _random_selection(lens, Hkv, 4, block, device)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    assert row_descriptors(k, 16, (32,), lead=1) is not None  # (K's rows, as the op sees them, take TMA tiles)
    out = nsa_selected_attention(q, k, v, sel, block_size=block, cu_seqlens=cu)
    monkeypatch.setenv("LONGATTN_TMA", "0")
    pointers = nsa_selected_attention(q, k, v, sel, block_size=block, cu_seqlens=cu)
    for a, b in ((0, 45), (115, 152)):
        mask = block_mask_ref(sel[a:b].repeat_interleave(Hq // Hkv, dim=1), b - a, b - a, block)
        ref = masked_attention_ref(q[a:b].float(), k[a:b].float(), v[a:b].float(), mask, 32 ** -0.5)[0]
        assert_close(out[a:b], ref, torch.float16, f"out [{a}, {b})")
        assert_close(pointers[a:b], ref, torch.float16, f"out [{a}, {b}), pointer loads")


def test_nsa_selected_tma_candidates(monkeypatch):
    """With K/V's descriptors the forward's autotuner also tries each shared-tile candidate loading its blocks by
    TMA, those first; never the tile per query, float32 or the dq kernel."""
    from longattn.nsa.kernels import selected_configs

    monkeypatch.setenv("LONGATTN_INTERPRET_TILES", "gpu")
    plain, both = selected_configs(16, 16, "tf32", True), selected_configs(16, 16, "tf32", True, tma=True)
    twins = [c for c in both if c.kwargs.get("USE_TMA")]
    assert both[:len(twins)] == twins and len(both) == len(twins) + len(plain)
    assert [c.kwargs for c in twins] == [dict(c.kwargs, USE_TMA=True) for c in plain if not c.kwargs.get("PER_QUERY")]
    assert not any(c.kwargs.get("USE_TMA") for c in selected_configs(16, 16, "ieee", True, tma=True))
    assert not any(c.kwargs.get("USE_TMA") for c in selected_configs(16, 16, "tf32"))


@pytest.mark.parametrize("queries", [0, 1, 2], ids=["base", "twice", "four-times"])
def test_nsa_selected_gpu_candidates(queries, monkeypatch, device):
    """Each number of queries per program the selected branch's autotuner may take on a GPU (a group of 4 with 4
    slots: 4, 8 or 16 queries, up to 64 rows) gives the reference's output and gradients, in float16, through
    the interpreter with the GPU's tiles."""
    from longattn.nsa.kernels import selected_queries

    monkeypatch.setenv("LONGATTN_INTERPRET_TILES", "gpu")
    choices = selected_queries(4, 4)
    assert len(choices) == 3
    monkeypatch.setenv("LONGATTN_NSA_QUERY_BLOCK", str(choices[queries]))
    T, dtype = 150, torch.float16
    ins = [torch.randn(T, h, 32, device=device, dtype=dtype) for h in (4, 1, 1)]
    _check_selected(ins, _random_selection([T], 1, 4, 16, device), [T], 16, dtype)


def test_nsa_selected_split_scores(monkeypatch, device):
    """The candidates of 64 rows on 8 warps compute their score products split between the warpgroups
    (SPLIT_SCORES: unchained products, p and dS out of a branch); forward and gradients still equal the
    reference's, through the interpreter with the GPU's tiles."""
    from longattn.kernels.utils import COMPILE_OPTIONS, cdiv
    from longattn.nsa import ops
    from longattn.nsa.kernels import selected_rows

    def launch(tuned, args, meta, max_q, programs_h, n_seq, heads):
        qb = 64 // heads  # 64 rows
        assert selected_rows(qb, heads) == 64
        tuned.fn[(cdiv(max_q, qb), programs_h, n_seq)](*args, **meta, QB=qb, ROWS=64, SPLIT_SCORES=True,
                                                       **COMPILE_OPTIONS)

    monkeypatch.setenv("LONGATTN_INTERPRET_TILES", "gpu")
    monkeypatch.setattr(ops, "_launch_selected", launch)
    T, dtype = 150, torch.float16
    ins = [torch.randn(T, h, 32, device=device, dtype=dtype) for h in (4, 1, 1)]
    _check_selected(ins, _random_selection([T], 1, 4, 16, device), [T], 16, dtype)


def test_nsa_selected_attention_bad_arguments(device):
    from longattn.nsa import nsa_selected_attention

    q = torch.randn(1, 40, 2, 16, device=device)
    sel = _random_selection([40], 2, 2, 16, device)[None]
    for bad in (sel.float(), sel.to(torch.complex64)):
        with pytest.raises(TypeError, match="block_indices must have an integer dtype"):
            nsa_selected_attention(q, q, q, bad, block_size=16)
    with pytest.raises(TypeError, match="block_indices must be an integer tensor, got list"):
        nsa_selected_attention(q, q, q, sel.tolist(), block_size=16)
    with pytest.raises(ValueError, match="block_indices is on meta but q is on"):
        nsa_selected_attention(q, q, q, sel.to("meta"), block_size=16)
    with pytest.raises(ValueError, match="block_indices must be"):
        nsa_selected_attention(q, q, q, sel[:, :30], block_size=16)
    no_own = sel.clone()
    no_own[0, 35, 0, 0] = -1
    with pytest.raises(ValueError, match="up to each query.s own block, the own block included"):
        nsa_selected_attention(q, q, q, no_own, block_size=16)
    later = sel.clone()
    later[0, 3, 1, 1] = 2
    with pytest.raises(ValueError, match="up to each query.s own block, the own block included"):
        nsa_selected_attention(q, q, q, later, block_size=16)


@pytest.mark.gpu
def test_nsa_decode_in_cuda_graph():
    """With validate=False a decoding step has no host synchronisation: captured once, replayed as the
    sequences grow."""
    cfg = NSAConfig()
    lens, L, Hq, Hkv = [700, 3000, 64], 4096, 16, 1
    q, k, v, _, _, gates = _decode_case(lens, [0, 0, 0], L, Hq, Hkv, 128, 128, torch.bfloat16, "cuda", cfg)
    k, v = k.nan_to_num(), v.nan_to_num()  # the sequences grow into the rest of the caches
    kc, vc = (torch.randn(len(lens), cfg.num_cmp_blocks(L), Hkv, 128, device="cuda", dtype=torch.bfloat16)
              for _ in range(2))
    seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
    run = lambda: nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seq, config=cfg, validate=False)
    graph, out = capture_graph(run)
    for step in range(3):
        seq += 17 * (step + 1)
        q.normal_()
        graph.replay()
        ref = nsa_decode(q, k, v, kc, vc, *gates, cache_seqlens=seq, config=cfg)
        assert_close(out, ref, torch.bfloat16, f"replay {step}")


@pytest.mark.parametrize("queries", [2, 4])
def test_nsa_selected_per_query(queries, monkeypatch, device):
    """The forward's tile per query (PER_QUERY: 2 or 4 queries of a group of 16 per program, every block any of
    them selected loaded once and multiplied only by the queries that selected it) gives the reference's output,
    with unrelated selections, a ragged last block of queries and two sequences; through the interpreter with the
    GPU's tiles (the backward as usual)."""
    from longattn.nsa.kernels import selected_configs

    monkeypatch.setenv("LONGATTN_INTERPRET_TILES", "gpu")
    tried = selected_configs(16, 16, "tf32", True)
    assert any(c.kwargs.get("PER_QUERY") and c.kwargs["QB"] == queries for c in tried)
    assert not any(c.kwargs.get("PER_QUERY") for c in selected_configs(16, 16, "tf32"))  # dq has no such tile
    launched = _force_per_query(monkeypatch, queries)
    lens, dtype = [150, 37], torch.float16
    ins = [torch.randn(sum(lens), h, 32, device=device, dtype=dtype) for h in (16, 1, 1)]
    _check_selected(ins, _random_selection(lens, 1, 4, 16, device), lens, 16, dtype)
    assert launched


@pytest.mark.parametrize("tiles", ["per_query", "split_scores"])
def test_nsa_softcap_gpu_tiles(tiles, monkeypatch, device):
    """Soft-capped scores with the GPU's tiles through the interpreter: the selected branch's tile per query (4
    queries of a group of 16 a program), or 64 rows on 8 warps whose score products are split between the
    warpgroups (SPLIT_SCORES, forward and dq): output, selection and gradients equal the reference's."""
    from longattn.kernels.utils import COMPILE_OPTIONS, cdiv
    from longattn.nsa import ops

    monkeypatch.setenv("LONGATTN_INTERPRET_TILES", "gpu")
    launched = []
    if tiles == "per_query":
        launched = _force_per_query(monkeypatch, 4)
    else:
        def launch(tuned, args, meta, max_q, programs_h, n_seq, heads):
            tuned.fn[(cdiv(max_q, 4), programs_h, n_seq)](*args, **meta, QB=4, ROWS=64, SPLIT_SCORES=True,
                                                          **COMPILE_OPTIONS)
            launched.append(heads)

        monkeypatch.setattr(ops, "_launch_selected", launch)
    cu = torch.tensor([0, 150, 187], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(187, h, 32, device=device, dtype=torch.float16) for h in (16, 1, 1))
    gates = [torch.rand(187, 16, device=device) for _ in range(3)]
    _check(q, k, v, gates, torch.float16, cu_seqlens=cu, softcap=1.5)
    assert launched


def test_nsa_sinks_per_query_tiles(monkeypatch, device):
    """Attention sinks with the selected branch's tile per query (4 queries of a group of 16 per program, the GPU's
    tiles): nsa_attention's output and gradients, the sinks' too, equal the reference's."""
    monkeypatch.setenv("LONGATTN_INTERPRET_TILES", "gpu")
    launched = _force_per_query(monkeypatch, 4)
    cu = torch.tensor([0, 150, 187], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(187, h, 32, device=device, dtype=torch.float16) for h in (16, 1, 1))
    gates = [torch.rand(187, 16, device=device) for _ in range(3)]
    _check(q, k, v, gates, torch.float16, cu_seqlens=cu, sinks=torch.randn(16, device=device) * 2)
    assert launched


@pytest.mark.parametrize("learnable", [False, True], ids=["mean-pooled", "k_cmp-v_cmp-sinks-softcap"])
def test_torch_compile(learnable, device):
    """Under torch.compile nsa_attention is traced in the dense layout, its branches custom ops (flash attention,
    the selection, the selected branch, the gated sum): no graph break, and the output and every gradient (gates,
    compressed keys and values, attention sinks included; with a soft cap) equal eager mode's. With cu_seqlens it stays opaque (the
    lengths are read on the host), with the eager results too."""
    q, k, v = (leaf(torch.randn(2, 70, h, 32, device=device)) for h in (4, 2, 2))
    gates = [leaf(torch.rand(2, 70, 4, device=device)) for _ in range(3)]
    inputs = [q, k, v, *gates]
    if learnable:
        inputs += [leaf(torch.randn(2, CFG.num_cmp_blocks(70), 2, 32, device=device)) for _ in range(2)]
        inputs.append(leaf(torch.randn(4, device=device)))
    assert_compiled_matches_eager(lambda q, k, v, *rest: nsa_attention(
        q, k, v, *rest[:3], config=CFG,
        **(dict(k_cmp=rest[3], v_cmp=rest[4], sinks=rest[5], softcap=1.5) if learnable else {})), inputs)
    if learnable:  # (the varlen call below is the mean-pooled one's)
        return
    cu = torch.tensor([0, 70, 110], dtype=torch.int32, device=device)
    packed = [t.detach().reshape(140, *t.shape[2:])[:110].requires_grad_() for t in inputs[:6]]
    assert_compiled_matches_eager(lambda *a: nsa_attention(*a, config=CFG, cu_seqlens=cu), packed, fullgraph=False)


def test_custom_op_registration(device):
    """The custom ops of nsa_attention's branches (with attention sinks and a soft cap, and without) and of
    nsa_selected_attention
    pass torch.library.opcheck (schema, shapes, autograd formula)."""
    lengths = [40, 30]
    q, k, v = (leaf(torch.randn(70, h, 16, device=device)) for h in (4, 2, 2))
    gates = [leaf(torch.rand(70, 4, device=device)) for _ in range(3)]
    n_cmp = [CFG.num_cmp_blocks(n) for n in lengths]
    kc, vc = (leaf(torch.randn(sum(n_cmp), 2, 16, device=device)) for _ in range(2))
    cu, cu_cmp = (torch.tensor([0, a, a + b], dtype=torch.int32, device=device) for a, b in (lengths, n_cmp))
    config = [getattr(CFG, f.name) for f in dataclasses.fields(NSAConfig)]
    for sinks, softcap in ((None, 0.0), (leaf(torch.randn(4, device=device)), 1.5)):
        torch.library.opcheck(torch.ops.longattn.nsa_branches.default,
                              (q, k, v, kc, vc, *gates, sinks, cu, cu_cmp, lengths, config, 0.25, softcap))
    q, k, v = (leaf(torch.randn(80, h, 16, device=device)) for h in (4, 2, 2))
    pos = torch.arange(80, device=device) % 40
    sel = torch.stack([pos // 16, torch.where(pos >= 16, 0, -1)], -1)[:, None].expand(80, 2, 2).to(torch.int32)
    cu = torch.tensor([0, 40, 80], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.longattn.nsa_selected.default, (q, k, v, sel.contiguous(), cu, [40, 40], 16, 0.25))
