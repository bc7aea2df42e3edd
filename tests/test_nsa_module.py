"""NativeSparseAttention in a transformers model: training gradients, cached decoding, generate."""
import copy

import pytest
import torch

import longattn
from longattn.nsa import NSAConfig, nsa_attention_ref
from longattn.rollout import _cache_kw
from helpers import (OTHER_ARCHS, check_cache_reorder, check_packed_equals_separate, check_prompt_lookup_equals_greedy,
                     perturb_attention, replay_decode_step_without_sync, tiny_config, tiny_llama4_pair)
from longattn.hf.swap import NSA_ARCHS, V5_ARCHS, _attention_slot
from longattn.nsa.module import NativeSparseAttention

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config  # noqa: E402

NSA = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=3, window=16)


def _reference_impl(cfg) -> str:
    """The original model's attention: SDPA, or eager attention where transformers has no SDPA form of it (attention
    sinks: gpt-oss, Granite SWA) or its SDPA form drops part of it (soft-capped logits: Gemma 2 under transformers
    4)."""
    if getattr(cfg, "attn_logit_softcapping", None):
        return "eager"
    return "sdpa" if AutoModelForCausalLM._model_mapping[type(cfg)]._supports_sdpa else "eager"


def _model(device, arch="llama"):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)
    if arch == "qwen2_sliding":  # its second layer a sliding-window one: a cache keeping the last 16 tokens
        common.update(use_sliding_window=True, sliding_window=16, max_window_layers=1)
    if arch == "ministral":  # every layer a sliding-window one
        common.update(sliding_window=16, head_dim=16)
    # (Qwen3-Next: a linear-attention layer, then an NSA one; gpt-oss: a sliding-window layer, then an NSA one)
    cfg = (tiny_config(arch) if arch in ("qwen3_next", "gpt_oss") else
           dict(llama=LlamaConfig, ministral=transformers.MinistralConfig).get(arch, Qwen2Config)(**common))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=_reference_impl(cfg)).eval()
    return longattn.hf.swap_attention(model.to(device), "nsa", config=NSA)


def test_decode_steps_equal_full_forward(device, monkeypatch):
    """(And a decoding step's per-token tensors are copied to the device once for all layers.)"""
    import longattn.nsa.module as nsa_module

    copies = []
    copy = nsa_module.device_tensor
    monkeypatch.setattr(nsa_module, "device_tensor", lambda *a: copies.append(1) or copy(*a))
    model = _model(device, "llama")
    ids = torch.randint(0, 128, (2, 60)).to(device)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        kw = {_cache_kw(model): cache, "use_cache": True}  # the keyword this transformers version takes
        pre = model(ids[:, :26], **kw).logits
        copies.clear()
        # one token at a time across a selection block's end (32), completing three compressed blocks
        steps = [model(ids[:, i:i + 1], **kw).logits[:, -1] for i in range(26, 36)]
        assert len(copies) == 2 * 10 + 3 * 2 * 3  # lengths and offsets a step; the blocks completed in each layer
        # a chunk of several tokens, completing more compressed blocks than the side cache holds (it grows)
        chunk = model(ids[:, 36:], **kw).logits
    torch.testing.assert_close(pre, full[:, :26], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 26:36], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunk, full[:, 36:], atol=1e-4, rtol=1e-4)
    assert cache._longattn_nsa[0]["n"] == [NSA.num_cmp_blocks(60)] * 2


def test_long_chunk_after_prefix_equals_full_forward(device, monkeypatch):
    """A chunk of more than NSA_DECODE_TOKENS columns after a cached prefix runs nsa_attention on the chunk's queries
    (the shorter chunks of the test above, nsa_decode): a left-padded batch whose second row starts inside the chunk
    (its queries then all its tokens) gives the full forward's logits at every real position; a single row too."""
    import longattn.nsa.module as nsa_module

    model = _model(device, "llama")
    ids = torch.randint(1, 128, (2, 60)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    calls = []
    chunk = nsa_module.NativeSparseAttention._chunk
    monkeypatch.setattr(nsa_module.NativeSparseAttention, "_chunk", lambda *a: calls.append(1) or chunk(*a))
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        kw = {_cache_kw(model): cache, "use_cache": True}
        pre = model(ids[:, :20], attention_mask=mask[:, :20], **kw).logits
        rest = model(ids[:, 20:], attention_mask=mask, **kw).logits
        cache = DynamicCache(config=model.config)  # a single row (its cache read in place, not gathered)
        kw = {_cache_kw(model): cache, "use_cache": True}
        alone = torch.cat([model(ids[:1, :20], **kw).logits, model(ids[:1, 20:], **kw).logits], 1)
    assert len(calls) == 4  # (one per layer and chunk)
    got = torch.cat([pre, rest], 1)
    torch.testing.assert_close(got[mask.bool()], full[mask.bool()], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone, full[:1], atol=1e-4, rtol=1e-4)


OTHER_NSA_ARCHS = [a for a in OTHER_ARCHS if a in NSA_ARCHS]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe", *OTHER_NSA_ARCHS])
def test_window_branch_alone_equals_original_model(arch, device):
    """Gates shut on the compressed and selected branches and a window longer than the sequence: the swapped
    model is the original one, in a batch with a left-padded row (its q/k/v/o projections and their biases,
    RoPE (partial: GLM-4), and q/k norms, kept; EXAONE-4's full-attention layer beside a sliding one without RoPE;
    the sliding-window layers of OLMo-3, EXAONE-4 and Gemma 3 kept as they are). For the other families, cached
    generation (every branch open) gives a full recompute's logits."""
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, head_dim=16)
    if arch == "qwen3":
        cfg = transformers.Qwen3Config(**common)
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    elif arch == "llama":
        cfg = LlamaConfig(**common)
    else:
        cfg = tiny_config(arch)
        if cfg is None:
            pytest.skip(f"this transformers has no {arch} model")
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation=_reference_impl(cfg)).eval()
    perturb_attention(ref)  # norms and biases away from their initial ones, so that dropping them shows
    ref = ref.to(device)
    if arch in V5_ARCHS and int(transformers.__version__.split(".")[0]) < 5:
        with pytest.raises(ValueError, match="under transformers >= 5"):
            longattn.hf.swap_attention(copy.deepcopy(ref), "nsa", config=NSA)
        return
    model = longattn.hf.swap_attention(copy.deepcopy(ref), "nsa", config=NSAConfig(cmp_block=8, cmp_stride=4,
                                                                                  slc_block=16, slc_topk=3, window=64))
    nsa_layers = [m for m in model.modules() if isinstance(m, NativeSparseAttention)]
    # (a model mixing sliding-window and full layers keeps its sliding ones: OLMo-3, EXAONE-4, Gemma 3; the hybrids
    # their linear-attention (MiniMax-M1's an attention module of its own), Mamba or convolution layers; Nemotron-H's
    # attention is a layer's mixer)
    types = getattr(cfg, "layer_types", None) or []
    mixed = "sliding_attention" in types and "full_attention" in types
    # (Gemma 4's and Gemma 3n's KV-shared layers, attending to an earlier layer's keys and values, kept too)
    slots = [_attention_slot(layer) for layer in ref.model.layers]
    assert len(nsa_layers) == sum(slot is not None and t != "linear_attention" and
                                  not (mixed and t == "sliding_attention") and
                                  not getattr(getattr(*slot), "is_kv_shared_layer", False)
                                  for slot, t in zip(slots, types or [None] * len(slots)))
    assert len(nsa_layers) >= 1
    with torch.no_grad():
        for attn in nsa_layers:  # (each layer's heads: Laguna's differ)
            h = attn.num_heads
            attn.gate.bias.copy_(torch.tensor([-40.0] * 2 * h + [40.0] * h))  # g_cmp, g_slc ~ 0, g_swa ~ 1
    ids = torch.randint(1, 128, (2, 40)).to(device)  # (0: generate's pad token)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # a left-padded row
    with torch.no_grad():  # (row 0 unpadded)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[mask.bool()],
                                   ref(ids, attention_mask=mask).logits[mask.bool()], atol=1e-4, rtol=1e-4)
    if arch in ("gemma4_text", "gemma3n_text"):
        # (the KV-shared layers attend to the keys and values NSA's layer hands on; built on one, the module refuses)
        with pytest.raises(ValueError, match="does not take the keys and values of another layer"):
            NativeSparseAttention(ref.model.layers[-1].self_attn, NSA)
        if arch == "gemma4_text":  # (returned for assistant models)
            with torch.no_grad():
                ours, theirs = (m.model(ids[:1], return_shared_kv_states=True).shared_kv_states["full_attention"]
                                for m in (model, ref))
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if arch in OTHER_NSA_ARCHS:
        model = longattn.hf.swap_attention(copy.deepcopy(ref), "nsa", config=NSA)
        with torch.no_grad():
            # (24 prompt tokens and 5 new ones: past a selection block, compressed blocks completed while decoding;
            # each step's logits those of the recompute: decoding keeps every branch's parts, the sinks too)
            gen = model.generate(ids[:1, :24], max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
            recompute = model(gen.sequences[:, :-1], use_cache=False).logits[0, 23:]
        torch.testing.assert_close(torch.cat(gen.logits), recompute, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_sliding", "ministral"])
def test_generate_equals_recompute(arch, device):
    """(The Llama model is covered by the step-by-step test above.) A model mixing sliding-window and full layers keeps
    its sliding ones, with their window's cache; where every layer slides, NSA replaces them all and their caches keep
    every token (they kept the window: wrong tokens)."""
    model = _model(device, arch)
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == (["NativeSparseAttention", "Qwen2Attention"] if arch == "qwen2_sliding" else
                     ["NativeSparseAttention"] * 2)
    ids = torch.randint(1, 128, (1, 40)).to(device)  # (0: generate's pad token)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        # greedy recompute without a cache: the model is causal, so one forward over the generated sequence
        # gives, at every position, the logits a recompute from scratch would see there
        recompute = model(gen[:, :-1], use_cache=False).logits[:, 39:].argmax(-1)
    assert torch.equal(gen[:, 40:], recompute)


@pytest.mark.parametrize("arch", ["llama", "qwen3_next", "gpt_oss"])
def test_training_gradients_match_reference(arch, monkeypatch, device):
    """Every parameter's gradient (projections, compressors, position embeddings, gates; Qwen3-Next's output gate in
    its q projection, and its linear-attention layer's; gpt-oss's attention sinks) through the Triton op equals the
    one through the PyTorch reference, and is the same under gradient checkpointing."""
    import longattn.nsa.module as nsa_module

    model = _model(device, arch).train()
    for m in model.modules():  # move the new parameters (and gpt-oss's sinks) off their initial values
        if isinstance(m, nsa_module.NativeSparseAttention):
            with torch.no_grad():
                for p in (m.k_pos, m.v_pos, m.gate.weight, m.gate.bias, m.sinks):
                    if p is not None:
                        p.add_(torch.randn_like(p) * (1.0 if p is m.sinks else 0.1))
    ids = torch.randint(0, 128, (2, 50)).to(device)

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 (the older name warns there)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        recomputed = grads()  # each layer's forward run again in the backward
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        recomputed = grads()
        model.gradient_checkpointing_disable()
    monkeypatch.setattr(nsa_module, "nsa_attention", nsa_attention_ref)
    ref = grads()
    assert set(recomputed) == set(ours)
    for n in ours:
        torch.testing.assert_close(recomputed[n], ours[n], atol=1e-5, rtol=1e-5, msg=n)
    assert set(ours) == set(ref)
    for name in ("k_pos", "v_pos", "k_compress", "v_compress", "gate"):
        assert any(name in n for n in ours), name
    assert arch != "gpt_oss" or "model.layers.1.self_attn.sinks" in ours  # (the NSA layer's)
    for n in ours:
        assert torch.isfinite(ours[n]).all(), n
        torch.testing.assert_close(ours[n], ref[n], atol=1e-4, rtol=1e-3, msg=n)


def test_packed_sequences_train_as_separate(device):
    """Training on packed sequences: each sequence compressed and attended on its own, gradients included."""
    model = _model(device).train()
    check_packed_equals_separate(model, [27, 41], grads=True)


def test_speculative_decoding_equals_greedy(device):
    check_prompt_lookup_equals_greedy(_model(device), device)


def test_compressed_cache_follows_beam_search(device):
    model = _model(device)
    ids = torch.randint(0, 128, (3, 45)).to(device)
    check_cache_reorder(model, ids, torch.tensor([2, 2, 0], device=device))


@pytest.mark.gpu
def test_decoding_step_does_not_wait_for_the_gpu():
    model = _model("cuda")
    ids = torch.randint(0, 128, (2, 200), device="cuda")
    replay_decode_step_without_sync(model, ids, DynamicCache(config=model.config))


def test_gates_start_as_the_branches_average(device):
    """The gates of a swapped layer start at 1/3 each, whatever its input: the gated sum the branches' average, at the
    scale of the attention it replaced (gates of 0.5 would make it 1.5 times that)."""
    model = _model(device)
    for layer in model.model.layers:
        attn = layer.self_attn
        gates = torch.sigmoid(attn.gate(torch.randn(5, model.config.hidden_size, device=device)))
        torch.testing.assert_close(gates, torch.full_like(gates, 1 / 3))


def test_refused_swap_leaves_the_model(device):
    """A layer NSA's module refuses (here a bidirectional one) fails the swap before any layer is replaced or the
    config touched: every layer of a model whose layers all slide (Ministral: the swap makes them full-attention
    layers) stays as it was."""
    model = AutoModelForCausalLM.from_config(transformers.MinistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=16)).to(device)
    types, window = list(model.config.layer_types or []), model.config.sliding_window
    model.model.layers[1].self_attn.is_causal = False
    with pytest.raises(ValueError, match="bidirectional"):
        longattn.hf.swap_attention(model, "nsa", config=NSA)
    assert not any(isinstance(layer.self_attn, NativeSparseAttention) for layer in model.model.layers)
    assert list(model.config.layer_types or []) == types and model.config.sliding_window == window


def test_all_sliding_gemma3(device):
    """A Gemma 3 whose every layer slides (its released configurations mix layer types): under transformers 5 its
    rotary embedding holds a RoPE per layer type present, none for the full-attention layers NSA's would become: a
    ValueError, the model left as it was; under transformers 4 (a global rotary embedding beside the local one) the
    swapped model generates."""
    cfg = tiny_config("gemma3_text")
    cfg.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
    model = AutoModelForCausalLM.from_config(cfg).eval().to(device)
    if "full_attention" not in getattr(model.model.rotary_emb, "layer_types", ["full_attention"]):
        with pytest.raises(ValueError, match="every layer slides"):
            longattn.hf.swap_attention(model, "nsa", config=NSA)
        assert not any(isinstance(layer.self_attn, NativeSparseAttention) for layer in model.model.layers)
        assert model.config.layer_types == ["sliding_attention"] * cfg.num_hidden_layers
        return
    longattn.hf.swap_attention(model, "nsa", config=NSA)
    with torch.no_grad():
        model.generate(torch.randint(1, 128, (1, 30), device=device), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)


def test_swap_nsa_errors(device):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**common)).to(device)
    with pytest.raises(TypeError, match="config must be an NSAConfig"):
        longattn.hf.swap_attention(copy.deepcopy(model), "nsa", config={"window": 8})
    swapped = longattn.hf.swap_attention(model, "nsa", config=NSA)
    ids = torch.randint(0, 128, (2, 20), device=device)
    mask = torch.ones_like(ids)
    mask[0, 5] = 0  # a hole, neither left nor right padding
    with pytest.raises(ValueError, match="one contiguous run"):
        swapped(ids, attention_mask=mask)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding: a prompt, but no decoding after it
    kw = {_cache_kw(swapped): DynamicCache(config=swapped.config), "use_cache": True}
    with torch.no_grad():
        swapped(ids, attention_mask=mask, **kw)
        with pytest.raises(ValueError, match="decodes after left padding only"):
            swapped(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), **kw)


def test_right_padded_batch_equals_single_rows(device):
    """Right padding (training batches): each row's real tokens give the logits and parameter gradients of the
    row alone."""
    model = _model(device).train()
    ids = torch.randint(1, 128, (2, 45)).to(device)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def run(*args, **kw):
        model.zero_grad()
        out = model(*args, **kw)
        out.loss.backward()
        return out.logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits, grads = run(ids, attention_mask=mask, labels=labels)
    ids_short = ids[1:, :30]
    short, short_grads = run(ids_short, labels=ids_short)
    torch.testing.assert_close(logits[1, :30], short[0], atol=1e-4, rtol=1e-4)
    full, full_grads = run(ids[:1], labels=ids[:1])
    torch.testing.assert_close(logits[0], full[0], atol=1e-4, rtol=1e-4)
    n0, n1 = 44, 29  # the batch's loss is the mean over both rows' predicted tokens
    for n in grads:
        torch.testing.assert_close(grads[n], (n0 * full_grads[n] + n1 * short_grads[n]) / (n0 + n1),
                                   atol=1e-5, rtol=1e-3, msg=n)


def test_left_padded_batch_generate_equals_single(device):
    model = _model(device)
    a, b = torch.randint(1, 128, (1, 37)).to(device), torch.randint(1, 128, (1, 20)).to(device)  # 0: pad token
    batch = torch.cat([a, torch.cat([torch.zeros_like(b[:, :17]), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :17] = 0
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, **kw)
        one_a, one_b = model.generate(a, **kw), model.generate(b, **kw)
    assert torch.equal(both[0, 37:], one_a[0, 37:])
    assert torch.equal(both[1, 37:], one_b[0, 20:])


def test_llama4_global_layers(device):
    """Llama 4: NSA replaces its global layers (no RoPE, queries scaled by position: temperature tuning), its chunked
    layers kept. With the window branch alone over a window longer than the sequence, logits and padded greedy
    generation past several chunks equal the eager model's; with every branch open, generation equals recompute."""
    ref = tiny_llama4_pair(device, "flash")[0].eval()
    ours = longattn.hf.swap_attention(copy.deepcopy(ref), "nsa", config=NSAConfig(cmp_block=8, cmp_stride=4,
                                                                                 slc_block=16, slc_topk=3, window=256))
    kinds = [type(layer.self_attn).__name__ for layer in ours.model.layers]
    assert kinds == ["Llama4TextAttention"] * 3 + ["NativeSparseAttention"]
    with torch.no_grad():
        ours.model.layers[3].self_attn.gate.bias.copy_(torch.tensor([-40.0] * 8 + [40.0] * 4))
    ids = torch.randint(1, 128, (2, 40)).to(device)
    mask = torch.ones_like(ids)
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6):  # (see test_hf's test_llama4_chunked_layers)
        mask[1, :9] = 0
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                                   ref(ids, attention_mask=mask).logits[mask.bool()], atol=1e-4, rtol=1e-4)
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), ref.generate(ids, attention_mask=mask, **kw))
    ours = longattn.hf.swap_attention(copy.deepcopy(ref), "nsa", config=NSA)
    with torch.no_grad():
        gen = ours.generate(ids[:1], **kw)
        recompute = ours(gen[:, :-1], use_cache=False).logits[:, 39:].argmax(-1)
    assert torch.equal(gen[:, 40:], recompute)
    # without chunks its RoPE layers are full-attention ones, which rotate by complex frequencies: kept as they are
    # (transformers 4 builds no such model: its masks need attention_chunk_size)
    if int(transformers.__version__.split(".")[0]) < 5:
        return
    cfg = copy.deepcopy(ref.config)
    cfg.attention_chunk_size, cfg.layer_types = None, ["full_attention"] * 4
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval().to(device)
    try:
        with torch.no_grad():
            want = ref(ids[:1]).logits
    except ValueError as e:  # (transformers 5.17's Llama 4 makes chunked masks whatever its config: no such model)
        if "attention_chunk_size" not in str(e):
            raise
        return
    ours = longattn.hf.swap_attention(copy.deepcopy(ref), "nsa", config=NSAConfig(cmp_block=8, cmp_stride=4,
                                                                                 slc_block=16, slc_topk=3, window=256))
    assert [type(layer.self_attn).__name__ for layer in ours.model.layers] == kinds
    with torch.no_grad():
        ours.model.layers[3].self_attn.gate.bias.copy_(torch.tensor([-40.0] * 8 + [40.0] * 4))
        torch.testing.assert_close(ours(ids[:1]).logits, want, atol=1e-4, rtol=1e-4)


def test_bitnet_packed_projections(device):
    """BitNet's quantised checkpoints hold their projections as BitLinear layers (ternary weights packed in uint8):
    NSA's new parameters take the dtype the layer computes in, and the window branch alone equals the model."""
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("NSA takes BitNet under transformers >= 5")
    from transformers.integrations.bitnet import BitLinear

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(tiny_config("bitnet"), attn_implementation="sdpa").eval()
    for layer in ref.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            dense = getattr(layer.self_attn, name)
            packed = BitLinear(dense.in_features, dense.out_features, bias=False, device="cpu", dtype=torch.float32)
            packed.weight.random_(0, 256)
            setattr(layer.self_attn, name, packed)
    ref = ref.to(device)
    ours = longattn.hf.swap_attention(copy.deepcopy(ref), "nsa", config=NSAConfig(cmp_block=8, cmp_stride=4,
                                                                                 slc_block=16, slc_topk=3, window=64))
    layers = [m for m in ours.modules() if isinstance(m, NativeSparseAttention)]
    assert len(layers) == 2 and all(m.gate.weight.dtype == torch.float32 for m in layers)
    with torch.no_grad():
        for m in layers:
            m.gate.bias.copy_(torch.tensor([-40.0] * 8 + [40.0] * 4))
        ids = torch.randint(1, 128, (2, 40)).to(device)
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
