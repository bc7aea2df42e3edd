"""Attention functions for transformers' ``AttentionInterface``: ``"moba"`` and ``"longattn"``.

transformers calls them with q ``(B, Hq, Tq, D)``, k/v ``(B, Hkv, Tk, D)`` (the cache already appended)
and expects ``(B, Tq, Hq, D)`` back. Left padding runs in place (flash attention's ``left_pad``, and
MoBA's steps of up to 16 new tokens after a cached prefix through :func:`longattn.moba.moba_decode`); other
padding masks (right padding, and MoBA's) are handled by unpadding to the varlen layout; a batch of one
row of packed sequences (position_ids restarting at 0, or transformers' ``cu_seq_lens_q``; no mask) runs
through the varlen path with one sequence per segment.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import transformers

from ..kernels.decode import MAX_QUERY_TOKENS, flash_decode
from ..kernels.flash import flash_attention
from ..kernels.utils import FLOAT8_DTYPES, device_tensor
from ..moba.ops import moba_attention, moba_decode, pool_cache_blocks
from .cache import dequant_scale, dequantised, quantised_cache

MOBA_DEFAULT_BLOCK_SIZE = 512
MOBA_DEFAULT_TOPK = 3
MOBA_DECODE_TOKENS = 16  # new tokens per row up to which a call after a cached prefix runs moba_decode in place


_last_packing = (None, None, None)  # (weak reference to the tensor read, its version and length, what it held)


def packed_segments(kwargs: dict, batch: int, q_len: int, kv_len: int):
    """The sequences packed into a single row without a cache prefix (training on packed sequences, a packed
    prefill): from transformers' ``cu_seq_lens_q`` keyword (``DataCollatorWithFlattening(return_flash_attn_kwargs=
    True)``) or from ``position_ids`` restarting at 0. Returns ``(cu_seqlens, lengths)``: int32 on the device and a
    host list, or ``(None, None)`` for an ordinary row. Reading them is a host synchronisation; every layer gets the
    same tensor, so what the last call read is reused. Raises ValueError for boundaries that do not tile the row."""
    global _last_packing
    cu_kw, pos = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
    src = cu_kw if cu_kw is not None else pos
    if src is None or batch != 1 or q_len != kv_len or q_len < 2:
        return None, None
    if cu_kw is None and (pos.dim() != 2 or pos.shape != (1, q_len)):
        return None, None
    ref, key, found = _last_packing
    if ref is None or ref() is not src or key != (src._version, q_len):
        if cu_kw is not None:
            bounds = cu_kw.flatten().tolist()
            if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q_len or \
                    any(b <= a for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f"cu_seq_lens_q must rise strictly from 0 to the {q_len} tokens of the packed row, "
                                 f"got {bounds}")
        else:
            bounds = torch.nonzero(pos[0] == 0).flatten().tolist() + [q_len]  # one synchronisation
            if len(bounds) == 1:
                bounds = [0, q_len]  # no position 0: one ordinary sequence
            elif bounds[0] != 0:
                raise ValueError("packed position_ids must start every sequence at 0, including the first")
        lens = [b - a for a, b in zip(bounds, bounds[1:])]
        cu = cu_kw.flatten().to(torch.int32) if cu_kw is not None else device_tensor(bounds, torch.int32, src.device)
        found = (None, None) if len(lens) == 1 else (cu, lens)
        _last_packing = (weakref.ref(src), (src._version, q_len), found)
    return found


def mark_packed(cache, layer_idx: int) -> None:
    """Record that ``layer_idx`` filled ``cache`` from a packed row (several sequences in one row): its state then
    belongs to no single sequence, and :func:`check_not_packed` refuses to decode from it."""
    side_cache(cache, "_longattn_packed", lambda store, beam_idx: None)[layer_idx] = True


def check_not_packed(cache, layer_idx: int) -> None:
    if cache.__dict__.get("_longattn_packed", {}).get(layer_idx):
        raise ValueError("this cache was filled by a packed row (several sequences in one row, position_ids "
                         "restarting at 0): decoding cannot continue it; prefill a batch (left padding) instead")


HOLES = ("attention_mask must mark one contiguous run of real tokens per row (left or right padding); masks with "
         "holes are not supported by longattn's attention")


def _unpad(mask: torch.Tensor, q_len: int):
    """Row indices and cu_seqlens of the real tokens of a (B, kv_len) padding mask, for keys and queries.

    Every row's real tokens must be contiguous, and the queries (the last q_len positions) must end where
    the keys end, so that query i still sits at key position Tk - Tq + i after unpadding.
    """
    mask = mask.bool()
    kv_len = mask.shape[1]
    pos = torch.arange(kv_len, device=mask.device)
    n_real = mask.sum(1)
    first = torch.where(mask, pos, kv_len).min(1).values
    last = torch.where(mask, pos, -1).max(1).values
    qmask = mask[:, kv_len - q_len:]
    holes = (n_real > 0) & (last - first + 1 != n_real)
    if holes.any():
        raise ValueError(HOLES)
    n_q = qmask.sum(1)
    if ((n_q > 0) & (last != kv_len - 1) & (q_len != kv_len)).any():
        raise ValueError("with a cache, the new tokens must be the last real tokens of every row (use left "
                         "padding for generation)")
    cu_k = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu_k[1:] = n_real.cumsum(0)
    cu_q = torch.zeros_like(cu_k)
    cu_q[1:] = n_q.cumsum(0)
    return qmask, cu_q, cu_k


def padding_runs(mask: torch.Tensor) -> list:
    """``(start, length)`` of each row's real tokens under a 2-D padding mask (one host read); ValueError unless
    every row's real tokens are one contiguous run (left or right padding)."""
    mask = mask.bool()
    n = mask.sum(1)
    first = mask.int().argmax(1)
    host = torch.stack([first, n, mask.cumsum(1).gather(1, (first + n - 1).clamp(min=0)[:, None])[:, 0]]).tolist()
    if any(within != count for within, count in zip(host[2], host[1])):
        raise ValueError(HOLES)
    return list(zip(host[0], host[1]))


# what the last masks' columns held: (weak reference to a mask, its version and the columns read, what they held),
# the latest first; a few of them, as models mixing sliding-window and full-attention layers alternate two masks
_read_masks: list = []
_READ_MASKS = 4
# masks whose left padding is known on the host (the rollout's decoding steps, and the columns of them that the mask
# function hands the layers): (weak reference, its version, each row's real tokens), the latest first
_known: list = []


def known_left_padding(mask: torch.Tensor, real: list) -> None:
    """Say that ``mask`` (a 2-D boolean padding mask, as passed to the model) is left padding, row b ending in
    ``real[b]`` real tokens: longattn's mask function and attention then take its padding from here instead of
    reading the mask back to the host (a synchronisation, which would keep the host from preparing the next decoding
    step while the GPU runs this one). Holds while the mask is unchanged (and among the last few marked)."""
    kept = [e for e in _known if e[0]() is not None and e[0]() is not mask]
    _known[:] = [(weakref.ref(mask), mask._version, list(real))] + kept[:_READ_MASKS - 1]


def _known_real(mask) -> Optional[list]:
    if mask is None:
        return None
    return next((real for ref, version, real in _known if ref() is mask and mask._version == version), None)


def _remember_padding(mask: torch.Tensor, kv_len: int, found: tuple) -> None:
    key = (mask._version, kv_len)
    kept = [e for e in _read_masks if e[0]() is not None and not (e[0]() is mask and e[1] == key)]
    _read_masks[:] = [(weakref.ref(mask), key, found)] + kept[:_READ_MASKS - 1]


def mask_padding(attention_mask: Optional[torch.Tensor], kv_len: int):
    """What the last ``kv_len`` columns of a transformers 2-D padding mask hold: ``(mask, pad, real)`` with
    ``mask`` None when they are all real tokens; ``pad``, each row's padding (int32 (B,) on the mask's device), when
    they are a left-padding mask with some padding (each row's real tokens at its end: batched generation), else
    None; ``real``, each row's real tokens (a host list), unless the mask has holes or right padding (None).
    Reading a mask is a host synchronisation; every layer of a forward gets the same mask object, so what the
    last call read is reused."""
    if attention_mask is None:  # (traced by TorchDynamo: no graph break without a mask)
        return None, None, None
    return _read_padding(attention_mask, kv_len)


@torch.compiler.disable  # reads the mask on the host; TorchDynamo would guard on the memo's weak reference
def _read_padding(attention_mask: torch.Tensor, kv_len: int):
    key = (attention_mask._version, kv_len)
    found = next((e[2] for e in _read_masks if e[0]() is attention_mask and e[1] == key), None)
    if found is None:
        real = _known_real(attention_mask)
        if real is not None and kv_len <= attention_mask.shape[1]:  # (known: nothing to read)
            real = [min(n, kv_len) for n in real]
            pad = [kv_len - n for n in real]
            found = (True, device_tensor(pad, torch.int32, attention_mask.device), real) if any(pad) else \
                (False, None, real)
        else:
            found = _padding_of(attention_mask, kv_len)
        _remember_padding(attention_mask, kv_len, found)
    masks, pad, real = found
    return (attention_mask if masks else None), pad, real


def _padding_of(attention_mask: torch.Tensor, kv_len: int) -> tuple:
    """(any padding, each row's padding if left padding, each row's real tokens if left padding) of the last
    ``kv_len`` columns of a 2-D mask: one host read."""
    kmask = attention_mask[:, -kv_len:].bool()
    pad = kv_len - kmask.sum(1, dtype=torch.int32)
    left = kmask == (torch.arange(kv_len, device=kmask.device)[None, :] >= pad[:, None])
    host = torch.cat([pad, left.all().view(1).int()]).tolist()  # one synchronisation
    masks = any(host[:-1])
    return masks, pad if masks and host[-1] else None, [kv_len - p for p in host[:-1]] if host[-1] else None


def _sees_later_keys(mask_function) -> bool:
    """Whether a transformers mask function is a union with another (``or_masks``, at any depth of its and/or
    combinations; traced by TorchDynamo, which cannot read closures, at the top only): a mask that lets some queries
    see keys after them, as Gemma 3's over an image's tokens (whose full-attention layers' mask is such a union at
    the top)."""
    if torch.compiler.is_compiling():
        return getattr(mask_function, "__name__", None) == "or_mask"
    todo, seen = [mask_function], set()
    while todo:
        fn = todo.pop()
        if not callable(fn) or id(fn) in seen:
            continue
        seen.add(id(fn))
        if getattr(fn, "__name__", None) == "or_mask":
            return True
        for cell in getattr(fn, "__closure__", None) or ():  # (and_masks / or_masks keep their functions there)
            try:
                held = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            todo.extend(held if isinstance(held, (tuple, list)) else [held])
    return False


def padding_mask(*args, **kwargs):
    """transformers mask function of longattn's implementations: a 2-D padding mask, or None without padding
    (flash-attention's convention: the attention unpads itself). A mask shorter than the keys says that the cache
    is static (preallocated, its last slots not yet written) and how many tokens it holds: the attention reads
    only those. With a static cache and no padding, such a mask is made here from the position of the new tokens
    (one host read per forward), where flash-attention's function returns None. A mask marked by
    known_left_padding is not read at all (flash-attention's function reads every mask: whether it pads anything).
    ValueError for a mask that lets queries see later keys (Gemma 3's bidirectional attention among an image's
    tokens): the attention is causal."""
    from transformers.masking_utils import flash_attention_mask

    if _sees_later_keys(kwargs.get("mask_function")):
        raise ValueError("this model's attention mask lets some queries see later keys (as Gemma 3's does among an "
                         "image's tokens), which longattn's causal attention cannot honour; run such inputs with "
                         "attn_implementation='sdpa' or 'eager'")
    kv_length, q_length = kwargs.get("kv_length"), kwargs.get("q_length")
    given = kwargs.get("attention_mask")
    if _chunked_mask(kwargs) and kwargs.get("kv_offset"):
        return _chunked_cache_mask(given, kwargs)
    real = None if torch.compiler.is_compiling() else _known_real(given)
    if real is not None and kv_length is not None and given.dim() == 2 and kv_length <= given.shape[1]:
        return _known_columns(given, real, kv_length)
    mask = flash_attention_mask(*args, **kwargs)
    if mask is not None or kv_length is None:
        return mask
    if kwargs.get("q_offset") is not None and q_length is not None:
        seen = int(kwargs["q_offset"]) + q_length  # a tensor for static caches (an int otherwise: no read)
    elif kwargs.get("cache_position") is not None:  # transformers before q_offset
        if kwargs["cache_position"].shape[0] >= kv_length:  # nothing cached before these tokens: nothing to read
            return None
        seen = int(kwargs["cache_position"][-1]) + 1
    else:
        return None
    if seen >= kv_length:
        return None
    return torch.ones(kwargs["batch_size"], seen, dtype=torch.bool, device=kwargs.get("device"))


def _chunked_mask(kwargs: dict) -> bool:
    """Whether transformers asks for the mask of chunked-attention layers (Llama 4's local layers)."""
    size = getattr(kwargs.get("config"), "attention_chunk_size", None)
    return size is not None and kwargs.get("local_size") == size


def _chunked_cache_mask(given: Optional[torch.Tensor], kwargs: dict) -> torch.Tensor:
    """The mask of chunked layers whose cache dropped its first ``kv_offset`` tokens (transformers keeps such layers'
    last tokens only, as a sliding window's): every column from the first token on, so that the attention finds
    where its keys sit in their chunks (its keys are the last ``kv_length`` columns)."""
    kv_offset, kv_length = kwargs["kv_offset"], kwargs["kv_length"]
    if isinstance(kv_offset, torch.Tensor):
        raise ValueError("chunked attention (config.attention_chunk_size) needs the number of tokens its layers' "
                         "cache dropped as an int (the mask's kv_offset), got a tensor (a compiled decoding step): "
                         "decode uncompiled or with the default dynamic cache")
    total = kv_offset + kv_length
    if given is None:
        mask = torch.ones(kwargs["batch_size"], total, dtype=torch.bool, device=kwargs.get("device"))
        known_left_padding(mask, [total] * mask.shape[0])
        return mask
    if given.dim() != 2 or given.shape[1] < total:
        raise ValueError(f"expected a 2-D padding mask of at least {total} columns for chunked attention after a "
                         f"cache of {kv_offset} dropped tokens, got shape {tuple(given.shape)}")
    return given[:, -total:] if given.shape[1] > total else given


@torch.compiler.disable  # (host lists and the registry's weak references)
def _known_columns(mask: torch.Tensor, real: list, kv_length: int) -> Optional[torch.Tensor]:
    """The last ``kv_length`` columns of a mask marked by known_left_padding (None where they are all real tokens),
    marked in turn: the layers' attention reads nothing back either."""
    real = [min(n, kv_length) for n in real]
    if all(n == kv_length for n in real):
        return None
    cols = mask[:, -kv_length:]
    known_left_padding(cols, real)
    return cols


# transformers 4.x (the last releases for torch 2.5) hands the modules a static cache's whole buffer with a mask
# that does not say which slots are written, and counts its tokens from non-zero keys
_STATIC_CACHE_NEEDS_V5 = int(transformers.__version__.split(".")[0]) < 5


def check_cache_supported(cache, kind: str) -> None:
    """The modules keeping state beside the cache (``"nsa"``, ``"mla"``) read a static cache's written slots from
    what transformers 5 passes; refuse one under transformers 4 rather than attend to unwritten slots. MLA's
    refuses a float8 cache (``InPlaceCache``'s ``cache_dtype``): it quantises its own latent cache."""
    if kind == "mla" and quantised_cache(cache):
        raise ValueError("swap_attention(model, 'mla')'s attention does not read a float8 KV cache (InPlaceCache's "
                         "cache_dtype): its module quantises its own latent cache, swap_attention(model, 'mla', "
                         "cache_dtype=...)")
    if _STATIC_CACHE_NEEDS_V5 and getattr(cache, "is_compileable", False):
        raise ValueError(f"past_key_values: swap_attention(model, {kind!r}) with a static cache "
                         f"({type(cache).__name__}) needs transformers >= 5 (found {transformers.__version__}); "
                         "use the default dynamic cache")


def static_cache_view(attention_mask, key, value):
    """Keys and values ``(B, L, H, D)`` cut to the tokens a static cache holds (the length of the 2-D
    ``attention_mask``, when shorter than L): views, nothing copied."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] >= key.shape[1]:
        return key, value
    n = attention_mask.shape[1]
    return key[:, :n], value[:, :n]


def side_cache(cache, name: str, reorder) -> dict:
    """A dict kept on a transformers cache object under ``name`` (longattn's per-layer state beside the cache:
    MoBA's pooled keys, NSA's compressed blocks, MLA's latent pages). Beam search reorders the cache's rows in
    place (``reorder_cache(beam_idx)``); ``reorder(store, beam_idx)`` then makes the state follow (the cache's
    method is wrapped once, holding the cache weakly: no reference cycle keeps its memory alive)."""
    store = cache.__dict__.get(name)
    if store is None:
        store = cache.__dict__[name] = {}
        hooks = cache.__dict__.setdefault("_longattn_reorder", {})
        if not hooks and hasattr(type(cache), "reorder_cache"):
            ref = weakref.ref(cache)

            def reorder_cache(beam_idx, *args, **kwargs):
                c = ref()
                for key, fn in c.__dict__["_longattn_reorder"].items():
                    fn(c.__dict__[key], beam_idx)
                return type(c).reorder_cache(c, beam_idx, *args, **kwargs)

            cache.reorder_cache = reorder_cache
        hooks[name] = reorder
    return store


def _reorder_means(store: dict, beam_idx: torch.Tensor) -> None:
    for kept in store.values():
        kept["means"] = kept["means"].index_select(0, beam_idx.to(kept["means"].device))


def _kept_means(module, k, lens, offsets, block_size: int, q_len: int, dtype) -> Optional[torch.Tensor]:
    """Pooled keys of every row's blocks before its last token's own block, kept on the transformers cache the
    module is being called with (recorded by ``swap_attention(model, "moba")``; None without one). A call after a
    cached prefix pools only the blocks completed since the previous call (one per decoding step); blocks past a
    cut-back of the cache (speculative decoding rejecting draft tokens) are pooled again, and a prefill pools
    them all. (B, N, Hkv, D) in ``dtype`` (the queries')."""
    cache = getattr(module, "_longattn_cache", None)
    if cache is None or torch.is_grad_enabled():  # training (a cache HF made but nobody decodes from): nothing kept
        return None
    B, L, hkv, d = k.shape
    need = (L - 1) // block_size
    store = side_cache(cache, "_longattn_moba", _reorder_means)
    layer = _layer_of(module)
    kept = store.get(layer)
    follows = q_len < L and kept is not None and kept["block_size"] == block_size and \
        kept["means"].shape[0] == B and kept["means"].dtype == dtype and kept["means"].device == k.device
    means = kept["means"] if follows else None
    if means is None or means.shape[1] < need:  # grow geometrically, keeping what follows on
        cap = max(need, 2 * means.shape[1]) if means is not None else need + 8
        grown = k.new_empty(B, cap, hkv, d, dtype=dtype)
        if means is not None:
            grown[:, :means.shape[1]] = means
        means = grown
    tail = None
    if follows:
        # the kept blocks end with the previous call's last token (cache length kept["kv_len"]), or where the cache
        # was cut back to (L - q_len keys precede these tokens); the blocks completed after that are pooled
        seen = min(kept["kv_len"] - 1, L - q_len)
        tail = (L - 1 - seen) // block_size + 1
    pool_cache_blocks(k, lens, offsets, block_size, means, tail=tail, scale=dequant_scale(k))  # (a float8 cache's)
    store[layer] = dict(means=means, kv_len=L, block_size=block_size)
    return means


def _with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention sinks (gpt-oss: one learned logit per head, in every row's softmax but attending to nothing):
    ``out * exp(lse) / (exp(lse) + exp(sink))``, from the output and lse without them; differentiable in all three.
    ``lse`` aligned with out's rows: ``(..., H)`` for out ``(..., H, D)``."""
    if sinks is None:
        return out
    keep = torch.sigmoid(lse - sinks.float())
    return (out.float() * keep.unsqueeze(-1)).to(out.dtype)


def _layer_of(module) -> Optional[int]:
    """The cache layer of attention ``module``: its ``layer_idx``, or where a block serves several layers (Zamba2's
    shared attention blocks, layer_idx -1) the index the model calls it with (recorded by swap_attention's hooks)."""
    layer = getattr(module, "_longattn_layer", None)
    return getattr(module, "layer_idx", None) if layer is None else layer


def _chunk_size(module) -> Optional[int]:
    """The chunk size of a chunked-attention layer (Llama 4's local layers: ``config.attention_chunk_size`` where
    ``config.layer_types`` says "chunked_attention"), or None."""
    cfg = getattr(module, "config", None)
    size = getattr(cfg, "attention_chunk_size", None)
    if not size:
        return None
    types, idx = getattr(cfg, "layer_types", None), _layer_of(module)
    if types is None or idx is None:
        raise ValueError("chunked attention (config.attention_chunk_size) needs config.layer_types and the module's "
                         "layer_idx to tell its chunked layers")
    return int(size) if types[idx] == "chunked_attention" else None


def _chunk_offsets(attention_mask: torch.Tensor, kv_len: int):
    """A chunked layer's mask from _chunked_cache_mask (more columns than keys: its cache dropped the first tokens):
    the mask's last ``kv_len`` columns, and each row's position of its key 0 among its real tokens (int32 on the
    device; read from the mask's padding, once per forward)."""
    dropped = attention_mask.shape[1] - kv_len
    _, _, real = mask_padding(attention_mask, attention_mask.shape[1])
    if real is None:
        raise ValueError("chunked attention after a cache that dropped tokens needs a left-padding mask")
    pads = [attention_mask.shape[1] - n for n in real]
    offsets = device_tensor([max(dropped - p, 0) for p in pads], torch.int32, attention_mask.device)
    return attention_mask[:, dropped:], offsets


def _run(kind: str, module, query, key, value, attention_mask, scaling, kwargs):
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, T, H, D)
    window = kwargs.get("sliding_window")
    chunk = _chunk_size(module)
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (q.shape[2],)):
        raise ValueError(f"attention sinks must be a tensor of one logit per query head ({q.shape[2]},), got "
                         f"{tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__}")
    softcap = kwargs.get("softcap")
    if kind == "moba" and not window and not chunk:
        cfg = getattr(module, "config", None)
        opts = dict(block_size=getattr(cfg, "moba_block_size", MOBA_DEFAULT_BLOCK_SIZE),
                    topk=getattr(cfg, "moba_topk", MOBA_DEFAULT_TOPK), softcap=softcap)
        op = moba_attention
    else:  # (a sliding-window or chunked layer of a MoBA model stays so: local already)
        kind, opts, op = "flash", dict(window=int(window) if window else None, softcap=softcap), flash_attention
        if chunk:
            opts = dict(opts, window=None, chunk_size=chunk)
    if sinks is not None:
        opts["return_lse"] = True
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"longattn attention expects a 2-D padding mask (or None), got shape "
                         f"{tuple(attention_mask.shape)}; register longattn's mask function (longattn.hf.register())")
    B, q_len = q.shape[0], q.shape[1]
    if chunk and attention_mask is not None and attention_mask.shape[1] > k.shape[1]:
        attention_mask, opts["chunk_offsets"] = _chunk_offsets(attention_mask, k.shape[1])
        opts["validate"] = False  # (the offsets come from the mask: no host read to check them)
    k, v = static_cache_view(attention_mask, k, v)
    kv_len = k.shape[1]
    attention_mask, pad, _ = mask_padding(attention_mask, kv_len)
    cu = packed_segments(kwargs, B, q_len, kv_len)[0] if attention_mask is None else None
    # with sinks the ops also return their lse, (B, H, T) in the dense layout and (H, total) in the varlen one
    dense = (lambda r: _with_sinks(r[0], r[1].transpose(1, 2), sinks)) if sinks is not None else (lambda r: r)
    varlen = (lambda r: _with_sinks(r[0], r[1].t(), sinks)) if sinks is not None else (lambda r: r)
    if k.dtype in FLOAT8_DTYPES or v.dtype in FLOAT8_DTYPES:  # a quantised cache (InPlaceCache's cache_dtype)
        if cu is not None or attention_mask is not None and pad is None:
            raise ValueError("a float8 KV cache (InPlaceCache's cache_dtype) serves batches of whole or left-padded "
                             "rows, not packed or right-padded ones")
        # decoding: the kernels read the float8 cache as it is, with its scales (flash_decode; MoBA's moba_decode
        # below)
        if q_len >= kv_len or q_len > (MOBA_DECODE_TOKENS if kind == "moba" else MAX_QUERY_TOKENS):
            # (a prefill, a long chunk: the cache's tokens widened, a copy)
            k, v = dequantised(k, q.dtype), dequantised(v, q.dtype)
        elif kind != "moba":
            lens = kv_len - pad if pad is not None else torch.full((B,), kv_len, dtype=torch.int32, device=q.device)
            extra = {n: opts[n] for n in ("window", "chunk_size", "chunk_offsets", "return_lse") if n in opts}
            return dense(flash_decode(q, k, v, cache_seqlens=lens, cache_offsets=pad, scale=scaling,
                                      softcap=softcap, k_scale=dequant_scale(k), v_scale=dequant_scale(v),
                                      validate=False, **extra))
        else:
            opts.update(k_scale=dequant_scale(k), v_scale=dequant_scale(v))
    # left padding runs in place: gathering the real tokens into a varlen layout would copy the whole K/V cache
    # at every step of every layer
    if kind == "moba" and cu is None and (attention_mask is None or pad is not None):
        offsets = pad if pad is not None else torch.zeros(B, dtype=torch.int32, device=q.device)
        k_mean = _kept_means(module, k, kv_len - offsets, offsets, opts["block_size"], q_len, q.dtype)
        if q_len < kv_len and q_len <= MOBA_DECODE_TOKENS:
            # new tokens after a cached prefix (a decoding step, speculative tokens): token i of row b is query row
            # b * q_len + i of moba_decode, reading cache row b with its own length, in place
            dev = q.device
            rows = torch.arange(B, dtype=torch.int32, device=dev).repeat_interleave(q_len) if q_len > 1 else None
            lens = ((kv_len - q_len + 1 - offsets)[:, None] + torch.arange(q_len, device=dev)).to(torch.int32)
            out = moba_decode(q.reshape(B * q_len, *q.shape[2:]), k, v, cache_seqlens=lens.flatten(),
                              cache_offsets=offsets.repeat_interleave(q_len), cache_rows=rows, k_mean=k_mean,
                              scale=scaling, validate=False, **opts)
            if sinks is not None:  # lse (B * q_len, H): aligned with the rows already
                out = _with_sinks(*out, sinks)
            return out.view(B, q_len, *out.shape[1:])
    elif kind != "moba" and pad is not None:
        return dense(op(q, k, v, scale=scaling, left_pad=pad, **dict(opts, validate=False)))
    if attention_mask is None:
        if cu is None:
            return dense(op(q, k, v, scale=scaling, **opts))
        return varlen(op(q[0], k[0], v[0], cu_seqlens=cu, scale=scaling, **opts))[None]
    qmask, cu_q, cu_k = _unpad(attention_mask[:, -kv_len:], q_len)
    kmask = attention_mask[:, -kv_len:].bool()
    out_p = varlen(op(q[qmask], k[kmask], v[kmask], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, scale=scaling, **opts))
    out = out_p.new_zeros(B, q_len, *out_p.shape[1:])
    out[qmask] = out_p
    return out


def _check(module, dropout, kwargs):
    if dropout:
        raise ValueError("longattn attention does not support attention dropout (got dropout > 0)")
    if kwargs.get("position_bias") is not None:  # a term the softmax would silently go without
        raise ValueError("longattn attention does not support an additive position_bias")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise ValueError("longattn's HF attention functions are causal (decoder) attention only")


def moba_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: Optional[float] = None, **kwargs):
    """transformers attention function for ``attn_implementation="moba"``; block size and top-k come from
    ``config.moba_block_size`` / ``config.moba_topk`` (defaults 512 / 3). A layer with a sliding window stays a
    sliding-window layer (flash attention, exact); attention sinks (gpt-oss's ``s_aux``) and softcap (Gemma 2's
    attention logit soft-capping) are honoured."""
    _check(module, dropout, kwargs)
    return _run("moba", module, query, key, value, attention_mask, scaling, kwargs), None


def flash_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: Optional[float] = None, **kwargs):
    """transformers attention function for ``attn_implementation="longattn"`` (honours sliding_window, softcap
    (Gemma 2's attention logit soft-capping) and attention sinks, gpt-oss's ``s_aux``)."""
    _check(module, dropout, kwargs)
    return _run("flash", module, query, key, value, attention_mask, scaling, kwargs), None
