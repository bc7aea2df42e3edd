"""Bad input raises a clear ValueError/TypeError naming the argument, before any kernel runs."""
import pytest
import torch

from longattn import flash_attention, flash_decode, merge_attention, moba_decode, nsa_attention


def qkv(device, B=1, T=8, Hq=4, Hkv=2, D=16, dtype=torch.float32):
    return (torch.randn(B, T, Hq, D, device=device, dtype=dtype), torch.randn(B, T, Hkv, D, device=device, dtype=dtype),
            torch.randn(B, T, Hkv, D, device=device, dtype=dtype))


def test_wrong_rank(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="q must have 3 or 4 dimensions"):
        flash_attention(q[0, 0], k, v)
    with pytest.raises(ValueError, match="k must be 4-D"):
        flash_attention(q, k[0], v)


def test_not_a_tensor(device):
    q, k, v = qkv(device)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        flash_attention(q, k, v.tolist())


def test_dtype_mismatch_and_unsupported(device):
    q, k, v = qkv(device)
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
        flash_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q must have dtype in"):
        flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="q must have dtype in"):
        flash_attention(q.int(), k.int(), v.int())


def test_device_mismatch(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="k is on meta but q is on"):
        flash_attention(q, k.to("meta"), v)


def test_heads_not_divisible(device):
    q, k, v = qkv(device, Hq=3, Hkv=2)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a positive multiple of the number of key/value heads \(2\)"):
        flash_attention(q, k, v)


def test_shape_mismatches(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="q and k must have the same head dim"):
        flash_attention(q[..., :8], k, v)
    with pytest.raises(ValueError, match="k and v must agree"):
        flash_attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match="same batch size"):
        flash_attention(torch.cat([q, q]), k, v)


def _varlen(device, total=10):
    return (torch.randn(total, 2, 16, device=device), torch.randn(total, 2, 16, device=device),
            torch.randn(total, 2, 16, device=device))


@pytest.mark.parametrize("cu,err,match", [
    (torch.tensor([0, 4, 10], dtype=torch.int64), TypeError, "cu_seqlens_q must have dtype int32"),
    (torch.tensor([1, 4, 10], dtype=torch.int32), ValueError, "must start at 0"),
    (torch.tensor([0, 6, 4, 10], dtype=torch.int32), ValueError, "must be non-decreasing"),
    (torch.tensor([0, 4, 9], dtype=torch.int32), ValueError, r"cu_seqlens_q\[-1\] must equal the number of tokens \(10\)"),
    (torch.tensor([[0, 4, 10]], dtype=torch.int32), ValueError, "must be 1-D"),
    (torch.tensor([0], dtype=torch.int32), ValueError, "must be 1-D with N\\+1 >= 2"),
], ids=["int64", "start", "decreasing", "last", "2d", "short"])
def test_bad_cu_seqlens(cu, err, match, device):
    q, k, v = _varlen(device)
    with pytest.raises(err, match=match):
        flash_attention(q, k, v, cu_seqlens=cu.to(device))


def test_varlen_misc(device):
    q, k, v = _varlen(device)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="q must be 3-D"):
        flash_attention(q[None], k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="max_seqlen_q=3 is smaller than the longest sequence"):
        flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=3)
    with pytest.raises(ValueError, match="either cu_seqlens or cu_seqlens_q"):
        flash_attention(q, k, v, cu_seqlens=cu, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="need both cu_seqlens_q and cu_seqlens_k"):
        flash_attention(q, k, v, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="same number of sequences"):
        flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32, device=device))
    qd, kd, vd = qkv(device)
    with pytest.raises(ValueError, match="max_seqlen_q is only meaningful with cu_seqlens"):
        flash_attention(qd, kd, vd, max_seqlen_q=8)


def test_bad_options(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="window requires causal=True"):
        flash_attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="window must lie in \\[1, 2147483647\\]"):
        flash_attention(q, k, v, window=0)
    with pytest.raises(TypeError, match="window must be an int"):
        flash_attention(q, k, v, window=2.5)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        flash_attention(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        flash_attention(q, k, v, causal=1)
    # every public op's flags: a bool each (validate=None turned the host checks off, return_lse=1 returned the lse)
    for name in ("return_lse", "validate"):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got NoneType"):
            flash_attention(q, k, v, **{name: None})
    lens = torch.tensor([100], dtype=torch.int32, device=device)  # (beyond the cache: checked only when validated)
    for op, args in ((flash_decode, (q[:, :1], k, v)), (moba_decode, (q[:, :1], k, v))):
        with pytest.raises(TypeError, match="validate must be a bool, got int"):
            op(*args, cache_seqlens=lens, validate=0)
    with pytest.raises(TypeError, match="return_selection must be a bool, got str"):
        nsa_attention(q, k, v, *(q[..., 0],) * 3, return_selection="no")
    with pytest.raises(ValueError, match="cannot be combined with window"):
        flash_attention(q, k, v, window=4, key_stride=16, key_offset=31)
    with pytest.raises(ValueError, match="key_stride must lie in \\[1, "):
        flash_attention(q, k, v, key_stride=0)
    with pytest.raises(ValueError, match="scale must be a finite positive number at most 2\\*\\*60, got 1"):
        flash_attention(q, k, v, scale=2 ** 1100)
    for big in (1e39, 2.0 ** 61):  # (beyond float32, in which the kernels take it, or near: NaN outputs)
        with pytest.raises(ValueError, match="scale must be a finite positive number at most"):
            flash_attention(q, k, v, scale=big)
        with pytest.raises(ValueError, match="softcap must be a finite positive number at most"):
            flash_attention(q, k, v, softcap=big)
    with pytest.raises(ValueError, match="k is on .* but q is on meta"):  # q first: also the autocast check's device
        flash_attention(q.to("meta"), k, v)


def test_merge_bad_input(device):
    o = torch.randn(2, 1, 5, 2, 8, device=device)
    l = torch.randn(2, 1, 2, 5, device=device)
    with pytest.raises(ValueError, match="lses must have shape"):
        merge_attention(o, l.transpose(-1, -2))
    with pytest.raises(TypeError, match="lses must have dtype in \\(float32\\)"):
        merge_attention(o, l.half())
    with pytest.raises(ValueError, match="same positive number of parts"):
        merge_attention(o, l[:1])
    with pytest.raises(ValueError, match="outs must hold at least one"):
        merge_attention([], [])
    with pytest.raises(ValueError, match="outs\\[1\\] has shape \\(1, 5, 2, 4\\) but outs\\[0\\] has"):
        merge_attention([o[0], o[1, ..., :4]], list(l))
    for bad in (o[..., :0], torch.zeros(*o.shape[:-1], 1025, device=o.device)):
        with pytest.raises(ValueError, match="outs must have a head dim in \\[1, 1024\\]"):
            merge_attention(bad, l)
    with pytest.raises(TypeError, match="outs\\[1\\] has dtype torch.float16 but outs\\[0\\] has torch.float32"):
        merge_attention([o[0], o[1].half()], list(l))
    with pytest.raises(ValueError, match="outs\\[1\\] is on meta"):
        merge_attention([o[0], o[1].to("meta")], list(l))
    with pytest.raises(TypeError, match="lses\\[1\\] must have dtype in \\(float32\\)"):
        merge_attention(list(o), [l[0], l[1].half()])


def test_window_and_strides_fit_32_bits(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="window must lie in \\[1, 2147483647\\]"):
        flash_attention(q, k, v, window=2 ** 63)
    with pytest.raises(ValueError, match="key_offset must lie in \\[0, 2147483647\\]"):
        flash_attention(q, k, v, key_stride=16, key_offset=2 ** 31)
    with pytest.raises(ValueError, match="the last key's position .* must be below 2\\*\\*31"):
        flash_attention(q, k, v, key_stride=2 ** 30)  # key 7 at 7 * 2**30


def _column(values, device):
    """int32 values as a strided view (a column of a 2-D tensor): what the kernels must not read as contiguous."""
    return torch.tensor([[x, -7] for x in values], dtype=torch.int32, device=device)[:, 0]


def test_strided_index_tensors(device):
    """Index tensors given as strided views (cu_seqlens, left_pad, cache lengths, offsets, block tables) give the
    results of their contiguous copies."""
    from longattn import NSAConfig, flash_decode, mla_decode, moba_decode, nsa_decode

    q, k, v = (t.reshape(-1, *t.shape[2:]) for t in qkv(device, B=2, T=12))
    cu = _column([0, 5, 24], device)
    torch.testing.assert_close(flash_attention(q, k, v, cu_seqlens=cu), flash_attention(q, k, v, cu_seqlens=cu.clone()))
    q, k, v = qkv(device, B=2, T=12)
    pad = _column([0, 5], device)
    torch.testing.assert_close(flash_attention(q, k, v, left_pad=pad), flash_attention(q, k, v, left_pad=pad.clone()))

    lens, offs = _column([12, 6], device), _column([0, 4], device)
    kw = dict(cache_seqlens=lens, cache_offsets=offs)
    kw_c = dict(cache_seqlens=lens.clone(), cache_offsets=offs.clone())
    q1 = q[:, -1]
    torch.testing.assert_close(moba_decode(q1, k, v, block_size=16, topk=2, **kw),
                               moba_decode(q1, k, v, block_size=16, topk=2, **kw_c))
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=3, window=8)
    kc, vc = torch.randn(2, 3, 2, 16, device=device), torch.randn(2, 3, 2, 16, device=device)
    gates = [torch.rand(2, 4, device=device) for _ in range(3)]
    torch.testing.assert_close(nsa_decode(q1, k, v, kc, vc, *gates, config=cfg, **kw),
                               nsa_decode(q1, k, v, kc, vc, *gates, config=cfg, **kw_c))

    cache = torch.randn(6, 16, 24, device=device)  # 6 pages of 16 tokens, latent 16 + rope 8
    table = torch.tensor([[4, 9, 0], [5, 9, 2]], dtype=torch.int32, device=device)[:, ::2]  # column stride 2
    ql, qr = torch.randn(2, 1, 4, 16, device=device), torch.randn(2, 1, 4, 8, device=device)
    seq = _column([20, 31], device)
    torch.testing.assert_close(mla_decode(ql, qr, cache, cache_seqlens=seq, block_table=table, scale=0.2),
                               mla_decode(ql, qr, cache, cache_seqlens=seq.clone(), block_table=table.contiguous(),
                                          scale=0.2))
    pages = torch.randn(10, 16, 2, 16, device=device)
    torch.testing.assert_close(flash_decode(ql, pages, pages, cache_seqlens=seq, block_table=table),
                               flash_decode(ql, pages, pages, cache_seqlens=seq.clone(), block_table=table.contiguous()))
    torch.testing.assert_close(flash_decode(q[:, -2:], k, v, **kw), flash_decode(q[:, -2:], k, v, **kw_c))


def test_interpreter_numpy_mismatch_is_named(monkeypatch):
    """Triton < 3.7's interpreter with numpy >= 2.4 (triton-lang/triton#9171) is refused with what to install,
    on the CPU path only; newer Triton or older numpy pass."""
    import numpy as np
    import triton

    from longattn.kernels import utils

    def problem(triton_version, numpy_version):
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(np, "__version__", numpy_version)
        utils.interpreter_problem.cache_clear()
        try:
            return utils.interpreter_problem()
        finally:
            utils.interpreter_problem.cache_clear()

    assert "needs numpy < 2.4" in problem("3.6.0", "2.4.6")
    assert problem("3.6.0", "2.2.6") is None
    assert problem("3.7.0", "2.4.6") is None
    assert problem("3.10.1", "2.5.0") is None


def _head_dim_strided(t: torch.Tensor) -> torch.Tensor:
    """t's values as a view strided in its last (head) dim: what a layer's transposes can hand over."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_head_dim_strided_inputs(layout, device):
    """q, k and v strided in their head dim give every op the outputs and gradients of their contiguous copies
    (the kernels index that dim with unit stride: such inputs are copied first)."""
    from longattn import NSAConfig, moba_attention, nsa_attention
    from longattn.kernels.sparse import block_sparse_attention
    from longattn.nsa import nsa_selected_attention

    lens, Hq, Hkv, D = [30, 40], 4, 2, 16
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topk=3, window=16)
    blocks = torch.tensor([-1, 0, 0, 1, 1], device=device).repeat_interleave(16)[:70]  # an earlier block or none
    varlen = layout == "varlen"
    kw = dict(cu_seqlens=torch.tensor([0, 30, 70], dtype=torch.int32, device=device)) if varlen else {}
    shape = (lambda *s: (70, *s)) if varlen else (lambda *s: (1, 70, *s))
    ops = {
        "flash": lambda q, k, v: flash_attention(q, k, v, **kw),
        "moba": lambda q, k, v: moba_attention(q, k, v, block_size=16, topk=2, **kw),
        "nsa": lambda q, k, v: nsa_attention(q, k, v, *gates, config=cfg, **kw),
        "nsa_selected": lambda q, k, v: nsa_selected_attention(q, k, v, sel, block_size=16, **kw),
        "block_sparse": lambda q, k, v: block_sparse_attention(q, k, v, blocks_q, block_size=16, **kw),
    }
    pos = torch.cat([torch.arange(n, device=device) for n in lens]) if varlen else torch.arange(70, device=device)
    gates = [torch.rand(shape(Hq), device=device) for _ in range(3)]
    sel = torch.stack([pos // 16, torch.where(pos >= 16, 0, -1)], -1)[:, None].expand(70, Hkv, 2)
    sel = sel.to(torch.int32).reshape(shape(Hkv, 2))
    own = pos // 16
    blocks_q = torch.where(blocks[:70] < own, blocks[:70], -1)[:, None, None].expand(70, Hq, 1)
    blocks_q = blocks_q.to(torch.int32).reshape(shape(Hq, 1))
    inputs = [torch.randn(shape(h, D), device=device) for h in (Hq, Hkv, Hkv)]
    dout = torch.randn(shape(Hq, D), device=device)
    for name, op in ops.items():
        results = []
        for make in (lambda t: t, _head_dim_strided):
            leaves = [t.clone().requires_grad_() for t in inputs]
            views = [make(t) for t in leaves]
            assert make is not _head_dim_strided or all(t.stride(-1) != 1 for t in views)
            out = op(*views)
            out.backward(dout)
            results.append([out] + [t.grad for t in leaves])
        for what, a, b in zip(("out", "dq", "dk", "dv"), *results):
            torch.testing.assert_close(b, a, msg=f"{name} {what}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is for machines without CUDA")
def test_import_after_triton_warns():
    """Without CUDA, longattn turns triton's interpreter on (TRITON_INTERPRET=1) when imported; triton imported
    before it (transformers imports it) made its own functions for a GPU then, so that every kernel would fail with
    an InterpreterError naming none of this: a warning says so at import."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import triton.language, longattn"
    got = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True)
    assert got.returncode == 0 and "triton was imported before longattn" in got.stderr
    got = subprocess.run([sys.executable, "-W", "always", "-c", "import longattn, triton.language"], env=env,
                         capture_output=True, text=True)
    assert got.returncode == 0 and "triton was imported before longattn" not in got.stderr
