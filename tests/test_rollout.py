"""Rollouts: packed prefill + cached decoding equals per-prompt generate; packed training backward."""
import copy

import pytest
import torch

import longattn
from longattn import rollout
from longattn.hf.cache import InPlaceLayer
from longattn.hf.swap import V5_ARCHS
from helpers import perturb_attention, tiny_config, tiny_deepseek_v3_config, tiny_gpt_oss_pair

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402


def _model(device, arch="llama", kind="moba", **opts):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    return longattn.hf.swap_attention(model.to(device), kind, **opts)


@pytest.mark.parametrize("chunk", [None, 26], ids=["whole", "chunked"])
@pytest.mark.parametrize("arch,kind,opts", [("llama", "moba", dict(block_size=16, topk=2)), ("qwen2", "flash", {})],
                         ids=["llama-moba", "qwen2-flash"])
def test_packed_rollout_equals_per_prompt_generate(arch, kind, opts, chunk, device):
    """Chunked (``prefill_chunk`` 26): the 37-token prompt alone in a row it fills in two forwards, the other two
    packed in a third."""
    model = _model(device, arch, kind, **opts)
    prompts = [torch.randint(0, 128, (n,)) for n in (37, 5, 20)]  # on the CPU: moved to the model
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    res = rollout.generate(model, prompts, 6, stop_at_eos=False, prefill_chunk=chunk)
    hook.remove()
    assert rows[:3 if chunk else 1] == ([(1, 26), (1, 11), (1, 25)] if chunk else [(1, 62)])
    assert res.prefill_packed
    for p, comp, lps in zip(prompts, res.completions, res.logprobs):
        with torch.no_grad():
            g = model.generate(p[None].to(device), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert comp == g[0, p.numel():].tolist()
        # log-probs equal a full recompute of the whole sequence
        with torch.no_grad():
            logits = model(g, use_cache=False).logits[0, p.numel() - 1:-1]
        want = torch.log_softmax(logits.float(), -1).gather(1, g[0, p.numel():, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps, device=device), want, atol=1e-4, rtol=1e-4)


def test_llama4_rollout_equals_eager_generate(device):
    """Llama 4 (chunks of 16 tokens in three layers of four; MoBA, dense here, in the fourth) swapped in: the
    rollout, packed or padded, whole or in prefill chunks of 10 tokens, gives each prompt's greedy tokens of the eager
    model, across chunks' ends."""
    from helpers import tiny_llama4_pair

    ref, ours = tiny_llama4_pair(device, "moba")
    prompts = [torch.randint(1, 128, (n,)) for n in (40, 23, 7)]
    want = []
    for p in prompts:
        with torch.no_grad():
            g = ref.generate(p[None].to(device), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        want.append(g[0, p.numel():].tolist())
    for packed, chunk in ((None, None), (False, 10)):
        res = rollout.generate(ours, prompts, 12, stop_at_eos=False, packed=packed, prefill_chunk=chunk)
        assert res.completions == want, (packed, chunk)


def test_padded_rollout_and_eos(device):
    model = _model(device, "llama", "moba", block_size=16, topk=2)
    prompts = [torch.randint(0, 128, (n,)) for n in (12, 30)]
    packed = rollout.generate(model, prompts, 5, packed=True, stop_at_eos=False)
    padded = rollout.generate(model, prompts, 5, packed=False, stop_at_eos=False)
    assert packed.completions == padded.completions and not padded.prefill_packed
    for impl in ("sdpa", "eager"):  # (their attention would cross a packed row's prompts: wrong completions before)
        other = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation=impl).to(device)
        with pytest.raises(ValueError, match=f"packed=True needs longattn's attention functions .*'{impl}'"):
            rollout.generate(other, prompts, 2, packed=True)
        assert not rollout.generate(other, prompts, 2).prefill_packed
    # 4 columns at a time: the shorter prompt's first 4 chunks are all padding
    chunked = rollout.generate(model, prompts, 5, packed=False, stop_at_eos=False, prefill_chunk=8)
    assert chunked.completions == packed.completions
    torch.testing.assert_close(torch.tensor(chunked.logprobs), torch.tensor(packed.logprobs), atol=1e-4, rtol=1e-4)
    eos = packed.completions[0][1]
    stopped = rollout.generate(model, prompts, 5, eos_token_id=eos)
    assert stopped.completions[0] == packed.completions[0][:packed.completions[0].index(eos) + 1]
    # several eos tokens (Qwen's and Llama 3's configs list them): any of them stops, the config's by default
    assert rollout.generate(model, prompts, 5, eos_token_id=[1000, eos]).completions == stopped.completions
    model.config.eos_token_id = [1000, eos]  # (1000: beyond the vocabulary)
    assert rollout.generate(model, prompts, 5).completions == stopped.completions


def _swapped(kind, device):
    """A tiny model with MoBA (16 / top 2), NSA (small blocks) or MLA (DeepSeek-V3's) swapped in."""
    if kind == "mla":
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(tiny_deepseek_v3_config(), attn_implementation="eager")
        return longattn.hf.swap_attention(base.eval().to(device), "mla", page_size=16)
    if kind == "nsa":
        from longattn.nsa import NSAConfig

        return _model(device, "llama", "nsa", config=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=3,
                                                                window=16))
    return _model(device, "llama", "moba", block_size=16, topk=2)


@pytest.mark.parametrize("kind", ["nsa", "mla"])  # (MoBA's: test_padded_rollout_and_eos)
def test_padded_prefill_in_chunks(kind, device):
    """The padded prefill 10 columns at a time (``prefill_chunk`` 30 for 3 prompts) gives the completions and
    log-probs of the whole one: the shortest prompt's first chunks are all padding, then one is padded up to its
    real tokens (a chunk after a cached prefix with padding: NSA leaves its padding out, MLA runs it as a longer
    chunk); the last chunk is short enough for their decoding path."""
    model = _swapped(kind, device)
    prompts = [torch.randint(1, 128, (n,)) for n in (36, 7, 25)]
    whole = rollout.generate(model, prompts, 3, stop_at_eos=False, packed=False)
    chunked = rollout.generate(model, prompts, 3, stop_at_eos=False, packed=False, prefill_chunk=30)
    with pytest.raises(ValueError, match="packed=True cannot serve longattn's MLA or NSA attention modules"):
        rollout.generate(model, prompts, 3, packed=True)  # (NSA raised AttributeError, MLA decoded garbage)
    assert chunked.completions == whole.completions
    torch.testing.assert_close(torch.tensor(chunked.logprobs), torch.tensor(whole.logprobs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["moba", "nsa", "mla"])
def test_finished_sequences_leave_the_batch(kind, device, monkeypatch):
    """With an eos that ends some rollouts early, dropping finished sequences from the batch and the cache gives
    the completions and log-probs of decoding every row to the end, cut at their eos; later steps run on fewer
    rows. Each rollout allocates its decoding cache once per layer, for the longest prompt and the new tokens: no
    step copies the cache (transformers' default one concatenates at every step); the packed prefill's row too."""
    grows = []
    grow = InPlaceLayer._grow
    monkeypatch.setattr(InPlaceLayer, "_grow", lambda layer, need, *a: grows.append((need, layer.reserve)) or
                        grow(layer, need, *a))
    model = _swapped(kind, device)
    prompts = [torch.randint(1, 128, (n,)) for n in (21, 14, 30, 9)]
    full = rollout.generate(model, prompts, 5, stop_at_eos=False)
    eos = full.completions[1][1]  # row 1 ends by its second token (others may too)
    rows, heads = [], []
    hooks = [model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True),
             model.lm_head.register_forward_pre_hook(lambda m, a: heads.append(a[0].shape[1]))]
    dropped = rollout.generate(model, prompts, 5, eos_token_id=eos)
    for h in hooks:
        h.remove()
    assert heads[0] == (len(prompts) if dropped.prefill_packed else 1)  # the prefill's last logits only
    for comp, lps, want, want_lps in zip(dropped.completions, dropped.logprobs, full.completions, full.logprobs):
        n = want.index(eos) + 1 if eos in want else len(want)
        assert comp == want[:n]
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(want_lps[:n]), atol=1e-4, rtol=1e-4)
    assert min(rows) < len(prompts) and rows[0] == (1 if dropped.prefill_packed else len(prompts))
    layers = model.config.num_hidden_layers  # (a packed prefill's row allocated once per layer too)
    packed_row = [(sum(p.numel() for p in prompts),) * 2] * layers if dropped.prefill_packed else []
    assert grows == (packed_row + [(30, 30 + 5 - 1)] * layers) * 2


@pytest.mark.parametrize("kind", ["flash", "moba", "mla"])
def test_decoding_steps_read_no_mask(kind, device, monkeypatch):
    """The rollout's decoding steps (left-padded rows of different lengths, samples repeated, finished rows dropped)
    never read their padding mask back to the host (a synchronisation a step would wait on: the rollout marks the
    mask's padding, which it knows; on a GPU nothing in those forwards synchronises), and give the completions of
    decoding every row to the end, cut at their eos. (MLA's module asks for its new tokens' columns: derived.)"""
    import transformers.masking_utils as masking

    from longattn.hf import attention as hf_attention

    reads, decoding = [], [False]
    read, flash_mask = hf_attention._padding_of, masking.flash_attention_mask
    monkeypatch.setattr(hf_attention, "_padding_of", lambda *a: reads.append(decoding[0]) or read(*a))
    monkeypatch.setattr(masking, "flash_attention_mask", lambda *a, **k: reads.append(
        decoding[0] and k.get("attention_mask") is not None) or flash_mask(*a, **k))
    model = _swapped(kind, device) if kind == "mla" else \
        _model(device, "llama", kind, **(dict(block_size=16, topk=2) if kind == "moba" else {}))
    model.register_forward_pre_hook(lambda m, a, kw: decoding.__setitem__(0, kw["input_ids"].shape[1] == 1),
                                    with_kwargs=True)
    prompts = [torch.randint(1, 128, (n,)) for n in (21, 9, 30)]
    sample = dict(num_samples=2, temperature=1.0)
    full = rollout.generate(model, prompts, 5, stop_at_eos=False, generator=torch.Generator(device).manual_seed(0),
                            **sample)
    eos = full.completions[0][1]
    if device == "cuda":  # there, every synchronisation in a decoding step's forward is an error (kernels compiled)
        strict = lambda m, a, kw: torch.cuda.set_sync_debug_mode("error" if kw["input_ids"].shape[1] == 1 else 0)
        hooks = [model.register_forward_pre_hook(strict, with_kwargs=True),
                 model.register_forward_hook(lambda m, a, o: torch.cuda.set_sync_debug_mode(0))]
    try:
        dropped = rollout.generate(model, prompts, 5, eos_token_id=eos,
                                   generator=torch.Generator(device).manual_seed(0), **sample)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            for h in hooks:
                h.remove()
    assert not any(reads)  # (reads in the prefill, padded for MLA's module, are not decoding steps')
    for comp, want in zip(dropped.completions, full.completions):
        assert comp == (want[:want.index(eos) + 1] if eos in want else want)


@pytest.mark.parametrize("kind", ["moba", "mla"])
def test_samples_share_one_prefill(kind, device):
    """num_samples=n: each prompt prefilled once (its cache rows then repeated for its samples: MoBA's pooled keys
    and MLA's latent pages follow) gives what listing each prompt n times gives, sampled from the same generator:
    the same completions and log-probs; the n samples of a prompt differ; greedy samples all equal the greedy
    completion."""
    if kind == "mla":
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(tiny_deepseek_v3_config(), attn_implementation="eager")
        model = longattn.hf.swap_attention(base.eval().to(device), "mla", page_size=16)
    else:
        model = _model(device, "llama", "moba", block_size=16, topk=2)
    prompts = [torch.randint(1, 128, (n,)) for n in (21, 9)]
    fed = []  # tokens of each forward call
    hook = model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].numel()), with_kwargs=True)
    gen = lambda: torch.Generator(device=device).manual_seed(5)
    shared = rollout.generate(model, prompts, 4, stop_at_eos=False, temperature=1.5, generator=gen(), num_samples=3)
    prefill = fed[0]
    listed = rollout.generate(model, [p for p in prompts for _ in range(3)], 4, stop_at_eos=False, temperature=1.5,
                              generator=gen())
    hook.remove()
    assert prefill == (21 + 9 if shared.prefill_packed else 2 * 21)  # each prompt once (packed, or padded to 21)
    assert shared.completions == listed.completions and len(shared.completions) == 6
    for a, b in zip(shared.logprobs, listed.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
    assert len({tuple(c) for c in shared.completions[:3]}) > 1  # the samples of a prompt differ
    greedy = rollout.generate(model, prompts, 4, stop_at_eos=False)
    rows = []  # rows of each forward call: greedy samples decode once per prompt
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    copies = rollout.generate(model, prompts, 4, stop_at_eos=False, num_samples=2)
    hook.remove()
    assert copies.completions == [c for c in greedy.completions for _ in range(2)]
    assert copies.logprobs == [lp for lp in greedy.logprobs for _ in range(2)] and max(rows) <= 2


def test_packed_training_backward_equals_unpacked(device):
    model = _model(device, "llama", "moba", block_size=16, topk=2).train()
    seqs = [torch.randint(0, 128, (n,)).to(device) for n in (40, 23)]

    def loss_of(logits, ids):
        return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum")

    packed = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(s.numel(), device=device) for s in seqs])[None]
    logits = model(packed, position_ids=pos).logits[0]
    start, loss = 0, 0.0
    for s in seqs:
        loss = loss + loss_of(logits[start:start + s.numel()], s)
        start += s.numel()
    loss.backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss_sep = sum(loss_of(model(s[None]).logits[0], s) for s in seqs)
    loss_sep.backward()
    torch.testing.assert_close(loss, loss_sep, atol=1e-4, rtol=1e-5)
    for n, p in model.named_parameters():
        assert torch.isfinite(g_packed[n]).all()
        torch.testing.assert_close(g_packed[n], p.grad, atol=1e-4, rtol=1e-3)


def test_rollout_with_mla_model(device):
    cfg = tiny_deepseek_v3_config()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval().to(device)
    model = longattn.hf.swap_attention(base, "mla", page_size=16)
    prompts = [torch.randint(0, 128, (n,)) for n in (25, 9)]
    res = rollout.generate(model, prompts, 4, stop_at_eos=False)
    assert not res.prefill_packed
    for p, comp in zip(prompts, res.completions):
        with torch.no_grad():
            g = model.generate(p[None].to(device), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert comp == g[0, p.numel():].tolist()


def test_rollout_bad_arguments():
    model = _model("cpu")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        rollout.generate(model, [[1, 2]], 0)
    with pytest.raises(ValueError, match="prompts\\[1\\] is empty"):
        rollout.generate(model, [[1, 2], []], 2)
    with pytest.raises(ValueError, match=r"prompts\[1\] holds token ids outside \[0, 128\)"):
        rollout.generate(model, [[1, 2], [3, 128]], 2)
    with pytest.raises(ValueError, match=r"prompts\[0\] holds token ids outside"):
        rollout.generate(model, [[-1, 2]], 2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        rollout.generate(model, [[1, 2]], True)
    for prompts in ("abc", 5, [[1.7, 2.2]], [[True, False]], [torch.tensor([[1, 2], [3, 4]])], [["a"]]):
        # (floats were truncated, a 2-D prompt flattened into one)
        with pytest.raises(TypeError, match="prompts"):
            rollout.generate(model, prompts, 2)
    with pytest.raises(TypeError, match="model must be a transformers causal LM"):
        rollout.generate(None, [[1, 2]], 2)
    for kw, match in ((dict(stop_at_eos=None), "stop_at_eos must be a bool, got NoneType"),
                      (dict(drop_finished=1), "drop_finished must be a bool, got int"),
                      (dict(packed="yes"), "packed must be a bool or None, got str")):
        with pytest.raises(TypeError, match=match):
            rollout.generate(model, [[1, 2]], 2, **kw)
    for kw, match in ((dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
                      (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
                      (dict(temperature=1.0, top_k=0), "top_k must be a positive int"),
                      (dict(temperature=1.0, top_p=0.0), r"top_p must lie in \(0, 1\]"),
                      (dict(temperature=1.0, top_p=1.5), r"top_p must lie in \(0, 1\]"),
                      (dict(temperature=1.0, min_p=-0.1), r"min_p must lie in \[0, 1\]"),
                      (dict(temperature=1.0, min_p=True), r"min_p must lie in \[0, 1\]"),
                      (dict(logprobs_mode="sampled"), "logprobs_mode must be 'raw' or 'processed'"),
                      (dict(stop_sequences=[1, 2]), "stop_sequences must be a sequence of non-empty sequences"),
                      (dict(stop_sequences=[[]]), "stop_sequences must be a sequence of non-empty sequences"),
                      (dict(stop_sequences=[[1, True]]), "stop_sequences must be a sequence of non-empty sequences"),
                      (dict(stop_sequences="ab"), "stop_sequences must be a sequence of non-empty sequences"),
                      (dict(stop_sequences=[[3, -1]]), "stop_sequences must be a sequence of non-empty sequences"),
                      (dict(stop_sequences=torch.tensor([1, 2])),
                       "stop_sequences must be a sequence of non-empty sequences"),
                      (dict(num_samples=0), "num_samples must be a positive int"),
                      (dict(prefill_chunk=0), "prefill_chunk must be a positive int or None"),
                      (dict(eos_token_id=2.5), "eos_token_id must be an int, a list of ints or None"),
                      (dict(eos_token_id=[1, "2"]), "eos_token_id must be an int, a list of ints or None")):
        with pytest.raises(ValueError, match=match):
            rollout.generate(model, [[1, 2]], 2, **kw)


@pytest.mark.parametrize("arch", ["qwen2", "gpt_oss", "gemma3_text", "qwen3_next"])
def test_training_batch(arch, device):
    """Rollout.training_batch gives the prompts and their completions (two samples each) to a training forward: the
    model's log-probs of the completion tokens there are the rollout's and its loss covers the completions only.
    Packed into one row by default (Qwen2 and gpt-oss, its sliding-window layers and sinks, under longattn's flash
    attention), as right-padded rows with padded=True, and where a packed row's sequences would reach each other,
    which refuses padded=False: under transformers' SDPA (Gemma 3, its sliding-window layers too), and in a hybrid
    (Qwen3-Next, under longattn's flash attention: a linear-attention layer, whose state would run on across a packed
    row). The prompts must be those given to generate."""
    if arch == "qwen2":
        model = _model(device, "qwen2", "flash")
    elif arch == "gpt_oss":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager").eval()
        perturb_attention(model)  # (sinks away from 0)
        model = longattn.hf.swap_attention(model.to(device), "flash")
    else:
        cfg = tiny_config(arch)
        if cfg is None:
            pytest.skip(f"this transformers has no {arch} model")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval().to(device)
        if not model._supports_default_dynamic_cache():
            pytest.skip(f"transformers {transformers.__version__} gives {arch} a cache class of its own")
        if arch == "qwen3_next":  # (its attention layers taking a packed row apart: the recurrent state refuses it)
            model = longattn.hf.swap_attention(model, "flash")
    prompts = [torch.randint(0, 128, (n,)) for n in (9, 21)]
    res = rollout.generate(model, prompts, 5, stop_at_eos=False, temperature=1.0, num_samples=2,
                           generator=torch.Generator(device=device).manual_seed(0))
    want_loss = -torch.cat([torch.tensor(lps) for lps in res.logprobs]).mean()
    for padded in (None, True):
        batch = res.training_batch(prompts, padded=padded)  # (on the model's device)
        rows = 1 if padded is None and arch in ("qwen2", "gpt_oss") else 4
        assert batch["input_ids"].shape == ((1, 2 * (9 + 5) + 2 * (21 + 5)) if rows == 1 else (4, 21 + 5))
        assert ("attention_mask" in batch) == (rows > 1)
        with torch.no_grad():
            out = model(**{k: batch[k] for k in ("input_ids", "position_ids", "attention_mask", "labels")
                           if k in batch})
        logp = torch.log_softmax(out.logits.float(), -1)
        ids = batch["input_ids"]
        for (r, a, b), comp, lps in zip(batch["completion_spans"], res.completions, res.logprobs):
            assert ids[r, a:b].tolist() == comp
            got = logp[r, a - 1:b - 1].gather(1, ids[r, a:b, None]).squeeze(1)
            torch.testing.assert_close(got, torch.tensor(lps, device=device), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.loss.float().cpu(), want_loss, atol=1e-4, rtol=1e-4)
    if arch in ("gemma3_text", "qwen3_next"):
        with pytest.raises(ValueError, match="take padded rows"):
            res.training_batch(prompts, padded=False)
    other = [p.clone() for p in prompts]
    other[1][-1] = (other[1][-1] + 1) % 128
    for wrong in (prompts[:1], prompts[::-1], prompts * 2, other, [prompts[0], prompts[0][:1].repeat(21)]):
        with pytest.raises(ValueError, match="prompts must be those given to generate"):
            res.training_batch(wrong)


def test_stop_sequences(device):
    """A completion ends once it ends with a stop sequence (kept in it, with its log-probs; stop_at_eos=False too),
    at the first of several to appear; one that never appears changes nothing; ints of any kind are taken."""
    import numpy as np

    model = _model(device, "qwen2", "flash")
    prompts = [torch.randint(0, 128, (n,)) for n in (9, 21)]
    full = rollout.generate(model, prompts, 8, stop_at_eos=False)
    a = full.completions[0]
    stops = [a[2:4], [np.int64(a[5])], full.completions[1][1:4]]

    def cut(comp):  # the completion up to the first stop sequence it ends with
        return next((comp[:n] for n in range(1, len(comp) + 1)
                     if any(comp[:n][-len(stop):] == [int(t) for t in stop] for stop in stops)), comp)

    got = rollout.generate(model, prompts, 8, stop_at_eos=False, stop_sequences=stops)
    assert len(got.completions[0]) <= 4 and len(got.completions[1]) <= 4
    for comp, lps, whole, whole_lps in zip(got.completions, got.logprobs, full.completions, full.logprobs):
        assert comp == cut(whole)
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(whole_lps[:len(comp)]), atol=1e-5, rtol=0)
    never = [torch.tensor([127] * 9)]
    assert rollout.generate(model, prompts, 8, stop_at_eos=False, stop_sequences=never).completions == \
        full.completions
    # greedy samples (each prompt decoded once) with the stop sequences given as a one-shot iterator
    twice = rollout.generate(model, prompts, 8, stop_at_eos=False, stop_sequences=iter(stops), num_samples=2)
    assert twice.completions == [c for c in got.completions for _ in range(2)]


def test_sampling(device):
    """Sampling: reproducible with a generator; top_k=1, a tiny top_p, min_p=1 and a tiny temperature (its scores
    overflowed float32: NaN probabilities) give the greedy completions; every token sampled with top_k, top_p and
    min_p lies in the set they allow of the model's distribution at its step (a full recompute); the log-probs are
    the model's at temperature 1, or with logprobs_mode="processed" (the same tokens) those of that set's
    distribution (0 when greedy)."""
    model = _model(device, "qwen2", "flash")
    prompts = [torch.randint(0, 128, (n,)) for n in (9, 21)]
    greedy = rollout.generate(model, prompts, 6, stop_at_eos=False)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(temperature=1e-45)):
        assert rollout.generate(model, prompts, 6, stop_at_eos=False, **{"temperature": 0.7, **kw}).completions == \
            greedy.completions
    assert rollout.generate(model, prompts, 3, logprobs_mode="processed").logprobs == [[0.0] * 3] * 2
    gen = lambda: torch.Generator(device=device).manual_seed(3)
    a, b = (rollout.generate(model, prompts, 6, stop_at_eos=False, temperature=1.5, generator=gen()) for _ in "ab")
    assert a.completions == b.completions != greedy.completions
    kw = dict(stop_at_eos=False, temperature=2.0, top_k=8, top_p=0.8, min_p=0.3)
    res = rollout.generate(model, prompts, 8, generator=gen(), **kw)
    processed = rollout.generate(model, prompts, 8, generator=gen(), logprobs_mode="processed", **kw)
    assert processed.completions == res.completions
    for p, comp, lps, plps in zip(prompts, res.completions, res.logprobs, processed.logprobs):
        with torch.no_grad():
            logits = model(torch.cat([p, torch.tensor(comp)])[None].to(device), use_cache=False).logits
        logits = logits[0, p.numel() - 1:-1].float()
        for step, tok in enumerate(comp):
            top = (logits[step] / 2.0).topk(8)
            probs = top.values.softmax(-1)
            kept = (probs.cumsum(-1) - probs < 0.8) & (probs >= 0.3 * probs[0])
            assert tok in top.indices[kept].tolist()
            allowed = torch.log_softmax(top.values[kept], -1)
            torch.testing.assert_close(torch.tensor(plps[step], device=device),
                                       allowed[top.indices[kept].tolist().index(tok)], atol=1e-4, rtol=1e-4)
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(comp, device=device)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps, device=device), want, atol=1e-4, rtol=1e-4)


def _assert_generate_each(model, prompts, res):
    """The rollout ``res`` (greedy) gives each prompt the tokens, and their log-probs, of the model's generate on that
    prompt alone."""
    device = model.device
    for p, comp, lps in zip(prompts, res.completions, res.logprobs):
        with torch.no_grad():
            g = model.generate(p[None].to(device), max_new_tokens=len(comp), do_sample=False, eos_token_id=None,
                               pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        assert comp == g.sequences[0, p.numel():].tolist()
        want = torch.log_softmax(torch.cat(g.logits).float(), -1).gather(1, g.sequences[0, p.numel():, None])
        torch.testing.assert_close(torch.tensor(lps, device=device), want.squeeze(1), atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["longattn", "nsa"])
def test_rollout_with_sliding_window_layers(kind, device):
    """gpt-oss keeps only a window of its sliding layers' tokens in the cache: the rollout prefills a padded batch
    (a packed row's cache cannot be split by prompt there) and equals the eager model's (under NSA, its full layer
    NSA's with the attention sinks, its sliding one kept: the same model's generate prompt by prompt); packed=True is
    refused."""
    ref, ours = tiny_gpt_oss_pair(device, "longattn")
    prompts = [torch.randint(1, 128, (n,)) for n in (13, 30, 22)]
    if kind == "nsa":
        from longattn.nsa import NSAConfig

        ours = longattn.hf.swap_attention(ref, "nsa", config=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16,
                                                                       slc_topk=4, window=16))
        prompts[1] = torch.randint(1, 128, (70,))  # (five selection blocks: one picked by score)
    got = rollout.generate(ours.eval(), prompts, 5, stop_at_eos=False)
    assert not got.prefill_packed
    if kind == "nsa":
        _assert_generate_each(ours, prompts, got)
    else:
        want = rollout.generate(ref.eval(), prompts, 5, stop_at_eos=False, packed=False)
        assert got.completions == want.completions
        for a, b in zip(got.logprobs, want.logprobs):
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    with pytest.raises(ValueError, match="sliding-window or linear-attention layers"):
        rollout.generate(ours, prompts, 2, packed=True)


@pytest.mark.parametrize("arch,kind", [("qwen3_next", "moba"), ("qwen3_next", "nsa"), ("falcon_h1", "moba"),
                                       ("falcon_h1", "nsa"), ("nemotron_h", "nsa"), ("minimax", "moba"),
                                       ("minimax", "nsa"), ("zamba2", "nsa")])
def test_rollout_with_linear_attention_layers(arch, kind, device):
    """A hybrid (Qwen3-Next: a linear-attention layer, whose cache is a recurrent state, then a full one under MoBA
    or NSA; Falcon-H1: a Mamba mixer beside the attention in every layer, its cache layers holding keys and values
    and a recurrent state; Nemotron-H: a Mamba layer, then an attention one without RoPE; Zamba2: Mamba layers, two
    of them with an attention block they share, which NSA's module becomes): the rollout prefills a
    padded batch (a packed row would mix the prompts in that state) and equals per-prompt generate, log-probs too;
    packed=True is refused. MiniMax-M1 (a lightning-attention layer, then a full one) decodes with InPlaceCache's form
    of its own cache class; where transformers gives another model one (transformers 4.57's hybrids), the rollout
    refuses it."""
    cfg = tiny_config(arch)
    if cfg is None:
        pytest.skip(f"this transformers has no {arch} model")
    if arch in V5_ARCHS and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"MoBA and NSA take {arch} under transformers >= 5 (test_hf checks the refusal)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval().to(device)
    if kind == "nsa":
        from longattn.nsa import NSAConfig

        longattn.hf.swap_attention(model, "nsa", config=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=4,
                                                                  window=16))
    else:
        longattn.hf.swap_attention(model, "moba", block_size=16, topk=2)
    # (NSA: one block between the first and the two local ones picked by score)
    prompts = [torch.randint(1, 128, (n,)) for n in (45, 70)]
    if not model._supports_default_dynamic_cache() and arch != "minimax":
        # (transformers 4.57 gives the hybrids a cache class of its own; MiniMax-M1's InPlaceCache takes)
        with pytest.raises(ValueError, match="needs a cache class of its own"):
            rollout.generate(model, prompts, 5)
        return
    res = rollout.generate(model, prompts, 5, stop_at_eos=False)
    assert not res.prefill_packed
    _assert_generate_each(model, prompts, res)
    with pytest.raises(ValueError, match="linear-attention layers"):
        rollout.generate(model, prompts, 2, packed=True)


def test_mla_float8_prefill_in_columns(device, monkeypatch):
    """MLA's float8 latent cache ("auto" scale) under the padded prefill in chunks of one column (fewer tokens than
    prompts): every chunk calibrates the scale, which ends where the prefill in one forward sets it (on every
    prompt token; before, on the first column's alone)."""
    from longattn.mla import PagedLatentCache

    model = longattn.hf.swap_attention(_swapped("mla", device), "mla", cache_dtype=torch.float8_e4m3fn)
    prompts = [torch.randint(1, 128, (n,)) for n in (9, 4, 7)]
    calibrate, calls = PagedLatentCache._calibrate, []

    def spy(pc, new):
        calibrate(pc, new)
        calls.append((new.shape[0], pc.scale))

    monkeypatch.setattr(PagedLatentCache, "_calibrate", spy)
    rollout.generate(model, prompts, 4, stop_at_eos=False, prefill_chunk=2)
    layers = model.config.num_hidden_layers
    assert len(calls) == 9 * layers  # (one calibration a layer per column: 9 columns, the longest prompt's)
    assert sum(n for n, _ in calls) == sum(len(p) for p in prompts) * layers
    scales = [s for _, s in calls[-layers:]]
    calls.clear()
    rollout.generate(model, prompts, 4, stop_at_eos=False)
    assert len(calls) == layers and [s for _, s in calls] == scales


@pytest.mark.parametrize("kind,packed,chunk", [("flash", None, None), ("flash", False, 24), ("flash", False, 3),
                                               ("moba", None, None), ("nsa", None, None)],
                         ids=["flash-packed", "flash-padded", "flash-padded-columns", "moba-packed", "nsa"])
def test_rollout_with_float8_cache(kind, packed, chunk, device, monkeypatch):
    """cache_dtype float8: the rollout decodes from a float8 cache (longattn's flash or MoBA attention or NSA's
    module reading it in their kernels): the completions and log-probs of a cache whose keys and values are rounded
    through float8 in their own dtype at the scales calibrated on the prompts or given (which differ from the
    unquantised cache's), the prefill packed or padded (NSA's; in chunks of 6 columns, or of one, fewer tokens than
    prompts: each calibrates); refused for MLA's module (which quantises its own latent cache) and transformers'
    attention."""
    from longattn.nsa import NSAConfig
    from test_hf_cache import _RoundedCache

    fp8 = torch.float8_e4m3fn
    opts = dict(moba=dict(block_size=16, topk=2), flash={},
                nsa=dict(config=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topk=3, window=16)))[kind]
    model = _model(device, kind=kind, **opts)
    prompts = [torch.randint(1, 128, (n,)) for n in (21, 14, 30, 9)]
    # the padded prefill in chunks of 6 columns (or 1): each raises the scales calibrated on those before where it must
    kw = dict(stop_at_eos=False, packed=packed, prefill_chunk=chunk)
    calibrate, raised = InPlaceLayer._calibrate, []  # (whether each calibration changed the scales of tokens held)

    def spy(layer, k, v, n):
        before = layer.k_scale, layer.v_scale
        calibrate(layer, k, v, n)
        raised.append(n > 0 and before != (layer.k_scale, layer.v_scale))

    monkeypatch.setattr(InPlaceLayer, "_calibrate", spy)
    ours = rollout.generate(model, prompts, 6, cache_dtype=fp8, **kw)
    assert any(raised) == (packed is False)
    plain = rollout.generate(model, prompts, 6, **kw)
    rounded = lambda scales: lambda model, n, dtype=None, _="auto": _RoundedCache(model.config, fp8, scales)
    monkeypatch.setattr(rollout, "_decoding_cache", rounded("auto"))
    ref = rollout.generate(model, prompts, 6, **kw)
    assert ours.prefill_packed == ref.prefill_packed == (packed is None and kind != "nsa")
    assert ours.completions == ref.completions
    lps = lambda r: torch.tensor(sum(r.logprobs, []))
    torch.testing.assert_close(lps(ours), lps(ref), atol=1e-4, rtol=1e-4)
    assert (lps(ours) - lps(plain)).abs().max() > 1e-3  # (the quantisation shows)
    if (kind, packed) != ("flash", None):
        return
    # a given scale (small: the larger keys and values saturate at 448 / 1024)
    monkeypatch.undo()
    given = rollout.generate(model, prompts, 6, stop_at_eos=False, cache_dtype=fp8, cache_scales=2.0 ** -10)
    monkeypatch.setattr(rollout, "_decoding_cache", rounded(2.0 ** -10))
    ref = rollout.generate(model, prompts, 6, stop_at_eos=False)
    assert given.completions == ref.completions
    torch.testing.assert_close(lps(given), lps(ref), atol=1e-4, rtol=1e-4)
    assert (lps(given) - lps(ours)).abs().max() > 1e-3
    # finished rows leaving the batch and the float8 cache (its rows selected through their bytes)
    monkeypatch.undo()
    eos = ours.completions[1][1]
    dropped = rollout.generate(model, prompts, 6, eos_token_id=eos, cache_dtype=fp8)
    for comp, want in zip(dropped.completions, ours.completions):
        assert comp == want[:want.index(eos) + 1 if eos in want else len(want)]
    for other, opts in (("mla", {}), ("moba", dict(block_size=16, topk=2))):  # (MoBA: the latent cached, tf 5)
        mla = longattn.hf.swap_attention(AutoModelForCausalLM.from_config(tiny_deepseek_v3_config()).to(device),
                                         other, **opts)
        with pytest.raises(ValueError, match="does not serve MLA models"):
            rollout.generate(mla, prompts, 2, cache_dtype=fp8)
    sliding = AutoModelForCausalLM.from_config(transformers.MistralConfig(  # (every layer keeps a window: none quantised)
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8))
    with pytest.raises(ValueError, match="would quantise none of this model's cache layers"):
        rollout.generate(longattn.hf.swap_attention(sliding.to(device), "flash"), prompts, 2, cache_dtype=fp8)
    with pytest.raises(TypeError, match="cache_dtype must be None"):
        rollout.generate(model, prompts, 2, cache_dtype=torch.float16)
    pairs = ((1.0, 1.0) for _ in range(8))  # (one pass over them)
    assert rollout.generate(model, prompts, 6, stop_at_eos=False, cache_dtype=fp8, cache_scales=pairs).completions == \
        rollout.generate(model, prompts, 6, stop_at_eos=False, cache_dtype=fp8, cache_scales=1.0).completions
    with pytest.raises(ValueError, match="cache_scales applies to a float8 cache"):
        rollout.generate(model, prompts, 2, cache_scales=[(1.0, 1.0)] * 2)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="this model's attention is 'sdpa'"):
        rollout.generate(model, prompts, 2, cache_dtype=fp8)
