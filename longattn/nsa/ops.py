"""NSA public ops: ``nsa_attention`` (prefill / training: Triton kernels for every branch, differentiable end to
end) and ``nsa_decode`` (one token per sequence against a KV cache)."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Optional

import torch
import triton

from ..kernels.flash import _score_args, flash_bwd, flash_fwd, kv_descriptors
from ..kernels.sparse import (ENTRY_TILE, BlockPlan, check_block_indices, entries, pack_inputs, plan_blocks,
                              sparse_backward)
from ..kernels.utils import (COMPILE_OPTIONS, AttnDims, cdiv, check_attention_inputs, check_block_table,
                             check_cache_lengths, check_cache_rows, check_decode_inputs, check_device,
                             check_positive_int, check_same_dtype, check_scale, check_sinks, check_softcap,
                             check_tensor, device_tensor, eager_context, empty, first_order_backward, kernel_inputs,
                             next_pow2, num_sms, public_op, resolve_seqlens, small_tiles, split_dim,
                             validate_cache_rows, validate_pages, widen_by_asm)
from .kernels import (_gated_prep_kernel, _nsa_decode_cmp_split_kernel,
                      _nsa_decode_combine_kernel, _nsa_decode_kernel, _nsa_decode_piece_kernel,
                      _nsa_decode_score_split_kernel, _nsa_select_kernel, _nsa_select_tuned,
                      _nsa_selected_dq_tuned, _nsa_selected_fwd_tuned, selected_configs, selected_rows)
from .reference import NSAConfig


MAX_SPLITS = 64  # split-KV programs per (sequence, KV head) in nsa_decode


def _mean_compress(x: torch.Tensor, lengths: list, config: NSAConfig) -> torch.Tensor:
    """Mean-pooling compressor over packed sequences: (total, H, D) -> (total_cmp, H, D), differentiable.

    A block of cmp_block tokens is cmp_block / cmp_stride consecutive runs of cmp_stride tokens: each run is
    summed once (float32 accumulation, nothing materialised in float32 beyond the sums), blocks add their runs."""
    stride, r = config.cmp_stride, config.cmp_block // config.cmp_stride
    parts, start = [], 0
    for n in lengths:
        m = config.num_cmp_blocks(n)
        if m:
            seq = x[start:start + (m - 1 + r) * stride]
            runs = seq.reshape(m - 1 + r, stride, *x.shape[1:]).sum(1, dtype=torch.float32)
            total = runs[:m]
            for i in range(1, r):
                total = total + runs[i:i + m]
            parts.append((total / config.cmp_block).to(x.dtype))
        start += n
    return torch.cat(parts) if parts else x.new_zeros(0, *x.shape[1:])


def _cu(lengths: list, device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # (device_tensor is opaque to TorchDynamo) a constant of the graph
        return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return device_tensor(cu, torch.int32, device)


def nsa_select(q: torch.Tensor, k_cmp: torch.Tensor, lse_cmp: torch.Tensor, cu_q: torch.Tensor, cu_cmp: torch.Tensor,
               max_q: int, heads_kv: int, config: NSAConfig, scale: float,
               query_pos: Optional[torch.Tensor] = None, softcap: float = 0.0) -> torch.Tensor:
    """Top-n selection blocks per (query row, KV head) from the compressed attention: int32
    ``(total_q, Hkv, slc_topk)``, best first, -1 padded. q ``(total_q, Hq, D)``, k_cmp ``(total_cmp, Hkv, D)``,
    lse_cmp ``(Hq, total_q)`` (natural log, from the compressed branch); ``query_pos`` (int32 per sequence): the
    position of each sequence's first query (a chunk after a prefix), default 0; ``softcap`` (> 0): the compressed
    branch's scores soft-capped (as its lse)."""
    hq, d = q.shape[1], q.shape[2]
    ratio, inner = config.slc_block // config.cmp_stride, config.cmp_block // config.cmp_stride
    nw = ratio + inner - 1
    da, db = split_dim(d)
    sel = empty(q.shape[0], heads_kv, config.slc_topk, device=q.device, dtype=torch.int32)
    qk_scale, soft = _score_args(scale, softcap, q.dtype)
    args = (q, k_cmp, lse_cmp, _score_weights(config, q.device), sel, cu_q, cu_cmp, q.stride(0), q.stride(1),
            k_cmp.stride(0), k_cmp.stride(1), lse_cmp.stride(0), sel.stride(0), sel.stride(1), hq // heads_kv,
            qk_scale, next_pow2(max_q))
    meta = dict(D=d, BLOCK_DA=da, BLOCK_DB=db, CMP_STRIDE=config.cmp_stride, CMP_BLOCK=config.cmp_block,
                SLC_BLOCK=config.slc_block, NW=nw, TOPK=config.slc_topk, TOPK_PAD=next_pow2(config.slc_topk),
                INIT=config.init_blocks, LOCAL=config.local_blocks, GROUP_PAD=next_pow2(hq // heads_kv),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", QPOS=query_pos,
                HAS_QPOS=query_pos is not None, **soft)
    if small_tiles():  # the interpreter: one small tile, nothing timed; chunks of 4 selection blocks at least
        c = max(4, next_pow2(cdiv(nw - 1, ratio)))  # Eq. 9's taps must not reach past the previous chunk
        _nsa_select_kernel[(cdiv(max_q, 32), heads_kv, cu_q.numel() - 1)](*args, **meta, BLOCK_M=32, C=c,
            **COMPILE_OPTIONS)
    else:  # the chunk's blocks and the rows are autotuned (kernels.select_candidates)
        _nsa_select_tuned[lambda m: (cdiv(max_q, m["BLOCK_M"]), heads_kv, cu_q.numel() - 1)](*args, **meta,
            **COMPILE_OPTIONS)
    return sel


def _gate_launch(n_rows: int, dv: int):
    block_r = 16 if small_tiles() else max(1, 2048 // next_pow2(dv))
    return (cdiv(n_rows, block_r),), dict(DV=dv, BLOCK_DV=next_pow2(dv), BLOCK_R=block_r)


def _gated_prep(dout, o, lse, g):
    """One branch's gradient inputs from the gated sum's: ``do = g * dout`` (o's dtype), the rows' ``delta =
    sum(do * o)`` (float32, lse's (Hq, N) layout) and the gate's gradient ``sum(dout * o)`` (g's dtype)."""
    do = empty(o.shape, device=o.device, dtype=o.dtype)
    delta = empty(lse.shape, device=lse.device, dtype=torch.float32)
    dg = empty(g.shape, device=g.device, dtype=g.dtype)
    n_rows = g.numel()
    if n_rows:
        grid, meta = _gate_launch(n_rows, o.shape[-1])
        _gated_prep_kernel[grid](o, dout, g, do, delta, dg, n_rows, o.shape[1], lse.stride(0), **meta,
            **COMPILE_OPTIONS)
    return do, delta, dg


def _sink_scale(lse: torch.Tensor, sinks: torch.Tensor, rest: bool = False):
    """``sigmoid(lse - sink)``, (N, Hq) float32 from a branch's lse (Hq, N): what attention sinks (Hq,) leave of its
    softmax to the keys (0 for a row that saw no key, whatever the sink); with ``rest`` also the sinks' share,
    ``sigmoid(sink - lse)`` (1 - the first, exact where that is near 1)."""
    lse = lse.t()
    none = lse == float("-inf")
    scale = torch.where(none, 0.0, torch.sigmoid(lse - sinks.float()))
    return (scale, torch.where(none, 1.0, torch.sigmoid(sinks.float() - lse))) if rest else scale


def _selected_heads(group: int, dtype) -> int:
    """Query heads per program of the selected branch's kernels: the whole GQA group, unless it is larger than a
    tile holds (64 heads; 16 in float32, whose products run on CUDA cores: 64 rows spilled up to 19 KB per
    thread on sm_90); it is then cut into slices of heads, one program each."""
    return min(group, 16 if dtype == torch.float32 and not small_tiles() else 64)


def _selected_meta(dims, block_size: int, topk: int, dtype) -> dict:
    """Tiles of the selected branch's kernels but the queries per program and the rows (kernels.selected_configs,
    autotuned)."""
    da, db = split_dim(dims.dim_qk)
    return dict(DK=dims.dim_qk, DV=dims.dim_v, BLOCK_DA=da, BLOCK_DB=db, BLOCK_DV=max(16, next_pow2(dims.dim_v)),
                SLC_BLOCK=block_size, SLC_TILE=min(block_size, 32 if small_tiles() else 64), TOPK=topk,
                TOPK_PAD=next_pow2(topk), PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _launch_selected(tuned, args, meta, max_q: int, programs_h: int, n_seq: int, heads: int):
    """Launch a selected-branch kernel (autotuned: ``tuned``) with ``args`` then ``meta``: grid (query blocks,
    KV heads x head slices, sequences). ``LONGATTN_NSA_QUERY_BLOCK``, a knob for benchmarks, forces that many
    queries per program (untimed), with the first launch the autotuner tries for it (or the default launch)."""
    forced = os.environ.get("LONGATTN_NSA_QUERY_BLOCK")
    if forced:
        qb = next_pow2(int(forced))
        tried = [c for c in selected_configs(heads, meta["TOPK_PAD"], meta["PRECISION"], tma=meta.get("HAS_TMA", False))
                 if c.kwargs["QB"] == qb]
        c = tried[0] if tried else triton.Config(dict(QB=qb, ROWS=selected_rows(qb, heads), SPLIT_SCORES=False))
        tuned.fn[(cdiv(max_q, qb), programs_h, n_seq)](*args, **meta, **c.kwargs, num_warps=c.num_warps,
                                                       num_stages=c.num_stages, **COMPILE_OPTIONS)
    else:
        tuned[lambda m: (cdiv(max_q, m["QB"]), programs_h, n_seq)](*args, **meta, **COMPILE_OPTIONS)


class _Selected(torch.autograd.Function):
    """Selected branch: forward and dq by blocks of consecutive queries (the rows of a tile are their GQA
    group's heads, which share each loaded block, and consecutive queries mostly select the same blocks;
    each row is written once), dk/dv through the block-sparse engine's kernels (organised by key block,
    entries standing for the group)."""

    @staticmethod
    def forward(ctx, q, k, v, sel, own, plan: BlockPlan, dims, cu, max_q: int, block_size: int, scale: float):
        out, lse = _selected_forward(q, k, v, sel, dims, cu, max_q, block_size, scale)
        ctx.save_for_backward(q, k, v, out, lse, sel, own, cu)
        ctx.plan, ctx.dims, ctx.block_size, ctx.scale, ctx.max_q = plan, dims, block_size, scale, max_q
        return out

    @staticmethod
    @first_order_backward("nsa_selected_attention")
    def backward(ctx, saved, dout):
        return _selected_backward(dout, *saved, ctx.plan, ctx.dims, ctx.max_q, ctx.block_size,
                                  ctx.scale) + (None,) * 8


def _selected_forward(q, k, v, sel, dims, cu, max_q: int, block_size: int, scale: float, gate=None,
                      write_o: bool = True, cu_k=None, query_pos=None, sinks=None, softcap: float = 0.0):
    """The selected branch's output (None without ``write_o``) and lse (Hq, total) on packed kernel inputs.
    ``gate``: ``(out, o_cmp, o_swa, g_cmp, g_slc, g_swa)``, NSA's gated sum written into ``out`` by the same
    launch (outputs (total, Hq, Dv) contiguous, gates (total, Hq) contiguous; out may be o_cmp), this branch's
    scaled by ``sinks``' share (float32 (Hq,), see _sink_scale; the others' gates carry theirs). ``query_pos``
    (int32 per sequence): the queries are a chunk of each sequence, from that position, the keys packed by
    ``cu_k``. ``softcap`` (> 0): soft-capped scores."""
    hq, hkv = dims.heads_q, dims.heads_kv
    group = hq // hkv
    out = empty(q.shape[0], hq, dims.dim_v, device=q.device, dtype=q.dtype) if write_o or gate is None else None
    lse = empty(hq, q.shape[0], device=q.device, dtype=torch.float32)
    if q.shape[0]:
        heads = _selected_heads(group, q.dtype)
        meta = _selected_meta(dims, block_size, sel.shape[-1], q.dtype)
        descs = kv_descriptors(k, v, meta["SLC_TILE"], meta["BLOCK_DA"], meta["BLOCK_DB"], meta["BLOCK_DV"], 1)
        like = gate[0] if out is None else out  # (the output layout, for the strides)
        qk_scale, soft = _score_args(scale, softcap, q.dtype)
        _launch_selected(_nsa_selected_fwd_tuned, (
            q, k, v, sel, out, lse, cu, *(descs or (None, None, None)), *(gate or (like,) + (None,) * 5),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), sel.stride(0),
            sel.stride(1), like.stride(0), like.stride(1), lse.stride(0), group, heads, hq, qk_scale),
            dict(meta, HAS_TMA=descs is not None, GATED=0 if gate is None else 1 if sinks is None else 2,
                 WRITE_O=out is not None, CU_K=cu_k, QPOS=query_pos, HAS_QPOS=query_pos is not None, SINKS=sinks,
                 **soft),
            max_q, hkv * cdiv(group, heads), cu.numel() - 1,
            heads)
    return out, lse


def _selected_backward(dout, q, k, v, out, lse, sel, own, cu, plan: BlockPlan, dims, max_q: int, block_size: int,
                       scale: float, delta=None, dq=None, cu_k=None, query_pos=None, softcap: float = 0.0):
    """dq, dk, dv of the selected branch from its forward's inputs, output and lse (``delta``, ``dq``: see
    :func:`longattn.kernels.sparse.sparse_backward`; dq is then added to in place). ``cu_k``, ``query_pos``,
    ``softcap``: the forward's (see _selected_forward)."""
    # the engine's entries: per (query, KV head), the selected blocks other than the own one, each entry
    # standing for the group's query heads
    earlier = torch.where(sel == own[:, None, None], torch.full_like(sel, -1), sel)
    group = dims.heads_q // dims.heads_kv
    per_entry = group  # query heads an entry stands for
    if group > ENTRY_TILE:  # more heads than rows in a tile: one entry per query head
        earlier, per_entry = earlier.repeat_interleave(group, dim=1), 1
    earlier = earlier.contiguous()
    ent = entries(earlier, plan, dims.heads_q, dims.heads_kv, per_entry) if earlier.numel() else None
    dq, dk, dv, dout, delta = sparse_backward(q, k, v, out, lse, dout, None, plan, dims, ent,
                                              earlier.shape[-1], block_size, scale, dq_by_entries=False,
                                              delta=delta, dq=dq, softcap=softcap)
    if ent is not None:  # dq of the earlier blocks, by query blocks, added to the own blocks' part
        heads = _selected_heads(group, q.dtype)
        qk_scale, soft = _score_args(scale, softcap, q.dtype)
        _launch_selected(_nsa_selected_dq_tuned, (
            q, k, v, dout, lse, delta, sel, dq, cu, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), dout.stride(0), dout.stride(1), sel.stride(0), sel.stride(1), dq.stride(0),
            dq.stride(1), lse.stride(0), group, heads, qk_scale, scale),
            dict(_selected_meta(dims, block_size, sel.shape[-1], q.dtype), CU_K=cu_k, QPOS=query_pos,
                 HAS_QPOS=query_pos is not None, **soft), max_q,
            dims.heads_kv * cdiv(group, heads), cu.numel() - 1, heads)
    return dq, dk, dv


def _selected_setup(qp, kp, vp, lq: list, lk: list, dims, block_size: int):
    """The own block of every packed row (int32), the engine's plan and the kernel inputs of the selected branch."""
    return (*_selected_plan(lq, lk, dims, block_size, qp.device), kernel_inputs(qp, kp, vp))


def _selected_plan(lq: list, lk: list, dims, block_size: int, device):
    """The own block of every packed row (int32) and the engine's plan of the selected branch's sequences (each
    one's queries its last tokens)."""
    own = torch.cat([torch.arange(k - n, k, device=device) // block_size for n, k in zip(lq, lk)]) if lq else \
        torch.zeros(0, dtype=torch.long, device=device)
    return own.to(torch.int32), plan_blocks(lq, lk, block_size, dims, device)


_SELECTED_ARGS = "Tensor q, Tensor k, Tensor v, Tensor sel, Tensor cu, int[] lengths, int block_size, float scale"


def _packed_dims(q, k, v, lengths: list):
    """AttnDims of packed sequences of ``lengths`` tokens (queries and keys alike)."""
    return AttnDims(True, len(lengths), max(lengths, default=0), max(lengths, default=0), q.shape[1], k.shape[1],
                    q.shape[2], v.shape[2], seqlens_q=list(lengths), seqlens_k=list(lengths))


@torch.library.custom_op("longattn::nsa_selected", mutates_args=(), schema=f"({_SELECTED_ARGS}) -> (Tensor, Tensor)")
def _selected_op(q, k, v, sel, cu, lengths, block_size, scale):
    with eager_context(q):
        dims = _packed_dims(q, k, v, lengths)
        _, _, (qk_, kk_, vk_) = _selected_setup(q, k, v, lengths, lengths, dims, block_size)
        out, lse = _selected_forward(qk_, kk_, vk_, sel, dims, cu, max(lengths, default=0), block_size, scale)
    return out.to(q.dtype), lse


@_selected_op.register_fake
def _selected_shapes(q, k, v, sel, *args):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("longattn::nsa_selected_backward", mutates_args=(),
                         schema=f"(Tensor dout, Tensor out, Tensor lse, {_SELECTED_ARGS}) -> (Tensor, Tensor, Tensor)")
def _selected_backward_op(dout, out, lse, q, k, v, sel, cu, lengths, block_size, scale):
    with eager_context(q):
        dims = _packed_dims(q, k, v, lengths)
        own, plan, (qk_, kk_, vk_) = _selected_setup(q, k, v, lengths, lengths, dims, block_size)
        out, dout = kernel_inputs(out, dout)
        grads = _selected_backward(dout, qk_, kk_, vk_, out, lse, sel, own, cu, plan, dims, max(lengths, default=0),
                                   block_size, scale)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


@_selected_backward_op.register_fake
def _selected_backward_shapes(dout, out, lse, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _selected_op_save(ctx, inputs, output):
    q, k, v, sel, cu, *options = inputs
    ctx.save_for_backward(*output, q, k, v, sel, cu)
    ctx.options = options


def _selected_op_backward(ctx, dout, dlse):
    out, lse, *saved = ctx.saved_tensors
    dq, dk, dv = torch.ops.longattn.nsa_selected_backward(dout, out, lse, *saved, *ctx.options)
    return (dq, dk, dv) + (None,) * 5


_selected_op.register_autograd(_selected_op_backward, setup_context=_selected_op_save)


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(NSAConfig))  # the op takes the config as their values


@dataclasses.dataclass
class _Branches:
    """What the branches of one nsa_attention call share beyond their tensors (packed sequences); ``shape`` adds
    the launches' views of the problem."""
    config: NSAConfig
    lengths: list  # tokens per sequence
    cu: torch.Tensor  # int32 offsets of the sequences' tokens, and of their compressed blocks
    cu_cmp: torch.Tensor
    scale: float
    softcap: float = 0.0  # (0: none)
    dims: Optional[AttnDims] = None  # the tokens' q, k, v (varlen)
    cmp_dims: Optional[AttnDims] = None  # the tokens' queries over the compressed keys
    # queries that are the last tokens of their sequences (a chunk after a prefix): the queries per sequence, their
    # offsets, and the position of each sequence's first query (int32); None: every token a query
    lengths_q: Optional[list] = None
    cu_q: Optional[torch.Tensor] = None
    query_pos: Optional[torch.Tensor] = None

    def shape(self, q, k, v) -> "_Branches":
        lq = self.lengths if self.lengths_q is None else self.lengths_q
        cu_q = self.cu if self.cu_q is None else self.cu_q
        n, mq, mk = len(self.lengths), max(lq, default=0), max(self.lengths, default=0)
        n_cmp = [self.config.num_cmp_blocks(t) for t in self.lengths]
        sizes = (q.shape[1], k.shape[1], q.shape[2], v.shape[2])
        self.dims = AttnDims(True, n, mq, mk, *sizes, cu_seqlens_q=cu_q, cu_seqlens_k=self.cu, seqlens_q=lq,
                             seqlens_k=self.lengths)
        self.cmp_dims = AttnDims(True, n, mq, max(n_cmp, default=0), *sizes, cu_seqlens_q=cu_q,
                                 cu_seqlens_k=self.cu_cmp, seqlens_q=lq, seqlens_k=n_cmp)
        return self


def _branches_forward(q, k, v, kc, vc, gates, b: _Branches, keep: bool, sinks=None):
    """NSA's three branches and their gated sum on kernel inputs (packed q, k, v, compressed kc, vc; ``gates``
    three contiguous ``(N, Hq)``; attention ``sinks`` (Hq,) or None): ``(out, sel, branches)``, branches ``((o,
    lse) of cmp, slc)`` when ``keep`` (what the backward keeps: it runs the window branch again, see
    _branches_backward), else None, the gated sum then written over the compressed branch's output."""
    cfg, scale, dims = b.config, b.scale, b.dims
    cu_q = dims.cu_seqlens_q
    # compressed branch (also yields the lse the selection needs)
    o_cmp, lse_cmp = flash_fwd(q, kc, vc, b.cmp_dims, True, None, scale,
                               key_pos=(cfg.cmp_stride, cfg.cmp_block - 1), query_pos=b.query_pos, softcap=b.softcap)
    sel = nsa_select(q, kc, lse_cmp, cu_q, b.cu_cmp, dims.max_seqlen_q, dims.heads_kv, cfg, scale, b.query_pos,
                     b.softcap)
    o_swa, lse_swa = flash_fwd(q, k, v, dims, True, cfg.window, scale, softcap=b.softcap)  # sliding window
    if sinks is not None:  # the compressed and window branches' shares of their softmax with the sinks: in their gates
        sinks = sinks.float().contiguous()
        gates = (gates[0] * _sink_scale(lse_cmp, sinks), gates[1], gates[2] * _sink_scale(lse_swa, sinks))
    if not keep:
        lse_cmp = None
    # selected branch: the selected blocks (the own one among them, causal), one softmax; the same launch writes
    # the gated sum (without gradients over the compressed branch's output, and not the selected branch's own)
    out = empty(o_cmp.shape, device=q.device, dtype=q.dtype) if keep else o_cmp
    o_slc, lse_slc = _selected_forward(q, k, v, sel, dims, cu_q, dims.max_seqlen_q, cfg.slc_block, scale,
                                       gate=(out, o_cmp, o_swa, *gates), write_o=keep, cu_k=b.cu,
                                       query_pos=b.query_pos, sinks=sinks, softcap=b.softcap)
    if not keep:
        return out, sel, None
    return out, sel, ((o_cmp, lse_cmp), (o_slc, lse_slc))


def _branches_backward(dout, q, k, v, kc, vc, gates, sel, branches, b: _Branches, sinks=None):
    """Gradients of q, k, v, kc, vc, the three gates and the ``sinks`` (float32; None without them) from the gated
    sum's ``dout`` and the compressed and selected branches' ``(o, lse)``. One branch at a time: its gate-scaled
    output gradient and row delta (``_gated_prep``), then its backward, each adding its dq to the previous ones'
    in place (no branch-sized buffer but the one branch's do beside dq). The window branch comes first, its output
    and lse computed again (its forward is the cheapest of the three, a few percent of the backward's time; a
    forward with gradients then holds two branch outputs, not three), freed once its row delta is taken."""
    cfg, scale, dims = b.config, b.scale, b.dims
    dout = dout.to(q.dtype).contiguous()
    dsinks = None if sinks is None else torch.zeros(sinks.shape, device=q.device, dtype=torch.float32)

    def prep(o, lse, g):
        """The branch's do, row delta and gate gradient. With sinks its output enters the sum scaled by s =
        sigmoid(lse - sink): the gate g * s, the gate's gradient s * sum(dout * o), and lse's gradient dlse = g *
        s * (1 - s) * sum(dout * o) (the sink's: -dlse), which a row's score gradients take as p * dlse, that is
        with delta - dlse for delta."""
        if sinks is None:
            return _gated_prep(dout, o, lse, g)
        s, rest = _sink_scale(lse, sinks, rest=True)
        do, delta, dgs = _gated_prep(dout, o, lse, (g * s).contiguous())  # dgs: sum(dout * o), float32
        dlse = dgs * g * s * rest
        delta -= dlse.t()
        dsinks.sub_(dlse.sum(0))
        return do, delta, (dgs * s).to(g.dtype)

    def branch(o, lse, g, run):
        do, delta, dg = prep(o, lse, g)
        return run(do, o, lse, delta), dg

    o_swa, lse = flash_fwd(q, k, v, dims, True, cfg.window, scale, softcap=b.softcap)
    do, delta, dg_swa = prep(o_swa, lse, gates[2])
    del o_swa  # (before the backward's dq: the window's output is not needed again)
    dq, dk_swa, dv_swa = flash_bwd(do, q, k, v, lse, delta, dims, True, cfg.window, scale, softcap=b.softcap)
    del do, delta, lse

    def cmp(do, o, lse, delta):
        if kc.shape[0] == 0:  # no sequence reaches a compressed block: nothing attended, no gradient
            return dq, torch.zeros_like(kc), torch.zeros_like(vc)
        return flash_bwd(do, q, kc, vc, lse, delta, b.cmp_dims, True, None, scale,
                         key_pos=(cfg.cmp_stride, cfg.cmp_block - 1), dq=dq, query_pos=b.query_pos, softcap=b.softcap)

    (_, dkc, dvc), dg_cmp = branch(*branches[0], gates[0], cmp)
    own, plan = _selected_plan(dims.seqlens_q, b.lengths, dims, cfg.slc_block, q.device)
    (_, dk, dv), dg_slc = branch(*branches[1], gates[1], lambda do, o, lse, delta: _selected_backward(
        do, q, k, v, o, lse, sel, own, dims.cu_seqlens_q, plan, dims, dims.max_seqlen_q, cfg.slc_block, scale,
        delta=delta, dq=dq, cu_k=b.cu, query_pos=b.query_pos, softcap=b.softcap))
    return dq, dk + dk_swa, dv + dv_swa, dkc, dvc, dg_cmp, dg_slc, dg_swa, dsinks


class _NSAttention(torch.autograd.Function):
    """nsa_attention's branches as one autograd node: the backward runs them one at a time against a single dq
    (see _branches_backward) instead of autograd holding every branch's gradients at once and adding them."""

    @staticmethod
    def forward(ctx, q, k, v, kc, vc, g_cmp, g_slc, g_swa, sinks, b: _Branches):
        out, sel, branches = _branches_forward(q, k, v, kc, vc, (g_cmp, g_slc, g_swa), b, keep=True, sinks=sinks)
        ctx.save_for_backward(q, k, v, kc, vc, g_cmp, g_slc, g_swa, sinks, sel,
                              *(t for pair in branches for t in pair))
        ctx.branches = b
        ctx.mark_non_differentiable(sel)
        return out, sel

    @staticmethod
    @first_order_backward("nsa_attention")
    def backward(ctx, saved, dout, dsel):
        q, k, v, kc, vc, *rest = saved
        gates, sinks, sel, flat = rest[:3], rest[3], rest[4], rest[5:]
        branches = tuple(zip(flat[0::2], flat[1::2]))
        *grads, dsinks = _branches_backward(dout, q, k, v, kc, vc, gates, sel, branches, ctx.branches, sinks)
        return (*grads, None if dsinks is None else dsinks.to(sinks.dtype), None)


# torch.compile: in the dense layout TorchDynamo traces nsa_attention down to this custom op (its backward the next):
# the same code as eager mode when the graph runs; the branch outputs and lse are outputs of the op, for its backward
_BRANCHES_ARGS = ("Tensor q, Tensor k, Tensor v, Tensor kc, Tensor vc, Tensor g_cmp, Tensor g_slc, Tensor g_swa, "
                  "Tensor? sinks, Tensor cu, Tensor cu_cmp, int[] lengths, int[] config, float scale, float softcap")


def _op_branches(cu, cu_cmp, lengths, config, scale, softcap) -> _Branches:
    return _Branches(NSAConfig(**dict(zip(_CONFIG_FIELDS, config))), list(lengths), cu, cu_cmp, scale, softcap)


@torch.library.custom_op("longattn::nsa_branches", mutates_args=(),
                         schema=f"({_BRANCHES_ARGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _branches_op(q, k, v, kc, vc, g_cmp, g_slc, g_swa, sinks, cu, cu_cmp, lengths, config, scale, softcap):
    with eager_context(q):
        ins = kernel_inputs(q, k, v, kc, vc)
        b = _op_branches(cu, cu_cmp, lengths, config, scale, softcap).shape(*ins[:3])
        out, sel, branches = _branches_forward(*ins, (g_cmp, g_slc, g_swa), b, keep=True, sinks=sinks)
    return (out.to(q.dtype), sel, *(t.to(q.dtype) if t.dim() == 3 else t for pair in branches for t in pair))


@_branches_op.register_fake
def _branches_shapes(q, k, v, kc, vc, g_cmp, g_slc, g_swa, sinks, cu, cu_cmp, lengths, config, scale, softcap):
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    sel = q.new_empty(q.shape[0], k.shape[1], config[_CONFIG_FIELDS.index("slc_topk")], dtype=torch.int32)
    return (o, sel) + tuple(t.clone() for t in (o, lse) * 2)


@torch.library.custom_op("longattn::nsa_branches_backward", mutates_args=(),
                         schema=f"(Tensor dout, Tensor sel, Tensor o_cmp, Tensor lse_cmp, Tensor o_slc, "
                                f"Tensor lse_slc, {_BRANCHES_ARGS}) -> "
                                "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _branches_backward_op(dout, sel, o_cmp, lse_cmp, o_slc, lse_slc, q, k, v, kc, vc, g_cmp, g_slc, g_swa, sinks, cu,
                          cu_cmp, lengths, config, scale, softcap):
    """The gradients of the branches' inputs, the sinks' last (empty without sinks)."""
    with eager_context(q):
        ins = kernel_inputs(q, k, v, kc, vc)
        b = _op_branches(cu, cu_cmp, lengths, config, scale, softcap).shape(*ins[:3])
        o_cmp, o_slc, dout = kernel_inputs(o_cmp, o_slc, dout)
        *grads, dsinks = _branches_backward(dout, *ins, (g_cmp, g_slc, g_swa), sel,
                                            ((o_cmp, lse_cmp), (o_slc, lse_slc)), b, sinks)
    dsinks = q.new_empty(0) if sinks is None else dsinks.to(sinks.dtype)
    return (*(g.to(t.dtype) for g, t in zip(grads, (q, k, v, kc, vc, g_cmp, g_slc, g_swa))), dsinks)


@_branches_backward_op.register_fake
def _branches_backward_shapes(dout, sel, o_cmp, lse_cmp, o_slc, lse_slc, *ins):
    sinks = ins[8]
    return (*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in ins[:8]),
            ins[0].new_empty(0) if sinks is None else torch.empty_like(sinks))


def _branches_op_save(ctx, inputs, output):
    ctx.save_for_backward(*output[1:], *inputs[:11])
    ctx.options = inputs[11:]
    ctx.has_sinks = inputs[8] is not None
    ctx.mark_non_differentiable(*output[1:])


def _branches_op_backward(ctx, dout, *unused):
    saved = ctx.saved_tensors
    *grads, dsinks = torch.ops.longattn.nsa_branches_backward(dout, *saved, *ctx.options)
    return (*grads, dsinks if ctx.has_sinks else None) + (None,) * 6


_branches_op.register_autograd(_branches_op_backward, setup_context=_branches_op_save)


def _selected(qp, kp, vp, sel, lq: list, lk: list, dims, cu, block_size: int, scale: float) -> torch.Tensor:
    """The selected branch on packed inputs; sel int32 (total, Hkv, n) holding each row's own block."""
    if torch.compiler.is_compiling():  # (queries and keys are the same tokens)
        return torch.ops.longattn.nsa_selected(qp, kp, vp, sel, cu, lq, block_size, scale)[0]
    own, plan, (qk_, kk_, vk_) = _selected_setup(qp, kp, vp, lq, lk, dims, block_size)
    return _Selected.apply(qk_, kk_, vk_, sel, own, plan, dims, cu, max(lq, default=0), block_size, scale)


@public_op("q", "k", "v")
def nsa_selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, *,
                           block_size: int = 64, cu_seqlens: Optional[torch.Tensor] = None,
                           max_seqlen: Optional[int] = None, scale: Optional[float] = None) -> torch.Tensor:
    """NSA's selected branch alone: each query attends, in one softmax, to the key blocks its GQA group
    selected (causally inside its own block), differentiable in q, k, v.

    Args:
        q, k, v: ``(B, T, Hq, Dk)`` / ``(B, T, Hkv, Dk)`` / ``(B, T, Hkv, Dv)`` or varlen ``(total, H, D)`` with
            ``cu_seqlens`` (int32); queries and keys are the same tokens.
        block_indices: int ``(B, T, Hkv, n)`` / ``(total, Hkv, n)``: for every query and KV head, the blocks
            (``block_size`` tokens from the sequence start, each listed once, -1 = unused slot) shared by the
            group's query heads. Each query's own block must be listed; later blocks must not.
        block_size: a power of two from 16 to 65536 (default 64).
        scale: softmax scale, default ``Dk ** -0.5``.
    Returns:
        ``(B, T, Hq, Dv)`` / ``(total, Hq, Dv)`` in q's dtype.

    One program per block of consecutive queries and KV head holds the group's heads of those queries as the
    rows of its tiles and visits the union of their selected blocks once each: a loaded block serves the
    whole group of every query that selected it, and the output is written once.
    """
    dims = check_attention_inputs(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                  max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    if not dims.varlen and dims.max_seqlen_q != dims.max_seqlen_k:
        raise ValueError(f"q and k must have the same length, got {dims.max_seqlen_q} and {dims.max_seqlen_k}")
    scale = check_scale(scale, dims.dim_qk ** -0.5)
    qp, kp, vp, lq, lk = pack_inputs(q, k, v, dims)
    sel = check_block_indices(block_indices, dims, dims.heads_kv, lq, lk, block_size, own_listed=True, q=q)
    out = _selected(qp, kp, vp, sel, lq, lk, dims, _cu(lq, q.device), block_size,
                    scale)
    return out if dims.varlen else out.view(dims.batch, dims.max_seqlen_q, dims.heads_q, dims.dim_v)


# traced by TorchDynamo in the dense layout (its branches are custom ops); with cu_seqlens the lengths are read on
# the host: opaque (a graph break)
@public_op("q", "k", "v", "k_cmp", "v_cmp", traced=True, opaque_if=lambda q, k, *args, cu_seqlens=None,
           cu_seqlens_q=None, **kwargs: cu_seqlens is not None or cu_seqlens_q is not None or q.shape[1] != k.shape[1])
def nsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cmp: torch.Tensor, g_slc: torch.Tensor,
                  g_swa: torch.Tensor, *, config: NSAConfig = NSAConfig(), k_cmp: Optional[torch.Tensor] = None,
                  v_cmp: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                  max_seqlen: Optional[int] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                  cu_seqlens_k: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                  sinks: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                  return_selection: bool = False):
    """Native Sparse Attention (prefill / training), differentiable in q, k, v, the gates, k_cmp/v_cmp and sinks.

    ``o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`` with the semantics of
    :mod:`longattn.nsa.reference`.

    Args:
        q: ``(B, T, Hq, Dk)`` or varlen ``(total, Hq, Dk)`` with ``cu_seqlens`` (int32).
        k, v: ``(B, T, Hkv, Dk)`` / ``(B, T, Hkv, Dv)`` (or varlen); every query head group shares one
            selection. Group sizes 1 to 16 (any ``Hq % Hkv == 0`` works).
            A chunk after a prefix (chunked prefill; training a sequence's last tokens against keys and values
            that include earlier ones): q holds the last ``Tq`` of the ``Tk`` tokens of k and v (dense,
            ``Tq <= Tk``; varlen, ``cu_seqlens_q`` and ``cu_seqlens_k`` instead of ``cu_seqlens``, each sequence
            with at most as many queries as keys), query i at position ``Tk - Tq + i``; gates follow q, k_cmp /
            v_cmp (or the mean pooling) the keys. Equal to the last rows of the call on the whole sequences, with
            their gradients (k, v, k_cmp, v_cmp over every token), at the cost of the chunk's queries only.
        g_cmp, g_slc, g_swa: gates ``(B, T, Hq)`` / ``(total, Hq)``, any float dtype, typically in [0, 1].
        config: :class:`NSAConfig` (paper defaults).
        k_cmp, v_cmp: compressed keys/values ``(B, n_cmp, Hkv, D*)`` / packed ``(total_cmp, Hkv, D*)`` from a
            learnable compressor; default: mean pooling of k and v.
        scale: softmax scale of every branch, default ``Dk ** -0.5``.
        sinks: attention sinks (gpt-oss's), ``(Hq,)`` float logits, one per query head, in the softmax of each
            branch as a key without a value: a branch's output scaled by ``sigmoid(lse - sink)`` (lse of its
            scaled scores). The selection reads the compressed probabilities without them. Default: none.
        softcap: soft-capping of every branch's scores (Gemma 2's, 50.0): a positive ``c`` makes them
            ``c * tanh(scale * q.k / c)``, the compressed probabilities that score the selection included. None or 0
            (default): none.
        return_selection: also return the selected blocks, int32 ``(B, T, Hkv, slc_topk)`` / ``(total, Hkv,
            slc_topk)``, best first, -1 padded.
    Returns:
        ``(B, T, Hq, Dv)`` / ``(total, Hq, Dv)`` in q's dtype.

    Branches: compressed attention through the flash kernels with strided key positions (which also give the
    row lse); scores + top-n in one kernel that never stores the (T, n_cmp) probabilities; selected blocks by
    blocks of consecutive queries, the group's heads as the rows of each tile (they share each loaded block;
    dk/dv run through the block-sparse engine's gradient kernels, by key block), whose launch also writes the
    gated sum of the three branches (float32 inside; without gradients over the compressed branch's output, the
    selected branch's own never stored); the window through the flash kernels. The three branches are one
    autograd node, whose backward takes them one at a time: a branch's gate-scaled output gradient, row delta
    and gate gradient in one pass, then its kernels, each adding to one dq. No branch's output gradient or dq
    lives beside another's. The node keeps the compressed and selected branches' outputs for the backward, which
    runs the window branch's forward again (the cheapest of the three). Memory beyond the inputs with 64 query /
    4 KV heads, d 192 / 128, per token: 33 KB at the forward's peak (without gradients), 49 KB held from a forward
    with gradients to its backward (the output included), 100 KB at the peak of forward + backward.

    ``torch.compile``: in the dense layout TorchDynamo traces the op, the branches one custom op
    (``torch.ops.longattn.nsa_branches``, its backward ``nsa_branches_backward``): no graph break. With
    ``cu_seqlens`` the lengths are read on the host and the op runs as it is (a graph break).
    """
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = resolve_seqlens(cu_seqlens, max_seqlen, cu_seqlens_q,
                                                                            cu_seqlens_k, None, None)
    dims = check_attention_inputs(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    scale = check_scale(scale, dims.dim_qk ** -0.5)
    softcap = check_softcap(softcap)
    gshape = q.shape[:-1]
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        check_tensor(g, name, dtypes=(torch.float16, torch.bfloat16, torch.float32))
        if tuple(g.shape) != tuple(gshape):
            raise ValueError(f"{name} must have shape {tuple(gshape)} (one gate per query head), got {tuple(g.shape)}")
    check_sinks(sinks, dims.heads_q)
    check_device({"q": q, "g_cmp": g_cmp, "g_slc": g_slc, "g_swa": g_swa, "sinks": sinks})
    qp, kp, vp, lq, lk = pack_inputs(q, k, v, dims)
    chunk = lq != lk  # queries after a prefix
    if chunk:
        if any(a > b for a, b in zip(lq, lk)):
            raise ValueError(f"each sequence must have at most as many queries as keys (its last tokens the queries), "
                             f"got {lq} queries for {lk} keys")
    n_cmp = [config.num_cmp_blocks(n) for n in lk]
    if k_cmp is None and v_cmp is None:
        kc, vc = _mean_compress(kp, lk, config), _mean_compress(vp, lk, config)
    elif k_cmp is None or v_cmp is None:
        raise ValueError("pass both k_cmp and v_cmp, or neither")
    else:
        for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
            check_tensor(t, name, ndim=3 if dims.varlen else 4)
        check_same_dtype({"q": q, "k_cmp": k_cmp, "v_cmp": v_cmp})
        check_device({"q": q, "k_cmp": k_cmp, "v_cmp": v_cmp})
        lead = (sum(n_cmp),) if dims.varlen else (dims.batch, n_cmp[0] if n_cmp else 0)
        want_k, want_v = (*lead, dims.heads_kv, dims.dim_qk), (*lead, dims.heads_kv, dims.dim_v)
        if tuple(k_cmp.shape) != want_k or tuple(v_cmp.shape) != want_v:
            raise ValueError(f"k_cmp/v_cmp must hold {sum(n_cmp)} compressed blocks: shapes {want_k} and {want_v}, "
                             f"got {tuple(k_cmp.shape)} and {tuple(v_cmp.shape)}")
        kc = k_cmp if dims.varlen else k_cmp.reshape(-1, *k_cmp.shape[2:])
        vc = v_cmp if dims.varlen else v_cmp.reshape(-1, *v_cmp.shape[2:])
    if qp.shape[0] == 0:  # no token: empty results, still part of the autograd graph
        anchor = sum(t.sum() for t in (q, k, v, g_cmp, g_slc, g_swa, kc, vc, sinks) if t is not None) * 0
        out = q.new_zeros(*gshape, dims.dim_v) + anchor.to(q.dtype)
        sel = torch.empty(*q.shape[:-2], dims.heads_kv, config.slc_topk, dtype=torch.int32, device=q.device)
        return (out, sel) if return_selection else out
    cu, cu_cmp = _cu(lk, q.device), _cu(n_cmp, q.device)
    gates = [g.reshape(qp.shape[0], dims.heads_q).contiguous() for g in (g_cmp, g_slc, g_swa)]
    ins = [qp, kp, vp, kc if kc.stride(-1) == 1 else kc.contiguous(), vc if vc.stride(-1) == 1 else vc.contiguous()]
    if torch.compiler.is_compiling():
        values = [getattr(config, name) for name in _CONFIG_FIELDS]
        out, sel = torch.ops.longattn.nsa_branches(*ins, *gates, sinks, cu, cu_cmp, lq, values, scale, softcap)[:2]
    else:
        ins = kernel_inputs(*ins)
        branches = _Branches(config, lk, cu, cu_cmp, scale, softcap)
        if chunk:
            branches.lengths_q, branches.cu_q = lq, _cu(lq, q.device)
            branches.query_pos = device_tensor([b - a for a, b in zip(lq, lk)], torch.int32, q.device)
        branches.shape(*ins[:3])
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*ins, *gates, sinks)):
            out, sel = _NSAttention.apply(*ins, *gates, sinks, branches)
        else:
            out, sel, _ = _branches_forward(*ins, gates, branches, keep=False, sinks=sinks)
    out = out.to(q.dtype)
    if not dims.varlen:
        out = out.view(dims.batch, dims.max_seqlen_q, dims.heads_q, dims.dim_v)
        sel = sel.view(dims.batch, dims.max_seqlen_q, dims.heads_kv, sel.shape[-1])
    return (out, sel) if return_selection else out


@functools.lru_cache(maxsize=16)
def _score_weights(config: NSAConfig, device: torch.device) -> torch.Tensor:
    """Eq. 9's weights on the device, built once per (config, device) rather than copied at every call."""
    return config.score_weights().to(device=device, dtype=torch.float32)


def _gates(g_cmp: torch.Tensor, g_slc: torch.Tensor, g_swa: torch.Tensor) -> torch.Tensor:
    """The three (B, Hq) gates as one (3, B, Hq) tensor with unit head stride: a strided view when they are
    evenly spaced views of one tensor (as the module's, split from one (..., 3, Hq) projection), else a copy."""
    gates = (g_cmp, g_slc, g_swa)
    step = g_slc.data_ptr() - g_cmp.data_ptr()
    if step >= 0 and g_swa.data_ptr() - g_slc.data_ptr() == step and step % g_cmp.element_size() == 0 and \
            g_cmp.stride(1) == 1 and all(g.dtype == g_cmp.dtype and g.stride() == g_cmp.stride() and
                                         g.untyped_storage().data_ptr() == g_cmp.untyped_storage().data_ptr()
                                         for g in gates):
        return g_cmp.as_strided((3, *g_cmp.shape), (step // g_cmp.element_size(), *g_cmp.stride()))
    return torch.stack(gates)


def decode_tiles(config: NSAConfig, dtype: torch.dtype) -> tuple:
    """(keys per step, selected-block tile, selection blocks per scoring chunk, launch options) of the decoding
    kernels. A scoring chunk's C*R compressed keys (128 on a GPU) are one matmul, and C covers Eq. 9's reach into
    the previous chunk. float32 multiplies on CUDA cores: 16-key steps, 64-key chunks and 8 warps keep its
    registers from spilling (at 64 heads per KV head they spilled 66 KB per thread in the one-program path)."""
    fp32 = dtype == torch.float32 and not small_tiles()
    block_n, chunk_keys = (32, 64) if small_tiles() else (16, 64) if fp32 else (64, 128)
    ratio = config.slc_block // config.cmp_stride
    reach = next_pow2(cdiv(ratio + config.cmp_block // config.cmp_stride - 2, ratio))
    c = max(reach, max(1, chunk_keys // ratio))
    return block_n, min(config.slc_block, 16 if fp32 else 64), c, dict(num_warps=8) if fp32 else {}


@public_op("q", "k_cache", "v_cache", "k_cmp", "v_cmp")
def nsa_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_cmp: torch.Tensor,
               v_cmp: torch.Tensor, g_cmp: torch.Tensor, g_slc: torch.Tensor, g_swa: torch.Tensor, *,
               cache_seqlens: torch.Tensor, cache_offsets: Optional[torch.Tensor] = None,
               block_table: Optional[torch.Tensor] = None, cache_rows: Optional[torch.Tensor] = None,
               config: NSAConfig = NSAConfig(), scale: Optional[float] = None, sinks: Optional[torch.Tensor] = None,
               softcap: Optional[float] = None, k_scale: float = 1.0, v_scale: float = 1.0,
               num_splits: Optional[int] = None, return_selection: bool = False, validate: bool = True):
    """NSA for one new token per sequence against a KV cache (inference; not differentiable).

    The token of sequence b sits at position ``t = cache_seqlens[b] - 1``: its own K/V are already in the
    cache. Each Triton program serves a whole GQA group (the heads share the selection and every loaded
    block). With enough sequences one program per (sequence, KV head) runs the three branches back to back:
    compressed attention over the sequence's complete compressed blocks, the selection scores and top-n,
    the selected blocks, then the window and the gated sum. With few sequences (split-KV) the compressed
    attention and the scoring are spread over ``num_splits`` programs per (sequence, KV head), merged by lse
    and by a top-n of the splits' candidates, so that batch 1 fills the GPU. Either way it reads the
    compressed keys, the n selected blocks and the window, never the rest of the cache.

    Args:
        q: ``(B, Hq, Dk)``.
        k_cache, v_cache: ``(B, L, Hkv, Dk)`` / ``(B, L, Hkv, Dv)``, any strides with a contiguous last dim
            (so a transformers cache ``(B, Hkv, L, D)`` transposed works without a copy); or paged, ``(num_pages,
            page_size, Hkv, D*)`` with ``block_table`` (pages of any size; L is then ``max_pages * page_size``).
            q's dtype, or float8 (``float8_e4m3fn`` / ``float8_e5m2``, both: a quantised cache, see k_scale /
            v_scale, widened to q's dtype as it is read).
        k_cmp, v_cmp: compressed keys/values ``(B, N, Hkv, D*)`` in q's dtype; row b must hold at least
            ``config.num_cmp_blocks(cache_seqlens[b])`` blocks (the extra ones are not read).
        g_cmp, g_slc, g_swa: gates ``(B, Hq)``, any float dtype.
        cache_seqlens: int32 ``(B,)``, tokens of each sequence (the new one included), >= 1.
        cache_offsets: int32 ``(B,)``, cache row of each sequence's first token (left-padded caches,
            like transformers' with a padding mask); default 0. Contiguous caches only.
        block_table: int32 ``(B, max_pages)`` (one row per cache row, see cache_rows): the page of k_cache /
            v_cache holding each sequence's tokens ``j * page_size`` to ``(j + 1) * page_size - 1`` (a paged KV
            cache, as a serving engine keeps it; the compressed caches stay batched).
        cache_rows: int32 ``(B,)``, the caches' batch row each query reads (default: row b). Several new tokens
            of one sequence (a chunk after a cached prefix, speculative decoding) then run in one call, each
            its own query row with its own ``cache_seqlens`` (the token at position ``cache_seqlens[b] - 1``);
            the caches (k_cache, v_cache, k_cmp, v_cmp; paged: block_table, k_cmp, v_cmp) have
            ``max(cache_rows) + 1`` rows or more.
        config, scale, sinks, softcap: as in :func:`nsa_attention` (scale defaults to ``Dk ** -0.5``; sinks
            ``(Hq,)``; softcap None).
        k_scale, v_scale: dequantisation scales of k_cache / v_cache (per tensor): the keys are ``k_cache *
            k_scale``, the values ``v_cache * v_scale`` (a float8 cache's scales; default 1). The compressed keys
            and values are given as they are (compressed from the dequantised tokens).
        num_splits: programs per (sequence, KV head) over the compressed blocks, at most 64; default: 1 when
            the batch fills the GPU or the context is short, else enough to fill it.
        return_selection: also return the selected blocks, int32 ``(B, Hkv, slc_topk)``, best first,
            -1 padded.
        validate: check ``cache_seqlens``/``cache_offsets`` against the cache and ``k_cmp``, and the block-table
            entries the lengths use against the pages (default). That reads them back to the host, a
            synchronisation; ``validate=False`` skips it (no host synchronisation at all, so a decoding step can be
            captured in a CUDA graph, its work sized for the cache's length L) and leaves the caller responsible:
            out-of-range lengths read outside the caches (pages are clamped to the cache's).
    Returns:
        ``(B, Hq, Dv)`` in q's dtype. Equal to the last row of :func:`nsa_attention` on the sequence.
    """
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
    paged = block_table is not None
    bc = check_cache_rows(cache_rows, k_cmp if paged else k_cache)
    B, hq, dk, L, hkv, dv = check_decode_inputs(q, k_cache, v_cache, {"k_cmp": k_cmp, "v_cmp": v_cmp},
                                                {"cache_seqlens": cache_seqlens, "cache_offsets": cache_offsets,
                                                 "cache_rows": cache_rows, "block_table": block_table},
                                                cache_batch=k_cache.shape[0] if paged else bc, float8_caches=True)
    bc = B if bc is None else bc
    page = 0
    if paged:
        L, page = check_block_table(block_table, cache_offsets, k_cache, v_cache, bc)
    for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if t is None:
            raise TypeError(f"{name} must be a torch.Tensor, got None")
    if tuple(k_cmp.shape[::2]) != (bc, hkv) or k_cmp.shape[-1] != dk or tuple(v_cmp.shape) != \
            (*k_cmp.shape[:3], dv):
        raise ValueError(f"k_cmp/v_cmp must be (B, N, Hkv, Dk) / (B, N, Hkv, Dv) = ({bc}, N, {hkv}, {dk}) / "
                         f"({bc}, N, {hkv}, {dv}), got {tuple(k_cmp.shape)} and {tuple(v_cmp.shape)}")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        check_tensor(g, name, dtypes=(torch.float16, torch.bfloat16, torch.float32))
        if tuple(g.shape) != (B, hq):
            raise ValueError(f"{name} must have shape ({B}, {hq}) (one gate per query head), got {tuple(g.shape)}")
    check_sinks(sinks, hq)
    check_device({"q": q, "g_cmp": g_cmp, "g_slc": g_slc, "g_swa": g_swa, "sinks": sinks})
    scale = check_scale(scale, dk ** -0.5)
    softcap = check_softcap(softcap)
    qk_scale, soft = _score_args(scale, softcap, q.dtype)
    # the selected and window branches' scores: the cache's keys dequantised (their scale folded in)
    kv_qk_scale, kv_soft = _score_args(scale * check_scale(k_scale, 1.0, "k_scale"), softcap, q.dtype)
    v_scale = check_scale(v_scale, 1.0, "v_scale")
    cache_seqlens, cache_offsets, lens = check_cache_lengths(cache_seqlens, cache_offsets, B, L, validate)
    cache_rows = validate_cache_rows(cache_rows, B, bc, validate)  # a second synchronisation, only with cache_rows
    if paged:
        block_table = block_table.contiguous()
        if validate:  # the pages each sequence's length uses (one more synchronisation)
            validate_pages(block_table, cache_rows, lens, L, page, k_cache.shape[0])
    if B == 0:
        out = q.new_empty(0, hq, dv)
        return (out, torch.empty(0, hkv, config.slc_topk, dtype=torch.int32, device=q.device)) \
            if return_selection else out
    max_len = max(lens)
    for b, n in enumerate(lens if validate else ()):
        if config.num_cmp_blocks(n) > k_cmp.shape[1]:
            raise ValueError(f"k_cmp holds {k_cmp.shape[1]} compressed blocks per sequence but sequence {b} "
                             f"({n} tokens) needs {config.num_cmp_blocks(n)}")

    if num_splits is not None:
        check_positive_int(num_splits, "num_splits")
        num_splits = min(num_splits, MAX_SPLITS)

    qk, kk, vk, kck, vck = kernel_inputs(q, k_cache, v_cache, k_cmp, v_cmp)
    gates = _gates(g_cmp, g_slc, g_swa)
    has_sinks = sinks is not None
    sinks = sinks.float().contiguous() if has_sinks else gates  # (not read without sinks)
    weights = _score_weights(config, q.device)
    out = empty(B, hq, dv, device=q.device, dtype=q.dtype)
    sel = empty(B, hkv, config.slc_topk, device=q.device, dtype=torch.int32)
    group = hq // hkv
    block_n, slc_tile, c, launch = decode_tiles(config, q.dtype)
    nw = config.slc_block // config.cmp_stride + config.cmp_block // config.cmp_stride - 1
    n_cmp = config.num_cmp_blocks(max_len)
    n_slc = (max_len - 1) // config.slc_block + 1
    if num_splits is None:
        programs = B * hkv
        num_splits = 1 if programs >= num_sms(q.device) or n_cmp < 4 * block_n else \
            min(cdiv(2 * num_sms(q.device), programs), cdiv(n_cmp, block_n), MAX_SPLITS)
    dims = dict(DK=dk, DV=dv, BLOCK_DK=max(16, next_pow2(dk)), BLOCK_DV=max(16, next_pow2(dv)),
                BLOCK_G=max(16, next_pow2(group)), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                HAS_ROWS=cache_rows is not None)
    rows_arg = cache_rows if cache_rows is not None else cache_seqlens  # not read without HAS_ROWS
    widen = widen_by_asm(q.dtype, k_cache.dtype)  # (a float8 cache, see flash._widen)
    # a paged cache: its block table, last page and page size (PAGE = 0: contiguous, the table not read)
    paging = ((block_table, block_table.stride(0), k_cache.shape[0] - 1, page) if paged else
              (cache_seqlens, 0, 0, 0))
    blocks = dict(SLC_BLOCK=config.slc_block, TOPK=config.slc_topk, TOPK_PAD=next_pow2(config.slc_topk))
    selection = dict(CMP_STRIDE=config.cmp_stride, CMP_BLOCK=config.cmp_block, INIT=config.init_blocks,
                     NW=nw, LOCAL=config.local_blocks, C=c)
    attend = dict(BLOCK_N=block_n, SLC_TILE=slc_tile, WINDOW=config.window)
    common = (qk.stride(0), qk.stride(1))
    cache_strides = (kk.stride(0), kk.stride(1), kk.stride(2), vk.stride(0), vk.stride(1), vk.stride(2))
    cmp_strides = (kck.stride(0), kck.stride(1), kck.stride(2), vck.stride(0), vck.stride(1), vck.stride(2))
    if num_splits == 1:
        _nsa_decode_kernel[(B, hkv)](
            qk, kk, vk, kck, vck, gates, weights, out, sel, cache_seqlens, cache_offsets, rows_arg, paging[0], sinks,
            *common, *cache_strides, *cmp_strides, gates.stride(0), gates.stride(1), out.stride(0), out.stride(1),
            sel.stride(0), sel.stride(1), paging[1], group, qk_scale, kv_qk_scale, kv_soft["cap_scale"], v_scale,
            paging[2], **dims, **blocks, **selection,
            **attend, PAGE=paging[3], HAS_SINKS=has_sinks, WIDEN_ASM=widen, **soft, **launch, **COMPILE_OPTIONS)
        return (out, sel) if return_selection else out

    # split-KV: partial compressed attention per split, per-split top-n (each program merging the splits' lse), then
    # the final top-n and the other branches in pieces, all merged by lse in the last step
    per = max(1, cdiv(cdiv(n_cmp, num_splits), block_n)) * block_n
    s1 = max(1, cdiv(n_cmp, per))
    parts = empty(s1, B, hq, dv, device=q.device, dtype=torch.float32)
    lses = empty(s1, hq, B, device=q.device, dtype=torch.float32)
    _nsa_decode_cmp_split_kernel[(B, hkv, s1)](
        qk, kck, vck, parts, lses, cache_seqlens, rows_arg, *common, *cmp_strides, parts.stride(0), parts.stride(1),
        parts.stride(2), lses.stride(0), lses.stride(1), group, per, qk_scale, **dims, BLOCK_N=block_n,
        CMP_STRIDE=config.cmp_stride, CMP_BLOCK=config.cmp_block, **soft, **launch, **COMPILE_OPTIONS)
    per2 = max(1, cdiv(cdiv(n_slc, num_splits), c)) * c
    s2 = max(1, cdiv(n_slc, per2))
    top_pad = next_pow2(config.slc_topk)
    cand = empty(B, hkv, s2, top_pad, device=q.device, dtype=torch.int64)
    _nsa_decode_score_split_kernel[(B, hkv, s2)](
        qk, kck, lses, weights, cand, cache_seqlens, rows_arg, *common, kck.stride(0), kck.stride(1), kck.stride(2),
        lses.stride(0), lses.stride(1), cand.stride(0), cand.stride(1), cand.stride(2), group, per2, s1, qk_scale,
        **{k: v for k, v in dims.items() if k not in ("DV", "BLOCK_DV")}, **blocks, **selection, **soft, **launch,
        **COMPILE_OPTIONS)
    # the selected blocks and the window in pieces (one block, or WINDOW_PIECE keys, each), merged with the
    # compressed output and gated in a last small kernel: one program per (sequence, KV head) would run them all
    window_piece = 32 if small_tiles() else 128
    n_pieces = config.slc_topk + cdiv(min(config.window, max_len), window_piece)  # (a window past the keys: theirs)
    piece_out = empty(n_pieces, B, hq, dv, device=q.device, dtype=torch.float32)
    piece_lse = empty(n_pieces, hq, B, device=q.device, dtype=torch.float32)
    _nsa_decode_piece_kernel[(B, hkv, n_pieces)](
        qk, kk, vk, cand, piece_out, piece_lse, sel, cache_seqlens, cache_offsets, rows_arg, paging[0], *common,
        *cache_strides, cand.stride(0), cand.stride(1), piece_out.stride(0), piece_out.stride(1), piece_out.stride(2),
        piece_lse.stride(0), piece_lse.stride(1), sel.stride(0), sel.stride(1), paging[1], group, s2, kv_qk_scale,
        v_scale, paging[2], **dims, BLOCK_N=block_n, SLC_BLOCK=config.slc_block, TOPK=config.slc_topk,
        TOPK_PAD=top_pad, CAND_PAD=next_pow2(s2 * top_pad), WINDOW=config.window, WINDOW_PIECE=window_piece,
        PAGE=paging[3], WIDEN_ASM=widen, **kv_soft, **launch, **COMPILE_OPTIONS)
    block_h = min(16, next_pow2(hq))
    _nsa_decode_combine_kernel[(B, cdiv(hq, block_h))](
        parts, lses, piece_out, piece_lse, gates, out, sinks, parts.stride(0), parts.stride(1), parts.stride(2),
        lses.stride(0), lses.stride(1), piece_out.stride(0), piece_out.stride(1), piece_out.stride(2),
        piece_lse.stride(0), piece_lse.stride(1), gates.stride(0), gates.stride(1), out.stride(0), out.stride(1), hq,
        s1, n_pieces, DV=dv, BLOCK_DV=dims["BLOCK_DV"], BLOCK_H=block_h, TOPK=config.slc_topk, HAS_SINKS=has_sinks,
        **COMPILE_OPTIONS)
    return (out, sel) if return_selection else out


__all__ = ["nsa_attention", "nsa_selected_attention", "nsa_select", "nsa_decode"]
