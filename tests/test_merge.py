"""lse merge of partial attention results."""
import pytest
import torch

from longattn import flash_attention, merge_attention
from longattn.kernels.reference import attention_ref, merge_ref
from helpers import assert_close, assert_first_order_only, assert_lse_close, leaf


@pytest.mark.parametrize("cuts", [[40], [10, 55], [0, 30]], ids=str)
def test_merge_of_key_splits_equals_full_attention(cuts, dtype, device):
    """Attention over disjoint key chunks, merged, equals attention over all keys (exactness)."""
    B, Tq, Tk, H, D = 2, 33, 80, 4, 32
    q = torch.randn(B, Tq, H, D, device=device, dtype=dtype)
    k = torch.randn(B, Tk, 2, D, device=device, dtype=dtype)
    v = torch.randn(B, Tk, 2, D, device=device, dtype=dtype)
    bounds = [0] + cuts + [Tk]
    parts = [flash_attention(q, k[:, a:b], v[:, a:b], causal=False, return_lse=True)
             for a, b in zip(bounds[:-1], bounds[1:])]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    out_r, lse_r = attention_ref(q.float(), k.float(), v.float(), causal=False, return_lse=True)
    assert_close(out, out_r, dtype, "out")
    assert_lse_close(lse, lse_r, atol=1e-4 if dtype == torch.float32 else 2e-3)


def _random_parts(n, shape_o, device, dtype, empty_rows=True):
    outs = torch.randn(n, *shape_o, device=device, dtype=dtype)
    if len(shape_o) == 4:
        B, T, H, _ = shape_o
        lses = torch.randn(n, B, H, T, device=device) * 3
        if empty_rows:
            lses[0, :, :, :5] = float("-inf")          # one part empty on some rows
            lses[:, :, 1, 7] = float("-inf")           # every part empty on one row
    else:
        T, H, _ = shape_o
        lses = torch.randn(n, H, T, device=device) * 3
        if empty_rows:
            lses[1, :, 3:9] = float("-inf")
    return outs, lses


@pytest.mark.parametrize("n,shape", [(2, (2, 20, 3, 64)), (3, (45, 4, 48)), (1, (1, 9, 2, 16))], ids=str)
def test_merge_matches_reference(n, shape, dtype, device):
    outs, lses = _random_parts(n, shape, device, dtype)
    out, lse = merge_attention(outs, lses)  # stacked form
    out_r, lse_r = merge_ref(list(outs), list(lses))
    assert_close(out, out_r.float(), dtype, "out")
    assert_lse_close(lse, lse_r, atol=1e-5)
    out2, _ = merge_attention(list(outs), list(lses))  # list form
    torch.testing.assert_close(out2, out)


@pytest.mark.parametrize("n,shape", [(2, (2, 20, 3, 64)), (3, (45, 4, 48))], ids=str)
def test_merge_gradients(n, shape, dtype, device):
    outs, lses = _random_parts(n, shape, device, dtype, empty_rows=False)
    ok, lk = leaf(outs), leaf(lses)
    orf, lrf = leaf(outs, torch.float32), leaf(lses)
    out, lse = merge_attention(ok, lk)
    out_r, lse_r = merge_ref(list(orf), list(lrf))
    dout, dlse = torch.randn_like(out_r), torch.randn_like(lse_r)
    ((out.float() * dout).sum() + (lse * dlse).sum()).backward()
    ((out_r * dout).sum() + (lse_r * dlse).sum()).backward()
    assert_close(ok.grad, orf.grad, dtype, "d_outs")
    assert_close(lk.grad, lrf.grad, torch.float32 if dtype == torch.float32 else dtype, "d_lses")


def test_empty_part_output_is_ignored(device):
    """A part with lse = -inf may hold anything (even NaN) in its output: it must not leak."""
    outs, lses = _random_parts(2, (1, 12, 2, 16), device, torch.float32)
    outs[0, :, :5] = float("nan")  # rows where part 0 has lse = -inf
    out, lse = merge_attention(outs, lses)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :5], outs[1, :, :5].masked_fill(torch.isinf(lses[1, :, :, :5]).transpose(-1, -2)[..., None], 0))


def test_merge_gradient_with_empty_parts_is_finite(device):
    outs, lses = _random_parts(2, (1, 12, 2, 16), device, torch.float32)
    ok, lk = leaf(outs), leaf(lses)
    out, lse = merge_attention(ok, lk)
    assert torch.all(out[:, 7, 1] == 0) and torch.isneginf(lse[:, 1, 7]).all()
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    assert torch.isfinite(ok.grad).all() and torch.isfinite(lk.grad).all()
    assert torch.all(ok.grad[0, :, :5] == 0)  # an empty part gets no gradient


def test_merge_through_flash_is_differentiable(device):
    """Gradients flow through flash's lse into the merge (how MoBA/NSA combine branches)."""
    q, k, v = (torch.randn(1, 30, 2, 16, device=device) for _ in range(3))
    qk, kk, vk = leaf(q), leaf(k), leaf(v)
    o1, l1 = flash_attention(qk, kk[:, :12], vk[:, :12], causal=False, return_lse=True)
    o2, l2 = flash_attention(qk, kk[:, 12:], vk[:, 12:], causal=False, return_lse=True)
    out, _ = merge_attention([o1, o2], [l1, l2])
    qr, kr, vr = leaf(q), leaf(k), leaf(v)
    out_r = attention_ref(qr, kr, vr, causal=False)
    dout = torch.randn_like(out_r)
    (out * dout).sum().backward()
    (out_r * dout).sum().backward()
    for a, b, name in ((qk.grad, qr.grad, "dq"), (kk.grad, kr.grad, "dk"), (vk.grad, vr.grad, "dv")):
        assert_close(a, b, torch.float32, name)


def test_merge_no_second_derivative(device):
    outs = [leaf(torch.randn(1, 12, 2, 16, device=device)) for _ in range(2)]
    lses = [leaf(torch.randn(1, 2, 12, device=device)) for _ in range(2)]
    assert_first_order_only(lambda *x: merge_attention(list(x[:2]), list(x[2:])), (*outs, *lses), "merge_attention")
