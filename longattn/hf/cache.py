"""``InPlaceCache``: a transformers dynamic cache that writes new tokens in place instead of concatenating.

transformers' ``DynamicCache`` appends a step's keys and values with ``torch.cat``: every decoding step copies
the whole cache of every layer (read and written once more), which at long contexts moves more memory than the
attention itself reads, and a sparse attention's step (MoBA, NSA: a few blocks of the cache) becomes O(T) all the
same. ``InPlaceCache`` keeps each full-attention layer's keys and values in storage with room to spare, writes
the new tokens into it and hands the attention views of the tokens held (strided along the sequence: longattn's
kernels, SDPA and eager attention read them as they are). A step then copies only its own tokens. With a float8
``cache_dtype`` it keeps them quantised (half the bytes of a 16-bit cache; per-layer scales, by default calibrated on
what the prefill writes), which longattn's flash, MoBA and NSA attention decode from as they are.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.configuration_utils import PretrainedConfig

from ..kernels.utils import (FLOAT8_DTYPES, Calibration, calibrating_writes, check_scale, finite_magnitudes,
                             float8_quantised, float8_scale_for)


def _quantised(x: torch.Tensor, dtype: Optional[torch.dtype], scale: float = 1.0) -> torch.Tensor:
    """x as stored in a cache of ``dtype``: a float8 cache keeps ``x / scale`` saturated to its finite range; other
    dtypes take x as it is."""
    return float8_quantised(x, dtype, scale) if dtype in FLOAT8_DTYPES else x


@torch.compiler.disable  # (a tensor's Python attributes are not traced: compiled code calls this eagerly)
def dequant_scale(t: torch.Tensor) -> float:
    """The dequantisation scale of a float8 cache's keys or values as :class:`InPlaceCache` hands them out (any view
    of them): its tokens are ``t * scale``. 1 for a tensor of another dtype, or a float8 one from elsewhere."""
    if t.dtype not in FLOAT8_DTYPES:
        return 1.0
    scale = getattr(t, _SCALE_ATTR, None)
    if scale is None and t._base is not None:
        scale = getattr(t._base, _SCALE_ATTR, None)
    return 1.0 if scale is None else scale


def dequantised(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t, or where it is a float8 cache's keys or values, their tokens in ``dtype`` (widened, times their scale: a
    copy)."""
    if t.dtype not in FLOAT8_DTYPES:
        return t
    scale = dequant_scale(t)
    wide = t.to(dtype)
    return wide if scale == 1.0 else wide.mul_(scale)


_SCALE_ATTR = "_longattn_dequant_scale"  # (set on a float8 cache's storage: its views reach it through ._base)


def _tag(storage: Optional[torch.Tensor], scale: Optional[float]) -> None:
    if storage is not None and scale is not None and storage.dtype in FLOAT8_DTYPES:
        setattr(storage if storage._base is None else storage._base, _SCALE_ATTR, scale)


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` (float8 through its bytes: torch 2.5 selects no float8 rows)."""
    if x.dtype in FLOAT8_DTYPES:
        return x.view(torch.uint8).index_select(0, index).view(x.dtype)
    return x.index_select(0, index)


class InPlaceLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values ``(B, H, L, D)`` are views of the first L tokens of storage
    ``(B, H, capacity, D)``. The storage is allocated with a quarter more room than the tokens it must hold (at
    least 256 tokens), but not beyond ``reserve`` when that is enough (the most tokens expected: a generation's
    prompt plus its new tokens), and grows so when full, copying the tokens held once (amortised: a token is
    written about five times in all, where concatenation copies the whole cache at every step).

    Whatever transformers assigns to ``keys``/``values`` (batch selection, offloading, a prefix when it crops) is
    taken as it is: a prefix of the storage keeps the room behind it, another tensor becomes the storage.

    ``cache_dtype`` (default: the keys' own) a float8 dtype: the keys and values are stored in it, each divided by
    its scale (``k_scale``, ``v_scale``) and saturated to the format's range, and handed out so (float8 views, from
    which :func:`dequant_scale` reads the scale). ``scales``: ``"auto"`` (default) calibrates them on the writes (see
    :class:`InPlaceCache`), or a pair ``(k_scale, v_scale)`` of positive floats."""

    _k: Optional[torch.Tensor] = None
    _v: Optional[torch.Tensor] = None
    _n = 0  # tokens held
    _seen = (0.0, 0.0)  # "auto": the largest finite magnitudes of the keys and values of the calibrating writes

    def __init__(self, reserve: Optional[int] = None, cache_dtype: Optional[torch.dtype] = None, scales="auto"):
        self.reserve = reserve
        self.cache_dtype = cache_dtype
        if not (isinstance(scales, str) and scales == "auto"):
            scales = _scale_pair(scales, "scales")
        self._auto = cache_dtype in FLOAT8_DTYPES and scales == "auto"
        # (None while a calibration is due: set by the first write)
        self.k_scale, self.v_scale = (None, None) if self._auto else (1.0, 1.0) if scales == "auto" else scales
        super().__init__()

    @property
    def keys(self):
        _tag(self._k, self.k_scale)
        return self._k[:, :, :self._n] if self._k is not None and self._k.dim() == 4 else self._k

    @keys.setter
    def keys(self, t):
        if not self._is_prefix(t, self._k):
            self._k = t
        self._n = t.shape[2] if t is not None and t.dim() == 4 else 0

    @property
    def values(self):
        _tag(self._v, self.v_scale)
        return self._v[:, :, :self._n] if self._v is not None and self._v.dim() == 4 else self._v

    @values.setter
    def values(self, t):
        if not self._is_prefix(t, self._v):
            self._v = t

    @staticmethod
    def _is_prefix(t, storage) -> bool:
        """Whether ``t`` is the first tokens of ``storage`` (a view of it, as a crop makes)."""
        return (t is not None and storage is not None and t.dim() == 4 and storage.dim() == 4
                and t.data_ptr() == storage.data_ptr() and t.stride() == storage.stride()
                and t.shape[:2] == storage.shape[:2] and t.shape[3] == storage.shape[3]
                and t.shape[2] <= storage.shape[2])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: Optional[torch.Tensor] = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = self._v = None
        self._n = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens ``(B, H, T, D)`` after those held; return the keys and values of all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self._n, key_states.shape[2]
        if self._auto and (n == 0 or t > 1 or self.k_scale is None or Calibration.every_write):
            self._calibrate(key_states, value_states, n)
        if not self._fits(self._k, key_states, n + t) or not self._fits(self._v, value_states, n + t):
            self._grow(n + t, key_states, value_states)
        self._k[:, :, n:n + t].copy_(_quantised(key_states, self.cache_dtype, self.k_scale))
        self._v[:, :, n:n + t].copy_(_quantised(value_states, self.cache_dtype, self.v_scale))
        self._n = n + t
        return self.keys, self.values

    def _calibrate(self, key_states: torch.Tensor, value_states: torch.Tensor, n: int) -> None:
        """"auto" scales, at a first write (an empty or emptied cache) and at each write of several tokens a row (a
        prefill's chunks, speculative tokens; not a decoding step's one): the largest finite magnitudes these writes
        held since the cache was empty set them (one read back to the host for both); where a scale changes (it only
        rises once a write held a non-zero value), the ``n`` tokens held are re-quantised by the ratio (a power of
        two: exact but where they fall among the subnormals or saturate)."""
        new = finite_magnitudes(key_states, value_states)
        self._seen = tuple(map(max, self._seen if n else (0.0, 0.0), new))
        scales = tuple(float8_scale_for(a, self.cache_dtype) for a in self._seen)
        if n:
            for storage, old, scale in ((self._k, self.k_scale, scales[0]), (self._v, self.v_scale, scales[1])):
                old = 1.0 if old is None else old
                if scale != old:
                    storage[:, :, :n] = _quantised(storage[:, :, :n], self.cache_dtype, scale / old)
        self.k_scale, self.v_scale = scales

    @staticmethod
    def _fits(storage, new: torch.Tensor, need: int) -> bool:
        return storage is not None and storage.dim() == 4 and storage.shape[2] >= need \
            and storage.shape[:2] == new.shape[:2] and storage.shape[3] == new.shape[3]

    def _grow(self, need: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        held = self._n
        if held and not (self._fits(self._k, key_states, held) and self._fits(self._v, value_states, held)):
            raise ValueError(f"the cache holds keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)}: "
                             f"new keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} must match "
                             "them but for the tokens")
        capacity = need + max(need // 4, 256)
        if self.reserve is not None and need <= self.reserve:
            capacity = min(capacity, self.reserve)
        k = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[3], dtype=self.cache_dtype)
        v = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[3], dtype=self.cache_dtype)
        if held:
            k[:, :, :held] = self.keys
            v[:, :, :held] = self.values
        self._k, self._v = k, v

    def _select_rows(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (in that order) in new storage of the same capacity."""
        if not self._n:
            return
        index = index.to(self._k.device)
        k, v = _take_rows(self.keys, index), _take_rows(self.values, index)
        self._k = self._k.new_empty(k.shape[0], *self._k.shape[1:])
        self._v = self._v.new_empty(v.shape[0], *self._v.shape[1:])
        self._k[:, :, :self._n] = k
        self._v[:, :, :self._n] = v

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = torch.as_tensor(indices)
        self._select_rows(indices.nonzero().flatten() if indices.dtype == torch.bool else indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each batch row ``repeats`` times (generate's expansion for several sequences a prompt), keeping the room."""
        if self._n:
            self._select_rows(torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats))

    def get_seq_length(self) -> int:
        return self._n if self.is_initialized else 0

    def crop(self, *args, **kwargs) -> None:
        if self._k is not None:  # (transformers 4 crops every layer, written or not)
            super().crop(*args, **kwargs)

    def reset(self) -> None:
        self._k = self._v = None
        self._n = 0
        if self._auto:
            self.k_scale = self.v_scale = None
        self.is_initialized = False


class InPlaceCache(DynamicCache):
    """``DynamicCache`` whose full-attention layers are :class:`InPlaceLayer`: each step's keys and values are
    written in place into storage with room to spare, not concatenated (a copy of the whole cache per layer and
    step). Layers of other kinds (sliding-window layers, which keep a window) stay as ``DynamicCache`` makes them.

    Args:
        config: the model's config (as for ``DynamicCache(config=...)``), or None (a full-attention layer for
            each layer index the model updates).
        max_cache_len: the most tokens a sequence is expected to hold (prompt plus new tokens), if known. Each
            allocation leaves a quarter more room than needed (at least 256 tokens), but none beyond this bound
            while it holds (a short generation allocates once, exactly; a long one, which may stop early, grows
            as it goes instead of reserving its longest length up front).
        cache_dtype: None (default: the keys' and values' own dtype), or ``torch.float8_e4m3fn`` /
            ``torch.float8_e5m2``: the full-attention layers (those ``DynamicCache`` keeps as plain layers: not
            sliding-window layers, nor the layers of hybrids that hold a recurrent state beside their keys and
            values) keep their keys and values quantised (half the bytes of a 16-bit cache: each divided by its
            scale, see cache_scales, and saturated to the format's range, e4m3's 448, e5m2's 57344), and longattn's
            flash and MoBA attention (``attn_implementation="longattn"`` / ``"moba"``, ``swap_attention(model,
            "flash" / "moba")``) and NSA's module decode from them as they are, in their kernels (``flash_decode``'s,
            ``moba_decode``'s and ``nsa_decode``'s float8 caches, with the scales: half the bytes read a step); a
            prefill or a chunk of more than 16 tokens a row after a cached prefix attends to them dequantised to the
            queries' dtype (a copy).
            MLA's module refuses such a cache (ValueError: it quantises its latent cache itself,
            ``swap_attention(model, "mla", cache_dtype=...)``); so do, with a dtype error of torch, attention modules
            that compute on what the cache returns (transformers 5's MLA models under MoBA, whose cache holds the
            latent their attention decompresses).
        cache_scales: a float8 cache's dequantisation scales (per layer, per tensor: the tokens held are the stored
            ones times the scale). ``"auto"`` (default): each layer's key and value scales are calibrated on what
            it is written: at its first write and at each write of several tokens a row (a prefill, each of its
            chunks, speculative tokens), the power of two that brings the largest finite magnitude of these writes
            (since the layer was empty) to at most a quarter of the format's range (room for larger decoded tokens;
            a power of two divides exactly), the tokens held re-quantised where a scale changes; a write of one
            token a row (a decoding step; but within :func:`calibrating_writes`, as ``longattn.rollout.generate``'s
            prefill in chunks of one column runs) keeps them (beyond the range it saturates). Values of any magnitude
            so keep the format's relative precision instead of falling among its subnormals (below e4m3's 2^-6 at
            scale 1) or saturating. Each calibrating write reads its maxima back to the host (a synchronisation per
            layer). A positive float: every layer's
            keys and values at that scale (1: as they are, saturated). A sequence of ``(k_scale, v_scale)`` pairs
            (or a tensor of shape (layers, 2)): layer i's (a calibrated checkpoint's).

    ``longattn.rollout.generate`` decodes with one; ``model.generate(..., past_key_values=InPlaceCache(...))``
    takes one too. Views of the storage are handed out, so a tensor returned by one step sees the tokens a later
    step writes past its end only if the cache was cut back (``crop``) in between.
    """

    def __init__(self, config=None, max_cache_len: Optional[int] = None, cache_dtype: Optional[torch.dtype] = None,
                 cache_scales="auto", **kwargs):
        make = _layer_maker(max_cache_len, cache_dtype, cache_scales)
        if config is not None and not isinstance(config, PretrainedConfig):
            raise TypeError(f"config must be a transformers config (the model's) or None, got {type(config).__name__}")
        super().__init__(config=config, **kwargs)
        self.cache_dtype = cache_dtype
        if self.layer_class_to_replicate is not None:  # no config: layers added as the model updates them
            self.layer_class_to_replicate = lambda: make(len(self.layers))
        self.layers = [make(i) if type(layer) is DynamicLayer else layer for i, layer in enumerate(self.layers)]

    @staticmethod
    def for_model(model, max_cache_len: Optional[int] = None, cache_dtype: Optional[torch.dtype] = None,
                  cache_scales="auto") -> "InPlaceCache":
        """An ``InPlaceCache`` for ``model``: of the cache class of its own that transformers gives a model whose
        ``DynamicCache`` would not hold its layers' state (MiniMax-M1: its lightning-attention layers' states),
        else ``InPlaceCache(config=model.config, max_cache_len=max_cache_len, cache_dtype=cache_dtype,
        cache_scales=cache_scales)``. Raises ValueError for another model with a cache class of its own, TypeError
        for what has no transformers config."""
        if not isinstance(getattr(model, "config", None), PretrainedConfig):
            raise TypeError(f"model must be a transformers model (with its config), got {type(model).__name__}")
        if getattr(model, "_supports_default_dynamic_cache", lambda: True)():
            return InPlaceCache(config=model.config, max_cache_len=max_cache_len, cache_dtype=cache_dtype,
                                cache_scales=cache_scales)
        if getattr(model.config, "model_type", None) == "minimax":
            return _minimax_cache_class()(model.config, max_cache_len, cache_dtype, cache_scales)
        raise ValueError(f"this {model.config.model_type} model needs a cache class of its own (transformers' "
                         "DynamicCache does not hold its layers' state), which InPlaceCache does not provide")


def check_cache_dtype(cache_dtype) -> None:
    """TypeError unless ``cache_dtype`` is None or a float8 dtype (an InPlaceCache's quantised storage)."""
    if cache_dtype is not None and cache_dtype not in FLOAT8_DTYPES:
        raise TypeError(f"cache_dtype must be None or a float8 dtype (torch.float8_e4m3fn, torch.float8_e5m2), got "
                        f"{cache_dtype!r}")


def check_cache_scales(cache_scales, cache_dtype):
    """``cache_scales`` checked and normalised: ``"auto"``, a positive float, or a list of ``(k_scale, v_scale)``
    pairs of them (from any sequence: a tensor or array of shape (layers, 2) too); TypeError / ValueError otherwise,
    and for a value other than ``"auto"`` without a float8 ``cache_dtype``."""
    if isinstance(cache_scales, str) and cache_scales == "auto":
        return cache_scales
    if cache_scales is None or isinstance(cache_scales, (str, bool)):
        raise (ValueError if isinstance(cache_scales, str) else TypeError)(
            f"cache_scales must be 'auto', a positive float or a sequence of (k_scale, v_scale) pairs, got "
            f"{cache_scales!r}")
    if cache_dtype not in FLOAT8_DTYPES:
        raise ValueError("cache_scales applies to a float8 cache (cache_dtype torch.float8_e4m3fn / float8_e5m2), "
                         f"got cache_dtype {cache_dtype!r}")
    if hasattr(cache_scales, "tolist"):  # (a tensor or array)
        cache_scales = cache_scales.tolist()
    if isinstance(cache_scales, (int, float)):
        return check_scale(cache_scales, 1.0, "cache_scales")
    try:
        pairs = list(cache_scales)
    except TypeError:
        raise TypeError("cache_scales must be 'auto', a positive float or a sequence of (k_scale, v_scale) pairs, "
                        f"got {type(cache_scales).__name__}") from None
    return [_scale_pair(pair, f"cache_scales[{i}]") for i, pair in enumerate(pairs)]


def _scale_pair(pair, name: str) -> tuple:
    """A ``(k_scale, v_scale)`` pair of positive floats, checked (ValueError / TypeError naming ``name``)."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or any(x is None for x in pair):
        raise ValueError(f"{name} must be a (k_scale, v_scale) pair of positive floats, got {pair!r}")
    return tuple(check_scale(x, 1.0, f"{name}'s scales") for x in pair)


def _layer_maker(max_cache_len, cache_dtype, cache_scales):
    """Checks an InPlaceCache's arguments; returns ``make(i)``, the :class:`InPlaceLayer` of layer index i."""
    _check_max_len(max_cache_len)
    check_cache_dtype(cache_dtype)
    cache_scales = check_cache_scales(cache_scales, cache_dtype)

    def make(i: int) -> InPlaceLayer:
        if isinstance(cache_scales, list):
            if i >= len(cache_scales):
                raise ValueError(f"cache_scales holds {len(cache_scales)} (k_scale, v_scale) pairs: none for layer {i}")
            return InPlaceLayer(max_cache_len, cache_dtype, cache_scales[i])
        return InPlaceLayer(max_cache_len, cache_dtype, cache_scales if cache_scales == "auto" else (cache_scales,) * 2)

    return make


def quantised_cache(cache) -> bool:
    """Whether transformers cache ``cache`` keeps its keys and values in float8 (an ``InPlaceCache`` with a float8
    ``cache_dtype``)."""
    return getattr(cache, "cache_dtype", None) in FLOAT8_DTYPES


def _check_max_len(max_cache_len) -> None:
    if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int)
                                      or max_cache_len < 1):
        raise ValueError(f"max_cache_len must be a positive int or None, got {max_cache_len!r}")


@functools.lru_cache(maxsize=None)
def _minimax_cache_class():
    """MiniMax-M1's cache class with InPlaceCache's full-attention layers (transformers' MiniMax model takes only its
    own ``MiniMaxCache``), defined on first use."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    class InPlaceMiniMaxCache(InPlaceCache, MiniMaxCache):
        """``MiniMaxCache`` (each lightning-attention layer's state in ``linear_cache``) whose full-attention layers
        are :class:`InPlaceLayer`. The length and mask sizes asked of a lightning-attention layer (the model's masks
        ask layer 0's) are the first full-attention layer's: ``MiniMaxCache`` answers 0 there, and a left-padded
        batch's decoding steps then got a mask of one column, which masked every key of a padded row or none.
        ``reorder_cache`` reorders the states' rows too."""

        def __init__(self, config, max_cache_len: Optional[int] = None, cache_dtype: Optional[torch.dtype] = None,
                     cache_scales="auto"):
            make = _layer_maker(max_cache_len, cache_dtype, cache_scales)
            MiniMaxCache.__init__(self)  # (layers added as the model updates them)
            self.cache_dtype = cache_dtype
            self.layer_class_to_replicate = lambda: make(len(self.layers))
            types = list(getattr(config, "layer_types", None) or [])
            self._kv_layers = [i for i, t in enumerate(types) if t != "linear_attention"] or [0]

        def _kv_layer(self, layer_idx: int) -> int:
            return layer_idx if layer_idx in self._kv_layers else self._kv_layers[0]

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return super().get_seq_length(self._kv_layer(layer_idx))

        def get_mask_sizes(self, query, layer_idx: int = 0):
            return super().get_mask_sizes(query, self._kv_layer(layer_idx))

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            super().reorder_cache(beam_idx)
            self.linear_cache = [s.index_select(0, beam_idx.to(s.device)) if isinstance(s, torch.Tensor) else s
                                 for s in self.linear_cache]

    return InPlaceMiniMaxCache


__all__ = ["InPlaceCache", "InPlaceLayer", "calibrating_writes", "dequant_scale", "dequantised"]
