"""MLA: naive vs absorbed reference, prefill (fwd/bwd) and paged absorbed decode against the references."""
import itertools
import math

import pytest
import torch

from longattn.mla import PagedLatentCache, mla_absorbed_ref, mla_decode, mla_decode_ref, mla_naive_ref, mla_prefill
from longattn.mla import ops as mla_ops
from longattn.mla.kernels import _mla_decode_kernel, decode_candidates
from longattn.kernels.utils import row_descriptors, split_context
from longattn.kernels.reference import attention_ref
from longattn.mla.reference import gather_paged_ref, mla_decompress_ref
from helpers import assert_close, assert_lse_close, capture_graph, float8_bytes, leaf

SMALL = dict(H=4, nope=32, rope=16, rank=64, v=32)
V3 = dict(H=16, nope=128, rope=64, rank=512, v=128)


def _weights(H, nope, rope, rank, v, device, dtype=torch.float32):
    w_uk = torch.randn(H, nope, rank, device=device, dtype=dtype) / rank ** 0.5
    w_uv = torch.randn(H, v, rank, device=device, dtype=dtype) / rank ** 0.5
    return w_uk, w_uv


def _inputs(B, T, H, nope, rope, rank, v, device, dtype=torch.float32):
    return (torch.randn(B, T, H, nope, device=device, dtype=dtype), torch.randn(B, T, H, rope, device=device, dtype=dtype),
            torch.randn(B, T, rank, device=device, dtype=dtype), torch.randn(B, T, rope, device=device, dtype=dtype))


@pytest.mark.parametrize("cfg", [SMALL, V3], ids=["small", "v3"])
def test_naive_equals_absorbed(cfg, device):
    w_uk, w_uv = _weights(**cfg, device=device)
    qn, qr, c, kr = _inputs(2, 37, **cfg, device=device)
    scale = (cfg["nope"] + cfg["rope"]) ** -0.5
    a = mla_naive_ref(qn, qr, c, kr, w_uk, w_uv, scale=scale)
    b = mla_absorbed_ref(qn, qr, c, kr, w_uk, w_uv, scale=scale)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T", [45, 80])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_prefill_forward_and_gradients(varlen, T, dtype, device, monkeypatch):
    """Forward and every gradient against the naive reference. The kernels read q and k in their two parts (latent
    and rotary dims, 64 + 24, the second a tile of 32 masked: no concatenated copies), forward and backward; the
    forward of at most 64 queries runs split-KV (flash_decode)."""
    launches = []
    for name in ("flash_fwd", "flash_decode", "flash_bwd"):
        launch = getattr(mla_ops, name)
        monkeypatch.setattr(mla_ops, name, lambda *a, name=name, launch=launch, **kw: launches.append(
            (name, kw["parts"] is not None)) or launch(*a, **kw))
    cfg = dict(H=4, nope=64, rope=24, rank=48, v=64)
    w = _weights(**cfg, device=device, dtype=dtype)
    x = _inputs(2, T, **cfg, device=device, dtype=dtype)
    scale = 88 ** -0.5
    leaves_k = [leaf(t) for t in x + w]
    leaves_r = [leaf(t, torch.float32) for t in x + w]
    if varlen:
        cu = torch.tensor([0, T, 2 * T], dtype=torch.int32, device=device)
        flat = [t.flatten(0, 1) for t in leaves_k[:4]]
        out = mla_prefill(*flat, *leaves_k[4:], scale=scale, cu_seqlens=cu).view(2, T, 4, 64)
    else:
        out = mla_prefill(*leaves_k, scale=scale)
    ref = mla_naive_ref(*leaves_r, scale=scale)
    assert_close(out, ref, dtype, "out")
    dout = torch.randn_like(ref)
    (out.float() * dout).sum().backward()
    (ref * dout).sum().backward()
    for name, a, b in zip(["dq_nope", "dq_rope", "dc_kv", "dk_rope", "dw_uk", "dw_uv"], leaves_k, leaves_r):
        assert_close(a.grad, b.grad, dtype, name, factor=2)
    assert launches == [("flash_fwd" if T > 64 else "flash_decode", True), ("flash_bwd", True)]


def test_prefill_keeps_only_inputs_for_backward(device):
    """Between forward and backward mla_prefill holds its inputs, output and lse, nothing decompressed (the
    backward decompresses K/V again; test_prefill_forward_and_gradients checks its gradients)."""
    cfg = dict(H=4, nope=32, rope=16, rank=48, v=32)
    x = [leaf(t) for t in _inputs(2, 40, **cfg, device=device, dtype=torch.float32)]
    w = [leaf(t) for t in _weights(**cfg, device=device, dtype=torch.float32)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, lse = mla_prefill(*x, *w, scale=48 ** -0.5, return_lse=True)
    kept = {t.data_ptr() for t in (*x, *w, out, lse)}
    assert saved and all(t.data_ptr() in kept for t in saved), [tuple(t.shape) for t in saved]
    out.sum().backward()
    assert all(t.grad is not None for t in x + w)


def test_prefill_varlen_compiles_whole(device):
    """mla_prefill in the varlen layout compiles into one graph (fullgraph=True: its host checks read no offsets;
    the custom op does, where it checks each sequence's queries against its latent tokens) and equals eager mode."""
    cfg = dict(H=2, nope=16, rope=16, rank=32, v=16)
    x = [t[0] for t in _inputs(1, 12, **cfg, device=device)]
    w = _weights(**cfg, device=device)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    f = lambda *a: mla_prefill(*a, *w, scale=0.2, cu_seqlens=cu, max_seqlen=7)
    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(*x), f(*x))


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole", "prefix-chunks"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_prefill_chunk_after_prefix(varlen, chunk, dtype, device, monkeypatch):
    """Queries that are the last tokens of longer latent sequences (chunks after a cached prefix): output, lse and
    every gradient (the prefix's latent included) against attention on the decompressed K/V. With ``prefix_chunk``
    16 the prefixes (dense: 64 tokens in both sequences; varlen: 90, none and 70) are decompressed in pieces of 16
    tokens (4; varlen 5), the rest of the keys in one more, the pieces' attention merged by lse, forward and
    backward."""
    calls, attention = [], mla_ops._attention
    monkeypatch.setattr(mla_ops, "_attention", lambda *a: calls.append(a[10]) or attention(*a))
    cfg = dict(H=4, nope=32, rope=16, rank=48, v=32)
    scale = 48 ** -0.5
    w = [leaf(t) for t in _weights(**cfg, device=device, dtype=dtype)]
    if varlen:  # (queries, keys): a chunk after a prefix, a whole sequence, one query after 70 cached tokens (70
        lq, lk = [70, 20, 1], [160, 20, 71]  # queries: the flash forward, its TMA tiles in the GPU-tile pass)
        q = [t[0] for t in _inputs(1, sum(lq), **cfg, device=device, dtype=dtype)[:2]]
        kv = [t[0] for t in _inputs(1, sum(lk), **cfg, device=device, dtype=dtype)[2:]]
        cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=device) for n in (lq, lk))
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    else:
        q = _inputs(2, 37, **cfg, device=device, dtype=dtype)[:2]
        kv = _inputs(2, 101, **cfg, device=device, dtype=dtype)[2:]
        kw = {}
    x = [leaf(t) for t in (*q, *kv)]
    out, lse = mla_prefill(*x, *w, scale=scale, return_lse=True, **kw, **({} if chunk is None else
                                                                           dict(prefix_chunk=chunk)))
    assert calls == ([True] if chunk is None else [False] * (5 if varlen else 4) + [True])
    x_r, w_r = [leaf(t, torch.float32) for t in x], [leaf(t, torch.float32) for t in w]
    lead = (lambda t: t[None]) if varlen else (lambda t: t)
    k, v = (t[0] if varlen else t for t in mla_decompress_ref(lead(x_r[2]), lead(x_r[3]), *w_r))
    ref, lse_r = attention_ref(torch.cat(x_r[:2], -1), k, v, causal=True, scale=scale, return_lse=True, **kw)
    assert_close(out, ref, dtype, "out")
    # (the keys decompressed in the op's dtype: bfloat16's rounding moves the scores 8x float16's)
    assert_lse_close(lse, lse_r, atol={torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype])
    dout = torch.randn_like(ref)
    (out.float() * dout).sum().backward()
    (ref * dout).sum().backward()
    for name, a, b in zip(["dq_nope", "dq_rope", "dc_kv", "dk_rope", "dw_uk", "dw_uv"], x + w, x_r + w_r):
        assert_close(a.grad, b.grad, dtype, name, factor=2)


def _paged(kv_tokens, lens, page, device, shuffle=True):
    """Scatter per-sequence token rows into pages in random physical order; return cache and block table."""
    n_pages = [-(-n // page) for n in lens]
    total = sum(n_pages) + 3  # spare pages, never referenced
    order = torch.randperm(total) if shuffle else torch.arange(total)
    cache = torch.randn(total, page, kv_tokens[0].shape[-1], device=device, dtype=kv_tokens[0].dtype)
    # entries past a sequence's pages point far outside the cache: no kernel may read them
    table = torch.full((len(lens), max(n_pages)), 2 ** 30, dtype=torch.int32)
    k = 0
    for b, (toks, n) in enumerate(zip(kv_tokens, lens)):
        for j in range(n_pages[b]):
            p = int(order[k])
            k += 1
            table[b, j] = p
            chunk = toks[j * page:(j + 1) * page]
            cache[p, :chunk.shape[0]] = chunk
    return cache, table.to(device)


@pytest.mark.parametrize("S", [1, 2, 4])
@pytest.mark.parametrize("cfg,page", [(dict(H=16, rank=512, rope=64), 64), (dict(H=20, rank=48, rope=16), 16)],
                         ids=["v3-page64", "odd-page16"])
def test_decode_paged(S, cfg, page, dtype, device):
    H, R, E = cfg["H"], cfg["rank"], cfg["rope"]
    lens = [S, 70, 203]
    kv_tokens = [torch.randn(n, R + E, device=device, dtype=dtype) for n in lens]
    cache, table = _paged(kv_tokens, lens, page, device)
    q_lat = torch.randn(3, S, H, R, device=device, dtype=dtype)
    q_rope = torch.randn(3, S, H, E, device=device, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = 0.07
    out, lse = mla_decode(q_lat, q_rope, cache, cache_seqlens=seqlens, block_table=table, scale=scale,
                          return_lse=True)
    ref, lse_r = mla_decode_ref(q_lat, q_rope, cache, cache_seqlens=seqlens, block_table=table, scale=scale,
                                kv_lora_rank=R)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "o_latent")
    assert_lse_close(lse, lse_r, atol=1e-4 if dtype == torch.float32 else 3e-3)
    # unchecked (no host synchronisation; work sized for the table's capacity): the same result
    unchecked = mla_decode(q_lat, q_rope, cache, cache_seqlens=seqlens, block_table=table, scale=scale,
                           validate=False)
    assert_close(unchecked, ref, dtype, "o_latent (validate=False)")


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_decode_float8_every_value(cache_dtype, device):
    """Every finite float8 value is widened exactly in the latent and in the rope part (on a GPU by the kernel's
    integer operations, see flash._widen): four one-token sequences hold the 256 bytes in their latents and, 64 a
    sequence, in their rope keys; q_latent is 0 and head h's q_rope the h-th unit vector, so its lse is rope key h
    times the scale and its output the latent (the scale ln 2: exact base-2 scores, see the flash_decode twin)."""
    bits = float8_bytes(cache_dtype)
    cache = torch.cat([bits.expand(4, 256), bits.view(4, 64)], 1).contiguous().view(cache_dtype).view(4, 1, 320)
    q_lat = torch.zeros(4, 1, 64, 256, dtype=torch.bfloat16, device=device)
    q_rope = torch.eye(64, dtype=torch.bfloat16, device=device).expand(4, 1, 64, 64)
    lens = torch.ones(4, dtype=torch.int32, device=device)
    out, lse = mla_decode(q_lat, q_rope, cache.to(device), cache_seqlens=lens, scale=math.log(2), return_lse=True)
    want = cache.float().to(device)  # (torch 2.5 indexes no float8 tensor)
    assert torch.equal(out.float(), want[:, :, None, :256].expand(4, 1, 64, 256))
    torch.testing.assert_close(lse.view(4, 64), want[:, 0, 256:] * math.log(2), rtol=1e-6, atol=0)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_float8_cache(cache_dtype, dtype, device):
    """A quantised latent cache (float8, stored = value / kv_scale): the attention of the dequantised cache, paged
    (page 16, 2 tokens) and contiguous (1 token)."""
    torch.manual_seed(3)
    H, R, E, lens = 16, 48, 16, [2, 70, 203]
    for S, page in ((2, 16), (1, None)):
        kv_tokens = [torch.randn(n, R + E, device=device) * 8 for n in lens]  # stored / 0.125: within float8's range
        if page:
            cache, table = _paged(kv_tokens, lens, page, device)
        else:
            cache, table = torch.randn(3, max(lens) + 3, R + E, device=device) * 8, None
            for b, t in enumerate(kv_tokens):
                cache[b, :t.shape[0]] = t
        cache8 = cache.to(cache_dtype)
        q_lat = torch.randn(3, S, H, R, device=device, dtype=dtype)
        q_rope = torch.randn(3, S, H, E, device=device, dtype=dtype)
        seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        out, lse = mla_decode(q_lat, q_rope, cache8, cache_seqlens=seqlens, block_table=table, scale=0.07,
                              kv_scale=0.125, return_lse=True)
        ref, lse_r = mla_decode_ref(q_lat.float(), q_rope.float(), cache8.float() * 0.125, cache_seqlens=seqlens,
                                    block_table=table, scale=0.07, kv_lora_rank=R)
        assert out.dtype == dtype
        assert_close(out, ref, dtype, f"o_latent ({cache_dtype}, page {page})")
        assert_lse_close(lse, lse_r, atol=1e-4 if dtype == torch.float32 else 3e-3)
    with pytest.raises(TypeError, match="kv_cache must have q_latent's dtype .* or a float8 one"):
        mla_decode(q_lat, q_rope, cache8.half() if dtype != torch.float16 else cache8.float(), cache_seqlens=seqlens,
                   scale=0.07)
    with pytest.raises(ValueError, match="kv_scale must be a finite positive number"):
        mla_decode(q_lat, q_rope, cache8, cache_seqlens=seqlens, scale=0.07, kv_scale=-1.0)


def test_cache_float8(device):
    """A float8 PagedLatentCache stores value / scale: tokens() gives the values back within float8's rounding,
    fork copies the stored bytes exactly, truncate and a growing pool keep them."""
    cache = PagedLatentCache(2, page_size=16, kv_lora_rank=8, rope_dim=4, dtype=torch.float8_e4m3fn, device=device,
                             growable=True, scale=0.5)
    a = cache.new_sequence()
    toks = torch.randn(40, 12, device=device)
    cache.append([a], toks[:, :8], toks[:, 8:])  # 3 pages: the pool grows
    assert cache.kv.dtype == torch.float8_e4m3fn and cache.kv.shape[0] >= 3
    got = cache.tokens([a])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, (toks / 0.5).to(torch.float8_e4m3fn).float() * 0.5)  # one rounding, exactly
    c = cache.fork(a)
    assert torch.equal(cache.tokens([c]), got)
    cache.truncate(c, 20)
    more = torch.randn(3, 12, device=device)
    cache.append([c], more[:, :8], more[:, 8:])
    torch.testing.assert_close(cache.tokens([c], torch.float16),
                               torch.cat([got[:20], (more / 0.5).to(torch.float8_e4m3fn).float() * 0.5]).half())
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        PagedLatentCache(2, dtype=torch.float8_e4m3fn, device=device, scale=0.0)
    d = cache.new_sequence()  # (beyond the range at that scale: saturated, not NaN)
    cache.append([d], torch.full((2, 8), 1e4, device=device), torch.full((2, 4), -1e4, device=device))
    assert torch.equal(cache.tokens([d]).abs(), torch.full((2, 12), 448 * 0.5, device=device))


def test_cache_float8_auto_scale(device):
    """scale="auto": the first append to an empty cache sets it (the power of two bringing the largest magnitude into
    (top / 8, top / 4]), appends of one token a sequence keep it (beyond the range: saturated), an append of several
    tokens beyond it raises it, the tokens held re-quantised (rounded again at the new scale); an emptied cache
    calibrates afresh."""
    fp8 = torch.float8_e4m3fn
    top = torch.finfo(fp8).max
    cache = PagedLatentCache(2, page_size=16, kv_lora_rank=8, rope_dim=4, dtype=fp8, device=device, growable=True,
                             scale="auto")
    a, b = cache.new_sequence(), cache.new_sequence()
    toks = torch.randn(20, 12, device=device) * 1e-3
    cache.append([a, b], toks[:, :8], toks[:, 8:], [12, 8])
    s1 = cache.scale
    assert math.log2(s1).is_integer() and top / 8 < toks.abs().max() / s1 <= top / 4
    rounded = lambda x, s: (x / s).clamp(-top, top).to(fp8).float() * s
    torch.testing.assert_close(cache.tokens([a, b]), rounded(toks, s1), atol=0, rtol=0)
    one = torch.ones(2, 12, device=device)
    cache.append([a, b], one[:, :8], one[:, 8:])  # (one token each: kept, saturated)
    assert cache.scale == s1 and torch.equal(cache.tokens([a])[-1], torch.full((12,), top * s1, device=device))
    big = torch.randn(6, 12, device=device)
    cache.append([b], big[:, :8], big[:, 8:])
    s2 = cache.scale
    assert s2 == 2.0 ** math.ceil(math.log2(big.abs().max().item() * 4 / top)) > s1
    held = torch.cat([rounded(toks[12:], s1), torch.full((1, 12), top * s1, device=device)])
    torch.testing.assert_close(cache.tokens([b]), torch.cat([rounded(held, s2), rounded(big, s2)]), atol=0, rtol=0)
    for s in (a, b):
        cache.free(s)
    c = cache.new_sequence()
    cache.append([c], toks[:3, :8], toks[:3, 8:])
    assert cache.scale == 2.0 ** math.ceil(math.log2(toks[:3].abs().max().item() * 4 / top)) < s2
    with pytest.raises(ValueError, match="scale must be a positive float or 'auto', got 'max'"):
        PagedLatentCache(2, dtype=fp8, device=device, scale="max")


def test_decode_contiguous_cache(device):
    lens = [5, 64, 33]
    kv = torch.randn(3, 64, 48 + 16, device=device)
    q_lat, q_rope = torch.randn(3, 2, 8, 48, device=device), torch.randn(3, 2, 8, 16, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = mla_decode(q_lat, q_rope, kv, cache_seqlens=seqlens, scale=0.1)
    ref, _ = mla_decode_ref(q_lat, q_rope, kv, cache_seqlens=seqlens, scale=0.1, kv_lora_rank=48)
    assert_close(out, ref, torch.float32, "o_latent")
    assert_close(mla_decode(q_lat, q_rope, kv, cache_seqlens=seqlens, scale=0.1, validate=False), ref,
                 torch.float32, "o_latent (validate=False)")


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_decode_tma_equals_pointer_loads(paged, dtype, device, monkeypatch):
    """Tiles loaded by TMA (the cache's descriptors, where the device has it; the interpreter runs them) give the
    pointer loads' result: every whole tile by TMA, the partial last one of each split masked, so the NaN the
    cache holds past each sequence never reaches the output; 3 query tokens, pages in random order."""
    R, E, page, S = 64, 16, 32, 3
    lens = [S, 32, 75, 130]
    kv_tokens = [torch.randn(n, R + E, device=device, dtype=dtype) for n in lens]
    if paged:
        cache, table = _paged(kv_tokens, lens, page, device)
        for b, n in enumerate(lens):  # the rows past each sequence (its last page's tail), and the spare pages
            cache[int(table[b, (n - 1) // page]), (n - 1) % page + 1:] = float("nan")
        used = set(table.flatten().tolist())
        cache[[p for p in range(cache.shape[0]) if p not in used]] = float("nan")
    else:
        table = None
        cache = torch.full((len(lens), 160, R + E), float("nan"), device=device, dtype=dtype)
        for b, toks in enumerate(kv_tokens):
            cache[b, :len(toks)] = toks
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9")
    assert mla_ops.row_descriptors(cache, 32, (R, E)) is not None
    q_lat = torch.randn(len(lens), S, 8, R, device=device, dtype=dtype)
    q_rope = torch.randn(len(lens), S, 8, E, device=device, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    run = lambda: mla_decode(q_lat, q_rope, cache, cache_seqlens=seqlens, block_table=table, scale=0.1)  # noqa: E731
    out = run()
    monkeypatch.setenv("LONGATTN_TMA", "0")
    pointers = run()
    ref, _ = mla_decode_ref(q_lat, q_rope, cache, cache_seqlens=seqlens, block_table=table, scale=0.1, kv_lora_rank=R)
    assert_close(out, ref, dtype, "o_latent (TMA)")
    assert_close(pointers, ref, dtype, "o_latent (pointer loads)")
    if device == "cpu":  # the same products in the same order
        assert torch.equal(out, pointers)


def test_row_descriptors(device, monkeypatch):
    """A tensor seen as one matrix of rows (its leading dims) for TMA tiles; None wherever TMA cannot load it."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9")
    x = torch.zeros(5, 16, 80, dtype=torch.float16, device=device)
    c, r = row_descriptors(x, 8, (64, 16))
    assert (c.shape, c.strides, c.block_shape) == ([80, 80], [80, 1], [8, 64])
    assert (r.shape, r.strides, r.block_shape) == ([80, 80], [80, 1], [8, 16])
    wide = torch.zeros(5, 16, 96, dtype=torch.float16, device=device)[..., :80]  # rows 96 apart: still one matrix
    assert row_descriptors(wide, 8, (64,))[0].strides == [96, 1]
    # (B, T, H, D) keys of heads 2..3 of 4: rows B * T, each reaching over both heads' dims
    k = torch.zeros(3, 10, 4, 64, dtype=torch.float16, device=device)[:, :, 2:]
    (d,) = row_descriptors(k, 16, (64,))
    assert (d.shape, d.strides) == ([30, 128], [256, 1])
    assert row_descriptors(k[0], 16, (64,), lead=1)[0].shape == [10, 128]  # varlen (total, H, D)
    assert row_descriptors(wide[:, :8], 8, (64,)) is None  # pages not rows * stride apart
    unaligned = torch.zeros(4 + x.numel(), dtype=x.dtype, device=device)[4:].view(x.shape)
    assert row_descriptors(unaligned, 8, (64,)) is None  # base
    assert row_descriptors(torch.zeros(5, 16, 76, dtype=torch.float16, device=device), 8, (64,)) is None  # row stride
    assert row_descriptors(x, 8, (48,)) is None  # not a power of two
    assert row_descriptors(x, 8, (4,)) is None  # under 16 bytes
    assert row_descriptors(x, 8, (128,)) is None  # over a row
    assert row_descriptors(x[:0], 8, (64,)) is None
    monkeypatch.setenv("LONGATTN_TMA", "0")
    assert row_descriptors(x, 8, (64,)) is None


def test_absorbed_decode_matches_naive_last_rows(device):
    """Prefill a prompt into the paged cache, decode its last 2 tokens in absorbed form: equals naive MLA."""
    cfg = dict(H=4, nope=32, rope=16, rank=64, v=32)
    w_uk, w_uv = _weights(**cfg, device=device)
    qn, qr, c, kr = _inputs(1, 90, **cfg, device=device)
    scale = 48 ** -0.5
    naive = mla_naive_ref(qn, qr, c, kr, w_uk, w_uv, scale=scale)
    cache = PagedLatentCache(8, page_size=16, kv_lora_rank=64, rope_dim=16, dtype=torch.float32, device=device)
    sid = cache.new_sequence()
    cache.append([sid], c[0, :50], kr[0, :50])
    cache.append([sid], c[0, 50:], kr[0, 50:])
    q_lat = torch.einsum("bqhd,hdr->bqhr", qn[:, -2:], w_uk)
    o_lat = mla_decode(q_lat, qr[:, -2:], cache.kv, cache_seqlens=cache.seqlens([sid]),
                       block_table=cache.block_table([sid]), scale=scale)
    out = torch.einsum("bqhr,hdr->bqhd", o_lat, w_uv)
    torch.testing.assert_close(out, naive[:, -2:], atol=1e-4, rtol=1e-4)


def test_cache_bookkeeping(device):
    cache = PagedLatentCache(6, page_size=16, kv_lora_rank=8, rope_dim=4, dtype=torch.float32, device=device)
    a, b = cache.new_sequence(), cache.new_sequence()
    toks = {a: torch.randn(40, 12, device=device), b: torch.randn(9, 12, device=device)}
    cache.append([a, b], torch.cat([toks[a][:30, :8], toks[b][:5, :8]]), torch.cat([toks[a][:30, 8:], toks[b][:5, 8:]]),
                 [30, 5])
    cache.append([b, a], torch.cat([toks[b][5:, :8], toks[a][30:, :8]]), torch.cat([toks[b][5:, 8:], toks[a][30:, 8:]]),
                 [4, 10])
    assert cache.seqlens([a, b]).tolist() == [40, 9]
    table = cache.block_table([a, b])
    for i, s in enumerate([a, b]):
        got = gather_paged_ref(cache.kv, table, cache.seqlen(s), i)
        torch.testing.assert_close(got, toks[s])
    assert cache.num_free_pages == 6 - 3 - 1
    # the device table is rebuilt only when a page list changed
    assert cache.block_table([a, b]) is table
    cache.append([b], toks[b][:6, :8], toks[b][:6, 8:])  # 9 -> 15 tokens: still b's first page
    assert cache.block_table([a, b]) is table
    cache.append([b], toks[b][:2, :8], toks[b][:2, 8:])  # 17 tokens: a second page
    grown = cache.block_table([a, b])
    assert grown is not table and grown.shape == table.shape and int((grown[1] > 0).sum()) >= 1
    assert gather_paged_ref(cache.kv, grown, 17, 1)[15:].equal(toks[b][:2])
    cache.free(a)
    assert cache.num_free_pages == 4
    with pytest.raises(RuntimeError, match="cache is full"):
        cache.append([b], torch.randn(200, 8, device=device), torch.randn(200, 4, device=device))
    with pytest.raises(ValueError, match="unknown or freed sequence id 0"):
        cache.block_table([a])
    with pytest.raises(TypeError, match="seq_ids must be a sequence"):
        cache.append(b, toks[b][:2, :8], toks[b][:2, 8:])
    with pytest.raises(TypeError, match="lengths must be whole numbers"):
        cache.append([b], toks[b][:2, :8], toks[b][:2, 8:], [1.5])
    with pytest.raises(TypeError, match="lengths must be whole numbers"):
        cache.append([b], toks[b][:2, :8], toks[b][:2, 8:], [None])
    for ids in ([True], [[b]]):  # (a bool is no sequence id; a list cannot be one)
        with pytest.raises(TypeError, match="sequence ids must be ints"):
            cache.append(ids, toks[b][:2, :8], toks[b][:2, 8:])
    with pytest.raises(TypeError, match="sequence ids must be ints"):
        cache.free([b])
    # (B, T, dim) tensors: one row per sequence (three rows for one sequence were split over it silently)
    with pytest.raises(ValueError, match="B = 2 must equal the number of seq_ids, 1"):
        cache.append([b], toks[b][:4, :8].reshape(2, 2, 8), toks[b][:4, 8:].reshape(2, 2, 4))
    with pytest.raises(ValueError, match="lengths must be T = 2 for each sequence"):
        cache.append([b], toks[b][:2, :8].reshape(1, 2, 8), toks[b][:2, 8:].reshape(1, 2, 4), lengths=[1])
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        cache.tokens([b], dtype="float16")
    assert cache.seqlens(i for i in [b]).tolist() == cache.seqlens([b]).tolist()  # (any iterable of ids)
    # integers of numpy and torch count as ints (a mask's sum as lengths), their bools do not
    n = cache.seqlens([b]).item()
    cache.append(torch.tensor([b]), toks[b][:2, :8], toks[b][:2, 8:], lengths=torch.tensor([2]))
    assert cache.seqlens([b]).item() == n + 2
    with pytest.raises(TypeError, match="lengths must be whole numbers"):
        cache.append([b], toks[b][:1, :8], toks[b][:1, 8:], lengths=torch.tensor([True]))
    with pytest.raises(TypeError, match="c_kv must be a floating-point tensor"):
        cache.append([b], toks[b][:2, :8].tolist(), toks[b][:2, 8:])
    with pytest.raises(ValueError, match="c_kv and k_rope must hold the same tokens"):
        cache.append([b], toks[b][:2, :8].reshape(1, 2, 8), toks[b][:2, 8:].reshape(2, 1, 4))
    with pytest.raises(ValueError, match="c_kv is on meta but the cache is on"):
        cache.append([b], toks[b][:2, :8].to("meta"), toks[b][:2, 8:])
    with pytest.raises(TypeError, match="page_size must be a positive int, got float"):
        PagedLatentCache(4, device=device, page_size=64.0)
    for bad in (dict(kv_lora_rank=-1), dict(rope_dim=0)):
        with pytest.raises(ValueError, match="must be a positive int"):
            PagedLatentCache(4, device=device, **bad)
    with pytest.raises(ValueError, match="device must name a torch device"):
        PagedLatentCache(4, device="bogus")
    with pytest.raises(TypeError, match="dtype must be"):
        PagedLatentCache(4, dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="growable must be a bool, got str"):
        PagedLatentCache(4, device=device, growable="no")


def test_cache_fork(device):
    """fork: a new sequence with a copy of another's tokens (beam search); the two then grow apart."""
    cache = PagedLatentCache(8, page_size=16, kv_lora_rank=8, rope_dim=4, dtype=torch.float32, device=device)
    a = cache.new_sequence()
    toks = torch.randn(40, 12, device=device)
    cache.append([a], toks[:, :8], toks[:, 8:])
    c = cache.fork(a)
    more = torch.randn(3, 12, device=device)
    cache.append([c], more[:, :8], more[:, 8:])
    assert cache.seqlens([a, c]).tolist() == [40, 43] and cache.num_free_pages == 8 - 3 - 3
    table = cache.block_table([a, c])
    torch.testing.assert_close(gather_paged_ref(cache.kv, table, 40, 0), toks)
    torch.testing.assert_close(gather_paged_ref(cache.kv, table, 43, 1), torch.cat([toks, more]))


def test_cache_truncate(device):
    """truncate keeps a sequence's first tokens and returns the pages past them."""
    cache = PagedLatentCache(8, page_size=16, kv_lora_rank=8, rope_dim=4, dtype=torch.float32, device=device)
    a = cache.new_sequence()
    toks = torch.randn(40, 12, device=device)
    cache.append([a], toks[:, :8], toks[:, 8:])
    cache.truncate(a, 17)
    assert cache.seqlen(a) == 17 and cache.num_free_pages == 8 - 2
    more = torch.randn(5, 12, device=device)
    cache.append([a], more[:, :8], more[:, 8:])
    torch.testing.assert_close(gather_paged_ref(cache.kv, cache.block_table([a]), 22, 0), torch.cat([toks[:17], more]))
    with pytest.raises(ValueError, match="length must be an int in \\[0, 22\\]"):
        cache.truncate(a, 23)


@pytest.mark.parametrize("width", [2, 16], ids=["one-split", "several-splits"])
def test_decode_checks(width, device):
    """Bad lengths and pages are refused whether the context is split or not (one split: the kernel runs on
    clamped inputs while the checks are read back); good ones give the unchecked result."""
    q_lat, q_rope = torch.randn(2, 1, 4, 32, device=device), torch.randn(2, 1, 4, 16, device=device)
    cache = torch.randn(4, 16, 48, device=device)
    # entries past the pages a sequence uses lie outside the cache: never read, never refused
    table = torch.tensor([[0, 1] + [99] * (width - 2), [2, 3] + [-1] * (width - 2)], dtype=torch.int32, device=device)
    one_split = split_context(2, 16 * width, mla_ops.num_sms(cache.device))[0] == 1  # 2 sequences x 1 head group
    assert one_split == (width == 2)
    lens = torch.tensor([20, 5], dtype=torch.int32, device=device)
    out = mla_decode(q_lat, q_rope, cache, cache_seqlens=lens, block_table=table, scale=0.1)
    torch.testing.assert_close(out, mla_decode(q_lat, q_rope, cache, cache_seqlens=lens, block_table=table[:, :2],
                                               scale=0.1, validate=False), atol=1e-5, rtol=1e-5)
    bad_table = table.clone()
    bad_table[1, 0] = 9
    with pytest.raises(ValueError, match=r"block_table\[1\] points outside the cache: .* got \[9\]"):
        mla_decode(q_lat, q_rope, cache, cache_seqlens=lens, block_table=bad_table, scale=0.1)
    # unchecked, the kernel still reads inside the cache: pages clamped to it, lengths to [S, capacity]
    clamped = table.clone()
    clamped[1, 0] = 3
    torch.testing.assert_close(
        mla_decode(q_lat, q_rope, cache, cache_seqlens=lens, block_table=bad_table, scale=0.1, validate=False),
        mla_decode(q_lat, q_rope, cache, cache_seqlens=lens, block_table=clamped, scale=0.1), atol=0, rtol=0)
    too_long = torch.tensor([20, 16 * width + 7], dtype=torch.int32, device=device)
    torch.testing.assert_close(
        mla_decode(q_lat, q_rope, cache, cache_seqlens=too_long, block_table=table, scale=0.1, validate=False),
        mla_decode(q_lat, q_rope, cache, cache_seqlens=too_long.clamp(max=16 * width), block_table=table,
                   scale=0.1, validate=False), atol=0, rtol=0)
    for bad, b in (([20, 16 * width + 1], 1), ([0, 5], 0), ([20, -3], 1)):
        with pytest.raises(ValueError, match=rf"cache_seqlens\[{b}\] = {bad[b]} is out of range"):
            mla_decode(q_lat, q_rope, cache, cache_seqlens=torch.tensor(bad, dtype=torch.int32, device=device),
                       block_table=table, scale=0.1)
    with pytest.raises(ValueError, match="out of range"):  # fewer cached tokens than query tokens
        mla_decode(torch.randn(2, 3, 4, 32, device=device), torch.randn(2, 3, 4, 16, device=device), cache,
                   cache_seqlens=torch.tensor([20, 2], dtype=torch.int32, device=device), block_table=table, scale=0.1)
    with pytest.raises(ValueError, match="the cache holds at most 3 tokens per sequence, fewer than the 4"):
        mla_decode(torch.randn(2, 4, 4, 32, device=device), torch.randn(2, 4, 4, 16, device=device),
                   torch.randn(2, 3, 48, device=device), cache_seqlens=lens, scale=0.1)


def test_prefill_bad_inputs(device):
    qn, qr, c, kr = _inputs(1, 12, 4, 16, 8, 32, 16, device)
    w_uk, w_uv = _weights(H=4, nope=16, rope=8, rank=32, v=16, device=device)
    with pytest.raises(ValueError, match="w_uk is on meta but q_nope is on"):  # before the decompression
        mla_prefill(qn, qr, c, kr, w_uk.to("meta"), w_uv, scale=0.2)
    with pytest.raises(ValueError, match="c_kv is on meta but q_nope is on"):
        mla_prefill(qn, qr, c.to("meta"), kr, w_uk, w_uv, scale=0.2)
    with pytest.raises(TypeError, match="scale is required"):
        mla_prefill(qn, qr, c, kr, w_uk, w_uv, scale=None)
    with pytest.raises(ValueError, match="w_uk's middle dim"):
        mla_prefill(qn, qr, c, kr, w_uk[:, :8], w_uv, scale=0.2)
    with pytest.raises(ValueError, match="c_kv holds 6 tokens per sequence, fewer than the 12 queries"):
        mla_prefill(qn, qr, c[:, :6], kr[:, :6], w_uk, w_uv, scale=0.2)
    with pytest.raises(ValueError, match=r"prefix_chunk must lie in \[16, "):
        mla_prefill(qn, qr, c, kr, w_uk, w_uv, scale=0.2, prefix_chunk=8)
    with pytest.raises(TypeError, match="prefix_chunk must be an int"):
        mla_prefill(qn, qr, c, kr, w_uk, w_uv, scale=0.2, prefix_chunk=16.0)
    for bad, err in (("x", TypeError), (True, TypeError), (-0.2, ValueError)):
        with pytest.raises(err, match="scale must be a (float|finite positive number)"):
            mla_prefill(qn, qr, c, kr, w_uk, w_uv, scale=bad)
    # varlen: a sequence with more queries than latent tokens (its queries are its last tokens), one offsets tensor
    cu = lambda *a: torch.tensor(a, dtype=torch.int32, device=device)
    flat = [x[0] for x in (qn, qr, c, kr)]
    with pytest.raises(ValueError, match="sequence 0 has 6 queries but 5 latent tokens"):
        mla_prefill(*flat[:2], flat[2][:10], flat[3][:10], w_uk, w_uv, scale=0.2, cu_seqlens_q=cu(0, 6, 12),
                    cu_seqlens_k=cu(0, 5, 10))
    with pytest.raises(ValueError, match="need both cu_seqlens_q and cu_seqlens_k"):
        mla_prefill(*flat, w_uk, w_uv, scale=0.2, cu_seqlens_q=cu(0, 12))


def test_decode_bad_inputs(device):
    q_lat, q_rope = torch.randn(2, 1, 4, 32, device=device), torch.randn(2, 1, 4, 16, device=device)
    cache = torch.randn(4, 16, 48, device=device)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    lens = torch.tensor([20, 5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="last dim must be R \\+ Dr = 48"):
        mla_decode(q_lat, q_rope, torch.randn(4, 16, 40, device=device), cache_seqlens=lens, block_table=table, scale=0.1)
    with pytest.raises(TypeError, match="cache_seqlens must be an int32 tensor"):
        mla_decode(q_lat, q_rope, cache, cache_seqlens=lens.long(), block_table=table, scale=0.1)
    with pytest.raises(TypeError, match="scale is required"):
        mla_decode(q_lat, q_rope, cache, cache_seqlens=lens, block_table=table, scale=None)
    with pytest.raises(ValueError, match="at least one head"):
        mla_decode(q_lat[:, :, :0], q_rope[:, :, :0], cache, cache_seqlens=lens, block_table=table, scale=0.1)
    big = torch.zeros(*q_lat.shape[:-1], 1025, device=device)
    with pytest.raises(ValueError, match="the latent dim R must be at most 1024"):
        mla_decode(big, q_rope, big.new_zeros(1, 16, 1025 + q_rope.shape[-1]), cache_seqlens=lens, scale=0.1)
    with pytest.raises(ValueError, match="kv_cache must hold at least one page"):
        mla_decode(q_lat, q_rope, cache[:0], cache_seqlens=lens, block_table=table, scale=0.1)
    out, lse = mla_decode(q_lat[:0], q_rope[:0], cache, cache_seqlens=lens[:0], block_table=table[:0], scale=0.1,
                          return_lse=True)  # an empty batch
    assert out.shape == (0, 1, 4, 32) and lse.shape == (0, 4, 1)


@pytest.mark.parametrize("groups,max_len,sms,one,want", [(128, 8192, 132, True, 1), (512, 8192, 132, True, 1),
                                                         (2, 65536, 132, True, 64), (1, 100, 4, False, 2),
                                                         (3, 5000, 132, False, None)])
def test_decode_split_context(groups, max_len, sms, one, want):
    """Split-KV sizing: splits are whole multiples of 64 tokens that cover the context; a batch that fills the
    GPU is not split (batch 64 x 2 head groups on 132 SMs), batch 1 spreads over every SM."""
    n, per = split_context(groups, max_len, sms * (1 if one else 2))
    assert per % 64 == 0 and (n - 1) * per < max_len <= n * per
    assert groups * n <= 2 * sms * (1 if one else 2) or n == 1
    if want is not None:
        assert n == want


def test_decode_candidates():
    """Every tile the autotuner may try fits in shared memory and within a page; 64 rows run on 8 warps with the
    scores split between the warpgroups (SHARED_P), fewer on 4 without; float8 caches fit one more."""
    for rows, page in ((64, 64), (64, 16), (16, 256), (8, 32)):
        configs = decode_candidates(rows, page, 576, "tf32")
        assert configs
        for c in configs:
            assert c.kwargs["BLOCK_N"] <= page and c.num_warps == (8 if rows >= 64 else 4)
            p_tile = 2 * rows * c.kwargs["BLOCK_N"] if c.kwargs["SHARED_P"] else 0
            assert 2 * 576 * (rows + c.kwargs["BLOCK_N"] * c.num_stages) + p_tile <= 227 * 1024
        assert {c.kwargs["SHARED_P"] for c in configs} == {rows >= 64}
    assert [c.kwargs["BLOCK_N"] for c in decode_candidates(64, 64, 576, "ieee")] == [16]
    # a float8 cache (half the bytes a tile, but a 16-bit copy of it for the tensor cores) fits 64-token tiles at 3
    # stages too, as compiled for sm_90 (tests/cuda_compile.py checks the shared memory)
    tiles = lambda configs: [(c.kwargs["BLOCK_N"], c.num_stages) for c in configs]  # noqa: E731
    assert (64, 3) in tiles(decode_candidates(64, 64, 576, "tf32", 1))
    assert (64, 3) not in tiles(decode_candidates(64, 64, 576, "tf32"))
    assert tiles(decode_candidates(64, 64, 576, "tf32", 1))[0] == tiles(decode_candidates(64, 64, 576, "tf32"))[0]
    # with the cache's descriptors (tiles of 64 tokens), each 8-warp candidate of that tile also by TMA, those first
    for rows, cache_bytes in ((64, 2), (64, 1), (16, 2)):
        plain = decode_candidates(rows, 64, 576, "tf32", cache_bytes)
        both = decode_candidates(rows, 64, 576, "tf32", cache_bytes, tma_tile=64)
        assert not any(c.kwargs["USE_TMA"] for c in plain)
        twins = [c for c in both if c.kwargs["USE_TMA"]]
        key = lambda c: (c.kwargs["BLOCK_N"], c.kwargs["SHARED_P"], c.num_warps, c.num_stages)  # noqa: E731
        assert both[:len(twins)] == twins
        assert [key(c) for c in twins] == [key(c) for c in plain if c.kwargs["BLOCK_N"] == 64 and c.num_warps == 8]
        assert [key(c) for c in both[len(twins):]] == [key(c) for c in plain]
        assert bool(twins) == (rows == 64)


class _Launch:
    """Stands in for the autotuned decode kernel: launches one given configuration."""

    def __init__(self, config):
        self.config = config

    def __getitem__(self, grid):
        c = self.config
        return lambda *args, **meta: _mla_decode_kernel[grid](*args, **meta, **c.kwargs, num_warps=c.num_warps,
                                                              num_stages=c.num_stages)


@pytest.mark.parametrize("rows,page", [(64, 64), (16, 64), (64, 16)])
def test_decode_every_candidate(rows, page, device, monkeypatch):
    """Each configuration the autotuner may pick gives the reference's result (the suite otherwise runs only the
    first, LONGATTN_AUTOTUNE=0), with pages of 64 tokens and of 16 (whose 64 rows take 16-token tiles alone); on the
    CPU with the GPU's tiles and splits, through the interpreter."""
    B, S, dtype = 3, 1, torch.bfloat16
    H = rows  # one head group of `rows` rows
    lens = [1, 700, 2100] if device == "cuda" else [1, 200, 450]
    kv_tokens = [torch.randn(n, 576, device=device, dtype=dtype) for n in lens]
    # the last sequence's scores grow along it (its rotary keys scaled up to 20x): the rows' maxima grow past 2^8
    # at most of its tiles, so that the tiles rescaling lazily (LAZY_RESCALE) rescale after the first too, and skip
    # it elsewhere with probabilities above 1
    kv_tokens[-1][:, 512:] *= torch.linspace(0.05, 20, lens[-1], device=device, dtype=dtype)[:, None]
    cache, table = _paged(kv_tokens, lens, page, device)
    q_lat = torch.randn(B, S, H, 512, device=device, dtype=dtype)
    q_rope = torch.randn(B, S, H, 64, device=device, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    ref, _ = mla_decode_ref(q_lat, q_rope, cache, cache_seqlens=seqlens, block_table=table, scale=192 ** -0.5)
    monkeypatch.setattr(mla_ops, "small_tiles", lambda: False)
    tma = device == "cpu" or torch.cuda.get_device_capability()[0] >= 9  # where the cache gets descriptors
    configs = decode_candidates(rows, page, 576, "tf32", tma_tile=page if tma else 0)
    assert configs and all(c.kwargs["BLOCK_N"] <= page for c in configs)
    for c in configs:
        monkeypatch.setattr(mla_ops, "_mla_decode_tuned", _Launch(c))
        out = mla_decode(q_lat, q_rope, cache, cache_seqlens=seqlens, block_table=table, scale=192 ** -0.5)
        assert_close(out, ref, dtype, f"o_latent with {c}")


@pytest.mark.gpu
@pytest.mark.parametrize("B,L,H,S", [(8, 3000, 128, 1), (2, 9000, 16, 4), (64, 1024, 128, 2)])
def test_decode_gpu_large(B, L, H, S, dtype):
    lens = torch.randint(S, L + 1, (B,)).tolist()
    kv_tokens = [torch.randn(n, 576, device="cuda", dtype=dtype) for n in lens]
    cache, table = _paged(kv_tokens, lens, 64, "cuda")
    q_lat = torch.randn(B, S, H, 512, device="cuda", dtype=dtype)
    q_rope = torch.randn(B, S, H, 64, device="cuda", dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = mla_decode(q_lat, q_rope, cache, cache_seqlens=seqlens, block_table=table, scale=192 ** -0.5)
    ref, _ = mla_decode_ref(q_lat, q_rope, cache, cache_seqlens=seqlens, block_table=table, scale=192 ** -0.5)
    assert_close(out, ref, dtype, "o_latent")


@pytest.mark.gpu
def test_decode_in_cuda_graph():
    """With validate=False a decoding step has no host synchronisation: it can be captured once and replayed
    as the cache grows (new lengths, new tokens, new queries written in place)."""
    B, H, L = 4, 16, 1024
    cache = torch.randn(B, L, 576, device="cuda", dtype=torch.bfloat16)
    q_lat = torch.randn(B, 1, H, 512, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(B, 1, H, 64, device="cuda", dtype=torch.bfloat16)
    seqlens = torch.tensor([10, 300, 1, 700], dtype=torch.int32, device="cuda")
    run = lambda: mla_decode(q_lat, q_rope, cache, cache_seqlens=seqlens, scale=0.05, validate=False)
    graph, out = capture_graph(run)
    for step in range(3):
        seqlens += 1 + step
        q_lat.normal_()
        q_rope.normal_()
        graph.replay()
        ref, _ = mla_decode_ref(q_lat, q_rope, cache, cache_seqlens=seqlens, scale=0.05)
        assert_close(out, ref, torch.bfloat16, f"o_latent, replay {step}")
