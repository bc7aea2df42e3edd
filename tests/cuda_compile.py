"""Compile longattn's Triton kernels for a CUDA target (sm_90) on a machine without a GPU.

The interpreter that runs the CPU tests never lowers a kernel to GPU code, so errors that only the
compiler sees (types, layouts, shared-memory use) would otherwise wait for a GPU. It also fails a kernel that
forms a row-times-stride offset in 32 bits (``narrow_offsets``: wrong addresses past 2^31 elements, which no
small test reaches). Run as a script
(`python tests/cuda_compile.py [name-filter] [--resources] [--pipelined] [--shard=i/n]`; ``--resources`` adds
each kernel's shared memory, registers and spills, in all and per iteration of each innermost loop;
``--pipelined`` checks the hot loops' buffers, unduplicated products and unspilled loops; ``--shard=i/n``
compiles every n-th case from the i-th); it must not run with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SMEM_LIMIT = 227 * 1024  # H100/H200 shared memory per block
# floats wherever they are: the soft cap's scale, a quantised cache's dequantisation scales (folded into the scores'
# scale of the branches reading it)
FLOAT_ARGS = ("cap_scale", "kv_cap_scale", "kv_scale_log2", "v_scale")


def compile_kernel(kernel, pointers: dict, constexprs: dict, floats=(), *, num_warps=4, num_stages=3, arch=90, **extra):
    """Compile like a launch would: pointers and ``stride*`` ints specialised as 16-divisible, as the JIT does
    for aligned tensors and strides (without it the compiler can prove no alignment, so it neither vectorises
    loads nor pipelines them, and the register figures are far off); num_stages 3 is the launch default.
    ``extra``: other compile options of a launch (``maxnreg``); the options every launch passes
    (``COMPILE_OPTIONS``) too."""
    fn = kernel if isinstance(kernel, triton.runtime.jit.JITFunction) else kernel.fn
    # constexprs left out take their defaults, as in a launch
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in pointers:  # (or tensor descriptors: "tensordesc<bf16[64,512]>")
            sig[n] = pointers[n]
            if pointers[n].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in floats or n in FLOAT_ARGS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    from longattn.kernels.utils import COMPILE_OPTIONS

    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, **COMPILE_OPTIONS, **extra))


def _flash_cases():
    from longattn.kernels import flash as F
    from longattn.kernels import merge as M
    from longattn.kernels.utils import split_dim

    cases = []
    for dt, causal, window, varlen, dqk, dv, kpos in (("bf16", True, False, True, 128, 128, (1, 0)),
                                                      ("fp16", True, True, False, 192, 128, (1, 0)),
                                                      ("fp32", False, False, False, 128, 128, (1, 0)),
                                                      ("bf16", True, False, True, 192, 128, (16, 31))):
        ptr = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV_", "QB", "KB", "DQB", "DKB")}
        ptr.update(OS="*fp32", LS="*fp32")
        ptr.update({n: "*fp32" for n in ("LSE", "DELTA", "DLSE")})
        ptr.update({"CU_Q": "*i32", "CU_K": "*i32"})
        bd = lambda d: max(16, triton.next_power_of_2(d))
        da, db = split_dim(dqk)
        meta = dict(DQK=dqk, DV=dv, BLOCK_DA=da, BLOCK_DB=db, BLOCK_DV=bd(dv), IS_VARLEN=varlen, CAUSAL=causal,
                    HAS_WINDOW=window, PRECISION="ieee" if dt == "fp32" else "tf32", KS=kpos[0], KO=kpos[1],
                    LEFT_PAD=not varlen and kpos == (1, 0), BLOCK_M=64, BLOCK_N=64)
        tag = (f"{dt}-d{dqk}/{dv}-{'causal' if causal else 'full'}{'-window' if window else ''}"
               f"{'-varlen' if varlen else ''}{'-strided' if kpos != (1, 0) else ''}"
               f"{'-leftpad' if meta['LEFT_PAD'] else ''}")
        for kern, which in ((F._flash_fwd_kernel, "fwd"), (F._flash_bwd_dkdv_kernel, "dkdv"),
                            (F._flash_bwd_dq_kernel, "dq")):
            # float32 takes its own tiles whatever the candidates (the autotuner's pruning)
            tiles, launch = (F.FP32_TILES[which], (dict(num_warps=8, num_stages=1),)) if dt == "fp32" else ({}, ())
            cases.append((f"{kern.fn.__name__}[{tag}]", kern, ptr, dict(meta, **tiles), ("qk_scale", "scale"),
                          *launch))
            if (dt, dqk) == ("bf16", 128) or dt == "fp32" and which == "fwd":  # soft-capped scores (see _softcapped)
                cases.append((f"{kern.fn.__name__}[{tag}-softcap]", kern, ptr,
                              dict(meta, **tiles, SOFTCAP=1 if dt == "fp32" else 2), ("qk_scale", "scale"), *launch))
            if which == "dq":  # adding to a dq (NSA's branches)
                cases.append((f"{kern.fn.__name__}[{tag}-acc]", kern, ptr, dict(meta, **tiles, ACC_DQ=True),
                              ("qk_scale", "scale"), *launch))
            if kpos != (1, 0):  # (NSA's compressed keys for a chunk of queries after a prefix)
                cases += _query_pos_twins(cases[-1:], lambda name: True)
        if dt != "fp32":  # the forward's TMA twins (K/V's row descriptors), on the GPU's first tile
            tile = {k: v for k, v in F.FWD_TILES[0].items() if k.startswith("BLOCK")}
            n = tile["BLOCK_N"]
            descs = {"KA_DESC": f"tensordesc<{dt}[{n},{da}]>", "KB_DESC": f"tensordesc<{dt}[{n},{db}]>" if db else None,
                     "V_DESC": f"tensordesc<{dt}[{n},{bd(dv)}]>"}
            first = {k: v for k, v in F.FWD_TILES[0].items() if k.startswith("num_")}
            for lazy in (False, True):  # (and their twins rescaling lazily)
                cases.append((f"_flash_fwd_kernel[{tag}-first-tma{'-lazy' if lazy else ''}]", F._flash_fwd_kernel,
                              dict(ptr, **{k: v for k, v in descs.items() if v}),
                              dict(meta, **tile, HAS_TMA=True, USE_TMA=True, LAZY_RESCALE=lazy,
                                   **{k: None for k in descs if not descs[k]}), ("qk_scale", "scale"), first))
            cases.append((f"_flash_fwd_kernel[{tag}-first-lazy]", F._flash_fwd_kernel, ptr,
                          dict(meta, **tile, LAZY_RESCALE=True), ("qk_scale", "scale"), first))
            if db:  # q and k read in two tensors each (MLA's latent and rotary dims), TMA and pointers
                kb_desc = dict(descs, KB_DESC=f"tensordesc<{dt}[{n},{db}]>")
                cases.append((f"_flash_fwd_kernel[{tag}-first-tma-split]", F._flash_fwd_kernel, dict(ptr, **kb_desc),
                              dict(meta, **tile, HAS_TMA=True, USE_TMA=True, SPLIT_QK=True), ("qk_scale", "scale"),
                              first))
                for kern in (F._flash_fwd_kernel, F._flash_bwd_dkdv_kernel, F._flash_bwd_dq_kernel):
                    cases.append((f"{kern.fn.__name__}[{tag}-split]", kern, ptr, dict(meta, SPLIT_QK=True),
                                  ("qk_scale", "scale")))
        if dqk + dv > 256 and dt != "fp32":  # dK/dV's one-loop candidates (kept above 256 accumulated columns)
            for t in (t for t in F.DKDV_TILES if t.get("ONE_LOOP")):
                tile = {k: v for k, v in t.items() if k not in ("num_warps", "num_stages")}
                cases.append((f"_flash_bwd_dkdv_kernel[{tag}-one_loop-m{t['BLOCK_M']}n{t['BLOCK_N']}]",
                              F._flash_bwd_dkdv_kernel, ptr, dict(meta, **tile), ("qk_scale", "scale"),
                              dict(num_warps=t["num_warps"], num_stages=t["num_stages"])))
        dec = {k: v for k, v in meta.items() if k not in ("KS", "KO", "BLOCK_M")}
        for tq, g in ((1, 16), (4, 16), (1, 4)):  # decoding: the group's heads x the queries as rows
            rows = max(g, 16 // tq) * tq
            cases.append((f"_flash_decode_kernel[{tag}-q{tq}-g{g}]", F._flash_decode_kernel, ptr,
                          dict(dec, TQ=tq, BLOCK_G=max(g, 16 // tq),
                               BLOCK_N=64 if dt != "fp32" else 32 if rows >= 64 else 16),
                          ("qk_scale", "v_scale"), dict(num_warps=8 if rows >= 64 else 4)))
        if (dt, dqk) == ("bf16", 128):
            cases.append((f"_flash_decode_kernel[{tag}-q1-g16-softcap]", F._flash_decode_kernel, ptr,
                          dict(dec, TQ=1, BLOCK_G=16, BLOCK_N=64, SOFTCAP=2), ("qk_scale", "v_scale"),
                          dict(num_warps=4)))
        if db:  # a few queries of an MLA prefill: q and k in two tensors each
            cases.append((f"_flash_decode_kernel[{tag}-q16-g1-split]", F._flash_decode_kernel, ptr,
                          dict(dec, TQ=16, BLOCK_G=1, BLOCK_N=64 if dt != "fp32" else 16, SPLIT_QK=True),
                          ("qk_scale", "v_scale"), dict(num_warps=4)))
        if not varlen and kpos == (1, 0):  # flash_decode against a cache: lengths per sequence, paged or not
            # float8: a quantised cache, widened to q's dtype (bfloat16 queries: by inline PTX)
            for page, cache, qdt in ((0, dt, dt), (16, dt, dt), (64, dt, dt), (16, "fp8e4nv", dt), (0, "fp8e5", dt),
                                     (16, "fp8e4nv", "bf16"), (0, "fp8e5", "bf16")):
                if cache != dt and dt == "fp32" or qdt != dt and dt != "fp16":
                    continue
                cases.append((f"_flash_decode_kernel[{tag}-q1-g8-cache{f'-page{page}' if page else ''}"
                              f"{'-' + cache if cache != dt else ''}{'-q' + qdt if qdt != dt else ''}]",
                              F._flash_decode_kernel,
                              dict(ptr, Q=f"*{qdt}", SEQLENS="*i32", BT="*i32", K=f"*{cache}", V=f"*{cache}"),
                              dict(dec, TQ=1, BLOCK_G=16, BLOCK_N=64 if dt != "fp32" else 16, HAS_SEQLENS=True,
                                   PAGE=page, LEFT_PAD=not page, WIDEN_ASM=cache != dt and qdt == "bf16"),
                              ("qk_scale", "v_scale"), dict(num_warps=4)))
        cases.append((f"_flash_bwd_prep_kernel[{tag}]", F._flash_bwd_prep_kernel, ptr,
                      dict(DV=dv, BLOCK_DV=bd(dv), IS_VARLEN=varlen, HAS_DLSE=True, BLOCK_M=64), ()))
        mptr = {"O_in": f"*{dt}", "O": f"*{dt}", "DO": f"*{dt}", "DO_in": f"*{dt}", "LSE_in": "*fp32",
                "LSE": "*fp32", "DLSE": "*fp32", "DLSE_in": "*fp32"}
        rows = (2048 if dt == "fp32" else 4096) // bd(dv)  # as merge's _block_t
        cases.append((f"_merge_fwd_kernel[{dt}]", M._merge_fwd_kernel, mptr,
                      dict(D=dv, BLOCK_D=bd(dv), BLOCK_T=rows), ()))
        cases.append((f"_merge_bwd_kernel[{dt}]", M._merge_bwd_kernel, mptr,
                      dict(D=dv, BLOCK_D=bd(dv), HAS_DLSE=True, BLOCK_T=rows), ()))
    # chunked attention (Llama 4): the forward, backward and decoding kernels of a varlen and a left-padded case
    return cases + _chunked_twins(cases, lambda name: not name.startswith("_flash_bwd_prep") and any(
        name.endswith(t) for t in ("[bf16-d128/128-causal-varlen]", "[fp16-d192/128-causal-window-leftpad]",
                                   "-causal-varlen-q1-g16]", "-window-leftpad-q4-g16]")))


def _sparse_cases():
    import torch

    from longattn.kernels import sparse as K
    from longattn.moba import kernels as M
    from longattn.moba.ops import select_rows

    cases = []
    for dt, d, bs in (("bf16", 128, 64), ("fp32", 128, 64)):
        prec = "ieee" if dt == "fp32" else "tf32"
        torch_dt = torch.float32 if dt == "fp32" else torch.bfloat16
        ptr = {n: f"*{dt}" for n in ("Q", "K", "V", "KMEAN", "OS", "DO", "DK", "DV_")}
        ptr.update({n: "*fp32" for n in ("LS", "LSE", "DELTA", "DQ32", "PK", "PV")})
        ptr.update({n: "*i32" for n in ("SEL", "CU_Q", "CU_K", "BLOCK_OFF", "BLOCK_ROW", "BLOCK_LEN", "K_START",
                                         "K_END", "START", "SEQ", "ROWS", "BT")})
        ptr.update({n: "*i64" for n in ("ENTRY", "SEG_START", "TILE_CUM", "CHUNK_CUM", "SLOT")})
        meta = dict(DQK=d, DV=d, BLOCK_DQK=d, BLOCK_DV=d, KSEL=3, PRECISION=prec, GROUP=1)
        kv_meta = {**{k: v for k, v in meta.items() if k != "BLOCK_DQK"}, "BLOCK_DA": d, "BLOCK_DB": 0}
        floats = ("qk_scale", "scale")
        dec_meta = dict(DQK=d, DV=d, BLOCK_DA=d, BLOCK_DB=0, BLOCK_DV=d, KSEL=3, BLOCK_S=4, BLOCK_G=16, SPLIT=512,
                        BLOCK_N=32 if dt == "fp32" else 64, PRECISION=prec)  # as moba_decode launches it
        dec_ptr = dict(ptr, OS="*fp32")  # float32 partial outputs
        # the engine's kernels at every tile their autotuners try: MoBA's head dim 128, and NSA's paper shape for
        # dK/dV (head dim 192 = 128 + 64, v 128, groups of 16; NSA's dq and forward are its own kernels)
        engine = (("fwd", K._sparse_fwd_kernel, "", {k: v for k, v in meta.items() if k != "KSEL"}),  # a slot a launch
                  ("dq", K._sparse_dq_kernel, "", meta),
                  ("dq", K._sparse_dq_kernel, "-group16", dict(meta, GROUP=16)),
                  ("dq", K._sparse_dq_kernel, "-slots", dict(meta, SLOTS=True)),  # deterministic: stores, no atomics
                  ("dkdv", K._sparse_dkdv_kernel, "", kv_meta),
                  ("dkdv", K._sparse_dkdv_kernel, "-group16", dict(kv_meta, GROUP=16)),
                  ("dkdv", K._sparse_dkdv_kernel, "-d192-group16",
                   dict(kv_meta, DQK=192, BLOCK_DA=128, BLOCK_DB=64, GROUP=16)))
        for which, kernel, shape, m in engine:
            dims = (m.get("BLOCK_DQK", m.get("BLOCK_DA", 0) + m.get("BLOCK_DB", 0)), m["BLOCK_DV"])
            for c in K.sparse_candidates(which, prec, bs, dims):
                tag = f"n{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"
                cases.append((f"{kernel.fn.__name__}[{dt}{shape}-{tag}]", kernel, ptr, dict(m, **c.kwargs), floats,
                              dict(num_warps=c.num_warps, num_stages=c.num_stages)))
        finish = dict(DQK=d, DV=d, BLOCK_DA=d, BLOCK_DB=0, BLOCK_DV=d, BLOCK_N=16 if dt == "fp32" else 64)
        cases += [
            (f"_block_mean_kernel[{dt}]", M._block_mean_kernel, ptr, dict(D=d, BLOCK_D=d, BLOCK_T=64), ()),
            (f"_moba_select_kernel[{dt}]", M._moba_select_kernel, ptr,
             dict(D=d, BLOCK_D=d, KSEL=7, C=16, PRECISION=prec, BLOCK_M=select_rows(torch_dt)), ()),
            (f"_sparse_dkdv_finish_kernel[{dt}]", K._sparse_dkdv_finish_kernel, ptr, finish, ()),
            (f"_sparse_dkdv_finish_kernel[{dt}-d192]", K._sparse_dkdv_finish_kernel, ptr,
             dict(finish, DQK=192, BLOCK_DA=128, BLOCK_DB=64), ()),
            (f"_sparse_decode_kernel[{dt}-g4]", K._sparse_decode_kernel, dec_ptr, dict(dec_meta, HAS_ROWS=False),
             floats),
            (f"_sparse_decode_kernel[{dt}-g4-rows]", K._sparse_decode_kernel, dec_ptr, dict(dec_meta, HAS_ROWS=True),
             floats),
            (f"_sparse_decode_kernel[{dt}-g4-page16]", K._sparse_decode_kernel, dec_ptr,  # a paged cache
             dict(dec_meta, HAS_ROWS=False, PAGE=16), floats, dict(num_warps=8)),
            # NSA-like shapes through MoBA: head dim 192 = 128 + 64, groups of 16 selecting 15 blocks each
            (f"_sparse_decode_kernel[{dt}-d192-g16]", K._sparse_decode_kernel, dec_ptr,
             dict(dec_meta, DQK=192, BLOCK_DA=128, BLOCK_DB=64, KSEL=15, BLOCK_S=16, HAS_ROWS=False,
                  BLOCK_N=16 if dt == "fp32" else 64), floats),
            (f"_cache_block_mean_kernel[{dt}]", M._cache_block_mean_kernel, ptr, dict(D=d, BLOCK_D=d, BLOCK_T=64),
             ("scale",)),
            (f"_cache_block_mean_kernel[{dt}-page16]", M._cache_block_mean_kernel, ptr,
             dict(D=d, BLOCK_D=d, BLOCK_T=64, PAGE=16), ("scale",)),
            (f"_moba_decode_select_kernel[{dt}-g8]", M._moba_decode_select_kernel, ptr,
             dict(D=d, BLOCK_D=d, KSEL=7, C=16, PRECISION=prec, BLOCK_G=16, HAS_ROWS=False), ()),
            (f"_moba_decode_select_kernel[{dt}-g8-rows]", M._moba_decode_select_kernel, ptr,
             dict(D=d, BLOCK_D=d, KSEL=7, C=16, PRECISION=prec, BLOCK_G=16, HAS_ROWS=True), ()),
        ]
        if dt == "bf16":  # a float8 cache (InPlaceCache's cache_dtype under MoBA): widened as it is read (e4m3 to
            # bfloat16 by inline PTX, e5m2 by Triton's conversion), paged or not, pooled from it
            for cache, page in (("fp8e4nv", 0), ("fp8e4nv", 16), ("fp8e5", 0)):
                cases.append((f"_sparse_decode_kernel[{dt}-g4{f'-page{page}' if page else ''}-{cache}]",
                              K._sparse_decode_kernel, dict(dec_ptr, K=f"*{cache}", V=f"*{cache}"),
                              dict(dec_meta, HAS_ROWS=False, PAGE=page, WIDEN_ASM=cache == "fp8e4nv"), floats,
                              dict(num_warps=8) if page else {}))
            cases.append((f"_cache_block_mean_kernel[{dt}-fp8e4nv]", M._cache_block_mean_kernel,
                          dict(ptr, K="*fp8e4nv"), dict(D=d, BLOCK_D=d, BLOCK_T=64), ("scale",)))
    # soft-capped scores (Gemma 2: bfloat16 takes the GPU's tanh.approx) in the engine's first tiles
    return cases + _softcap_twins(cases, lambda name: name in (
        "_sparse_fwd_kernel[bf16-n64w4s3]", "_sparse_dq_kernel[bf16-n64w8s2]", "_sparse_dkdv_kernel[bf16-n64w8s3]",
        "_sparse_dkdv_kernel[bf16-d192-group16-n64w8s3]", "_sparse_decode_kernel[bf16-g4]",
        "_sparse_decode_kernel[fp32-g4]"))


def _mla_cases():
    from longattn.mla import kernels as K

    cases = []
    for dt, cache, has_bt, s_pad, block_h, page in (
            ("bf16", "bf16", True, 1, 64, 64), ("bf16", "bf16", True, 4, 16, 64), ("fp16", "fp16", False, 2, 32, 64),
            ("bf16", "bf16", True, 1, 16, 64), ("fp32", "fp32", True, 1, 16, 64), ("bf16", "fp8e4nv", True, 1, 64, 64),
            ("bf16", "bf16", True, 1, 64, 16)):  # (the last: 16-token pages)
        ptr = {n: f"*{dt}" for n in ("QL", "QR")}
        ptr.update({"KV": f"*{cache}", "BT": "*i32", "SEQLENS": "*i32", "OS": "*fp32", "LS": "*fp32"})
        meta = dict(RANK=512, BLOCK_RANK=512, ROPE=64, BLOCK_ROPE=64, PAGE=page, HAS_BT=has_bt, BLOCK_H=block_h,
                    S_PAD=s_pad, PRECISION="tf32" if dt != "fp32" else "ieee", WIDEN_ASM=cache != dt and dt == "bf16")
        # every tile the autotuner tries, those loaded by TMA too (the cache's descriptors: tiles of a page's tokens,
        # at most 64)
        for c in K.decode_candidates(block_h * s_pad, page, 576, meta["PRECISION"], 1 if cache.startswith("fp8") else 2,
                                     tma_tile=min(page, 64)):
            n, tma = c.kwargs["BLOCK_N"], c.kwargs["USE_TMA"]
            tag = f"{dt}-S{s_pad}-H{block_h}{'-paged' if has_bt else ''}{'' if page == 64 else f'{page}'}"
            tag += f"-n{n}x{c.num_stages}"
            tag += "-shared_p" if c.kwargs["SHARED_P"] else ""
            tag += "-tma" if tma else ""
            tag += "-lazy" if c.kwargs["LAZY_RESCALE"] else ""
            tag += f"-{cache}" if cache != dt else ""  # a float8 (quantised) cache
            descs = {"C_DESC": f"tensordesc<{cache}[{n},512]>", "R_DESC": f"tensordesc<{cache}[{n},64]>"}
            cases.append((f"_mla_decode_kernel[{tag}]", K._mla_decode_kernel, dict(ptr, **descs) if tma else ptr,
                          dict(meta, **c.kwargs, HAS_TMA=tma, **({} if tma else dict.fromkeys(descs))),
                          ("qk_scale", "out_scale"), dict(num_warps=c.num_warps, num_stages=c.num_stages)))
    return cases


def _nsa_cases():
    import types

    import torch

    from longattn.nsa import kernels as K
    from longattn.nsa import NSAConfig
    from longattn.nsa.ops import _selected_heads, _selected_meta, decode_tiles

    cases = []
    for dt, d in (("bf16", 192), ("fp32", 64)):
        torch_dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt]
        ptr = {"Q": f"*{dt}", "KC": f"*{dt}", "LSE": "*fp32", "W": "*fp32", "SEL": "*i32", "CU_Q": "*i32",
               "CU_C": "*i32"}
        meta = dict(D=d, BLOCK_DA=128 if d == 192 else d, BLOCK_DB=64 if d == 192 else 0, CMP_STRIDE=16,
                    CMP_BLOCK=32, SLC_BLOCK=64, NW=5, TOPK=16,
                    TOPK_PAD=16, INIT=1, LOCAL=2, GROUP_PAD=16, PRECISION="ieee" if dt == "fp32" else "tf32")
        for c in K.select_candidates(meta["PRECISION"]):  # every tile the autotuner tries
            tag = f"m{c.kwargs['BLOCK_M']}c{c.kwargs['C']}w{c.num_warps}s{c.num_stages}{'h' * c.kwargs['HEAD_ROWS']}"
            launch = dict(num_warps=c.num_warps, num_stages=c.num_stages)
            if c.maxnreg:
                tag, launch["maxnreg"] = f"{tag}r{c.maxnreg}", c.maxnreg
            # (token, head) rows: the group whose 256 rows the autotuner keeps them for (kernels._select_prune)
            group = dict(GROUP_PAD=256 // c.kwargs["BLOCK_M"]) if c.kwargs["HEAD_ROWS"] else {}
            cases.append((f"_nsa_select_kernel[{dt}-d{d}-{tag}]", K._nsa_select_kernel, ptr,
                          dict(meta, **c.kwargs, **group), ("scale_log2",), launch))
        ptr = {name: f"*{dt}" for name in ("Q", "K", "V", "KC", "VC", "OUT")}
        ptr.update(GATES="*fp32", W="*fp32", SEL="*i32", SEQ="*i32", OFF="*i32", ROWS="*i32", BT="*i32", OP="*fp32",
                   LP="*fp32",
                   LSE="*fp32", OC="*fp32", LC="*fp32", CAND="*i64", O=f"*{dt}", CU="*i32", DO=f"*{dt}", DQ=f"*{dt}",
                   DELTA="*fp32")
        dv = 128 if d == 192 else d
        shared = dict(DK=d, DV=dv, BLOCK_DK=256 if d == 192 else d, BLOCK_DV=dv, PRECISION="ieee" if dt == "fp32"
                      else "tf32")
        # the decoding kernels' tiles as nsa_decode sizes them for the paper's config
        block_n, slc_tile, c, launch = decode_tiles(NSAConfig(), torch_dt)
        blocks = dict(SLC_BLOCK=64, TOPK=16, TOPK_PAD=16)
        select = dict(CMP_STRIDE=16, CMP_BLOCK=32, NW=5, INIT=1, LOCAL=2, C=c)
        attend = dict(BLOCK_N=block_n, SLC_TILE=slc_tile, WINDOW=512)
        for block_g in (16, 64):  # GQA groups up to 16, and 64 heads sharing one KV head
            g = dict(shared, BLOCK_G=block_g, HAS_ROWS=block_g == 16)  # decoding with and without cache_rows
            # the selected branch's tiles as its launch sizes them (float32: slices of 16 heads)
            dims = types.SimpleNamespace(heads_q=block_g, heads_kv=1, dim_qk=d, dim_v=dv)
            rows = {k: v for k, v in _selected_meta(dims, 64, 16, torch_dt).items()
                    if k in ("BLOCK_DA", "BLOCK_DB", "SLC_TILE")}
            heads = _selected_heads(block_g, torch_dt)
            no_dk = {k: v for k, v in shared.items() if k != "BLOCK_DK"}
            for name, meta in (("_nsa_decode_kernel", dict(g, **blocks, **select, **attend)),
                               ("_nsa_decode_cmp_split_kernel", dict(g, BLOCK_N=block_n, CMP_STRIDE=16,
                                                                     CMP_BLOCK=32)),
                               ("_nsa_decode_score_split_kernel", dict({k: v for k, v in g.items() if "DV" not in k},
                                                                       **blocks, **select)),
                               ("_nsa_decode_piece_kernel", dict(g, BLOCK_N=block_n, SLC_BLOCK=64, TOPK=16,
                                                                 TOPK_PAD=16, CAND_PAD=512, WINDOW=512,
                                                                 WINDOW_PIECE=128)),
                               ("_nsa_decode_combine_kernel", dict(DV=dv, BLOCK_DV=dv, BLOCK_H=16, TOPK=16)),
                               ("_nsa_selected_fwd_kernel", dict(no_dk, **blocks, **rows)),
                               ("_nsa_selected_dq_kernel", dict(no_dk, **blocks, **rows))):
                opts = launch if name.startswith("_nsa_decode") and "combine" not in name else {}
                if name.startswith("_nsa_selected"):  # every tile its autotuner tries (float32: the first)
                    fwd = name == "_nsa_selected_fwd_kernel"
                    # the forward's TMA twins take K/V's row descriptors (tiles of SLC_TILE rows)
                    n, da, db = rows["SLC_TILE"], rows["BLOCK_DA"], rows["BLOCK_DB"]
                    descs = {"KA_DESC": f"tensordesc<{dt}[{n},{da}]>", "KB_DESC": f"tensordesc<{dt}[{n},{db}]>",
                             "V_DESC": f"tensordesc<{dt}[{n},{dv}]>"} if db else \
                        {"KA_DESC": f"tensordesc<{dt}[{n},{da}]>", "V_DESC": f"tensordesc<{dt}[{n},{dv}]>"}
                    configs = K.selected_configs(heads, 16, shared["PRECISION"], fwd, tma=fwd)
                    for c in configs:
                        tma = c.kwargs.get("USE_TMA", False)
                        if tma and c.kwargs["QB"] != configs[0].kwargs["QB"]:  # (TMA twins: of the base tiles only)
                            continue
                        tag = f"q{c.kwargs['QB']}w{c.num_warps}s{c.num_stages}"
                        tag += ("pq" if c.kwargs.get("PER_QUERY") else "") + ("-tma" if tma else "")
                        none = {} if not fwd else {k: None for k in ("KA_DESC", "KB_DESC", "V_DESC")
                                                   if not tma or k not in descs}
                        cases.append((f"{name}[{dt}-d{d}-g{block_g}-{tag}]", getattr(K, name),
                                      dict(ptr, **descs) if tma else ptr,
                                      dict(meta, **c.kwargs, **none, **({"HAS_TMA": True} if tma else {})),
                                      ("scale_log2", "scale"), dict(num_warps=c.num_warps, num_stages=c.num_stages)))
                        if fwd and c.kwargs["QB"] == configs[0].kwargs["QB"]:
                            # nsa_attention's launches: with the gated sum, the branch's own output without gradients
                            gated = dict(ptr, **(descs if tma else {}),
                                         **{n: f"*{dt}" for n in ("O_CMP", "O_SWA", "G_CMP", "G_SLC", "G_SWA")})
                            cases.append((f"{name}[{dt}-d{d}-g{block_g}-{tag}-gated]", getattr(K, name), gated,
                                          dict(meta, **c.kwargs, **none, **({"HAS_TMA": True} if tma else {}),
                                               GATED=True, WRITE_O=False, O=None),
                                          ("scale_log2", "scale"),
                                          dict(num_warps=c.num_warps, num_stages=c.num_stages)))
                    continue
                cases.append((f"{name}[{dt}-d{d}-g{block_g}]", getattr(K, name), ptr, meta, ("scale_log2", "scale"),
                              opts))
                if block_g == 16 and name in ("_nsa_decode_kernel", "_nsa_decode_piece_kernel"):  # a paged cache
                    cases.append((f"{name}[{dt}-d{d}-g{block_g}-page64]", getattr(K, name), ptr, dict(meta, PAGE=64),
                                  ("scale_log2", "scale"), opts))
                    if dt == "bf16":  # a float8 cache (InPlaceCache's cache_dtype), widened as it is read
                        for cache, page in ((("fp8e4nv", 0),) if name == "_nsa_decode_kernel" else
                                            (("fp8e4nv", 0), ("fp8e4nv", 64), ("fp8e5", 0))):
                            cases.append((f"{name}[{dt}-d{d}-g{block_g}{f'-page{page}' if page else ''}-{cache}]",
                                          getattr(K, name), dict(ptr, K=f"*{cache}", V=f"*{cache}"),
                                          dict(meta, PAGE=page, WIDEN_ASM=cache == "fp8e4nv"),
                                          ("scale_log2", "scale"), opts))
        gptr = {n: f"*{dt}" for n in ("O", "DOUT", "DO")}
        gptr.update({n: "*fp32" for n in ("G", "DG", "DELTA")})
        cases.append((f"_gated_prep_kernel[{dt}]", K._gated_prep_kernel, gptr, dict(DV=dv, BLOCK_DV=dv, BLOCK_R=16),
                      ()))
    # (the selection's first tile and a (token, head) rows one, the selected branch's first tile with the gated sum,
    # by pointers and by TMA, its tiles per query, and its dq's first tile)
    cases += _query_pos_twins(cases, lambda name: any(
        f"[bf16-d192-{tag}]" in name for tag in ("m64c32w8s2", "m16c16w8s2h", "g16-q1w4s3-gated",
                                                 "g16-q1w4s3-tma-gated", "g16-q2w4s3pq", "g16-q4w4s3pq")
    ) or name == "_nsa_selected_dq_kernel[bf16-d192-g16-q1w4s3]")
    # soft-capped scores (Gemma 2): those selection and selected-branch tiles, the 64-row tiles splitting their
    # score products (SPLIT_SCORES), and the decoding kernels
    return cases + _softcap_twins(cases, lambda name: any(
        f"[bf16-d192-{tag}]" in name for tag in ("m64c32w8s2", "m16c16w8s2h", "g16-q1w4s3-tma-gated",
                                                 "g16-q2w4s3pq", "g16-q4w8s3", "g16")
    ) and "-qpos" not in name and "combine" not in name or name == "_nsa_selected_dq_kernel[bf16-d192-g16-q1w4s3]")


def _chunked_twins(cases: list, chosen) -> list:
    """Twins of the ``chosen`` cases (by name) in chunks (flash_attention's ``chunk_size``, the chunking shifted per
    sequence by ``chunk_offsets``)."""
    return [(name[:-1] + "-chunked]", kern, dict(ptr, KOFF="*i32"), dict(meta, HAS_WINDOW=True, CHUNKED=True), *rest)
            for name, kern, ptr, meta, *rest in cases if chosen(name)]


def _softcap_twins(cases: list, chosen) -> list:
    """Twins of the ``chosen`` cases (by name) with soft-capped scores (SOFTCAP 2 in bfloat16: the GPU's tanh.approx;
    1 otherwise, see flash's _softcapped)."""
    return [(name[:-1] + "-softcap]", kern, ptr, dict(meta, SOFTCAP=2 if "bf16" in name else 1), *rest)
            for name, kern, ptr, meta, *rest in cases if chosen(name)]


def _query_pos_twins(cases: list, chosen) -> list:
    """Twins of the ``chosen`` cases (by name) taking a chunk of queries after a prefix (nsa_attention's
    ``query_pos``: each sequence's first query position, the keys packed apart from the queries)."""
    return [(name[:-1] + "-qpos]", kern, dict(ptr, QPOS="*i32", CU_K="*i32"), dict(meta, HAS_QPOS=True), *rest)
            for name, kern, ptr, meta, *rest in cases if chosen(name)]


def narrow_offsets(ttir: str) -> list:
    """Source positions of the 32-bit multiplications by a ``stride*`` argument (through splats, broadcasts and
    sign extensions): a row index times a stride overflows int32 past 2^31 elements (a 1M-token sequence with
    64 heads of 128), so every such product must be formed in int64."""
    defs = {}
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.#]+) = ([\w.]+) (.*)", line)
        if m:
            defs[m.group(1)] = (m.group(2), m.group(3))
    locs = dict(re.findall(r"^(#loc\d+) = loc\((.*)\)$", ttir, re.M))

    def where(loc, depth=0):  # a location is a file position, or names / call sites pointing at others
        text = locs.get(loc, "")
        pos = re.match(r'"[^"]+":\d+:\d+', text)
        refs = re.findall(r"#loc\d+", text)
        return pos.group(0) if pos else where(refs[0], depth + 1) if refs and depth < 8 else "?"

    def stride_arg(v, depth=0):
        if v.startswith("%stride"):
            return True
        op, rest = defs.get(v, (None, ""))
        return depth < 8 and op in ("tt.splat", "tt.broadcast", "tt.expand_dims", "arith.extsi") and \
            stride_arg(re.findall(r"%[\w.#]+", rest)[0], depth + 1)

    found = []
    for op, rest in defs.values():
        operands, _, typ = rest.partition(" : ")
        if op == "arith.muli" and re.match(r"(i32|tensor<[\dx]*xi32>)( |$)", typ) and \
                any(stride_arg(o) for o in re.findall(r"%[\w.#]+", operands)):
            loc = re.search(r"loc\((#loc\d+)\)", typ)
            found.append(where(loc.group(1)) if loc else "?")
    return found


def resources(kernel) -> str:
    """Registers per thread and spilled bytes of a compiled kernel (ptxas -v on its PTX): a GPU-free hint of
    whether a tile configuration fits the register file."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    newest = [os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")]  # the one triton uses for sm_90
    ptxas = next(p for p in newest + ["ptxas"] if p == "ptxas" or os.path.exists(p))
    arch = kernel.metadata.target.arch
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        proc = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                              capture_output=True, text=True)
    regs = re.findall(r"Used (\d+) registers", proc.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    return f"regs {regs[-1] if regs else '?'} spill {spills[-1] if spills else '?'} in-loop {loop_spills(kernel)}"


def loop_spills(kernel) -> str:
    """Local-memory loads/stores (register spills) per iteration of the kernel's innermost loops, from its SASS
    (nvdisasm): spills outside the loops cost little, those inside cost every iteration. '-' without nvdisasm."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(nvdisasm):
        return "-"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        lines = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout.splitlines()
    labels = {m.group(1): i for i, m in enumerate(re.match(r"\s*\.L_x_(\d+):", x) for x in lines) if m}
    loops = [(labels[m.group(1)], i) for i, m in enumerate(re.search(r"BRA\s+`\(\.L_x_(\d+)\)", x) for x in lines)
             if m and labels.get(m.group(1), i) < i]  # backward branches
    inner = [(a, b) for a, b in loops if not any(a < c and d < b for c, d in loops)]
    counts = [sum(bool(re.search(r"\b(LDL|STL)\b", x)) for x in lines[a:b + 1]) for a, b in inner]
    return "/".join(map(str, counts)) or "0"


CASE_BUILDERS = [_flash_cases, _sparse_cases, _mla_cases, _nsa_cases]

# hot loops that must stream their tiles through shared memory with this many buffers (the compiler's pipeliner
# gives up on loops with data-dependent conditions, and keeps fewer buffers when an address waits on a load of
# its own iteration): a regression here costs every load's full latency
PIPELINED = {
    "_flash_fwd_kernel[bf16-d192/128-causal-varlen-strided]": 2,
    "_flash_fwd_kernel[bf16-d192/128-causal-varlen-strided-first-tma]": 2,  # its bulk copies a tile ahead
    "_flash_fwd_kernel[bf16-d192/128-causal-varlen-strided-first-tma-lazy]": 2,  # (the rescaling's branch in its loop)
    "_flash_fwd_kernel[bf16-d128/128-causal-varlen-first-lazy]": 2,
    "_flash_decode_kernel[bf16-d128/128-causal-varlen-q1-g16]": 2,
    "_flash_decode_kernel[fp16-d192/128-causal-window-leftpad-q1-g8-cache-page16]": 2,  # pages read a tile ahead
    "_flash_decode_kernel[fp16-d192/128-causal-window-leftpad-q1-g8-cache-page16-fp8e4nv]": 2,  # float8 cache
    "_flash_bwd_dkdv_kernel[bf16-d192/128-causal-varlen-strided-one_loop-m32n128]": 2,
    "_mla_decode_kernel[bf16-S1-H64-paged-n32x4-shared_p]": 4,  # the branch in its loop must not stop pipelining
    "_mla_decode_kernel[bf16-S1-H64-paged-n64x2-shared_p-tma]": 2,  # the bulk copies one tile ahead
    "_mla_decode_kernel[bf16-S1-H64-paged-n64x2-shared_p-tma-lazy]": 2,  # (the rescaling's branch in its loop)
    "_mla_decode_kernel[bf16-S1-H64-paged-n32x4-shared_p-lazy]": 4,
    "_nsa_selected_fwd_kernel[bf16-d192-g16-q1w4s3]": 2,  # one query of 16 heads per program (as timed on the H100)
    "_nsa_selected_fwd_kernel[bf16-d192-g16-q1w4s3-tma]": 2,  # its blocks' bulk copies
    "_nsa_selected_dq_kernel[bf16-d192-g16-q1w4s3]": 2,
    "_nsa_selected_fwd_kernel[bf16-d192-g16-q2w4s3pq]": 2,  # the first query's product out of a branch
    "_nsa_decode_piece_kernel[bf16-d192-g16]": 2,
    "_nsa_decode_piece_kernel[bf16-d192-g16-page64]": 2,  # pages read a tile ahead
    "_nsa_decode_piece_kernel[bf16-d192-g16-fp8e4nv]": 2,  # a float8 cache
    "_sparse_fwd_kernel[bf16-n64w4s3]": 3,
    "_sparse_decode_kernel[bf16-g4]": 2,  # its key loop sits in a branch, in a loop over the group's blocks
    "_sparse_decode_kernel[bf16-g4-page16]": 2,  # pages read a tile ahead
    "_sparse_decode_kernel[bf16-g4-fp8e4nv]": 2,  # a float8 cache
}


# kernels that must compute each product once: Triton lays a product whose result reaches another product on all
# warps along its rows, so a 64-row product on 8 warps is computed by both warpgroups whole. These kernels keep
# their score products out of such chains (nsa/kernels.py, mla/kernels.py SHARED_P, kernels/sparse.py
# _bwd_operands); a regression doubles their tensor-core work
UNDUPLICATED = (
    "_nsa_select_kernel[bf16-d192-m64c32w8s2]",
    "_nsa_select_kernel[bf16-d192-m64c16w8s3]",
    "_nsa_select_kernel[bf16-d192-m16c16w8s2h]",  # (token, head) rows: 128 a warpgroup
    "_nsa_select_kernel[bf16-d192-m16c32w8s2h]",
    "_nsa_select_kernel[bf16-d192-m32c16w8s2h]",
    "_nsa_select_kernel[bf16-d192-m64c16w8s2h]",
    "_mla_decode_kernel[bf16-S1-H64-paged-n64x2-shared_p]",
    "_mla_decode_kernel[bf16-S1-H64-paged-n64x2-shared_p-tma]",
    "_mla_decode_kernel[bf16-S4-H16-paged-n32x4-shared_p]",
    "_mla_decode_kernel[bf16-S1-H64-paged-n64x2-shared_p-lazy]",  # the rescaling's condition out of a branch
    "_mla_decode_kernel[bf16-S1-H64-paged-n64x2-shared_p-tma-lazy]",
    "_mla_decode_kernel[bf16-S4-H16-paged-n32x4-shared_p-lazy]",
    "_sparse_dkdv_kernel[bf16-d192-group16-n64w8s3]",
    "_sparse_dq_kernel[bf16-n64w8s2]",  # dS out of a branch
    "_nsa_selected_fwd_kernel[bf16-d192-g16-q4w8s3]",  # SPLIT_SCORES
    "_nsa_selected_dq_kernel[bf16-d192-g16-q4w8s3]",
    # soft-capped scores (the capped products added by a multiply-add too: flash's _scaled_scores)
    "_nsa_select_kernel[bf16-d192-m64c32w8s2-softcap]",
    "_sparse_dkdv_kernel[bf16-d192-group16-n64w8s3-softcap]",
    "_sparse_dq_kernel[bf16-n64w8s2-softcap]",
    "_nsa_selected_fwd_kernel[bf16-d192-g16-q4w8s3-softcap]",
    "_nsa_selected_dq_kernel[bf16-d192-g16-q4w8s3-softcap]",
)


# kernels whose innermost loops must not spill registers (`--resources`' in-loop figures; spills inside a hot loop
# cost local-memory traffic every iteration): the candidates kept for that reason, and the main hot loops
NO_LOOP_SPILLS = (
    "_flash_fwd_kernel[bf16-d192/128-causal-varlen-strided]",
    "_flash_fwd_kernel[bf16-d192/128-causal-varlen-strided-first-tma-lazy]",
    "_flash_fwd_kernel[bf16-d128/128-causal-varlen-first-lazy]",
    "_flash_bwd_dkdv_kernel[bf16-d192/128-causal-varlen-strided-one_loop-m32n128]",
    "_mla_decode_kernel[bf16-S1-H64-paged-n64x2-shared_p]",
    "_mla_decode_kernel[bf16-S1-H64-paged-n64x2-shared_p-tma]",
    "_nsa_select_kernel[bf16-d192-m64c16w8s3]",
    "_nsa_select_kernel[bf16-d192-m16c32w8s2h]",
    "_nsa_select_kernel[bf16-d192-m16c16w8s2h]",
    "_nsa_select_kernel[bf16-d192-m32c16w8s2h]",
    "_nsa_select_kernel[bf16-d192-m64c16w8s2h]",
    "_nsa_selected_fwd_kernel[bf16-d192-g16-q1w4s3]",
    "_nsa_selected_dq_kernel[bf16-d192-g16-q1w4s3]",
    "_sparse_dkdv_kernel[bf16-d192-group16-n64w8s3]",  # every dK/dV candidate (64 keys on 4 warps spilled)
    "_sparse_dkdv_kernel[bf16-d192-group16-n64w8s2]",
    "_sparse_dkdv_kernel[bf16-d192-group16-n32w8s2]",
    "_sparse_dkdv_kernel[bf16-d192-group16-n32w4s2]",
    "_sparse_dkdv_kernel[bf16-d192-group16-n64w8s3-softcap]",  # soft-capped scores
    "_nsa_selected_fwd_kernel[bf16-d192-g16-q1w4s3-tma-gated-softcap]",
    "_nsa_selected_dq_kernel[bf16-d192-g16-q1w4s3-softcap]",
)


def duplicated_products(kernel) -> list:
    """The (rows x cols) products of a compiled kernel that more warpgroups compute than their rows need (a
    warpgroup covers 64 rows): each of them is computed several times over."""
    ttgir = kernel.asm["ttgir"]
    warps = {name: (int(m), int(n)) for name, m, n in re.findall(
        r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = 3.*?warpsPerCTA = \[(\d+), (\d+)\]", ttgir, re.M)}
    return [f"{rows}x{cols}" for rows, cols, layout in
            re.findall(r"warp_group_dot .*?-> tensor<(\d+)x(\d+)x\w+, (#mma\d*)>", ttgir)
            if layout in warps and int(rows) < 64 * (warps[layout][0] // 4)]


def buffers(kernel) -> int:
    """The most buffers of any multi-buffered shared-memory allocation in a compiled kernel (0: no pipelining)."""
    found = re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x", kernel.asm["ttgir"])
    return max((int(n) for n in found), default=0)


def main(argv) -> int:
    show = "--resources" in argv  # also print registers and spills per kernel
    # only the PIPELINED, UNDUPLICATED and NO_LOOP_SPILLS kernels, failing when they have too few buffers,
    # duplicated products or spills inside their loops
    check_pipelined = "--pipelined" in argv
    # --shard=i/n: every n-th case from the i-th (0-based), so that n processes share the work
    shard = next((a.split("=", 1)[1] for a in argv if a.startswith("--shard=")), "0/1")
    index, shards = (int(x) for x in shard.split("/"))
    argv = [a for a in argv if a not in ("--resources", "--pipelined") and not a.startswith("--shard=")]
    pattern = argv[1] if len(argv) > 1 else ""
    failures = 0
    cases = (case for build in CASE_BUILDERS for case in build())
    for i, (name, kern, ptr, meta, floats, *launch) in enumerate(cases):  # launch: the op's num_warps/num_stages
        if i % shards != index or pattern not in name or (
                check_pipelined and name not in PIPELINED and name not in UNDUPLICATED and name not in NO_LOOP_SPILLS):
            continue
        t = time.time()
        try:
            k = compile_kernel(kern, ptr, meta, floats, **(launch[0] if launch else {}))
            smem = k.metadata.shared
            status = "ok" if smem <= SMEM_LIMIT else f"FAIL shared memory {smem} > {SMEM_LIMIT}"
            narrow = narrow_offsets(k.asm["ttir"])
            if narrow and status == "ok":
                status = f"FAIL 32-bit row x stride products at {', '.join(sorted(set(narrow)))}"
            if check_pipelined and status == "ok" and buffers(k) < PIPELINED.get(name, 0):
                status = f"FAIL {buffers(k)} shared-memory buffers in its loop, expected {PIPELINED[name]}"
            if check_pipelined and status == "ok" and name in UNDUPLICATED and duplicated_products(k):
                status = f"FAIL products computed by several warpgroups: {', '.join(duplicated_products(k))}"
            if check_pipelined and status == "ok" and name in NO_LOOP_SPILLS and \
                    loop_spills(k).strip("0/-"):
                status = f"FAIL registers spilled inside its loops (per iteration: {loop_spills(k)})"
            if show and status == "ok":
                status = f"ok  smem {smem}  {resources(k)}"
        except Exception as e:  # report every failure, not only the first
            status = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        failures += not status.startswith("ok")
        print(f"{name:60s} {time.time() - t:5.1f}s {status}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
