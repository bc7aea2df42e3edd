"""Rollouts end to end: `longattn.rollout.generate` on a random Llama-style model (or, `--arch deepseek_v3`, a
DeepSeek-V3-style one: MLA attention, R1's architecture), per attention kind.

What an RL rollout pays: the batched prefill of prompts of different lengths, then decoding with the KV cache
(every layer's attention, the projections and MLPs, the sampling and the host work of each step). Each kind is
the same random model with its attention swapped (`swap_attention`; `mla`: longattn's MLA module, prefill through
`mla_prefill`, decoding in the absorbed form over its paged latent cache); `sdpa` is transformers' own attention
(the baseline; for DeepSeek-V3 transformers 5 caches the latent and decompresses it at every step),
`sdpa_dynamic` the same with transformers' default cache (`DynamicCache`, which concatenates each step's keys and
values: a copy of the whole cache per layer and step) in place of the rollout's `InPlaceCache`; `flash_fp8` is
`flash` decoding from a float8 cache (`cache_dtype=torch.float8_e4m3fn`: half the bytes a step reads).
Decoding is greedy by default (`--temperature t`: sampled, the generator seeded alike for every kind); greedy,
`agree` and `dlogp` compare each kind's completions with `sdpa`'s (the same model and prompts): the mean share of each
completion's tokens before its first token that differs from `sdpa`'s, and the mean absolute difference of the
log-probabilities of those shared tokens (rounding alone makes them differ where the random model has near ties;
`moba` attends sparsely, `nsa` has parameters of its own: no comparison for it). Prompt lengths are drawn between
half the nominal length and the full one, the same for every kind; `--samples n` (with `--temperature`) samples n
completions of each prompt from one prefill of it (`num_samples`: a GRPO group). Timings are
`Rollout.prefill_seconds` / `decode_seconds` (wall clock around a synchronised GPU) of one run after an identical
warm-up run (kernels compiled and autotuned, and any per-shape plan made, for every length the timed run meets).
"""
from __future__ import annotations

import argparse
import contextlib

from .common import Results, parse_ints, peak_memory_mb, require_cuda

COLUMNS = ["impl", "arch", "B", "samples", "prompt", "new", "layers", "hidden", "Hq", "Hkv", "D", "prefill_ms",
           "step_ms", "tok/s", "x_sdpa_prefill", "x_sdpa_step", "agree", "dlogp", "peak_MB"]
PLOT = dict(x="prompt", y="step_ms", series="series", panels="mode", title="rollout decoding step")
# the kinds each --arch takes (all of them: the default --kinds)
ARCH_KINDS = {"llama": ("sdpa", "sdpa_dynamic", "flash", "flash_fp8", "moba", "nsa"),
              "deepseek_v3": ("sdpa", "sdpa_dynamic", "mla", "moba")}
KINDS = ("sdpa", "sdpa_dynamic", "flash", "flash_fp8", "moba", "nsa", "mla")


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--prompts", default="8k,32k", help="nominal prompt lengths; each prompt has between half and all")
    p.add_argument("--batch", type=int, default=8, help="prompts")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt, from one prefill of it (with "
                   "--temperature > 0: greedy samples are all alike, decoded once)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the completions then compared with "
                   "sdpa's: agree, dlogp); above: sampled, a generator seeded alike for every kind")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per forward of the prefill "
                   "(rollout.generate's prefill_chunk; default all at once)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--arch", default="llama", choices=sorted(ARCH_KINDS), help="the model: Llama-style (GQA, "
                   "--kv-heads) or DeepSeek-V3-style (MLA: latent 512, q LoRA 1536, q/k heads 128 + 64, v 128, "
                   "dense MLPs)")
    p.add_argument("--kinds", default=None, help=f"comma-separated, of {ARCH_KINDS} by --arch (default: all of "
                   "the arch's)")
    p.add_argument("--moba", default="4096:4", help="MoBA block_size:topk")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", default=None)


def _config(args):
    """The benchmark's model config (``args.arch``)."""
    from transformers import DeepseekV3Config, LlamaConfig

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=1 << 20)
    if args.arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=args.kv_heads)
    # DeepSeek-V3's attention dims; every MLP dense (first_k_dense_replace: all layers): the attention is compared
    return DeepseekV3Config(**common, num_key_value_heads=args.heads, kv_lora_rank=512, q_lora_rank=1536,
                            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                            first_k_dense_replace=args.layers, n_routed_experts=1, num_experts_per_tok=1, n_group=1,
                            topk_group=1, moe_intermediate_size=args.hidden)


def _kinds(args) -> list:
    kinds = ARCH_KINDS[args.arch]
    chosen = [k.strip() for k in (args.kinds or ",".join(kinds)).split(",") if k.strip()]
    unknown = [k for k in chosen if k not in kinds]
    if unknown:
        raise ValueError(f"--kinds: {unknown} not among the kinds of --arch {args.arch}: {kinds}")
    return chosen


def _model(kind: str, args, dev, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    import longattn

    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(_config(args), attn_implementation="sdpa").to(dtype).eval()
    if kind == "moba":
        bs, topk = (int(x) for x in args.moba.split(":"))
        longattn.hf.swap_attention(model, "moba", block_size=bs, topk=topk)
    elif kind in ("flash", "flash_fp8", "nsa", "mla"):
        longattn.hf.swap_attention(model, kind.removesuffix("_fp8"))
    elif kind not in ("sdpa", "sdpa_dynamic"):
        raise ValueError(f"--kinds: unknown kind {kind!r}, expected some of {KINDS}")
    return model


@contextlib.contextmanager
def _cache_of(kind: str):
    """``sdpa_dynamic``: the rollout decodes with transformers' DynamicCache instead of its InPlaceCache."""
    from transformers import DynamicCache

    from longattn import rollout

    if kind != "sdpa_dynamic":
        yield
        return
    saved = rollout._decoding_cache
    rollout._decoding_cache = lambda model, max_cache_len, cache_dtype=None, cache_scales=None: DynamicCache(
        config=model.config)
    try:
        yield
    finally:
        rollout._decoding_cache = saved


def _agreement(res, ref) -> tuple:
    """(agree, dlogp) of rollout ``res`` against ``ref`` (same prompts): the mean share of each completion's tokens
    before its first difference, and the mean |log p difference| over those tokens (None when none is shared)."""
    shares, diffs = [], []
    for got, want, lp, lp_ref in zip(res.completions, ref.completions, res.logprobs, ref.logprobs):
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        shares.append(n / max(len(want), 1))
        diffs += [abs(a - b) for a, b in zip(lp[:n], lp_ref[:n])]
    return sum(shares) / max(len(shares), 1), sum(diffs) / len(diffs) if diffs else None


def run(args, argv=None) -> list[dict]:
    import torch

    from longattn import rollout

    if args.samples > 1 and args.temperature == 0:
        raise ValueError("--samples above 1 needs --temperature above 0: greedy samples are all alike, so generate "
                         "decodes each prompt once (the rows timed would not be the samples')")
    dev = require_cuda()
    dtype = getattr(torch, args.dtype)
    kinds = _kinds(args)
    cfg = _config(args)
    dims = (cfg.num_key_value_heads, getattr(cfg, "qk_head_dim", None) or cfg.head_dim)  # (Hkv, q/k head dim)
    rows = Results("rollout", COLUMNS, argv, out_dir=args.out, plot=PLOT)
    for T in parse_ints(args.prompts):
        gen = torch.Generator().manual_seed(T)
        lens = torch.randint(max(1, T // 2), T + 1, (args.batch,), generator=gen).tolist()
        prompts = [torch.randint(0, args.vocab, (n,), generator=gen) for n in lens]
        ref = None  # sdpa's rollout: the others' completions compared with it
        for kind in sorted(kinds, key=lambda k: k != "sdpa"):
            try:
                model = _model(kind, args, dev, dtype)
                with _cache_of(kind):
                    kw = dict(stop_at_eos=False, num_samples=args.samples, prefill_chunk=args.prefill_chunk,
                              cache_dtype=torch.float8_e4m3fn if kind == "flash_fp8" else None,
                              temperature=args.temperature)
                    seeded = lambda: dict(generator=torch.Generator(dev).manual_seed(0)) if args.temperature else {}
                    # the warm-up decodes as many tokens: every shape the timed run meets is seen once before
                    # (kernels compiled and autotuned, per-shape plans made: the first kind timed after a 2-token
                    # warm-up, SDPA with the in-place cache, took 15x the second's step on the H100, 2026-11-27)
                    rollout.generate(model, prompts, args.new_tokens, **kw, **seeded())
                    done = []
                    mem = peak_memory_mb(lambda: done.append(rollout.generate(model, prompts, args.new_tokens, **kw,
                                                                              **seeded())))
            except Exception as e:  # a kind that cannot run here (memory): the others still do
                print(f"  {kind} prompt={T}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                continue
            finally:
                model = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            res = done[0]
            steps = max(1, args.new_tokens - 1)  # the first token comes from the prefill's logits
            rows_decoded = args.batch * args.samples
            row = dict(op="rollout", impl=kind, series=kind, mode="rollout", arch=args.arch, B=args.batch,
                       samples=args.samples, prompt=T, new=args.new_tokens, layers=args.layers, hidden=args.hidden,
                       Hq=args.heads, Hkv=dims[0], D=dims[1], dtype=args.dtype,
                       prefill_ms=1e3 * res.prefill_seconds, step_ms=1e3 * res.decode_seconds / steps,
                       **{"tok/s": rows_decoded * steps / max(res.decode_seconds, 1e-9)}, peak_MB=mem,
                       prompt_tokens=sum(lens))
            if kind == "sdpa":
                ref = res
            if ref is not None and kind != "nsa" and not args.temperature:
                row["agree"], row["dlogp"] = _agreement(res, ref)
            rows.append(row)
            print(f"  {kind:6s} prompt={T} B={args.batch}x{args.samples}: prefill {row['prefill_ms']:.1f} ms, "
                  f"{row['step_ms']:.2f} ms/step" + (f", agree {row['agree']:.3f}" if "agree" in row else ""))
    base = {r["prompt"]: r for r in rows if r["impl"] == "sdpa"}
    for r in rows:
        b = base.get(r["prompt"])
        r["x_sdpa_prefill"] = b["prefill_ms"] / r["prefill_ms"] if b and r["prefill_ms"] else None
        r["x_sdpa_step"] = b["step_ms"] / r["step_ms"] if b and r["step_ms"] else None
    out = rows.finish()
    print(f"results written to {out}")
    return rows
