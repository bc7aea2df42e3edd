"""The `longattn` command: `longattn demo` and `longattn bench ...`."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def _tiny_configs(cuda: bool):
    """The embedded default: small Llama-style and DeepSeek-V3-style configs (random weights, no download)."""
    from transformers import DeepseekV3Config, LlamaConfig

    width = 256 if cuda else 64
    # the DeepSeek-style model's MLPs are all dense: with random weights its MoE router's top-2 of 4 experts flips
    # on bf16 rounding-sized changes to the attention output (0.4% noise moved its logits by 0.6), which would
    # hide the attention's own difference from the dense model
    llama = LlamaConfig(vocab_size=512, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 16)
    deepseek = DeepseekV3Config(vocab_size=512, hidden_size=width, intermediate_size=2 * width,
                                moe_intermediate_size=width // 2, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                topk_group=1, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16,
                                qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=2,
                                max_position_embeddings=1 << 16)
    return llama, deepseek


def _demo(args) -> int:
    import copy

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    import longattn  # sets TRITON_INTERPRET=1 without CUDA, registers the HF attention functions
    from longattn import rollout
    from longattn.kernels.utils import is_interpreter

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    scale = 16 if cuda else 1
    lengths = [int(n) * scale for n in args.lengths.split(",")]
    block = args.block_size * scale
    backend = ("Triton kernels on " + torch.cuda.get_device_name(0)) if cuda else \
        "Triton kernels through the CPU interpreter (small sizes)" if is_interpreter() else "Triton kernels"
    print(f"longattn {longattn.__version__} demo: {backend}, {str(dtype).replace('torch.', '')}")
    torch.manual_seed(0)
    if args.model:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
        bases = {base.config.model_type: base}
        print(f"model: {args.model} ({base.config.model_type})")
    else:
        llama_cfg, ds_cfg = _tiny_configs(cuda)
        bases = {"llama": AutoModelForCausalLM.from_config(llama_cfg, attn_implementation="sdpa"),
                 "deepseek_v3": AutoModelForCausalLM.from_config(ds_cfg, attn_implementation="eager")}
        print("model: embedded tiny Llama-style and DeepSeek-V3-style models, random weights")
    for m in bases.values():
        m.to(device=dev, dtype=dtype).eval()
    vocab = next(iter(bases.values())).config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), device=dev) for n in lengths]
    print(f"{len(prompts)} prompts of lengths {lengths}: one prefill (packed without padding where the attention "
          f"allows), then {args.new_tokens} greedy tokens each with a KV cache")

    runs = []  # (label, base model key, kind, options, exact?)
    for key in bases:
        if key == "deepseek_v3":
            runs.append(("mla (absorbed decode)", key, "mla", {}, True))
        else:
            nsa_cfg = longattn.NSAConfig(cmp_block=block // 2, cmp_stride=block // 4, slc_block=block, slc_topk=4,
                                         window=2 * block)
            runs += [("flash", key, "flash", {}, True),
                     (f"moba bs{block} top-all", key, "moba", dict(block_size=block, topk=64), True),
                     (f"moba bs{block} top{args.topk}", key, "moba", dict(block_size=block, topk=args.topk), False),
                     (f"nsa blk{block} top4 w{2 * block}", key, "nsa", dict(config=nsa_cfg), False)]
    rows, failed = [], []
    for label, key, kind, opts, exact in tqdm(runs, desc="demo", unit="run"):
        base = bases[key]
        model = longattn.hf.swap_attention(copy.deepcopy(base), kind, **opts)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res = rollout.generate(model, prompts, args.new_tokens, stop_at_eos=False)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        ref = rollout.generate(base, prompts, args.new_tokens, stop_at_eos=False, packed=False)
        with torch.no_grad():  # logits of every prompt token, ours vs the dense model
            diff = max((model(p[None]).logits.float() - base(p[None]).logits.float()).abs().max().item()
                       for p in prompts)
        same = sum(a == b for a, b in zip(res.completions, ref.completions))
        tokens = sum(lengths) + sum(len(c) for c in res.completions)
        n_dec = sum(len(c) for c in res.completions) - len(prompts)
        rows.append((label, tokens, res.prefill_seconds * 1e3, n_dec / max(res.decode_seconds, 1e-9), peak, diff,
                     f"{same}/{len(prompts)}", exact))
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-3
        # in bfloat16 a near-tie between two logits may pick another greedy token (a rounding difference,
        # not an error): there the logits are checked, and the tokens only in float32
        if exact and not (diff <= tol and (same == len(prompts) or dtype == torch.bfloat16)):
            failed.append(label)
        del model
    print()
    head = f"{'kind':26s} {'tokens':>7s} {'prefill ms':>11s} {'decode tok/s':>13s} {'peak MB':>8s} " \
           f"{'max |diff| vs dense':>20s} {'same tokens':>12s}"
    print(head)
    print("-" * len(head))
    for label, tokens, pre, tps, peak, diff, same, exact in rows:
        peak_s = f"{peak:8.0f}" if peak is not None else f"{'n/a':>8s}"
        note = "" if exact else "  (sparse / new gates: differs from dense by design)"
        print(f"{label:26s} {tokens:7d} {pre:11.1f} {tps:13.1f} {peak_s} {diff:20.2e} {same:>12s}{note}")
    if failed:
        print(f"FAILED: {', '.join(failed)} differ from the dense model", file=sys.stderr)
        return 1
    print("\nexact configurations match the dense model (logits" +
          (")" if dtype == torch.bfloat16 else " and greedy tokens)"))
    return 0


def _sync(cuda: bool):
    if cuda:
        import torch

        torch.cuda.synchronize()


def _bench(extra) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "__main__.py").exists():
        print(f"error: the bench package is not next to longattn (looked in {root}); run from a source checkout",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "bench", *extra], cwd=root)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="longattn", description="longattn: attention kernels for long contexts")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="run the kernels on the embedded default problem and check them")
    demo.add_argument("--lengths", default="37,100,5,70", help="comma-separated prompt lengths (x16 on CUDA)")
    demo.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated per prompt")
    demo.add_argument("--block-size", type=int, default=16, help="MoBA block size (x16 on CUDA)")
    demo.add_argument("--topk", type=int, default=2, help="MoBA top-k of the sparse configuration")
    demo.add_argument("--model", default=None, help="a local transformers checkpoint instead of the embedded default")
    sub.add_parser("bench", help="benchmarks (same options as `python -m bench`)", add_help=False)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
