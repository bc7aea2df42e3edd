"""Paged latent cache for MLA decoding: only ``kv_lora_rank + qk_rope_head_dim`` values per token."""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch

from ..kernels.utils import (FLOAT8_DTYPES, SUPPORTED_DTYPES, Calibration, check_bool, check_scale, device_tensor,
                             finite_magnitudes, float8_quantised, float8_scale_for)


def check_cache_scale(scale, name: str):
    """``"auto"``, or ``scale`` as a positive float (ValueError / TypeError naming ``name``)."""
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(f"{name} must be a positive float or 'auto', got {scale!r}")
        return scale
    return check_scale(scale, 1.0, name)


def check_page_size(page_size) -> int:
    """A page size: a power of two from 16 to 256 (TypeError / ValueError naming ``page_size``)."""
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"page_size must be a positive int, got {type(page_size).__name__}")
    if page_size < 16 or page_size > 256 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two from 16 to 256, got {page_size}")
    return page_size


def _whole(n, message: str, floats: bool = True) -> int:
    """``n`` as a Python int: an int, a numpy or 0-d tensor integer, or (``floats``) a float holding a whole number;
    else TypeError(``message``) (a bool is no count and no id)."""
    if not (isinstance(n, bool) or str(getattr(n, "dtype", "")) in ("bool", "torch.bool")):  # (numpy's, torch's)
        try:
            return operator.index(n)
        except TypeError:
            if floats and isinstance(n, float) and n.is_integer():
                return int(n)
    raise TypeError(f"{message}, got {n!r}")


class PagedLatentCache:
    """A pool of fixed-size pages holding, per token, the normalised latent and the rotary key.

    Storage is ``(num_pages, page_size, rank + rope_dim)`` (576 values per token for DeepSeek-V3); each
    sequence owns a list of pages, allocated as it grows and returned by :meth:`free`. Never stores
    decompressed K/V. A ``growable`` cache doubles its pool instead of failing when it runs out (the
    storage tensor is then replaced: re-read :attr:`kv` after :meth:`append`). ``device`` defaults to the GPU when
    there is one, else the CPU. A float8 ``dtype`` quantises the tokens (half the bytes of a 16-bit cache): it stores
    ``value / scale`` saturated to the format's range and :func:`longattn.mla.mla_decode` reads it with
    ``kv_scale=cache.scale``. ``scale``: a positive float, or ``"auto"`` (calibrated on the tokens: at the first
    append to an empty cache and at each append of several tokens to a sequence, a prefill or its chunks, the power
    of two bringing the largest finite magnitude of these appends since the cache was empty to at most a quarter of
    the format's range; where it changes, the tokens held are re-quantised; an append of one token a sequence keeps
    it, but within :func:`longattn.hf.cache.calibrating_writes`, as ``longattn.rollout.generate``'s prefill in
    chunks of one column runs. Each calibrating append reads the maximum back to the host). A scale other than 1
    is refused for other dtypes.

    Example::

        cache = PagedLatentCache(num_pages=1024, device="cuda", dtype=torch.bfloat16)
        ids = [cache.new_sequence() for _ in range(batch)]
        cache.append(ids, c_kv, k_rope, lengths)          # packed tokens, lengths per sequence
        table, lens = cache.block_table(ids), cache.seqlens(ids)
        o_latent = mla_decode(q_latent, q_rope, cache.kv, cache_seqlens=lens, block_table=table, scale=s)
    """

    def __init__(self, num_pages: int, *, page_size: int = 64, kv_lora_rank: int = 512, rope_dim: int = 64,
                 dtype: torch.dtype = torch.bfloat16, device=None, growable: bool = False, scale=1.0):
        for name, val in (("num_pages", num_pages), ("kv_lora_rank", kv_lora_rank), ("rope_dim", rope_dim)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{name} must be a positive int, got {type(val).__name__}")
            if val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        check_page_size(page_size)
        if dtype not in SUPPORTED_DTYPES + FLOAT8_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float8 (e4m3fn, e5m2), got {dtype}")
        self._auto = check_cache_scale(scale, "scale") == "auto"
        self.scale = 1.0 if self._auto else check_scale(scale, 1.0, "scale")
        if self.scale != 1.0 and dtype not in FLOAT8_DTYPES:  # (mla_decode would apply it to unscaled tokens)
            raise ValueError(f"scale applies to a float8 cache (dtype float8_e4m3fn / float8_e5m2), got {scale!r} "
                             f"with dtype {dtype}")
        self._seen = 0.0  # "auto": the largest finite magnitude calibrated on since the cache was empty
        if device is None:  # the GPU when there is one (without, the kernels run on the CPU through the interpreter)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must name a torch device, got {device!r}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device is {device} but CUDA is not available")
        self.page_size = page_size
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.kv = torch.zeros(num_pages, page_size, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page numbers first
        self._pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._next_id = 0
        check_bool(growable, "growable")
        self.growable = growable
        self._version = 0  # bumped whenever a sequence's page list changes
        self._table = None  # (seq_ids, version, device table) of the last block_table call

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def new_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self._pages[sid] = []
        self._lens[sid] = 0
        return sid

    def free(self, seq_id: int) -> None:
        """Return a sequence's pages to the pool."""
        self._check_ids([seq_id])
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self._lens[seq_id]
        self._version += 1

    def fork(self, seq_id: int) -> int:
        """A new sequence holding a copy of ``seq_id``'s tokens (beam search, parallel samples); returns its id."""
        self._check_ids([seq_id])
        n = self._lens[seq_id]
        new = self.new_sequence()
        if n:
            self._write([new], [n], self._flat()[self._rows([seq_id])])  # as stored: no second rounding
        return new

    def _flat(self) -> torch.Tensor:
        """The storage as (slots, width) rows, viewed as bytes when float8 (torch indexes no float8 tensor on the
        CPU before 2.6)."""
        flat = self.kv.view(-1, self.kv.shape[-1])
        return flat.view(torch.uint8) if self.kv.dtype in FLOAT8_DTYPES else flat

    def _rows(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """Storage rows of the sequences' tokens, one sequence after another (int64, on the cache's device)."""
        offsets = torch.arange(self.page_size)
        rows = [(torch.tensor(self._pages[s], dtype=torch.long)[:, None] * self.page_size + offsets).flatten()
                [:self._lens[s]] for s in seq_ids]
        return device_tensor(torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long), torch.long,
                             self.kv.device)

    def tokens(self, seq_ids: Sequence[int], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The sequences' tokens ``(total, rank + rope_dim)``, one sequence after another, as values (a float8
        cache's dequantised: stored x scale) in ``dtype`` (default: the cache's, float32 for a float8 one)."""
        seq_ids = self._check_ids(seq_ids)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
        rows = self._flat()[self._rows(seq_ids)]
        if self.kv.dtype not in FLOAT8_DTYPES:
            return rows if dtype is None else rows.to(dtype)
        return (rows.view(self.kv.dtype).float() * self.scale).to(dtype or torch.float32)

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep the first ``length`` tokens of a sequence (speculative decoding rejecting draft tokens); the pages
        past them return to the pool."""
        self._check_ids([seq_id])
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self._lens[seq_id]:
            raise ValueError(f"length must be an int in [0, {self._lens[seq_id]}], got {length!r}")
        pages = self._pages[seq_id]
        keep = -(-length // self.page_size)
        if keep < len(pages):
            self._free.extend(reversed(pages[keep:]))
            del pages[keep:]
            self._version += 1
        self._lens[seq_id] = length

    def seqlen(self, seq_id: int) -> int:
        self._check_ids([seq_id])
        return self._lens[seq_id]

    def _check_ids(self, ids: Sequence[int]) -> list:
        """``ids`` as a list, each a live sequence's id (an int from new_sequence)."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"seq_ids must be a sequence of ids (from new_sequence), got {type(ids).__name__}")
        ids = [_whole(s, "sequence ids must be ints (from new_sequence)", floats=False) for s in ids]
        for s in ids:
            if s not in self._pages:
                raise ValueError(f"unknown or freed sequence id {s!r}")
        return ids

    def append(self, seq_ids: Sequence[int], c_kv: torch.Tensor, k_rope: torch.Tensor,
               lengths: Optional[Sequence[int]] = None) -> None:
        """Append tokens to sequences.

        ``c_kv`` ``(total, rank)`` and ``k_rope`` ``(total, rope_dim)`` hold the new tokens of ``seq_ids``
        packed one sequence after another, ``lengths[i]`` of them for ``seq_ids[i]`` (default: the same
        number for each). ``(B, T, ...)`` tensors are accepted for equal lengths.
        """
        seq_ids = self._check_ids(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("seq_ids must not repeat")
        for name, t in (("c_kv", c_kv), ("k_rope", k_rope)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dim() not in (2, 3):
                raise TypeError(f"{name} must be a floating-point tensor (total, dim) or (B, T, dim), got "
                                f"{type(t).__name__ if not isinstance(t, torch.Tensor) else (t.dtype, tuple(t.shape))}")
        if c_kv.shape[:-1] != k_rope.shape[:-1]:
            raise ValueError(f"c_kv and k_rope must hold the same tokens (the same leading dims), got "
                             f"{tuple(c_kv.shape)} and {tuple(k_rope.shape)}")
        for name, t in (("c_kv", c_kv), ("k_rope", k_rope)):
            if t.device != self.kv.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.kv.device}")
        if c_kv.dim() == 3:
            if c_kv.shape[0] != len(seq_ids):
                raise ValueError(f"(B, T, dim) tensors hold B sequences of T tokens each: B = {c_kv.shape[0]} must "
                                 f"equal the number of seq_ids, {len(seq_ids)}")
            if lengths is not None and list(lengths) != [c_kv.shape[1]] * c_kv.shape[0]:
                raise ValueError(f"lengths must be T = {c_kv.shape[1]} for each sequence of (B, T, dim) tensors (or "
                                 f"None), got {list(lengths)}")
            c_kv, k_rope = c_kv.reshape(-1, c_kv.shape[-1]), k_rope.reshape(-1, k_rope.shape[-1])
        total = c_kv.shape[0]
        if lengths is None:
            if total % max(len(seq_ids), 1):
                raise ValueError(f"{total} tokens cannot be split evenly over {len(seq_ids)} sequences")
            lengths = [total // max(len(seq_ids), 1)] * len(seq_ids)
        if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__iter__"):
            raise TypeError(f"lengths must be a sequence of token counts, got {type(lengths).__name__}")
        lengths = [_whole(n, "lengths must be whole numbers") for n in lengths]
        if len(lengths) != len(seq_ids) or sum(lengths) != total or min(lengths, default=0) < 0:
            raise ValueError(f"lengths {lengths} must give one non-negative count per sequence summing to {total}")
        if c_kv.shape[-1] != self.kv_lora_rank or k_rope.shape[-1] != self.rope_dim or k_rope.shape[0] != total:
            raise ValueError(f"c_kv must be (total, {self.kv_lora_rank}) and k_rope (total, {self.rope_dim}), got "
                             f"{tuple(c_kv.shape)} and {tuple(k_rope.shape)}")
        new = torch.cat([c_kv, k_rope], -1)
        if self.kv.dtype in FLOAT8_DTYPES:  # quantised: value / scale, stored as its bytes (see _flat)
            if self._auto and (max(lengths, default=0) > 1 or not any(self._lens.values()) or
                               Calibration.every_write):
                self._calibrate(new)
            new = float8_quantised(new.float(), self.kv.dtype, self.scale).view(torch.uint8)
        self._write(seq_ids, lengths, new.to(self._flat().dtype))

    def _calibrate(self, new: torch.Tensor) -> None:
        """"auto": the scale for the largest finite magnitude of the calibrating appends since the cache was empty,
        ``new``'s included; the tokens held re-quantised where it changes (by a power of two: exact but among the
        subnormals)."""
        held = any(self._lens.values())
        self._seen = max(self._seen if held else 0.0, finite_magnitudes(new)[0])
        scale = float8_scale_for(self._seen, self.kv.dtype)
        if held and scale != self.scale:
            step = 256  # pages at a time (a float32 copy of them)
            for a in range(0, self.kv.shape[0], step):
                part = self.kv[a:a + step]
                self.kv.view(torch.uint8)[a:a + step] = float8_quantised(
                    part.float(), self.kv.dtype, scale / self.scale).view(torch.uint8)
        self.scale = scale

    def _write(self, seq_ids: list, lengths: list, rows: torch.Tensor) -> None:
        """Append ``rows`` (total, width), already in the storage's form (see _flat), to the sequences."""
        need = sum(-(-(self._lens[s] + n) // self.page_size) - len(self._pages[s]) for s, n in zip(seq_ids, lengths))
        if need > len(self._free):
            if not self.growable:
                raise RuntimeError(f"the cache is full: {need} more pages needed, {len(self._free)} free")
            self._grow(max(self.kv.shape[0], need - len(self._free)))
        slots = []
        for s, n in zip(seq_ids, lengths):
            start = self._lens[s]
            while len(self._pages[s]) * self.page_size < start + n:
                self._pages[s].append(self._free.pop())
                self._version += 1
            pages = self._pages[s]
            slots.extend(pages[(start + i) // self.page_size] * self.page_size + (start + i) % self.page_size
                         for i in range(n))
            self._lens[s] = start + n
        if slots:
            self._flat()[device_tensor(slots, torch.long, self.kv.device)] = rows

    def _grow(self, extra: int) -> None:
        old = self.kv.shape[0]
        kv = torch.zeros(old + extra, *self.kv.shape[1:], dtype=self.kv.dtype, device=self.kv.device)
        kv.view(torch.uint8)[:old] = self.kv.view(torch.uint8)  # (the bytes: torch copies no float8 slice on 2.5)
        self.kv = kv
        self._free = list(range(old + extra - 1, old - 1, -1)) + self._free

    def block_table(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 ``(B, max_pages)``; unused entries are 0 (never read: they lie past the sequence length).

        Built on the host and copied to the device only when a page list changed since the last call for the
        same sequences (a decoding step adds a page once every page_size tokens); treat it as read-only."""
        seq_ids = self._check_ids(seq_ids)
        key = tuple(seq_ids)
        if self._table is not None and self._table[:2] == (key, self._version):
            return self._table[2]
        width = max([len(self._pages[s]) for s in seq_ids] + [1])
        table = torch.zeros(len(seq_ids), width, dtype=torch.int32)
        for i, s in enumerate(seq_ids):
            table[i, :len(self._pages[s])] = torch.tensor(self._pages[s], dtype=torch.int32)
        table = device_tensor(table, torch.int32, self.kv.device)
        self._table = (key, self._version, table)
        return table

    def seqlens(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 ``(B,)`` token counts."""
        seq_ids = self._check_ids(seq_ids)
        return device_tensor([self._lens[s] for s in seq_ids], torch.int32, self.kv.device)


__all__ = ["PagedLatentCache"]
