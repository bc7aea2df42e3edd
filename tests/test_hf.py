"""transformers integration: attn_implementation="moba" / "longattn" on tiny random models."""
import copy
import math

import pytest
import torch

import longattn  # noqa: F401  (registers the attention implementations)
from helpers import (check_cache_reorder, check_packed_equals_separate, check_prompt_lookup_equals_greedy,
                     perturb_attention, replay_decode_step_without_sync, run_without_gpu_sync, tiny_config,
                     tiny_deepseek_v3_config, tiny_gpt_oss_pair, tiny_llama4_pair, tiny_mla_config,
                     tiny_multimodal_config, OTHER_ARCHS)
from longattn import rollout
from longattn.hf import attention as hf_attention
from longattn.hf.swap import MLA_ARCHS, MLA_ATTENTIONS, V5_ARCHS, _attention_modules, _language_model
from longattn.mla import PagedLatentCache
from longattn.mla.module import MLAAttention
from longattn.nsa import NSAConfig

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402


def _config(arch="llama", **extra):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def _pair(cfg, impl, device):
    """The same random weights under sdpa and under ``impl``, on ``device``."""
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == impl
    return ref.to(device), ours.to(device)


def _assert_same_logits_and_gradients(ours, ref, ids, mask):
    """Logits and the attention parameters' gradients (training through the swapped modules) equal the reference
    model's; the logits of the real tokens under a padding ``mask`` too."""
    runs = []
    for model in (ours, ref):
        logits = model(ids).logits
        logits.square().mean().backward()
        runs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()
                                       if "self_attn" in n and p.grad is not None}))
    (logits, grads), (ref_logits, ref_grads) = runs
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=name)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits[mask.bool()]
        b = ref(ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,impl", [("llama", "moba"), ("qwen2", "moba"), ("llama", "longattn"),
                                       ("qwen2", "longattn")])
def test_logits_match_sdpa(arch, impl, device):
    """MoBA with topk >= blocks is exact causal attention: logits and the attention parameters' gradients equal
    sdpa's, the logits with padding too."""
    ref, ours = _pair(_config(arch, moba_block_size=16, moba_topk=64), impl, device)
    ids = torch.randint(0, 128, (2, 70)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding
    _assert_same_logits_and_gradients(ours, ref, ids, mask)


def _greedy_recompute(model, ids, n):
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def test_moba_generate_with_cache_equals_recompute(device):
    """Sparse MoBA (topk 2 of up to 4 blocks): cached decoding gives the tokens of a full recompute."""
    _, ours = _pair(_config(moba_block_size=16, moba_topk=2), "moba", device)
    ids = torch.randint(0, 128, (1, 44)).to(device)  # the new tokens cross a block's end (48)
    with torch.no_grad():
        gen = ours.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(gen, _greedy_recompute(ours, ids, 6))


@pytest.mark.parametrize("arch", sorted(OTHER_ARCHS))
def test_moba_swap_on_other_models(arch, device, monkeypatch):
    """Other families' attention under MoBA: with top-k over every block (causal attention) the logits equal the
    original model's, in a batch with a left-padded row (its attention's norms and biases kept, its sliding-window,
    linear-attention, Mamba and convolution layers staying so); sparse (top 2 of 16-token blocks: logits of their
    own), cached decoding gives a full recompute's tokens."""
    cfg = tiny_config(arch)
    if cfg is None:
        pytest.skip(f"this transformers has no {arch} model")
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    perturb_attention(ref)
    ref = ref.to(device)
    if not type(ref)._can_set_attn_implementation() or \
            int(transformers.__version__.split(".")[0]) < 5 and arch in V5_ARCHS:
        # (transformers 4 builds their attention modules with the model, or their masks itself, or marks them as not
        # taking flash attention's conventions: refused, not run)
        with pytest.raises(ValueError, match="transformers >= 5|picks its attention modules when it is built|"
                                             "does not take flash-attention's conventions"):
            longattn.hf.swap_attention(copy.deepcopy(ref), "moba", block_size=16, topk=64)
        return
    ours = longattn.hf.swap_attention(copy.deepcopy(ref), "moba", block_size=16, topk=64)
    # (each attention sees the transformers cache, where decoding keeps the pooled keys: Nemotron-H's is a mixer)
    attns = _attention_modules(*_language_model(ours)[::2])  # (GPT-2's in transformer.h, ...)
    assert attns and all(getattr(a, "_longattn_records_cache", False) for a in attns)
    # (and every module MoBA's attention function runs in is among them: none pools every block at each step)
    records = []
    kept_means = hf_attention._kept_means
    monkeypatch.setattr(hf_attention, "_kept_means", lambda module, *args: records.append(
        getattr(module, "_longattn_records_cache", False)) or kept_means(module, *args))
    ids = torch.randint(1, 128, (2, 40)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # (row 0 unpadded)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits[mask.bool()]
        b = ref(ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    longattn.hf.swap_attention(ours, "moba", block_size=16, topk=2)
    if any(t != "sliding_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"]):
        with torch.no_grad():  # (MoBA's attention runs; not where every layer slides: Ministral under transformers 4)
            assert not torch.allclose(ours(ids[:1]).logits, ref(ids[:1]).logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # 4 new tokens after 40 (each query: its own block and one of the 2 before)
        gen = ours.generate(ids[:1], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        # (the model is causal: one forward over the generated sequence gives each step's recomputed logits)
        recompute = ours(gen[:, :-1], use_cache=False).logits[:, 39:].argmax(-1)
    assert torch.equal(gen[:, 40:], recompute)
    assert all(records)


@pytest.mark.parametrize("kind", ["moba", "nsa"])
def test_zamba2_shared_attention_blocks(kind, device, tmp_path):
    """Zamba2's attention block serves several layers, its modules' own layer_idx -1, the cache's layer the index the
    model calls it with: what decoding keeps per layer (MoBA's pooled keys, NSA's compressed blocks) lies under
    each of those indices and is that layer's, its cached keys' blocks pooled or compressed. NSA's layers add
    parameters of their own (the block's weights and each layer's adapters stay tied as the model ties them), and
    the model saved loads back with them."""
    cfg = tiny_config("zamba2")
    if cfg is None or int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("Zamba2 is swapped under transformers >= 5")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval().to(device)
    hybrid = [i for i, t in enumerate(cfg.layers_block_type) if t == "hybrid"]
    attns = [model.model.layers[i].shared_transformer for i in hybrid]
    assert attns[0].self_attn.q_proj.weight is attns[1].self_attn.q_proj.weight  # (one block, tied)
    opts = dict(block_size=16, topk=2) if kind == "moba" else dict(config=NSAConfig(
        cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=3, window=16))
    longattn.hf.swap_attention(model, kind, **opts)
    if kind == "nsa":
        a, b = (block.self_attn for block in attns)
        assert a.gate is not b.gate and a.q_proj.weight is b.q_proj.weight
        assert a.linear_q_adapter_list[0][0].weight is b.linear_q_adapter_list[0][0].weight
        with torch.no_grad():  # (each layer's own, off their initial values)
            for name, p in model.named_parameters():
                if any(s in name for s in ("gate", "_pos", "_compress")):
                    p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(1, 128, (1, 41)).to(device)
    with torch.no_grad():
        cache = model(ids[:, :40], use_cache=True).past_key_values
        model(ids[:, 40:], use_cache=True, **{rollout._cache_kw(model): cache})  # (a step: 41 tokens cached)
    store = getattr(cache, "_longattn_moba" if kind == "moba" else "_longattn_nsa")
    assert sorted(store) == hybrid
    for i, block in zip(hybrid, attns):
        k = cache.layers[i].keys.transpose(1, 2)  # (B, L, Hkv, D)
        if kind == "moba":  # (the blocks before the last token's own)
            want = k[:, :32].unflatten(1, (2, 16)).mean(2)
            got = store[i]["means"][:, :2]
        else:
            with torch.no_grad():
                want = block.self_attn.compress(k, block.self_attn.k_pos, block.self_attn.k_compress)
            got = store[i]["k"][:, :store[i]["n"][0]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if kind == "nsa":
        with pytest.raises(ValueError, match="must name the layer calling it"):
            a(torch.randn(1, 3, cfg.attention_hidden_size, device=device))
        with torch.no_grad():
            logits = model(ids).logits
        model.tie_weights()  # (transformers ties the blocks again, by the names it tied them by: NSA's stay apart)
        assert a.gate is not b.gate and not torch.equal(a.gate.weight, b.gate.weight)
        model.save_pretrained(tmp_path)
        loaded = longattn.hf.from_pretrained(tmp_path).eval().to(device)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, logits, atol=0, rtol=0)
            torch.testing.assert_close(loaded(ids).logits, logits, atol=1e-5, rtol=1e-5)


def test_swap_refuses_attention_picked_at_build(monkeypatch):
    """A model whose attention modules were picked when it was built (transformers 4's Nemotron and Jamba: setting
    an attention implementation afterwards reaches none of them, transformers only warning) is refused by the kinds
    that set one, instead of running its own attention under longattn's name."""
    model = AutoModelForCausalLM.from_config(_config())
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    for kind in ("flash", "moba"):
        with pytest.raises(ValueError, match="picks its attention modules when it is built"):
            longattn.hf.swap_attention(model, kind)
    assert model.config._attn_implementation != "longattn"


def _left_padded(n_a: int, n_b: int, device):
    """Two random prompts (token 0 is the pad token) and their left-padded batch with its mask."""
    a = torch.randint(1, 128, (1, n_a)).to(device)
    b = torch.randint(1, 128, (1, n_b)).to(device)
    batch = torch.cat([a, torch.cat([b.new_zeros(1, n_a - n_b), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :n_a - n_b] = 0
    return (a, b), batch, mask


@pytest.mark.parametrize("impl", ["moba", "longattn"])
def test_batched_left_padded_generate_equals_single(impl, device, monkeypatch):
    """Left-padded batched generation gives each prompt's own tokens; flash attention ("longattn") runs the
    padded batch in place, never unpadding (gathering) the cache, and MoBA's decoding steps too (its prefill
    unpads)."""
    _, ours = _pair(_config(moba_block_size=16, moba_topk=2), impl, device)
    unpad, decode = hf_attention._unpad, hf_attention.moba_decode
    steps = []

    def no_unpad_decoding(mask, q_len):
        if impl == "longattn" or q_len == 1:
            pytest.fail("left padding was unpadded")
        return unpad(mask, q_len)

    monkeypatch.setattr(hf_attention, "_unpad", no_unpad_decoding)
    monkeypatch.setattr(hf_attention, "moba_decode", lambda *a, **kw: steps.append(1) or decode(*a, **kw))
    (a, b), batch, mask = _left_padded(37, 20, device)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both = ours.generate(batch, attention_mask=mask, **kw)
        one_a = ours.generate(a, **kw)
        one_b = ours.generate(b, **kw)
    assert torch.equal(both[0, 37:], one_a[0, 37:])
    assert torch.equal(both[1, 37:], one_b[0, 20:])
    assert (len(steps) > 0) == (impl == "moba")


def test_moba_swap_keeps_pooled_keys(device, monkeypatch):
    """swap_attention(model, "moba") keeps each layer's pooled keys on the cache: after the prefill pools every
    block once, a decoding step pools only the block the previous token completed, and the scores equal those
    of attn_implementation="moba" alone (which pools every block at every step), across block boundaries, with
    left padding."""
    _, plain = _pair(_config(moba_block_size=16, moba_topk=2), "moba", device)
    kept = copy.deepcopy(plain)
    longattn.hf.swap_attention(kept, "moba", block_size=16, topk=2)
    calls = []
    pool = hf_attention.pool_cache_blocks
    monkeypatch.setattr(hf_attention, "pool_cache_blocks",
                        lambda *a, tail=None, **kw: calls.append(tail) or pool(*a, tail=tail, **kw))
    _, batch, mask = _left_padded(45, 20, device)  # 14 new tokens: each row crosses a block's end (48, 32)
    kw = dict(max_new_tokens=14, min_new_tokens=14, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        ref = plain.generate(batch, attention_mask=mask, **kw)
        assert not calls  # without the swap nothing is kept
        got = kept.generate(batch, attention_mask=mask, **kw)
    layers = len(kept.model.layers)
    assert calls == [None] * layers + [1] * layers * 13  # prefill pools all; each step adds one block
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    assert all(m._longattn_cache is None for m in (layer.self_attn for layer in kept.model.layers))


def test_moba_speculative_decoding_equals_greedy(device, monkeypatch):
    """Draft tokens are verified in place (moba_decode, one query row per token) and the rejected ones cut the
    cache back: the kept pooled keys are not reused past the cut, and only the prefill pools every block."""
    _, plain = _pair(_config(moba_block_size=16, moba_topk=2), "moba", device)
    model = longattn.hf.swap_attention(plain, "moba", block_size=16, topk=2)
    tails, rows = [], []
    pool, decode = hf_attention.pool_cache_blocks, hf_attention.moba_decode
    monkeypatch.setattr(hf_attention, "pool_cache_blocks",
                        lambda *a, tail=None, **kw: tails.append(tail) or pool(*a, tail=tail, **kw))
    monkeypatch.setattr(hf_attention, "moba_decode", lambda q, *a, **kw: rows.append(q.shape[0]) or decode(q, *a, **kw))
    check_prompt_lookup_equals_greedy(model, device)
    assert tails.count(None) == 2 * len(model.model.layers)  # the two prefills (greedy, then speculative)
    assert max(rows) > 1  # several tokens of the one sequence verified in one call


def test_moba_kept_pooled_keys_follow_beam_search(device):
    """Beam search reorders the cache's rows in place: the kept pooled keys follow them."""
    _, plain = _pair(_config(moba_block_size=16, moba_topk=2), "moba", device)
    kept = longattn.hf.swap_attention(plain, "moba", block_size=16, topk=2)
    ids = torch.randint(1, 128, (3, 52)).to(device)  # three different rows, three complete blocks each
    check_cache_reorder(kept, ids, torch.tensor([2, 0, 0], device=device))


def test_static_cache_refused_under_transformers_4(monkeypatch):
    """Under transformers 4 (the last releases for torch 2.5) the NSA and MLA modules refuse a static cache, whose
    written slots they cannot tell there; dynamic caches pass, and any cache under transformers 5."""
    from transformers import DynamicCache

    static = type("StaticLike", (), {"is_compileable": True})()
    monkeypatch.setattr(hf_attention, "_STATIC_CACHE_NEEDS_V5", True)
    with pytest.raises(ValueError, match=r"past_key_values: swap_attention\(model, 'nsa'\) with a static cache"):
        hf_attention.check_cache_supported(static, "nsa")
    hf_attention.check_cache_supported(DynamicCache(), "mla")
    monkeypatch.setattr(hf_attention, "_STATIC_CACHE_NEEDS_V5", False)
    hf_attention.check_cache_supported(static, "nsa")


def test_padding_read_once_per_mask(device):
    """Every layer gets the same mask object: its padding is read (a host synchronisation) once, and read again
    when the mask changes in place or other columns are asked for."""
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    mask[1, :5] = 0
    m, pad, real = hf_attention.mask_padding(mask, 12)
    assert m is mask and pad.tolist() == [0, 5] and real == [12, 7]
    again = hf_attention.mask_padding(mask, 12)
    assert again[0] is mask and again[1] is pad  # reused, not recomputed
    assert hf_attention.mask_padding(mask, 4) == (None, None, [4, 4])  # the last 4 columns: all real
    mask[1, 7] = 0  # a hole: no longer left padding
    assert hf_attention.mask_padding(mask, 12) == (mask, None, None)
    mask.fill_(1)
    assert hf_attention.mask_padding(mask, 12) == (None, None, [12, 12])


def test_alternating_masks_read_once(device, monkeypatch):
    """A model mixing sliding-window and full-attention layers hands its layers two masks in turn: each is read once
    per forward, not at every layer."""
    reads = []
    read = hf_attention._padding_of
    monkeypatch.setattr(hf_attention, "_padding_of", lambda *a: reads.append(a[1]) or read(*a))
    full = torch.ones(2, 12, dtype=torch.bool, device=device)
    full[1, :5] = 0
    window = full[:, -8:]
    for _ in range(3):
        assert hf_attention.mask_padding(full, 12)[2] == [12, 7]
        assert hf_attention.mask_padding(window, 8)[2] == [8, 7]
    assert reads == [12, 8]


def test_packed_segments(device):
    """The sequences of a packed row, from position_ids or cu_seq_lens_q, read once per tensor; ordinary rows and
    calls with a cache prefix are not packed; boundaries that do not tile the row are refused."""
    seg = hf_attention.packed_segments
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]], device=device)
    cu, lens = seg(dict(position_ids=pos), 1, 9, 9)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 9] and lens == [3, 2, 4]
    assert seg(dict(position_ids=pos), 1, 9, 9)[0] is cu  # reused, not read again
    pos[0, 5] = 7  # changed in place: read again
    assert seg(dict(position_ids=pos), 1, 9, 9)[1] == [3, 6]
    assert seg(dict(position_ids=torch.arange(9, device=device)[None]), 1, 9, 9) == (None, None)
    assert seg(dict(position_ids=pos), 1, 1, 10) == (None, None)  # a decoding step
    assert seg(dict(position_ids=pos.expand(2, 9)), 2, 9, 9) == (None, None)
    flat = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    assert seg(dict(cu_seq_lens_q=flat, position_ids=pos), 1, 9, 9)[1] == [4, 5]  # the keyword wins
    with pytest.raises(ValueError, match="start every sequence at 0"):
        seg(dict(position_ids=torch.tensor([[3, 4, 0, 1]], device=device)), 1, 4, 4)
    for bad in ([0, 4, 8], [1, 9], [0, 5, 5, 9]):
        with pytest.raises(ValueError, match="cu_seq_lens_q must rise strictly from 0 to the 9"):
            seg(dict(cu_seq_lens_q=torch.tensor(bad, device=device)), 1, 9, 9)


@pytest.mark.gpu
@pytest.mark.parametrize("impl,tokens", [("moba", 1), ("longattn", 1), ("moba", 3)])
def test_decoding_step_does_not_wait_for_the_gpu(impl, tokens):
    """A decoding step of the attention functions (one new token, or several: speculative verification), once the
    forward's padding mask has been read (by its first layer), launches its kernels without a host
    synchronisation (left padding in place, MoBA's kept means)."""
    from types import SimpleNamespace

    B, H, Hkv, D, L = 2, 8, 2, 64, 700
    module = SimpleNamespace(config=SimpleNamespace(moba_block_size=64, moba_topk=3), layer_idx=0,
                             _longattn_cache=SimpleNamespace())
    fn = hf_attention.moba_attention_forward if impl == "moba" else hf_attention.flash_attention_forward
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
    q, k, v = mk(B, H, tokens, D), mk(B, Hkv, L, D), mk(B, Hkv, L, D)
    mask = torch.ones(B, L, dtype=torch.long, device="cuda")
    mask[1, :100] = 0
    with torch.no_grad():
        fn(module, q, k[:, :, :-tokens], v[:, :, :-tokens], mask[:, :-tokens], scaling=D ** -0.5)  # the previous step
        first, _ = fn(module, q, k, v, mask, scaling=D ** -0.5)  # the first layer reads the mask
        other, _ = run_without_gpu_sync(lambda: fn(module, q, k, v, mask, scaling=D ** -0.5))
    torch.testing.assert_close(other, first)


def test_right_padding_matches_sdpa(device):
    """Right padding (not left) takes the unpadding path: the real tokens' logits equal sdpa's."""
    ref, ours = _pair(_config(), "longattn", device)
    ids = torch.randint(0, 128, (2, 50)).to(device)
    mask = torch.ones_like(ids)
    mask[0, 41:] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits[mask.bool()]
        b = ref(ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_packed_sequences_equal_separate(device):
    """One row of packed sequences (position_ids restart at 0, or cu_seq_lens_q) runs each sequence on its own."""
    _, ours = _pair(_config(moba_block_size=16, moba_topk=2), "moba", device)
    check_packed_equals_separate(ours, [30, 45], decode_error=False)  # rollout splits a packed cache first


def test_mask_with_holes_is_rejected(device):
    _, ours = _pair(_config(moba_block_size=16, moba_topk=2), "moba", device)
    ids = torch.randint(0, 128, (1, 20)).to(device)
    mask = torch.ones_like(ids)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="contiguous run of real tokens"):
        with torch.no_grad():
            ours(ids, attention_mask=mask)


def _deepseek(device, arch="deepseek_v3", kind="mla", **options):
    """A tiny model of MLA model type ``arch`` (eager attention) and its copy with ``kind`` swapped in."""
    cfg = tiny_deepseek_v3_config() if arch == "deepseek_v3" else tiny_mla_config(arch)
    if cfg is None:
        pytest.skip(f"this transformers has no {arch} model")
    torch.manual_seed(0)
    # (Mistral 4's causal LM is not among AutoModelForCausalLM's: its own class)
    build = transformers.Mistral4ForCausalLM._from_config if arch == "mistral4" else AutoModelForCausalLM.from_config
    ref = build(copy.deepcopy(cfg), attn_implementation="eager").eval().to(device)
    ours = copy.deepcopy(ref)
    longattn.hf.swap_attention(ours, kind, **(options or dict(page_size=16)))
    return ref.to(device), ours.to(device)


def _swapped(kind, device):
    """A tiny model with longattn's ``kind`` swapped in (MoBA 16 / top 2, NSA at small block sizes)."""
    if kind == "mla":
        return _deepseek(device)[1]
    opts = dict(flash={}, moba=dict(block_size=16, topk=2),
                nsa=dict(config=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=3, window=16)))[kind]
    return longattn.hf.swap_attention(_pair(_config(), "sdpa", device)[1], kind, **opts)


@pytest.mark.parametrize("arch", MLA_ARCHS)  # (each model type the swap takes)
def test_mla_swap_logits_and_gradients_match(arch, device):
    ref, ours = _deepseek(device, arch)
    names = [type(m).__name__ for m in ours.modules()]
    # every attention of the model's MLA class replaced (LongCat-Flash: two a layer; Kimi Linear: not its linear ones)
    assert names.count("MLAAttention") == [type(m).__name__ for m in ref.modules()].count(MLA_ATTENTIONS[arch]) > 0
    assert MLA_ATTENTIONS[arch] not in names
    ids = torch.randint(0, 128, (2, 40)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    _assert_same_logits_and_gradients(ours, ref, ids, mask)


@pytest.mark.parametrize("arch", MLA_ARCHS)  # (each model type the swap takes)
def test_mla_generate_uses_absorbed_decode_and_matches(arch, monkeypatch, device):
    import longattn.mla.module as mla_module

    ref, ours = _deepseek(device, arch)
    calls = []
    real = mla_module.mla_decode
    monkeypatch.setattr(mla_module, "mla_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(1, 128, (2, 40)).to(device)  # 0 is the pad token
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        g_ours = ours.generate(ids, attention_mask=mask, **kw)
        g_ref = ref.generate(ids, attention_mask=mask, **kw)
    # 5 decode steps after the prompt, one call a step in every MLA layer
    assert len(calls) == 5 * sum(isinstance(m, MLAAttention) for m in ours.modules())
    assert torch.equal(g_ours.sequences, g_ref.sequences)
    for a, b in zip(g_ours.logits, g_ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["deepseek_v3", "longcat_flash", "kimi_linear"])
def test_moba_swap_on_mla_models(arch, device, monkeypatch):
    """MoBA on MLA models, over the keys and values their attention decompresses (q/k and v head dims apart): with
    top-k over every block the logits and the attention parameters' gradients equal the eager model's; sparse (top
    2 of 16-token blocks), cached decoding gives a full recompute's tokens, every attention (LongCat-Flash: two a
    decoder layer) pooling only the block the previous token completed."""
    ref, ours = _deepseek(device, arch, "moba", block_size=16, topk=64)
    ids = torch.randint(1, 128, (2, 40)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    _assert_same_logits_and_gradients(ours, ref, ids, mask)
    longattn.hf.swap_attention(ours, "moba", block_size=16, topk=2)
    calls = []
    pool = hf_attention.pool_cache_blocks
    monkeypatch.setattr(hf_attention, "pool_cache_blocks",
                        lambda *a, tail=None, **kw: calls.append(tail) or pool(*a, tail=tail, **kw))
    prompt = torch.randint(1, 128, (1, 45)).to(device)
    with torch.no_grad():  # 6 new tokens after 45 (the fourth crosses a block's end)
        gen = ours.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    n = [type(m).__name__ for m in ref.modules()].count(MLA_ATTENTIONS[arch])
    assert calls == [None] * n + [1] * n * 5  # the prefill pools every block, a step one
    with torch.no_grad():
        recompute = ours(gen[:, :-1], use_cache=False).logits[:, 44:].argmax(-1)
    assert torch.equal(gen[:, 45:], recompute)


@pytest.mark.parametrize("arch,kind", [("qwen2_5_vl", "flash"), ("qwen2_5_vl", "moba"), ("qwen2_5_vl", "nsa"),
                                       ("qwen3_vl", "nsa"), ("qwen3_vl", "moba"), ("qwen3_5", "nsa"),
                                       ("qwen3_5", "moba"), ("kimi_k25", "mla")])
def test_swap_on_multimodal_model(arch, kind, device, tmp_path):
    """A multimodal model: its language model's attention swapped, its vision encoder's kept (bidirectional: the
    attention functions refuse it). Qwen2.5-VL, Qwen3-VL and Qwen3.5 (a hybrid: its linear-attention layer kept) with
    an image in the prompt (multimodal RoPE), Kimi K2.5 (MLA) on text: the logits and greedy generation equal the
    eager model's (MoBA over every block, NSA's window branch alone over a window longer than the sequence: exact);
    saved, it loads back swapped (longattn.hf.from_pretrained), NSA's weights too. NSA takes multimodal RoPE under
    transformers 5 only (ValueError before)."""
    cfg = tiny_multimodal_config(arch)
    if cfg is None:
        pytest.skip(f"this transformers has no {arch} model")
    torch.manual_seed(0)
    ref = transformers.AutoModelForImageTextToText.from_config(cfg, attn_implementation="eager").eval().to(device)
    opts = dict(flash={}, moba=dict(block_size=16, topk=64), mla=dict(page_size=16),
                nsa=dict(config=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=3, window=64)))[kind]
    if kind == "nsa" and int(transformers.__version__.split(".")[0]) < 5:
        with pytest.raises(ValueError, match="under transformers >= 5"):
            longattn.hf.swap_attention(copy.deepcopy(ref), kind, **opts)
        return
    ours = longattn.hf.swap_attention(copy.deepcopy(ref), kind, **opts)
    assert ours.config.vision_config._attn_implementation == "eager"
    assert ours.config.text_config._attn_implementation == ("moba" if kind == "moba" else "longattn")
    # (its language model's attention takes a packed row apart: rollouts train it on packed sequences, not Qwen3.5's,
    # whose linear-attention layer would carry its state across; nor the eager original)
    assert rollout._trains_packed(ours) == (arch != "qwen3_5") and not rollout._trains_packed(ref)
    if kind == "nsa":  # gates: the window branch alone
        nsa_layers = [m for m in ours.modules() if type(m).__name__ == "NativeSparseAttention"]
        assert len(nsa_layers) == (1 if arch == "qwen3_5" else 2)  # (Qwen3.5's linear-attention layer kept)
        with torch.no_grad():
            for m in nsa_layers:
                m.gate.bias.copy_(torch.tensor([-40.0] * 8 + [40.0] * 4))
    ids = torch.randint(1, 128, (1, 40)).to(device)
    inputs = dict(input_ids=ids)
    if arch.startswith("qwen"):  # an image of 4 x 4 patches (4 tokens after merging) after the first two tokens
        ids[0, 2:8] = torch.tensor([152, 150, 150, 150, 150, 153])
        inputs.update(pixel_values=torch.randn(16, 3 * 2 * 14 * 14).to(device),
                      image_grid_thw=torch.tensor([[1, 4, 4]]).to(device))
        if arch != "qwen2_5_vl" and int(transformers.__version__.split(".")[0]) >= 5:
            inputs.update(mm_token_type_ids=(ids == 150).int())  # (which tokens are an image's, as processors say)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, ref(**inputs).logits, atol=1e-4, rtol=1e-4)
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(**inputs, **kw), ref.generate(**inputs, **kw))
    ours.save_pretrained(tmp_path)
    loaded = longattn.hf.from_pretrained(tmp_path).eval().to(device)
    assert type(loaded) is type(ours) and loaded.config.text_config._attn_implementation == \
        ours.config.text_config._attn_implementation
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["flash", "moba"])
def test_gemma3_image_refused_text_exact(kind, device):
    """Gemma 3 lets an image's tokens attend to each other both ways, which longattn's causal attention cannot: a
    prompt with an image is refused (ValueError; compiled with fullgraph=True, TorchDynamo's error carrying it), not
    answered with causal attention over it; a text prompt gives the eager model's logits (MoBA over every block:
    exact)."""
    ref = transformers.AutoModelForImageTextToText.from_config(tiny_multimodal_config("gemma3"),
                                                               attn_implementation="eager").eval().to(device)
    opts = dict(block_size=16, topk=64) if kind == "moba" else {}
    ours = longattn.hf.swap_attention(copy.deepcopy(ref), kind, **opts)
    ids = torch.randint(1, 128, (1, 40)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        ids[0, 2:8] = torch.tensor([152, 150, 150, 150, 150, 153])
        image = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28).to(device),
                     token_type_ids=(ids == 150).long())
        with pytest.raises(ValueError, match="see later keys|require torch>=2.6") as eager:
            ours(**image)
        if "see later keys" in str(eager.value):  # (transformers 4.57 refuses such masks itself under torch 2.5)
            with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="see later keys"):
                torch.compile(ours, backend="aot_eager", fullgraph=True)(**image)


def _mla_decoding_errors(ours, ref, device) -> tuple:
    """``ours``' greedy generation of 4 tokens after 2 prompts of 30, with a transformers cache: the cache, and the
    relative error of the logits of the prompt's last token, then of each decoding step, against ``ref``'s forward
    on the whole sequence (float32 logits)."""
    from transformers import DynamicCache

    from longattn.rollout import _cache_kw

    ids = torch.randint(1, 128, (2, 30)).to(device)
    cache = DynamicCache(config=ours.config)
    with torch.no_grad():
        got = ours.generate(ids, **{_cache_kw(ours): cache}, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        full = ref(got.sequences).logits[:, ids.shape[1] - 1:-1]
    assert all(x.dtype == torch.float32 for x in got.logits)
    return cache, [((x - full[:, i]).norm() / full[:, i].norm()).item() for i, x in enumerate(got.logits)]


@pytest.mark.parametrize("scale", [0.25, "auto"])
def test_mla_float8_latent_cache(scale, device, tmp_path):
    """swap_attention(model, "mla", cache_dtype=float8): the latent cache holds float8 (half the bytes) and decoding
    reads it dequantised: the decoding steps' logits stay near the full-precision model's (the latent rounded to 3
    bits of mantissa), the prompt's equal them; a given scale, or (the default) each layer's calibrated on the prompt
    (a power of two); the options are saved with the model and load back."""
    ref, ours = _deepseek(device)
    longattn.hf.swap_attention(ours, "mla", cache_dtype=torch.float8_e4m3fn,
                               **({"cache_scale": scale} if scale != "auto" else {}))
    assert (ours.config.longattn["cache_dtype"], ours.config.longattn["cache_scale"]) == ("float8_e4m3fn", scale)
    cache, errors = _mla_decoding_errors(ours, ref, device)
    assert all(s["pc"].kv.dtype == torch.float8_e4m3fn for s in cache._longattn_mla.values())
    scales = [s["pc"].scale for s in cache._longattn_mla.values()]
    assert scales == [scale] * len(scales) if scale != "auto" else all(
        math.log2(s).is_integer() and s < 1 for s in scales)
    assert errors[0] < 1e-5 and all(0 < e < 0.05 for e in errors[1:]), errors  # (the prompt: no cache read)
    ours.save_pretrained(tmp_path)
    loaded = longattn.hf.from_pretrained(tmp_path)
    attn = loaded.model.layers[0].self_attn
    assert (attn.cache_dtype, attn.cache_scale) == (torch.float8_e4m3fn, scale)
    with pytest.raises(TypeError, match="cache_dtype must be None, float16"):
        longattn.hf.swap_attention(ours, "mla", cache_dtype=torch.int8)


def test_mla_latent_cache_of_another_dtype(device, tmp_path):
    """A 16-bit latent cache under a float32 model (cache_dtype=float16: half the cache's bytes): decoding takes its
    queries in float16, its steps' logits near the model's; a scale without a float8 cache, and a page size the cache
    would refuse, are refused before any layer changes; a cache_dtype given alone resets the scale to "auto"; the
    config records every option as the layers have it (a swap again with some keeps the others), and the model
    loads back so."""
    ref, ours = _deepseek(device)
    layers = [layer.self_attn for layer in ours.model.layers]
    for bad, err in ((dict(cache_scale=2.0), "cache_scale applies to a float8 latent cache"),
                     (dict(cache_dtype=torch.float16, cache_scale=0.5), "cache_scale applies to a float8"),
                     (dict(page_size=48), "page_size must be a power of two from 16 to 256, got 48"),
                     (dict(page_size=0), "page_size must be a power of two")):
        with pytest.raises(ValueError, match=err):
            longattn.hf.swap_attention(ours, "mla", **bad)
        fresh = copy.deepcopy(ref)
        with pytest.raises(ValueError, match=err):  # (refused before its first layer is replaced)
            longattn.hf.swap_attention(fresh, "mla", **bad)
        assert not any(isinstance(m, MLAAttention) for m in fresh.modules())
    assert all(a.page_size == 16 and a.cache_dtype is None and a.cache_scale == "auto" for a in layers)
    longattn.hf.swap_attention(ours, "mla", cache_dtype="float8_e5m2")
    longattn.hf.swap_attention(ours, "mla", cache_scale=0.5)
    longattn.hf.swap_attention(ours, "mla", page_size=32)
    assert ours.config.longattn == dict(kind="mla", page_size=32, cache_dtype="float8_e5m2", cache_scale=0.5)
    ours.save_pretrained(tmp_path)
    loaded = longattn.hf.from_pretrained(tmp_path).model.layers[0].self_attn
    assert (loaded.page_size, loaded.cache_dtype, loaded.cache_scale) == (32, torch.float8_e5m2, 0.5)
    with pytest.raises(ValueError, match="scale applies to a float8 cache"):
        PagedLatentCache(4, dtype=torch.float16, scale=2.0, device=device)
    longattn.hf.swap_attention(ours, "mla", cache_dtype=torch.float8_e4m3fn, cache_scale=0.5)
    longattn.hf.swap_attention(ours, "mla", cache_dtype=torch.float16, page_size=16)
    assert all(a.cache_dtype == torch.float16 and a.cache_scale == "auto" for a in layers)
    assert ours.config.longattn == dict(kind="mla", page_size=16, cache_dtype="float16", cache_scale="auto")
    cache, errors = _mla_decoding_errors(ours, ref, device)
    assert all(s["pc"].kv.dtype == torch.float16 for s in cache._longattn_mla.values())
    assert errors[0] < 1e-5 and all(0 < e < 2e-3 for e in errors[1:]), errors


def _assert_same_generation(ours, ref, ids, **kw):
    """The same logits on ``ids``, then the same greedy tokens and per-step logits over 4 generated tokens."""
    kw = dict(kw, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        g_ours, g_ref = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(g_ours.sequences, g_ref.sequences)
    for a, b in zip(g_ours.logits, g_ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


class _LowRankAdapter(torch.nn.Module):
    """A LoRA-style wrapper of a linear layer: base(x) + B(A(x)), its ``weight`` the base's alone; ``enabled`` False
    (peft's disable_adapter, as for a reference model's log-probs): base(x)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base
        self.enabled = True
        self.a = torch.nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.b = torch.nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        torch.nn.init.normal_(self.b.weight, std=0.5)

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return self.base(x) + self.b(self.a(x)) if self.enabled else self.base(x)


def test_mla_with_adapter_on_kv_b_proj(device):
    """A wrapped kv_b_proj (LoRA adapters, quantised layers) is used through its effective map, in prefill and in
    the absorbed decoding: logits and generated tokens equal the eager model's with the same wrapper, also after the
    adapters change in place, are switched off (no tensor changes) or are overwritten through .data (no version
    bump) between generations."""
    ref, ours = _deepseek(device)
    for a, b in zip(ref.model.layers, ours.model.layers):
        a.self_attn.kv_b_proj = _LowRankAdapter(a.self_attn.kv_b_proj)
        b.self_attn.kv_b_proj = copy.deepcopy(a.self_attn.kv_b_proj)
    ids = torch.randint(1, 128, (2, 30)).to(device)
    _assert_same_generation(ours, ref, ids)
    with torch.no_grad():  # the adapters change in place (a training step): decoding follows
        for a, b in zip(ref.model.layers, ours.model.layers):
            a.self_attn.kv_b_proj.b.weight.mul_(-1.0)
            b.self_attn.kv_b_proj.b.weight.mul_(-1.0)
    _assert_same_generation(ours, ref, ids)
    for a, b in zip(ref.model.layers, ours.model.layers):
        a.self_attn.kv_b_proj.enabled = b.self_attn.kv_b_proj.enabled = False
    _assert_same_generation(ours, ref, ids)
    for a, b in zip(ref.model.layers, ours.model.layers):
        a.self_attn.kv_b_proj.enabled = b.self_attn.kv_b_proj.enabled = True
        a.self_attn.kv_b_proj.b.weight.data.mul_(2.0)
        b.self_attn.kv_b_proj.b.weight.data.mul_(2.0)
    _assert_same_generation(ours, ref, ids)


def test_mla_decoding_without_position_ids(device):
    """The transformers cache counts the tokens (models derive the new tokens' positions from it when no
    position_ids are given): steps decoded that way equal the full forward."""
    from transformers import DynamicCache

    from longattn.rollout import _cache_kw

    _, ours = _deepseek(device)
    ids = torch.randint(1, 128, (2, 24)).to(device)
    cache = DynamicCache(config=ours.config)
    kw = {_cache_kw(ours): cache, "use_cache": True}
    with torch.no_grad():
        full = ours(ids).logits
        ours(ids[:, :20], **kw)
        steps = torch.cat([ours(ids[:, i:i + 1], **kw).logits for i in range(20, 24)], 1)
    assert cache.get_seq_length() == 24
    torch.testing.assert_close(steps, full[:, 20:], atol=1e-4, rtol=1e-4)


def test_mla_speculative_decoding_equals_greedy(device):
    check_prompt_lookup_equals_greedy(_deepseek(device)[1], device)


def test_mla_latent_cache_follows_beam_search(device):
    _, ours = _deepseek(device)
    ids = torch.randint(1, 128, (3, 40)).to(device)
    check_cache_reorder(ours, ids, torch.tensor([1, 1, 0], device=device))


def test_mla_packed_sequences_equal_separate(device):
    _, ours = _deepseek(device)
    check_packed_equals_separate(ours, [23, 40])


@pytest.mark.gpu
def test_mla_decoding_step_does_not_wait_for_the_gpu():
    from transformers import DynamicCache

    _, ours = _deepseek("cuda")
    ids = torch.randint(1, 128, (2, 70), device="cuda")
    replay_decode_step_without_sync(ours, ids, DynamicCache(config=ours.config))


@pytest.mark.parametrize("kind", ["flash", "moba", "nsa", "mla"])
def test_generate_with_chunked_prefill(kind, device):
    """transformers' chunked prefill (``prefill_chunk_size`` 10) on a left-padded batch gives the tokens of a whole
    one: chunks after a cached prefix that are all padding in a row, or padding up to its real tokens, all short
    (MLA's and NSA's decoding path takes them when no row has padding)."""
    model = _swapped(kind, device).eval()
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (3, 45)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    mask[2, :33] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        whole = model.generate(ids, **kw)
        torch.testing.assert_close(model.generate(ids, prefill_chunk_size=10, **kw), whole)


@pytest.mark.parametrize("kind", ["flash", "moba", "nsa", "mla"])
def test_static_cache_generate_equals_dynamic(kind, device):
    """A static cache hands the attention its whole preallocated buffer, unwritten slots included: generating
    with it gives the dynamic cache's logits, with and without left padding. transformers compiles the decoding
    steps of a static cache (on a GPU by default; here on every device, its graphs run without inductor)."""
    from transformers.generation.configuration_utils import CompileConfig

    compile_config = CompileConfig(backend="aot_eager")
    compile_config._compile_all_devices = True
    _check_static_equals_dynamic(_swapped(kind, device), kind, device, compile_config=compile_config)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["moba", "nsa", "mla"])
def test_static_cache_generate_compiled_as_by_default(kind):
    """What a GPU user gets by default with a static cache: transformers compiles the decoding steps with inductor
    and CUDA graphs (mode "reduce-overhead") around longattn's ops and the modules' side state."""
    _check_static_equals_dynamic(_swapped(kind, "cuda"), kind, "cuda")


def _check_static_equals_dynamic(model, kind, device, **static_kw):
    torch._dynamo.reset()
    ids = torch.randint(1, 128, (2, 37)).to(device)
    if kind in ("nsa", "mla") and hf_attention._STATIC_CACHE_NEEDS_V5:  # refused, not run on unwritten slots
        with pytest.raises(ValueError, match="static cache .* needs transformers >= 5"), torch.no_grad():
            model.generate(ids, cache_implementation="static", max_new_tokens=2, pad_token_id=0, **static_kw)
        return
    mask = torch.ones_like(ids)
    for pad in (0, 5):
        mask[1, :pad] = 0
        kw = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            static = model.generate(ids, cache_implementation="static", **static_kw, **kw)
            dynamic = model.generate(ids, **kw)
        for a, b in zip(static.logits, dynamic.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"left padding {pad}")
    assert hasattr(model, "_compiled_call")  # the steps ran compiled


@pytest.mark.parametrize("kind,fullgraph", [("flash", True), ("moba", True), ("nsa", True), ("mla", True),
                                            ("flash", False), ("nsa", False), ("mla", False)],
                         ids=lambda v: {True: "fullgraph", False: "with-cache"}.get(v, v))
def test_compiled_model_equals_eager(kind, fullgraph, device):
    """torch.compile(model) trains as eager mode does: logits and every parameter's gradient equal. Without a
    cache the whole forward is one graph (fullgraph=True: the ops are custom ops or traced); with transformers'
    cache (use_cache, the default even in training) the modules' state beside it is host bookkeeping, opaque to
    TorchDynamo (graph breaks). Dynamo traced into the ops before."""
    import transformers

    if kind == "mla" and fullgraph and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4's DeepSeek-V3 routes its experts with data-dependent shapes: not one graph")
    torch._dynamo.reset()
    model = _swapped(kind, device).train()
    if kind == "mla" and fullgraph:
        # the experts by one batched matmul: transformers' grouped-matmul fallback (float32 under TorchDynamo)
        # has, in 5.17 at least, a backward that reads its group offsets on the host: not one graph
        model.set_experts_implementation("batched_mm")
    ids = torch.randint(0, 128, (2, 50)).to(device)
    grads = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=fullgraph)):
        model.zero_grad()
        logits = run(ids, use_cache=not fullgraph).logits
        logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        grads[-1]["logits"] = logits
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["flash", "nsa", "mla"])  # (MoBA's attention function runs as flash's does)
def test_autocast_training_follows_float32(kind, device):
    """Mixed-precision training (float32 weights under torch.autocast, bfloat16): the attention gets float32
    q/k (rotated by float32 RoPE tables) and bfloat16 v, which the ops refused before; they now cast them as
    SDPA does. Loss and gradients stay near the float32 model's."""
    model = _swapped(kind, device).train()
    ids = torch.randint(0, 128, (2, 40)).to(device)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype != torch.float32):
            loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss32, g32), (loss16, g16) = results
    torch.testing.assert_close(loss16, loss32, atol=0, rtol=2e-2)
    assert g16.keys() == g32.keys()
    for n in [n for n in g32 if "self_attn" in n]:  # (MoE routing may flip under bf16: experts differ)
        assert (g16[n] - g32[n]).norm() <= 0.1 * g32[n].norm() + 1e-6, n


def test_flash_swap_on_any_decoder_model(device, monkeypatch):
    """kind "flash" takes any decoder model that uses transformers' attention interface, whatever its layout (GPT-2:
    model.transformer.h, no model.model.layers): each layer runs longattn's flash, the logits equal eager's. A model
    that transformers marks as not taking flash-attention's conventions is refused (BLOOM: its attention never calls
    the attention functions, a swap would change nothing)."""
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval().to(device)
    ours = longattn.hf.swap_attention(copy.deepcopy(ref), "flash")
    calls = []
    flash = hf_attention.flash_attention
    monkeypatch.setattr(hf_attention, "flash_attention", lambda *a, **k: calls.append(1) or flash(*a, **k))
    ids = torch.randint(0, 128, (2, 30)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    assert len(calls) == 2
    bloom = AutoModelForCausalLM.from_config(transformers.BloomConfig(n_layer=2, hidden_size=64, n_head=4,
                                                                      vocab_size=128))
    with pytest.raises(ValueError, match="BloomForCausalLM does not take flash-attention's conventions"):
        longattn.hf.swap_attention(bloom, "flash")


@pytest.mark.parametrize("arch", ["gemma2", "gemma4_text", "gemma3n_text"])
def test_flash_swap_on_gemma_models(arch, device):
    """Gemma 2: the attention logits soft-capped in every layer (scores made large enough that the cap changes the
    logits); Gemma 4 as its E2B / E4B models: KV-shared layers, which transformers would run at the kept logits'
    positions only by slicing 4-D masks (longattn's are 2-D: the swap keeps their inputs whole); Gemma 3n: its last
    layers reuse earlier layers' keys and values too (and AltUp, Laurel, per-layer inputs). All with sliding-window
    layers beside full ones: the swapped model's logits on a left-padded batch and its padded greedy generation equal
    eager's."""
    if arch == "gemma2":
        cfg = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                        attn_logit_softcapping=1.0, max_position_embeddings=1024, pad_token_id=0)
    else:
        cfg = tiny_config(arch)
        if cfg is None:
            pytest.skip(f"this transformers has no {arch} model")
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    if arch == "gemma2":
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "q_proj" in name or "k_proj" in name:
                    p.mul_(8)
        uncapped = copy.deepcopy(ref)
        for layer in uncapped.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    ref = ref.to(device)
    ours = longattn.hf.swap_attention(copy.deepcopy(ref), "flash")
    ids = torch.randint(1, 128, (2, 20)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()], want[mask.bool()], atol=1e-4,
                                   rtol=1e-4)
        if arch == "gemma2":
            assert (uncapped.to(device)(ids, attention_mask=mask).logits - want).abs().max() > 0.03
        torch.testing.assert_close(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_swap_attention_errors():
    _, llama = _pair(_config(), "sdpa", "cpu")
    with pytest.raises(ValueError, match="kind must be one of"):
        longattn.hf.swap_attention(llama, "dense")
    with pytest.raises(ValueError, match="kind 'mla' supports model types"):
        longattn.hf.swap_attention(llama, "mla")
    with pytest.raises(ValueError, match="unknown option"):
        longattn.hf.swap_attention(llama, "moba", blocksize=64)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        longattn.hf.swap_attention(llama, "moba", block_size=100)
    # (as the op checks them, before the config keeps them: the first forward failed)
    for opts, err, match in ((dict(block_size=2 ** 20), ValueError, "from 16 to 65536"),
                             (dict(topk=True), TypeError, "topk must be an int"),
                             (dict(topk=10 ** 12), ValueError, "topk must lie in")):
        with pytest.raises(err, match=match):
            longattn.hf.swap_attention(llama, "moba", **opts)
    assert getattr(llama.config, "moba_topk", None) is None
    for model in (None, torch.nn.Linear(2, 2)):
        with pytest.raises(ValueError, match="model must be a transformers PreTrainedModel"):
            longattn.hf.swap_attention(model, "flash")
    longattn.hf.swap_attention(llama, "moba", block_size=64, topk=2)
    assert llama.config._attn_implementation == "moba" and llama.config.moba_topk == 2
    with pytest.raises(ValueError, match="already longattn's NativeSparseAttention"):
        longattn.hf.swap_attention(longattn.hf.swap_attention(llama, "nsa"), "moba")
    v2 = AutoModelForCausalLM.from_config(tiny_mla_config("deepseek_v2"), attn_implementation="eager")
    with pytest.raises(ValueError, match="use kind='mla' for deepseek_v2 models"):
        longattn.hf.swap_attention(v2, "flash")


@pytest.mark.parametrize("kind", ["moba", "nsa", "mla"])
def test_save_and_from_pretrained(kind, device, tmp_path):
    """A swapped model saved with save_pretrained loads back swapped, the weights the swap added (NSA's
    compressors and gates, moved off their initial values here) included: same logits."""
    model = _swapped(kind, device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("gate", "_pos", "_compress")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = longattn.hf.from_pretrained(tmp_path).to(device)
    assert type(loaded) is type(model)
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    assert loaded.config._attn_implementation == model.config._attn_implementation
    ids = torch.randint(0, 128, (2, 40)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra", [dict(dropout=0.1), dict(softcap=-1.0), dict(position_bias=torch.zeros(1)),
                                   dict(is_causal=False), dict(s_aux=torch.zeros(3)), dict(attention_chunk_size=2)],
                         ids=lambda e: next(iter(e)))
def test_attention_function_refuses_what_it_would_ignore(extra, device):
    """Dropout, position bias, non-causal attention, sinks of the wrong shape, chunked attention (a config's
    attention_chunk_size) without the layer types that say which layers are chunked, a soft cap that is not a
    positive number: an error, not an attention computed without them."""
    q = torch.randn(1, 4, 8, 16, device=device)
    module = torch.nn.Module()
    if "attention_chunk_size" in extra:
        module.config, extra = LlamaConfig(attention_chunk_size=extra["attention_chunk_size"]), {}
    fns = (hf_attention.flash_attention_forward, hf_attention.moba_attention_forward)
    for fn in fns:
        with pytest.raises(ValueError, match="does not support|causal|one logit per query head|config.layer_types|"
                                             "softcap must be"):
            fn(module, q, q, q, None, scaling=0.25, **extra)


@pytest.mark.parametrize("kind", ["flash", "moba"])
def test_llama4_chunked_layers(kind, monkeypatch, device):
    """Llama 4: chunked attention (chunks of 16 tokens) in three layers of four, swapped in (the chunked layers stay
    chunked under MoBA, which takes the global one). Training gradients of every attention projection equal the
    eager model's; cached generation past several chunks (transformers' cache of a chunked layer then drops its
    oldest tokens: the chunks are found from the mask) gives its tokens and logits, with left padding too, and (flash)
    with a static cache."""
    ref, ours = tiny_llama4_pair(device, kind)
    ids = torch.randint(1, 128, (2, 40)).to(device)
    mask = torch.ones_like(ids)
    # padding still among the keys a chunked layer's cache keeps after the prompt; transformers' eager Llama 4 counts
    # a padded row's chunks from its first real token only with torch >= 2.6 (its own warning otherwise): with an
    # older torch the reference batch goes unpadded (test_llama4_rollout_equals_eager_generate pads a batch there)
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6):
        mask[1, :30] = 0
    # (no loss on the padding rows, whose outputs are each model's own, nor on the first real token, predicted there)
    labels = ids.masked_fill((mask == 0) | (mask.roll(1, 1) == 0), -100)
    for model in (ref, ours):
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if "self_attn" in n} for m in (ref, ours)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-4, rtol=1e-4, msg=name)
    found = []
    offsets = hf_attention._chunk_offsets
    monkeypatch.setattr(hf_attention, "_chunk_offsets", lambda *a: found.append(1) or offsets(*a))
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    static = [dict(attention_mask=mask, cache_implementation="static")] if kind == "flash" else []
    for extra in [dict(attention_mask=mask), {}] + static:
        with torch.no_grad():
            try:
                g_ref = ref.generate(ids, **extra, **kw)
            except TypeError as e:  # (transformers 5.17's static-cache masks of chunked layers fail in the eager model)
                if "cache_implementation" in extra and "create_chunked_causal_mask" in str(e):
                    continue
                raise
            g_ours = ours.generate(ids, **extra, **kw)
        assert torch.equal(g_ours.sequences, g_ref.sequences)
        for a, b in zip(g_ours.logits, g_ref.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert found  # (the steps after the caches dropped tokens)


@pytest.mark.parametrize("impl", ["longattn", "moba"])
def test_gpt_oss_sinks_and_sliding_layers(impl, device):
    """gpt-oss: attention sinks (a learned logit per head in every softmax) and alternating sliding-window layers.
    Logits, the sinks' gradients and cached generation equal the eager model's (MoBA with top-k over every block
    is dense attention; its sliding layers stay sliding)."""
    ref, ours = tiny_gpt_oss_pair(device, impl)
    ids = torch.randint(1, 128, (2, 40)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    for model in (ref, ours):
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
    for a, b in zip(ref.model.layers, ours.model.layers):
        torch.testing.assert_close(b.self_attn.sinks.grad, a.self_attn.sinks.grad, atol=1e-5, rtol=1e-4)
    _assert_same_generation(ours, ref, ids, attention_mask=mask)


def test_chunked_layers_mask_after_dropped_tokens(device):
    """The mask function of chunked layers whose cache dropped tokens (kv_offset > 0): every column from the first
    token (a mask of ones, its padding known without a read, where the model gave none); a kv_offset given as a
    tensor is refused."""
    from transformers import Llama4TextConfig

    cfg = Llama4TextConfig(attention_chunk_size=16)
    kw = dict(batch_size=2, q_length=1, kv_length=16, kv_offset=9, local_size=16, config=cfg, device=device)
    mask = hf_attention.padding_mask(attention_mask=None, **kw)
    assert mask.shape == (2, 25) and bool(mask.all()) and hf_attention._known_real(mask) == [25, 25]
    given = torch.ones(2, 30, dtype=torch.bool, device=device)
    given[1, :12] = False
    assert torch.equal(hf_attention.padding_mask(attention_mask=given, **kw), given[:, -25:])
    with pytest.raises(ValueError, match="as an int"):
        hf_attention.padding_mask(attention_mask=given, **dict(kw, kv_offset=torch.tensor(9)))
