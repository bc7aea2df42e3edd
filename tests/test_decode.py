"""flash_decode: a few new tokens per sequence against a KV cache (contiguous, left-padded, paged) vs the reference."""
import math

import pytest
import torch

from longattn import flash_attention, flash_decode
from longattn.kernels.reference import attention_ref
from helpers import assert_close, assert_lse_close, capture_graph, float8_bytes, run_without_gpu_sync


def _cache(lens, hkv, dk, dv, dtype, device, page=None, offsets=None, spare=5):
    """Random keys/values of each sequence, and a cache holding them: contiguous ``(B, L, Hkv, D)`` (rows from each
    offset), or paged ``(pages, page, Hkv, D)`` in random page order with a block table (unused pages hold noise,
    unused table entries -1 or a page of another sequence)."""
    B = len(lens)
    keys = [torch.randn(n, hkv, dk, device=device, dtype=dtype) for n in lens]
    vals = [torch.randn(n, hkv, dv, device=device, dtype=dtype) for n in lens]
    if page is None:
        offsets = offsets or [0] * B
        L = max(o + n for o, n in zip(offsets, lens)) + spare
        kc = torch.randn(B, L, hkv, dk, device=device, dtype=dtype)
        vc = torch.randn(B, L, hkv, dv, device=device, dtype=dtype)
        for b, (o, n) in enumerate(zip(offsets, lens)):
            kc[b, o:o + n], vc[b, o:o + n] = keys[b], vals[b]
        return keys, vals, kc, vc, None
    per = [-(-n // page) for n in lens]
    max_pages = max(per) + 1
    order = torch.randperm(sum(per) + 3).tolist()  # 3 pages nobody uses
    kc = torch.randn(len(order), page, hkv, dk, device=device, dtype=dtype)
    vc = torch.randn(len(order), page, hkv, dv, device=device, dtype=dtype)
    table = torch.full((B, max_pages), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        for j in range(per[b]):
            p = order.pop()
            table[b, j] = p
            m = min(page, n - j * page)
            kc[p, :m], vc[p, :m] = keys[b][j * page:j * page + m], vals[b][j * page:j * page + m]
    table[0, per[0]:] = table[-1, 0]  # entries past a sequence's length are never read
    return keys, vals, kc, vc, table.to(device)


def _reference(q, keys, vals, causal, window, scale, softcap=None):
    outs, lses = zip(*(attention_ref(q[b:b + 1], k[None], v[None], causal=causal, window=window, scale=scale,
                                     return_lse=True, softcap=softcap) for b, (k, v) in enumerate(zip(keys, vals))))
    return torch.cat(outs), torch.cat(lses)


CASES = [  # (lens, S, Hq, Hkv, dk, dv, page, offsets, causal, window)
    ([70, 1, 129], 1, 4, 2, 32, 32, None, None, True, None),
    ([70, 33, 129], 3, 8, 2, 48, 32, 16, None, True, None),  # dk 48: split head dim; 3 speculative tokens
    ([200, 64, 5], 2, 4, 4, 32, 16, 32, None, True, 40),  # dv != dk, window
    ([90, 12], 4, 2, 1, 32, 32, None, [0, 50], True, None),  # left-padded cache
    ([90, 12], 4, 2, 1, 32, 32, 64, None, False, None),  # non-causal: every token sees all keys
    ([300], 16, 16, 2, 16, 16, 16, None, True, None),  # 8 heads per KV head x 16 tokens: two launches
    ([50, 130], 2, 144, 2, 16, 16, 16, None, True, 30),  # 72 heads per KV head: parts of 64 and 8, a token each
    ([77], 3, 71, 1, 32, 32, None, None, False, None),  # MQA with 71 heads (Falcon-7B's shape), non-causal
]


def _case(case, dtype, device, q_scale=1.0):
    """CASES[case]'s cache and queries: (keys, vals, k_cache, v_cache, block_table, q, cache_seqlens, cache_offsets,
    causal, window)."""
    lens, S, hq, hkv, dk, dv, page, offsets, causal, window = CASES[case]
    torch.manual_seed(case)
    keys, vals, kc, vc, table = _cache(lens, hkv, dk, dv, dtype, device, page, offsets)
    q = q_scale * torch.randn(len(lens), S, hq, dk, device=device, dtype=dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    offs = torch.tensor(offsets, dtype=torch.int32, device=device) if offsets else None
    return keys, vals, kc, vc, table, q, seqlens, offs, causal, window


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_flash_decode_matches_reference(case, dtype, device):
    keys, vals, kc, vc, table, q, seqlens, offs, causal, window = _case(case, dtype, device)
    want, want_lse = _reference(q, keys, vals, causal, window, 0.3)
    for validate in (True, False):
        out, lse = flash_decode(q, kc, vc, cache_seqlens=seqlens, block_table=table, cache_offsets=offs,
                                causal=causal, window=window, scale=0.3, return_lse=True, validate=validate)
        assert out.dtype == dtype
        assert_close(out, want, dtype, f"out (validate={validate})")
        assert_lse_close(lse, want_lse, atol=2e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("case", [1, 2, 3])
def test_flash_decode_softcap(case, dtype, device):
    """Soft-capped scores (see flash_attention's softcap): paged with speculative tokens, a window, a left-padded
    cache, with a key scale (the cap applies to the dequantised scores)."""
    keys, vals, kc, vc, table, q, seqlens, offs, causal, window = _case(case, dtype, device, q_scale=4.0)
    want, want_lse = _reference(q, [2 * k for k in keys], vals, causal, window, 0.3, softcap=3.0)
    out, lse = flash_decode(q, kc, vc, cache_seqlens=seqlens, block_table=table, cache_offsets=offs, causal=causal,
                            window=window, scale=0.3, k_scale=2.0, softcap=3.0, return_lse=True)
    assert_close(out, want, dtype, "out")
    assert_lse_close(lse, want_lse, atol=2e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("case", [1, 3, 5, 6])
def test_flash_decode_chunks(case, dtype, device):
    """Chunked attention (chunk_size, chunk_offsets: see flash_attention): paged with speculative tokens across a
    chunk's end, a left-padded cache, two launches of 8 heads x 16 tokens, parts of 64 heads."""
    keys, vals, kc, vc, table, q, seqlens, offs, _, _ = _case(case, dtype, device)
    shifts = torch.tensor([5, 0, 17][:len(keys)], dtype=torch.int32, device=device)  # (key 0's chunk position)
    chunk = 24
    out, lse = flash_decode(q, kc, vc, cache_seqlens=seqlens, block_table=table, cache_offsets=offs, scale=0.3,
                            return_lse=True, chunk_size=chunk, chunk_offsets=shifts)
    for b, (k, v) in enumerate(zip(keys, vals)):  # (row b's key j at position shifts[b] + j of its chunking)
        want, want_lse = attention_ref(q[b:b + 1], k[None], v[None], scale=0.3, return_lse=True, chunk_size=chunk,
                                       chunk_offsets=shifts[b:b + 1])
        assert_close(out[b:b + 1], want, dtype, f"out row {b}")
        assert_lse_close(lse[b:b + 1], want_lse, atol=2e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_flash_decode_float8_cache(cache_dtype, dtype, device):
    """A quantised cache: float8 keys and values with per-tensor scales give the attention of the dequantised ones
    (widened exactly to q's dtype as they are read; the scales applied to the scores and the output), contiguous
    (left-padded) and paged, one launch and several (72 heads per KV head)."""
    torch.manual_seed(2)
    for lens, S, hq, hkv, page, offsets in (([70, 129, 5], 2, 8, 2, None, [3, 0, 40]),
                                            ([70, 129, 5], 1, 8, 2, 16, None), ([50], 3, 72, 1, 16, None)):
        _, _, kc, vc, table = _cache(lens, hkv, 32, 16, torch.float32, device, page, offsets)
        k8, v8 = (kc * 4).to(cache_dtype), (vc / 2).to(cache_dtype)  # stored 4x and / 2: scales 1/4 and 2
        q = torch.randn(len(lens), S, hq, 32, device=device, dtype=dtype)
        seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        offs = torch.tensor(offsets, dtype=torch.int32, device=device) if offsets else None
        out, lse = flash_decode(q, k8, v8, cache_seqlens=seqlens, block_table=table, cache_offsets=offs, scale=0.3,
                                k_scale=0.25, v_scale=2.0, return_lse=True)
        assert out.dtype == dtype

        def seq(c, b, n):  # sequence b's n tokens of a cache, widened (torch 2.5 indexes no float8 tensor)
            c = c.float()
            rows = c[b, offsets[b]:] if table is None and offsets else c[b] if table is None else \
                c[table[b].clamp(min=0).long()].flatten(0, 1)
            return rows[:n]
        want, want_lse = _reference(q.float(), [seq(k8, b, n) * 0.25 for b, n in enumerate(lens)],
                                    [seq(v8, b, n) * 2.0 for b, n in enumerate(lens)], True, None, 0.3)
        assert_close(out, want, dtype, f"{cache_dtype} cache, page {page}")
        assert_lse_close(lse, want_lse, atol=2e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_flash_decode_float8_every_value(cache_dtype, device):
    """Every finite float8 value (subnormals, zeros of both signs, the largest) is widened exactly, as keys and as
    values (on a GPU by the kernels' integer operations, see flash._widen): two one-token caches hold the 256 bytes;
    query head h is the h-th unit vector, so its lse is key value h (the one score) times the scale and its output the
    value row. The scale ln 2 makes the kernel's base-2 scores (scores * scale * log2 e) the keys themselves, exactly
    (the one key's probability then exactly 1, whatever its score; the kernels fold the scale into the exponent's
    fused multiply-add, exact only for exact products)."""
    cache = float8_bytes(cache_dtype).view(cache_dtype).view(2, 1, 1, 128).to(device)
    q = torch.eye(128, dtype=torch.bfloat16, device=device).expand(2, 1, 128, 128)
    lens = torch.ones(2, dtype=torch.int32, device=device)
    out, lse = flash_decode(q, cache, cache, cache_seqlens=lens, scale=math.log(2), return_lse=True)
    want = cache.float().view(2, 1, 1, 128)  # (torch 2.5 indexes no float8 tensor)
    assert torch.equal(out.float(), want.expand(2, 1, 128, 128))
    torch.testing.assert_close(lse.view(2, 128), want.view(2, 128) * math.log(2), rtol=1e-6, atol=0)


def test_flash_decode_equals_flash_attention_on_the_gathered_keys(device):
    """One sequence's new tokens against its keys: flash_attention with Tq < Tk gives the same output and lse;
    a stacked K/V buffer's halves work as paged caches in place."""
    torch.manual_seed(0)
    page, n = 16, 77
    kv = torch.randn(2, 8, page, 2, 32, device=device)  # (K/V, pages, page, Hkv, D)
    table = torch.tensor([[5, 2, 7, 0, 3]], dtype=torch.int32, device=device)
    q = torch.randn(1, 2, 4, 32, device=device)
    out, lse = flash_decode(q, kv[0], kv[1], cache_seqlens=torch.tensor([n], dtype=torch.int32, device=device),
                            block_table=table, return_lse=True)
    k, v = (kv[i][table[0].long()].flatten(0, 1)[None, :n] for i in (0, 1))
    want, want_lse = flash_attention(q, k, v, return_lse=True)
    assert_close(out, want, torch.float32)
    assert_lse_close(lse, want_lse)


def test_flash_decode_errors(device):
    B, L = 2, 40
    q = torch.randn(B, 2, 4, 16, device=device)
    kc = torch.randn(B, L, 2, 16, device=device)
    lens = torch.tensor([10, 40], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 41 is out of range"):
        flash_decode(q, kc, kc, cache_seqlens=lens + 1)
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 1 is out of range: it must be at least the 2"):
        flash_decode(q, kc, kc, cache_seqlens=torch.tensor([1, 5], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"less its offset 5"):
        flash_decode(q, kc, kc, cache_seqlens=lens, cache_offsets=torch.tensor([0, 5], dtype=torch.int32,
                                                                                device=device))
    with pytest.raises(TypeError, match="cache_seqlens must be an int32 tensor of shape"):
        flash_decode(q, kc, kc, cache_seqlens=lens.long())
    with pytest.raises(TypeError, match="k_cache and v_cache must share one dtype, q's"):
        flash_decode(q, kc.to(torch.float8_e4m3fn), kc, cache_seqlens=lens)
    with pytest.raises(TypeError, match="q must have dtype"):
        flash_decode(q.to(torch.float8_e4m3fn), kc.to(torch.float8_e4m3fn), kc.to(torch.float8_e4m3fn),
                     cache_seqlens=lens)
    with pytest.raises(ValueError, match="v_scale must be a finite positive number"):
        flash_decode(q, kc, kc, cache_seqlens=lens, v_scale=0.0)
    with pytest.raises(ValueError, match="1 to 16 new tokens"):
        flash_decode(torch.randn(B, 17, 4, 16, device=device), kc, kc, cache_seqlens=lens)
    with pytest.raises(ValueError, match="window requires causal"):
        flash_decode(q, kc, kc, cache_seqlens=lens, causal=False, window=4)
    pages = torch.randn(6, 16, 2, 16, device=device)
    table = torch.tensor([[0, 1, 2], [3, 4, 6]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"block_table\[1\] points outside the cache: its first 3 entries"):
        flash_decode(q, pages, pages, cache_seqlens=lens, block_table=table)
    flash_decode(q, pages, pages, cache_seqlens=torch.tensor([10, 32], dtype=torch.int32, device=device),
                 block_table=table)  # the bad entry is past the length: never read
    with pytest.raises(ValueError, match="cache_offsets applies to contiguous caches"):
        flash_decode(q, pages, pages, cache_seqlens=lens, block_table=table, cache_offsets=lens)
    with pytest.raises(ValueError, match="pages must follow one another"):
        flash_decode(q, pages[:, :8], pages[:, :8], cache_seqlens=lens, block_table=table)
    with pytest.raises(TypeError, match="block_table must be an int32 tensor"):
        flash_decode(q, pages, pages, cache_seqlens=lens, block_table=table.long())
    with pytest.raises(ValueError, match=r"k_cache/v_cache must be"):
        flash_decode(q, kc, kc[..., :8].contiguous()[:, :30], cache_seqlens=lens)
    with pytest.raises(ValueError, match="must be a positive multiple of the KV heads"):
        flash_decode(torch.randn(B, 1, 3, 16, device=device), kc, kc, cache_seqlens=lens)
    with pytest.raises(ValueError, match="the cache holds at most 1 tokens per sequence, fewer than the 2 new"):
        flash_decode(q, kc[:, :1], kc[:, :1], cache_seqlens=lens)
    with pytest.raises(ValueError, match="chunk_size and window cannot be combined"):
        flash_decode(q, kc, kc, cache_seqlens=lens, chunk_size=8, window=4)
    with pytest.raises(ValueError, match="chunk_offsets needs chunk_size"):
        flash_decode(q, kc, kc, cache_seqlens=lens, chunk_offsets=lens)
    with pytest.raises(TypeError, match=f"chunk_offsets must be an int32 tensor of shape \\({B},\\)"):
        flash_decode(q, kc, kc, cache_seqlens=lens, chunk_size=8, chunk_offsets=lens[:1])
    out, lse = flash_decode(q[:0], kc[:0], kc[:0], cache_seqlens=lens[:0], return_lse=True)  # an empty batch
    assert out.shape == (0, 2, 4, 16) and lse.shape == (0, 4, 2)


@pytest.mark.gpu
def test_flash_decode_in_cuda_graph():
    """With validate=False a decoding step over a paged cache has no host synchronisation: captured once in a CUDA
    graph, it is replayed as the sequences grow (new lengths, new pages in the block table, new queries written in
    place) and gives the reference's output each time."""
    torch.manual_seed(0)
    lens = [40, 300, 1, 700]
    keys, vals, kc, vc, table = _cache([n + 20 for n in lens], 2, 64, 64, torch.bfloat16, "cuda", page=16)
    q = torch.randn(len(lens), 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    run = lambda: flash_decode(q, kc, vc, cache_seqlens=seqlens, block_table=table, validate=False)
    graph, out = capture_graph(run)
    for step in range(3):
        seqlens += 1 + step
        q.normal_()
        graph.replay()
        n = seqlens.tolist()
        want, _ = _reference(q, [k[:m] for k, m in zip(keys, n)], [v[:m] for v, m in zip(vals, n)], True, None,
                             64 ** -0.5)
        assert_close(out, want, torch.bfloat16, f"replay {step}")
    out = run_without_gpu_sync(run)  # and eagerly, without waiting for the GPU
    assert_close(out, want, torch.bfloat16, "eager")
