"""Batched rollouts for RL: prefill prompts of different lengths, then decode with a KV cache.

``generate(model, prompts, max_new_tokens)`` returns the completions and the log-probability of every
generated token; ``num_samples=n`` samples n completions of each prompt (GRPO-style groups) from one prefill of
it, the cache's rows then repeated for its samples. With longattn's attention implementations ("moba",
"longattn") the prompts are packed into one row without padding (position_ids restart at 0 per prompt, the
attention runs varlen) and the packed KV cache is then split into a left-padded batch cache for decoding; other
models (MLA-swapped DeepSeek-V3 included) prefill a left-padded batch, whose padding the attention skips through
the mask. The decoding cache (:class:`longattn.hf.cache.InPlaceCache`) has room to spare (up to the longest prompt
plus the new tokens) and each step writes its tokens in place (transformers' default cache copies itself whole at
every step). No decoding step waits for the GPU: its padding mask is marked (``longattn.hf.known_left_padding``)
rather than read back, and each step's tokens are read once the next step's forward is queued.
"""
from __future__ import annotations

import inspect
import itertools
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .hf.attention import known_left_padding
from .hf.cache import InPlaceCache, calibrating_writes, check_cache_dtype, check_cache_scales
from .kernels.utils import check_bool, device_tensor, read_back_later

PACKED_IMPLEMENTATIONS = ("moba", "longattn")


@dataclass
class Rollout:
    """Generated tokens (up to and including the first eos or stop sequence) and their log-probabilities, per
    completion: with ``num_samples`` n, completion ``i * n + j`` is the j-th sample of prompt i."""
    completions: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prefill_packed: bool = False
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    device: Optional[torch.device] = None  # the model's
    # what training_batch checks its prompts against, and the layout it picks: the prompts' lengths and their tokens
    # (one after another, on the host; None: not checked), the samples per prompt, whether sequences packed into one
    # row train as they would alone (see _trains_packed)
    prompt_lengths: list = field(default_factory=list)
    prompt_tokens: Optional[torch.Tensor] = None
    num_samples: int = 1
    packable: bool = True

    def training_batch(self, prompts: Sequence, device=None, padded: Optional[bool] = None) -> dict:
        """The prompts and their completions as the input of a training forward of the model that generated them
        (transformers' causal LM loss then covers the completions only). Packed (default where the model's layers allow
        it): one row, ``input_ids`` and ``position_ids`` (restarting at 0 with each sequence) ``(1, N)``, each sequence
        attended on its own in every longattn kind (sliding-window layers too) and transformers' flash attention,
        forward and backward. Padded (``padded=True``, and where a packed row's sequences would reach each other: under
        transformers' SDPA or eager attention, which attend across the row whenever the forward keeps a cache, as it
        does by default, and always under transformers 4, and in hybrids, whose linear-attention or Mamba state would
        run on from one sequence into the next): a row per completion, right-padded, ``input_ids``,
        ``position_ids`` and ``attention_mask`` ``(B, L)``. ``labels`` are the completion tokens and -100 elsewhere
        (prompts, padding; each sequence starts with a prompt token, so no loss crosses sequences);
        ``completion_spans``: (row, start, end) of each completion. ``prompts``: those given to :func:`generate`
        (completion i belongs to prompt ``i // num_samples``); on ``device``, default the model's.

        ``logits = model(**{k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in
        batch}).logits``: the log-prob of completion i's token at position t of its row r is
        ``log_softmax(logits[r, t - 1])[input_ids[r, t]]``, t in its span."""
        check_bool(padded, "padded", allow_none=True)
        device = torch.device(device) if device is not None else self.device or torch.device("cpu")
        prompts = _as_tensors(prompts, device, None)
        lens = [p.numel() for p in prompts]
        if lens != self.prompt_lengths:
            raise ValueError(f"prompts must be those given to generate (of {self.prompt_lengths} tokens), got "
                             f"prompts of {lens} tokens")
        if self.prompt_tokens is not None:
            same = (torch.cat(prompts).cpu() == self.prompt_tokens).split(lens)
            bad = next((i for i, s in enumerate(same) if not s.all()), None)
            if bad is not None:
                raise ValueError(f"prompts must be those given to generate, in their order: prompts[{bad}] differs")
        if padded is False and not self.packable:
            raise ValueError("padded=False: a packed row's sequences would reach each other in this model (its "
                             "attention is transformers' SDPA or eager one, which attends across the row when the "
                             "forward keeps a cache, or some of its layers carry a recurrent state from one sequence "
                             "into the next); take padded rows")
        seqs = [(prompts[i // self.num_samples], torch.tensor(comp, dtype=torch.long, device=device))
                for i, comp in enumerate(self.completions)]
        labels = [torch.cat([torch.full_like(p, -100), c]) for p, c in seqs]
        ids = [torch.cat([p, c]) for p, c in seqs]
        if padded or not self.packable:
            width = max(x.numel() for x in ids)
            pad = lambda xs, value: torch.stack([torch.cat([x, x.new_full((width - x.numel(),), value)]) for x in xs])
            return dict(input_ids=pad(ids, 0), labels=pad(labels, -100),
                        position_ids=torch.arange(width, device=device).expand(len(ids), width).contiguous(),
                        attention_mask=pad([torch.ones_like(x) for x in ids], 0),
                        completion_spans=[(r, p.numel(), p.numel() + c.numel()) for r, (p, c) in enumerate(seqs)])
        starts = [0, *itertools.accumulate(x.numel() for x in ids)]
        return dict(input_ids=torch.cat(ids)[None], labels=torch.cat(labels)[None],
                    position_ids=torch.cat([torch.arange(x.numel(), device=device) for x in ids])[None],
                    completion_spans=[(0, a + p.numel(), a + p.numel() + c.numel()) for a, (p, c) in zip(starts, seqs)])


def _as_tensors(prompts, device, vocab: Optional[int]) -> list:
    """The prompts as 1-D int64 tensors on ``device``, checked: none empty, every id in [0, vocab) (an id outside
    would index the embedding out of bounds: a device-side assertion on a GPU)."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a sequence of token-id sequences, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        try:
            t = torch.as_tensor(p)
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is None or isinstance(p, (str, bytes)) or t.dim() != 1 or \
                (t.numel() and (t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex)):
            raise TypeError(f"prompts[{i}] must be a 1-D sequence of int token ids, got "
                            f"{type(p).__name__ if t is None else f'{t.dtype} of shape {tuple(t.shape)}'}")
        if t.numel() == 0:
            raise ValueError(f"prompts[{i}] is empty")
        out.append(t.to(device=device, dtype=torch.long))
    if not out:
        raise ValueError("prompts must hold at least one prompt")
    if vocab is not None:
        bounds = torch.stack([torch.stack(t.aminmax()) for t in out]).tolist()  # (one read back)
        bad = next((i for i, (a, b) in enumerate(bounds) if a < 0 or b >= vocab), None)
        if bad is not None:
            raise ValueError(f"prompts[{bad}] holds token ids outside [0, {vocab}) (the model's vocab_size)")
    return out


def _own_modules(model) -> bool:
    """Whether the model's attention is longattn's MLA or NSA module: each keeps state of its own beside the cache
    (latent pages, compressed blocks) for the rows it prefilled, which a cache made from a packed row's keys and
    values would not have."""
    return any(type(m).__name__ in ("MLAAttention", "NativeSparseAttention") for m in model.modules())


def _attn_impl(model):
    """The attention implementation of the model's language model (a multimodal model's text config holds the one
    swap_attention set; its vision encoder keeps its own)."""
    cfg = model.config
    return getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "_attn_implementation", None)


def _uses_packing(model) -> bool:
    impl = _attn_impl(model)
    return impl in PACKED_IMPLEMENTATIONS and not _own_modules(model) and _keys_values_cache(model)


def _keys_values_cache(model) -> bool:
    """Whether the model's transformers cache keeps every token's keys and values in every layer, and nothing else:
    not where some layers keep a window (sliding-window layers: gpt-oss, Mistral) or a recurrent state (the
    linear-attention or Mamba layers of hybrids: Qwen3-Next, Nemotron-H; Falcon-H1's layers hold both keys and values
    and a Mamba state). The packed prefill, which splits every layer's cache of the packed row by prompt, needs it (a
    recurrent state after a packed row would mix the prompts). Not where the model takes a cache class of its own
    (MiniMax-M1: its lightning-attention layers' states)."""
    from transformers import DynamicLayer

    layers = _default_cache_layers(model)
    return layers is not None and all(isinstance(layer, DynamicLayer) and not getattr(layer, "is_sliding", False) and
                                      not hasattr(layer, "update_recurrent_state") for layer in layers)


def _default_cache_layers(model):
    """The layers of the cache the model decodes with by default (transformers' DynamicCache, as its config lays it
    out), or None where it takes a cache class of its own."""
    from transformers import DynamicCache

    if not getattr(model, "_supports_default_dynamic_cache", lambda: True)():
        return None
    return getattr(DynamicCache(config=model.config), "layers", ())


def _trains_packed(model) -> bool:
    """Whether sequences packed into one row (position_ids restarting at 0 with each) run in a forward of the model as
    they would alone: where its attention takes the row apart by its position_ids (longattn's attention functions and
    NSA / MLA modules, transformers' flash attention; not its SDPA or eager attention, which attend across the row
    whenever the forward keeps a cache, as it does by default, and always under transformers 4) and none of its layers
    carries a recurrent state from token to token (the linear-attention or Mamba layers of hybrids: Qwen3-Next,
    Nemotron-H, Falcon-H1; MiniMax-M1's lightning attention, which takes a cache class of its own)."""
    impl = _attn_impl(model)
    if not (impl in PACKED_IMPLEMENTATIONS or _own_modules(model) or
            isinstance(impl, str) and ("flash_attention" in impl or "flash-attn" in impl)):
        return False
    layers = _default_cache_layers(model)
    return layers is not None and not any(hasattr(layer, "update_recurrent_state") for layer in layers)


def _cache_kw(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in recent 5.x releases; use what the model takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _last_logits_kw(model, keep) -> dict:
    """Ask the model for the logits of the ``keep`` positions only (``logits_to_keep``: the last n, or a 1-D tensor
    of positions) where it takes that argument: all of them would be (tokens x vocabulary) floats, tens of GB for
    long prompts."""
    return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _left_pad(rows: list, length: int, value=0) -> torch.Tensor:
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, length - r.shape[0]:] = r
    return out


def _prompt_groups(lens: list, chunk: Optional[int]) -> list:
    """Consecutive prompts in groups of at most ``chunk`` tokens (a longer prompt alone); all in one without."""
    if chunk is None:
        return [list(range(len(lens)))]
    groups, size = [[]], 0
    for i, n in enumerate(lens):
        if groups[-1] and size + n > chunk:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def _packed_prefill(model, prompts, lens, capacity: int, chunk: Optional[int] = None, cache_dtype=None,
                    cache_scales="auto"):
    """Prefill the prompts packed in a row (a row per group of ``chunk`` tokens at most, a longer prompt alone in a
    row it fills ``chunk`` tokens at a time); return last-token logits (B, V) and a left-padded cache that expects
    ``capacity`` tokens per row at most."""
    device = prompts[0].device
    logits, ks, vs = [], [], []  # ks[layer][prompt]: (n, H, D)
    for group in _prompt_groups(lens, chunk):
        glens = [lens[i] for i in group]
        ids = torch.cat([prompts[i] for i in group])[None]
        pos = torch.cat([torch.arange(n, device=device) for n in glens])[None]
        packed = InPlaceCache(config=model.config, max_cache_len=ids.shape[1])  # (chunks written in place)
        step = chunk if len(group) == 1 and chunk is not None else ids.shape[1]
        last = torch.tensor(glens, device=device).cumsum(0) - 1  # the prompts' last tokens in the row
        for a in range(0, ids.shape[1], step):  # (a row of one prompt after its first chunk: against its cache)
            ends = last - a  # (in the chunk)
            keep = _last_logits_kw(model, ends if a + step >= ids.shape[1] else 1)
            out = model(input_ids=ids[:, a:a + step], position_ids=pos[:, a:a + step], use_cache=True,
                        **{_cache_kw(model): packed}, **keep)
        logits.append(out.logits[0] if keep else out.logits[0, ends])
        for layer_idx, layer in enumerate(packed.layers):
            if layer_idx == len(ks):
                ks.append([])
                vs.append([])
            ks[layer_idx] += layer.keys[0].transpose(0, 1).split(glens)  # per prompt (n, H, D)
            vs[layer_idx] += layer.values[0].transpose(0, 1).split(glens)
        del packed, out
    cache = _decoding_cache(model, capacity, cache_dtype, cache_scales)
    longest = max(lens)
    for layer_idx, (k, v) in enumerate(zip(ks, vs)):
        cache.update(_left_pad(k, longest).transpose(1, 2), _left_pad(v, longest).transpose(1, 2), layer_idx)
        ks[layer_idx] = vs[layer_idx] = None  # (B, H, longest, D) in the cache: the per-prompt parts go
    return torch.cat(logits), cache


def _decoding_cache(model, max_cache_len: int, cache_dtype=None, cache_scales="auto"):
    """The cache the rollout decodes with: ``InPlaceCache.for_model`` (benchmarks put another in its place)."""
    return InPlaceCache.for_model(model, max_cache_len, cache_dtype, cache_scales)


def _padded_prefill(model, prompts, lens, capacity: int, chunk: Optional[int] = None, cache_dtype=None,
                    cache_scales="auto"):
    """Prefill the prompts left-padded to the longest (``chunk`` tokens of the batch at a time: as many columns
    as make them, one at least); return last-token logits (B, V) and the cache."""
    longest = max(lens)
    ids = _left_pad(prompts, longest)
    mask = _left_pad([torch.ones_like(p) for p in prompts], longest)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = _decoding_cache(model, capacity, cache_dtype, cache_scales)
    step = longest if chunk is None else max(1, chunk // len(prompts))
    with calibrating_writes():  # (a float8 cache's "auto" scales calibrated on every chunk, of one column too)
        for a in range(0, longest, step):
            out = model(input_ids=ids[:, a:a + step], attention_mask=mask[:, :a + step],
                        position_ids=pos[:, a:a + step], use_cache=True, **{_cache_kw(model): cache},
                        **_last_logits_kw(model, 1))
    return out.logits[:, -1], cache


def _next_tokens(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
                 min_p: Optional[float], generator: Optional[torch.Generator], processed: bool):
    """Greedy (temperature 0) or sampled next tokens (B,) from logits (B, V): softmax at ``temperature`` over the
    ``top_k`` highest logits, the smallest set of the most likely tokens whose probability reaches ``top_p``, and the
    tokens at least ``min_p`` times as likely as the most likely one; and their log-probabilities (B,) float32: the
    model's at temperature 1, or with ``processed`` those of the distribution they were drawn from (0 when greedy)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, (torch.zeros(tok.shape, device=tok.device) if processed else
                     torch.log_softmax(logits.float(), -1).gather(1, tok[:, None]).squeeze(1))
    scores = logits.float()
    scores = (scores - scores.amax(-1, keepdim=True)) / temperature  # (<= 0: no overflow at a tiny temperature)
    if top_k is not None and top_k < scores.shape[-1]:
        scores = scores.masked_fill(scores < scores.topk(top_k, -1).values[:, -1:], float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = scores.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs >= top_p  # the mass before them already reaches top_p (never the first)
        scores = scores.scatter(-1, order, ordered.masked_fill(beyond, float("-inf")))
    if min_p is not None and min_p > 0:  # (the most likely token's score is 0: p / p_max = exp(score))
        scores = scores.masked_fill(scores < math.log(min_p), float("-inf"))
    tok = torch.multinomial(scores.softmax(-1), 1, generator=generator)
    return tok.squeeze(1), torch.log_softmax(scores if processed else logits.float(), -1).gather(1, tok).squeeze(1)


@torch.no_grad()
def generate(model, prompts: Sequence, max_new_tokens: int, *, eos_token_id: Optional[int | Sequence[int]] = None,
             stop_at_eos: bool = True, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
             min_p: Optional[float] = None, num_samples: int = 1, packed: Optional[bool] = None,
             drop_finished: bool = True, prefill_chunk: Optional[int] = None, logprobs_mode: str = "raw",
             stop_sequences: Optional[Sequence[Sequence[int]]] = None,
             cache_dtype: Optional[torch.dtype] = None, cache_scales="auto") -> Rollout:
    """Sample (or greedily decode, ``temperature=0``) up to ``max_new_tokens`` tokens for every prompt.

    Args:
        model: a transformers causal LM (typically after :func:`longattn.hf.swap_attention`).
        prompts: token-id sequences (lists or 1-D tensors) of any lengths.
        eos_token_id: stop a sequence after this token, or any of these (default: ``model.config.eos_token_id``,
            an int or a list as Qwen's and Llama 3's configs give); ``stop_at_eos=False`` generates
            ``max_new_tokens`` tokens but for ``stop_sequences``.
        stop_sequences: token-id sequences (each non-empty) that end a completion once it ends with one of them
            (say the tokens of ``"</answer>"``; the completion's own tokens, never the prompt's), kept in it as an
            eos is; default none.
        temperature: 0 for greedy decoding, else softmax temperature for sampling.
        top_k, top_p: when sampling, only the ``top_k`` most likely tokens (default: all), and of those the smallest
            set whose probability (at ``temperature``) reaches ``top_p`` (nucleus sampling; default 1: all); of those
            the tokens at least ``min_p`` times as likely as the most likely one (default 0: all).
        generator: the random generator of the sampling (on the model's device), for reproducible rollouts.
        num_samples: completions per prompt (a GRPO group): each prompt is prefilled once, then its cache rows and
            last logits are repeated for its samples, which decode side by side (the prompts' prefill is not
            repeated, as it would be with each prompt listed ``num_samples`` times; the results are the same).
            Greedy samples, all alike, are decoded once.
        packed: force (True) or forbid (False) the packed prefill; default: packed when the model uses
            longattn's attention functions and its cache keeps every token's keys and values (no sliding-window
            layers, no linear-attention ones: hybrids prefill a padded batch). True is refused (ValueError) where
            that does not hold, and for longattn's MLA and NSA modules (state of their own beside the cache).
        prefill_chunk: at most this many prompt tokens per forward of the prefill (default: all in one): long
            prompts then prefill without the model's activations for all their tokens at once (its MLPs', every
            layer's queries). Packed, the prompts go in rows of that many tokens at most, a longer prompt alone in a
            row that it fills that many tokens at a time against its cache; padded, the batch takes as many
            columns at a time as make that many tokens (one at least). The results are the same.
        drop_finished: once a quarter of the batch has finished (eos), take the finished sequences out of the
            batch and the cache (one copy of the cache, ``reorder_cache``), so that later steps decode only the
            live ones; rollout lengths vary widely. Greedy results are the same either way; sampled ones are
            drawn from the same distributions, but not the same draws (the generator's numbers go to the rows
            decoded).
        logprobs_mode: ``"raw"`` (default): the log-probabilities of the model at temperature 1; ``"processed"``:
            those of the distribution each token was drawn from (temperature, top_k, top_p and min_p applied: the
            behaviour policy's, for importance ratios; 0 when greedy).
        cache_dtype: None (default: the model's), or ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``: decode with the
            keys and values cached in float8 (``InPlaceCache``'s ``cache_dtype``: half the cache's memory and of
            the bytes a decoding step reads; each layer's keys and values at the scales of ``cache_scales``: see
            ``InPlaceCache``, by default calibrated on the prompts' prefill, each chunk of it), for models whose
            attention is longattn's flash, MoBA or NSA attention (``swap_attention(model, "flash" / "moba" /
            "nsa")``); the prompts' prefill attends to the unquantised keys (packed) or to the quantised ones (padded:
            hybrids, sliding-window models, NSA's module). The completions and log-probs are those of the quantised
            cache (not the 16-bit model's: the log-probs of a training forward differ by the quantisation).
            ValueError for another attention, for MLA models (MLA's module quantises its latent cache itself:
            ``swap_attention(model, "mla", cache_dtype=...)``) and where no layer's cache would be quantised.
    Returns:
        :class:`Rollout` with ``completions[i]`` (token ids) and ``logprobs[i]`` (log p of each generated
        token, see ``logprobs_mode``), ``len(prompts) * num_samples`` of each, the samples of a prompt one after
        another. Greedy completions equal per-prompt ``model.generate``.
    """
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
    check_bool(stop_at_eos, "stop_at_eos")
    check_bool(drop_finished, "drop_finished")
    check_bool(packed, "packed", allow_none=True)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1):
        raise ValueError(f"min_p must lie in [0, 1] or be None, got {min_p!r}")
    if logprobs_mode not in ("raw", "processed"):
        raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
    stops = _stop_sequences(stop_sequences)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive int or None, got {prefill_chunk!r}")
    check_cache_dtype(cache_dtype)
    cache_scales = check_cache_scales(cache_scales, cache_dtype)
    if cache_dtype is not None:
        _check_float8_cache_model(model)
    if num_samples > 1 and temperature == 0:  # greedy samples are all alike: each prompt decoded once, then copied
        res = generate(model, prompts, max_new_tokens, eos_token_id=eos_token_id, stop_at_eos=stop_at_eos,
                       packed=packed, drop_finished=drop_finished, prefill_chunk=prefill_chunk,
                       logprobs_mode=logprobs_mode, stop_sequences=stops, cache_dtype=cache_dtype,
                       cache_scales=cache_scales)
        res.completions = [list(c) for c in res.completions for _ in range(num_samples)]
        res.logprobs = [list(lp) for lp in res.logprobs for _ in range(num_samples)]
        res.num_samples = num_samples
        return res
    device = next(model.parameters()).device
    prompts = _as_tensors(prompts, device, getattr(model.config, "vocab_size", None))
    lens = [p.numel() for p in prompts]
    prompt_tokens = torch.cat(prompts).cpu()  # (training_batch checks its prompts against them)
    B = len(prompts)
    if eos_token_id is None:
        eos_token_id = getattr(model.config, "eos_token_id", None)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id if isinstance(eos_token_id, (list, tuple)) \
        else [] if eos_token_id is None else [None]
    if any(isinstance(e, bool) or not isinstance(e, int) for e in eos):
        raise ValueError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}")
    eos = set(eos) if stop_at_eos else set()
    use_packed = _uses_packing(model) if packed is None else packed
    if use_packed and packed and not _keys_values_cache(model):
        raise ValueError("packed=True needs a cache that keeps every token's keys and values in every layer; this "
                         "model's has sliding-window or linear-attention layers")
    if use_packed and packed and _attn_impl(model) not in PACKED_IMPLEMENTATIONS:
        raise ValueError(f"packed=True needs longattn's attention functions (swap_attention 'flash' or 'moba'), which "
                         f"take a packed row's prompts apart by their positions; this model's attention "
                         f"({_attn_impl(model)!r}) would attend from one prompt to another")
    if use_packed and packed and _own_modules(model):
        raise ValueError("packed=True cannot serve longattn's MLA or NSA attention modules (their state beside the "
                         "cache is kept per row they prefill): they prefill a padded batch (packed=None or False)")
    t0 = _clock(device)
    # the most tokens the cache holds: the longest prompt (rows are left-padded to it) and every new token but the
    # last (never fed)
    logits, cache = (_packed_prefill if use_packed else _padded_prefill)(
        model, prompts, lens, max(lens) + max_new_tokens - 1, prefill_chunk, cache_dtype, cache_scales)
    longest = max(lens)
    # (boolean: transformers takes it as it is, so that the attention finds it marked by known_left_padding)
    mask = _left_pad([torch.ones_like(p, dtype=torch.bool) for p in prompts], longest)
    real = list(lens)  # each row's real tokens in the mask (the rest left padding), known here without reading it
    next_pos = torch.tensor(lens, device=device)
    if num_samples > 1:  # each prompt's row repeated for its samples: one copy of the cache, no second prefill
        rep = torch.arange(B, device=device).repeat_interleave(num_samples)
        cache.reorder_cache(rep)
        logits, mask, next_pos = logits[rep], mask[rep], next_pos[rep]
        real = [n for n in real for _ in range(num_samples)]
        B *= num_samples
    t1 = _clock(device)  # the prefill's time includes the samples' copies of the cache
    done = [False] * B
    rows = list(range(B))  # the completion each row of the decoded batch belongs to
    result = Rollout([[] for _ in range(B)], [[] for _ in range(B)], use_packed, t1 - t0, device=device,
                     prompt_lengths=lens, prompt_tokens=prompt_tokens, num_samples=num_samples,
                     packable=_trains_packed(model))
    for step in range(max_new_tokens):
        tok, tok_lp = _next_tokens(logits, temperature, top_k, top_p, min_p, generator, logprobs_mode == "processed")
        # the step's tokens and log-probs copied to the host, read once the next step's forward is queued: the host
        # prepares that forward while the GPU samples this step, and the GPU then runs it while the host records
        # these tokens (a row that has just ended takes one forward more, its output dropped)
        tokens = read_back_later(tok, tok_lp)
        last = step == max_new_tokens - 1
        if not last:
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=device)], 1)
            real = [n + 1 for n in real]
            known_left_padding(mask, real)  # (its padding is not read back: nothing in the forward waits)
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None], use_cache=True,
                        **{_cache_kw(model): cache})
            next_pos = next_pos + 1
            logits = out.logits[:, -1]
        host_tok, host_lp = (t.tolist() for t in tokens())
        for j, i in enumerate(rows):
            if not done[i]:
                comp = result.completions[i]
                comp.append(int(host_tok[j]))
                result.logprobs[i].append(float(host_lp[j]))
                done[i] = comp[-1] in eos or any(comp[-len(stop):] == stop for stop in stops)
        live = [j for j, i in enumerate(rows) if not done[i]]
        if not live or last:
            break
        if drop_finished and 4 * (len(rows) - len(live)) >= len(rows):
            keep = device_tensor(live, torch.long, device)
            cache.reorder_cache(keep)
            logits, mask, next_pos = logits[keep], mask[keep], next_pos[keep]
            real = [real[j] for j in live]
            rows = [rows[j] for j in live]
    result.decode_seconds = _clock(device) - t1
    return result


def _check_float8_cache_model(model) -> None:
    """ValueError unless the model's attention decodes from a float8 cache (``cache_dtype``): longattn's flash or
    MoBA attention, NSA's module; not MLA's module, which quantises its own latent cache, nor transformers 5's MLA
    models under MoBA, whose cache holds the latent their attention decompresses, nor a model whose cache would
    quantise nothing (every layer sliding or holding a recurrent state)."""
    from .hf.swap import MLA_ARCHS

    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    mla = any(type(m).__name__ == "MLAAttention" for m in model.modules())
    if mla or getattr(text, "model_type", None) in MLA_ARCHS:
        raise ValueError("cache_dtype (a float8 KV cache) does not serve MLA models: their cache holds the latent "
                         "(transformers 5) or MLA's module keeps its own, which it quantises itself: "
                         "swap_attention(model, 'mla', cache_dtype=...)")
    if _attn_impl(model) not in PACKED_IMPLEMENTATIONS:
        raise ValueError("cache_dtype (a float8 KV cache) needs longattn's flash, MoBA or NSA attention "
                         "(swap_attention(model, 'flash' / 'moba' / 'nsa')), whose decoding reads float8 caches; this "
                         f"model's attention is {_attn_impl(model)!r}")
    from transformers import DynamicLayer

    layers = _default_cache_layers(model)  # (None: a cache class of the model's own, MiniMax-M1's, in-place too)
    if layers is not None and not any(type(layer) is DynamicLayer for layer in layers):
        raise ValueError("cache_dtype (a float8 KV cache) would quantise none of this model's cache layers (each "
                         "keeps a window or a recurrent state)")


def _stop_sequences(stop_sequences) -> list:
    """The stop sequences as lists of ints, checked: a sequence of non-empty int sequences, or None (none)."""
    if stop_sequences is None:
        return []
    def bad():
        return ValueError(f"stop_sequences must be a sequence of non-empty sequences of int token ids, got "
                          f"{stop_sequences!r}")

    if isinstance(stop_sequences, (str, bytes, torch.Tensor)) or not hasattr(stop_sequences, "__iter__"):
        raise bad()
    stops = []
    for stop in stop_sequences:
        if isinstance(stop, torch.Tensor):  # (a 1-D tensor of ids)
            stop = stop.tolist() if stop.dim() == 1 else None
        if stop is None or isinstance(stop, (str, bytes)) or not hasattr(stop, "__iter__"):
            raise bad()
        stop = [t.item() if isinstance(t, torch.Tensor) and t.dim() == 0 else t for t in stop]
        if not stop or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 for t in stop):
            raise bad()
        stops.append([int(t) for t in stop])
    return stops


def _clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


__all__ = ["generate", "Rollout"]
