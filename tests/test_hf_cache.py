"""InPlaceCache: a transformers dynamic cache writing each step's tokens in place; generation and rollouts with it."""
import math
import types

import pytest
import torch

from longattn.hf.cache import InPlaceCache, InPlaceLayer, dequant_scale, dequantised
from longattn.kernels.utils import Calibration
from longattn.rollout import _cache_kw

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig  # noqa: E402

from test_hf import _deepseek, _swapped  # noqa: E402


def _same(a, b):
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.equal(x, y)


@pytest.mark.parametrize("reserve", [None, 24, 10_000])
def test_in_place_cache_follows_dynamic_cache(reserve):
    """Updates, crops (speculative decoding), reordering (beam search, rollouts dropping finished rows) and batch
    selection give DynamicCache's keys and values; within the room allocated nothing is reallocated (a step copies
    its own tokens only) and a crop keeps the room. An allocation leaves 256 tokens of room here, but none beyond
    the tokens expected (``max_cache_len``) while they suffice."""
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    ref, ours = DynamicCache(config=cfg), InPlaceCache(config=cfg, max_cache_len=reserve)
    assert all(type(layer) is InPlaceLayer for layer in ours.layers)

    def step(t, batch=3):
        k, v = torch.randn(batch, 2, t, 16), torch.randn(batch, 2, t, 16)
        for i in range(2):
            _same(ours.update(k, v, i), ref.update(k, v, i))
        assert ours.get_seq_length() == ref.get_seq_length()

    step(7)
    storage = ours.layers[1]._k
    assert storage.shape[2] == min(reserve or 10_000, 7 + 256)
    for _ in range(5):
        step(1)
    step(3)
    assert ours.layers[1]._k is storage
    ref.crop(-4)
    ours.crop(-4)
    assert ours.get_seq_length() == ref.get_seq_length() == 11 and ours.layers[1]._k is storage
    step(2)
    assert ours.layers[1]._k is storage
    step(30)  # past 24 tokens (within the room of the others' first allocation)
    assert (ours.layers[1]._k is storage) == (reserve != 24)
    for cache in (ref, ours):
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        cache.batch_select_indices(torch.tensor([0, 2]))
    _same((ours.layers[0].keys, ours.layers[0].values), (ref.layers[0].keys, ref.layers[0].values))
    room = ours.layers[0]._k.shape[2]
    for cache in (ref, ours):  # (generate's expansion for several sequences a prompt)
        cache.batch_repeat_interleave(2)
    _same((ours.layers[1].keys, ours.layers[1].values), (ref.layers[1].keys, ref.layers[1].values))
    assert ours.layers[1]._k.shape[2] == room
    for cache in (ref, ours):
        cache.batch_select_indices(torch.tensor([0, 3]))
    step(1, batch=2)
    assert ours.layers[0]._k.shape[2] == room  # the room survives the reordering
    with pytest.raises(ValueError, match="must match them but for the tokens"):
        ours.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), 0)
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        InPlaceCache(config=cfg, max_cache_len=0)
    with pytest.raises(TypeError, match="config must be a transformers config"):
        InPlaceCache(config="x")


def test_in_place_cache_without_config():
    cache = InPlaceCache()
    k = torch.randn(1, 2, 5, 8)
    keys, _ = cache.update(k, k, 1)
    assert [type(layer) for layer in cache.layers] == [InPlaceLayer, InPlaceLayer]
    assert torch.equal(keys, k) and cache.get_seq_length(1) == 5


@pytest.mark.parametrize("kind", ["sdpa", "flash", "moba", "nsa", "mla"])
def test_generate_with_in_place_cache(kind, device):
    """transformers' generate with an InPlaceCache (reserving too little: it grows while decoding) gives the tokens
    and logits of its default cache: left-padded greedy decoding, and beam search (which reorders the cache's
    rows)."""
    model = _deepseek(device)[1] if kind == "mla" else _swapped("flash" if kind == "sdpa" else kind, device)
    if kind == "sdpa":
        model.set_attn_implementation("sdpa")
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (2, 37)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    for extra in (dict(max_new_tokens=5), dict(max_new_tokens=5, num_beams=2)):  # 37 + 4 tokens fed: it grows
        kw = dict(attention_mask=mask, min_new_tokens=extra["max_new_tokens"], do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True, **extra)
        cache = InPlaceCache(config=model.config, max_cache_len=40)
        with torch.no_grad():
            ours = model.generate(ids, **{_cache_kw(model): cache}, **kw)
            ref = model.generate(ids, **kw)
        assert cache.layers[0]._k.shape[2] > 40  # (it was the cache used, and it grew)
        assert torch.equal(ours.sequences, ref.sequences)
        for a, b in zip(ours.logits, ref.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["moba", "nsa"])
def test_speculative_decoding_with_in_place_cache(kind, device, monkeypatch):
    """Prompt lookup (draft tokens verified in one forward, the rejected ones cut off with ``cache.crop``, which an
    InPlaceCache does without giving up its room) gives the greedy tokens and logits of the default cache."""
    model = _swapped(kind, device)
    torch.manual_seed(1)
    ids = torch.randint(1, 128, (1, 12), device=device).repeat(1, 4)  # repetitions: the lookup finds drafts
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    cache = InPlaceCache(config=model.config)
    grows = []
    grow = InPlaceLayer._grow
    monkeypatch.setattr(InPlaceLayer, "_grow", lambda layer, *a: grows.append(layer) or grow(layer, *a))
    with torch.no_grad():
        greedy = model.generate(ids, **kw)
        speculative = model.generate(ids, prompt_lookup_num_tokens=5, **{_cache_kw(model): cache}, **kw)
    n = greedy.sequences.shape[1]
    assert torch.equal(speculative.sequences[:, :n], greedy.sequences)
    torch.testing.assert_close(torch.cat(speculative.logits[:len(greedy.logits)]), torch.cat(greedy.logits),
                               atol=1e-4, rtol=1e-4)
    assert len(grows) == len(cache.layers)  # one allocation per layer, kept through the crops


def test_in_place_cache_for_minimax(device):
    """MiniMax-M1 takes only its own cache class (its lightning-attention layers' states beside the keys and values):
    ``InPlaceCache.for_model`` gives one with in-place full-attention layers. A left-padded batch's greedy generation
    with it equals each prompt's own (MiniMaxCache answers a length of 0 for layer 0, a lightning-attention layer,
    and the decoding steps' masks then hid every key of a padded row); reordering rows reorders the states too. A
    model with another cache class of its own is refused."""
    from helpers import tiny_config

    cfg = tiny_config("minimax")
    if cfg is None:
        pytest.skip("this transformers has no MiniMax model")
    from transformers import AutoModelForCausalLM
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval().to(device)
    cache = InPlaceCache.for_model(model, 80)
    assert isinstance(cache, InPlaceCache) and isinstance(cache, MiniMaxCache)
    a, b = torch.randint(1, 128, (1, 45)).to(device), torch.randint(1, 128, (1, 70)).to(device)
    batch = torch.cat([torch.cat([a.new_zeros(1, 25), a], 1), b])
    mask = torch.ones_like(batch)
    mask[0, :25] = 0
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        got = model.generate(batch, attention_mask=mask, **{_cache_kw(model): cache}, **kw)
        for row, ids in enumerate((a, b)):
            want = model.generate(ids, **kw)
            assert torch.equal(got.sequences[row, 70:], want.sequences[0, ids.shape[1]:]), row
            torch.testing.assert_close(torch.stack(got.logits)[:, row], torch.cat(want.logits), atol=2e-5, rtol=1e-5)
    assert all(type(layer) is InPlaceLayer for layer in cache.layers)
    states = {i: s.clone() for i, s in enumerate(cache.linear_cache) if isinstance(s, torch.Tensor)}
    keys = cache.layers[1].keys.clone()
    cache.reorder_cache(torch.tensor([1, 0], device=device))
    assert states and all(torch.equal(s.flip(0), cache.linear_cache[i]) for i, s in states.items())
    assert torch.equal(cache.layers[1].keys, keys.flip(0))
    with pytest.raises(TypeError, match="model must be a transformers model"):
        InPlaceCache.for_model(cfg)
    with pytest.raises(ValueError, match="cache class of its own"):
        InPlaceCache.for_model(types.SimpleNamespace(config=LlamaConfig(), _supports_default_dynamic_cache=lambda: False))


def _auto_scale(amax: float, fp8) -> float:
    """The scale a float8 cache calibrates for a largest magnitude ``amax``: the power of two that brings it into
    (an eighth, a quarter] of the format's range."""
    return 2.0 ** math.ceil(math.log2(amax * 4 / torch.finfo(fp8).max)) if amax > 0 else 1.0


class _RoundedCache(DynamicCache):
    """DynamicCache keeping its keys and values rounded through ``fp8`` (divided by their scale, saturated to the
    format's range, multiplied back) in their own dtype: the tokens a float8 InPlaceCache holds, for attention that
    does not read float8. ``scales``: one scale for all, or "auto": each layer's set at its first write and at each
    write of several tokens a row (each write within calibrating_writes) by the largest magnitudes written since it
    was empty, the tokens held rounded again at the new scales."""

    def __init__(self, config, fp8, scales="auto"):
        super().__init__(config=config)
        self.fp8, self.scales, self.auto = fp8, scales, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        top = torch.finfo(self.fp8).max
        r = lambda x, s: (x / s).clamp(-top, top).to(self.fp8).to(x.dtype) * s
        scales = (self.scales, self.scales)
        if self.scales == "auto":
            held = self.get_seq_length(layer_idx)
            seen, scales = self.auto[layer_idx] if held else ((0.0, 0.0), (1.0, 1.0))
            if held == 0 or key_states.shape[2] > 1 or Calibration.every_write:
                seen = tuple(max(a, x.abs().max().item()) for a, x in zip(seen, (key_states, value_states)))
                scales = tuple(_auto_scale(a, self.fp8) for a in seen)
                if held:
                    layer = self.layers[layer_idx]
                    layer.keys, layer.values = r(layer.keys, scales[0]), r(layer.values, scales[1])
            self.auto[layer_idx] = seen, scales
        return super().update(r(key_states, scales[0]), r(value_states, scales[1]), layer_idx, *args, **kwargs)


def test_float8_in_place_cache():
    """A float8 cache_dtype at scale 1 stores the keys and values saturated to the format's range (a plain conversion
    makes NaN beyond it), keeps them through growth, crops, reordering and batch selection, and refuses other
    dtypes."""
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    fp8 = torch.float8_e4m3fn
    cache = InPlaceCache(config=cfg, max_cache_len=4, cache_dtype=fp8, cache_scales=1.0)
    torch.manual_seed(0)
    k, v = torch.randn(3, 2, 5, 16) * 100, torch.randn(3, 2, 5, 16)
    k[0, 0, 0, 0] = 1e4
    for t in (slice(0, 3), slice(3, 4), slice(4, 5)):  # (past max_cache_len: it grows)
        keys, values = cache.update(k[:, :, t], v[:, :, t], 0)
    want = lambda x: x.clamp(-448, 448).to(fp8).float()
    assert keys.dtype == values.dtype == fp8 and not keys.float().isnan().any()
    assert keys.float()[0, 0, 0, 0] == 448
    assert torch.equal(keys.float(), want(k)) and torch.equal(values.float(), want(v))
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    cache.batch_select_indices(torch.tensor([0, 2]))
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([0, 3]))
    held = cache.layers[0].keys.float()
    assert torch.equal(held, want(k)[[2, 1]])
    cache.crop(-2)  # (5 tokens -> 3)
    keys, _ = cache.update(k[[2, 1], :, :1], v[[2, 1], :, :1], 0)
    assert keys.shape[2] == 4 and torch.equal(keys.float()[:, :, :3], held[:, :, :3])
    with pytest.raises(TypeError, match="cache_dtype must be None or a float8 dtype"):
        InPlaceCache(config=cfg, cache_dtype=torch.float16)


def test_float8_cache_scales():
    """A float8 cache's scales: by default each layer's keys' and values' from its first write (a power of two
    bringing the largest magnitude into (top / 8, top / 4]: tokens of 1e-3 keep the format's relative precision,
    which they lose among its subnormals at scale 1), kept by single-token writes (what lies beyond the range
    saturates), growth, reordering and crops, raised by a write of several tokens beyond them (the tokens held
    rounded again), calibrated again after a reset or a crop to nothing; given ones (one for all, a pair per layer,
    a tensor of pairs); the scale read back from any view of what the cache hands out (dequant_scale, dequantised,
    under torch.compile too); bad scales refused."""
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    fp8 = torch.float8_e4m3fn
    top = torch.finfo(fp8).max
    torch.manual_seed(0)
    k, v = torch.randn(3, 2, 6, 16) * 100, torch.randn(3, 2, 6, 16) * 1e-3
    cache = InPlaceCache(config=cfg, max_cache_len=4, cache_dtype=fp8)
    layer = cache.layers[0]
    assert layer.k_scale is None and layer.v_scale is None  # (until the first write)
    keys, values = cache.update(k[:, :, :3], v[:, :, :3], 0)
    for x, s in ((k[:, :, :3], layer.k_scale), (v[:, :, :3], layer.v_scale)):
        assert math.log2(s).is_integer() and top / 8 < x.abs().max() / s <= top / 4
    assert layer.v_scale < 2.0 ** -10 < 1.0 < layer.k_scale
    k[0, 0, 4, 0] = 1e6  # (a later token beyond the range: saturated)
    for t in range(3, 6):  # (decoding steps; past max_cache_len: it grows)
        keys, values = cache.update(k[:, :, t:t + 1], v[:, :, t:t + 1], 0)
    ks, vs = layer.k_scale, layer.v_scale
    want = lambda x, s: (x / s).clamp(-top, top).to(fp8).float()
    assert torch.equal(keys.float(), want(k, ks)) and torch.equal(values.float(), want(v, vs))
    assert keys.float()[0, 0, 4, 0] == top
    for view in (keys, keys.transpose(1, 2), keys.transpose(1, 2)[:, 1:, :1]):
        assert dequant_scale(view) == ks
    assert dequant_scale(values[:1]) == vs and dequant_scale(k) == 1.0
    assert torch.equal(dequantised(values.transpose(1, 2), torch.float32), want(v, vs).transpose(1, 2) * vs)
    compiled = torch.compile(lambda x: x.float() * dequant_scale(x), backend="eager")
    assert torch.equal(compiled(values.transpose(1, 2)), want(v, vs).transpose(1, 2) * vs)
    exact = torch.ones_like(k, dtype=torch.bool)
    exact[0, 0, 4, 0] = False
    rel = lambda held: ((held - v) / v).abs().max().item()
    assert rel(dequantised(values, torch.float32)) <= 2.0 ** -4  # (e4m3: 3 mantissa bits, all normal)
    assert ((dequantised(keys, torch.float32) - k) / k).abs()[exact].max() <= 2.0 ** -4
    at_one = InPlaceCache(config=cfg, cache_dtype=fp8, cache_scales=1.0)
    assert rel(at_one.update(k, v, 0)[1].float()) > 0.5  # (scale 1: subnormals, zeros)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    cache.crop(-2)
    keys, values = cache.update(k[[2, 0, 1], :, 4:5], v[[2, 0, 1], :, 4:5], 0)
    assert (layer.k_scale, layer.v_scale) == (ks, vs) and dequant_scale(keys) == ks
    assert torch.equal(keys.float()[:, :, :4], want(k, ks)[[2, 0, 1], :, :4])
    cache.reset()
    keys, _ = cache.update(k[:, :, :2] * 1e-2, v[:, :, :2], 0)  # (a new first write: calibrated again)
    assert layer.k_scale == _auto_scale(k[:, :, :2].abs().max().item() * 1e-2, fp8) < ks / 32
    assert dequant_scale(keys) == layer.k_scale
    # several tokens beyond the scales: raised, the tokens held rounded again; a crop to nothing: calibrated afresh
    cache = InPlaceCache(config=cfg, cache_dtype=fp8)
    layer = cache.layers[0]
    cache.update(k[:, :, :3], v[:, :, :3], 0)
    k1, v1 = layer.k_scale, layer.v_scale
    keys, values = cache.update(k[:, :, 3:5] * 64, v[:, :, 3:5], 0)
    assert (layer.k_scale, layer.v_scale) == (_auto_scale((k[:, :, 3:5] * 64).abs().max().item(), fp8), v1)
    assert layer.k_scale >= 16 * k1
    again = lambda x: (x * k1 / layer.k_scale).clamp(-top, top).to(fp8).float()
    assert torch.equal(keys.float()[:, :, :3], again(want(k[:, :, :3], k1)))
    assert torch.equal(keys.float()[:, :, 3:], want(k[:, :, 3:5] * 64, layer.k_scale))
    assert torch.equal(values.float(), want(v[:, :, :5], v1))
    cache.crop(-5)  # (all 5 tokens)
    cache.update(k[:, :, :2], v[:, :, :2], 0)
    assert layer.k_scale == _auto_scale(k[:, :, :2].abs().max().item(), fp8) < k1 * 2
    cache.reset()  # (keys beyond 2**60 * 112: the largest scale the ops take, 2**60, the keys saturated)
    keys, _ = cache.update(torch.full_like(k[:, :, :2], 2.0 ** 80), v[:, :, :2], 0)
    assert layer.k_scale == 2.0 ** 60 and keys.float().max() == top
    # an inf among the values: the finite ones' largest sets the scale
    cache = InPlaceCache(config=cfg, cache_dtype=fp8)
    k_inf = k[:, :, :3].clone()
    k_inf[1, 0, 2, 5] = float("inf")
    cache.update(k_inf, v[:, :, :3], 0)
    assert cache.layers[0].k_scale == k1 == _auto_scale(k[:, :, :3].abs().max().item(), fp8)
    # given scales: one for all, a pair per layer (a calibrated checkpoint's)
    given = InPlaceCache(config=cfg, cache_dtype=fp8, cache_scales=0.5)
    assert [(lay.k_scale, lay.v_scale) for lay in given.layers] == [(0.5, 0.5)] * 2
    given = InPlaceCache(cache_dtype=fp8, cache_scales=torch.tensor([[2.0, 0.25], [0.3, 3]]))  # (made as updated)
    keys, values = given.update(k, v, 1)
    assert torch.equal(keys.float(), want(k, 0.3)) and dequant_scale(values) == 3.0
    assert (given.layers[0].k_scale, given.layers[0].v_scale) == (2.0, 0.25)
    with pytest.raises(ValueError, match="cache_scales holds 1 \\(k_scale, v_scale\\) pairs: none for layer 1"):
        InPlaceCache(config=cfg, cache_dtype=fp8, cache_scales=[(1.0, 1.0)])
    with pytest.raises(ValueError, match="cache_scales must be 'auto'"):
        InPlaceCache(cache_dtype=fp8, cache_scales="max")
    with pytest.raises(ValueError, match="cache_scales\\[0\\] must be a \\(k_scale, v_scale\\) pair"):
        InPlaceCache(cache_dtype=fp8, cache_scales=[1.0])
    with pytest.raises(ValueError, match="cache_scales\\[0\\]'s scales must be a finite positive number"):
        InPlaceCache(cache_dtype=fp8, cache_scales=[(1.0, -2.0)])
    with pytest.raises(TypeError, match="cache_scales must be 'auto', a positive float .* got True"):
        InPlaceCache(cache_dtype=fp8, cache_scales=True)
    with pytest.raises(TypeError, match="cache_scales must be .auto., a positive float .* got object"):
        InPlaceCache(cache_dtype=fp8, cache_scales=object())
    with pytest.raises(ValueError, match="scales must be a \\(k_scale, v_scale\\) pair of positive floats, got 2.0"):
        InPlaceLayer(cache_dtype=fp8, scales=2.0)
    with pytest.raises(TypeError, match="cache_scales must be 'auto', a positive float or a sequence .* got None"):
        InPlaceCache(cache_dtype=fp8, cache_scales=None)
    with pytest.raises(ValueError, match="cache_scales applies to a float8 cache"):
        InPlaceCache(cache_scales=0.5)


@pytest.mark.parametrize("kind,fp8", [("flash", torch.float8_e4m3fn), ("flash", torch.float8_e5m2),
                                      ("moba", torch.float8_e4m3fn), ("nsa", torch.float8_e4m3fn)],
                         ids=["flash-e4m3", "flash-e5m2", "moba-e4m3", "nsa-e4m3"])
def test_generate_with_float8_cache(kind, fp8, device, monkeypatch):
    """longattn's flash and MoBA attention and NSA's module decode from a float8 InPlaceCache in their kernels
    (flash_decode / moba_decode / nsa_decode on the left-padded cache, one token a step and several: prompt lookup's
    drafts): the tokens and logits of attention over the same keys and values rounded in float32 (at the scales
    calibrated on the prompt, and at scale 1), which differ from the unquantised cache's; values a thousand times
    smaller decode as from the unquantised cache at calibrated scales, not at scale 1. MLA's module refuses such a
    cache."""
    import longattn.nsa.module as nsa_module
    from longattn.hf import attention as hf_attention

    model = _swapped(kind, device)
    where, op = dict(flash=(hf_attention, "flash_decode"), moba=(hf_attention, "moba_decode"),
                     nsa=(nsa_module, "nsa_decode"))[kind]
    decode = getattr(where, op)
    reads = []  # (query tokens a row, the cache's dtype)
    monkeypatch.setattr(where, op, lambda q, k, *a, **kw: reads.append(
        (q.shape[1] if kind == "flash" else q.shape[0] // k.shape[0], k.dtype)) or decode(q, k, *a, **kw))
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (2, 37)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    run = lambda cache: model.generate(ids, **{_cache_kw(model): cache}, **kw)
    with torch.no_grad():
        ours = run(InPlaceCache(config=model.config, cache_dtype=fp8))
        assert reads and all(d == fp8 for _, d in reads)
        ref = run(_RoundedCache(model.config, fp8))
        at_one = run(InPlaceCache(config=model.config, cache_dtype=fp8, cache_scales=1.0))
        ref_one = run(_RoundedCache(model.config, fp8, 1.0))
        plain = model.generate(ids, **kw)
    logits = lambda out: torch.stack(out.logits)
    for got, want in ((ours, ref), (at_one, ref_one)):  # (calibrated scales, and scale 1)
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(logits(got), logits(want), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(ours), logits(plain), atol=1e-3, rtol=1e-3)
    if fp8 == torch.float8_e4m3fn:
        # values a thousand times smaller (v_proj scaled down, o_proj up): the calibrated cache keeps them within
        # e4m3's precision, scale 1 puts them among its subnormals
        with torch.no_grad():
            for layer in model.model.layers:
                for lin, by in ((layer.self_attn.v_proj, 1e-3), (layer.self_attn.o_proj, 1e3)):
                    lin.weight *= by
            plain = model.generate(ids, **kw)
            err = lambda cache: (logits(run(cache)) - logits(plain)).abs().max().item()
            calibrated = err(InPlaceCache(config=model.config, cache_dtype=fp8))
            assert calibrated < 0.03 and err(InPlaceCache(config=model.config, cache_dtype=fp8, cache_scales=1.0)) > 0.3
    # several new tokens a row: prompt lookup's drafts verified in one forward
    reads.clear()
    rep = torch.randint(1, 128, (1, 12), device=device).repeat(1, 4)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        ours = model.generate(rep, prompt_lookup_num_tokens=4, **kw,
                              **{_cache_kw(model): InPlaceCache(config=model.config, cache_dtype=fp8)})
        assert max(s for s, d in reads if d == fp8) > 1
        ref = model.generate(rep, **kw, **{_cache_kw(model): _RoundedCache(model.config, fp8)})
    n = ref.sequences.shape[1]
    assert torch.equal(ours.sequences[:, :n], ref.sequences)
    other = _swapped("mla", device)
    with torch.no_grad(), pytest.raises(ValueError, match="float8 KV cache"):
        other.generate(ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0,
                       **{_cache_kw(other): InPlaceCache(config=other.config, cache_dtype=fp8)})
