"""Shared helpers for every longattn op: argument checks, interpreter detection, autotune configs.

The checks raise ``TypeError`` for a wrong type or dtype and ``ValueError`` for a wrong shape or value,
always naming the argument, so that bad input never reaches a kernel (where it would become an illegal
memory access or a silent wrong answer).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# quantised KV caches: flash_decode, moba_decode, nsa_decode, mla_decode; longattn.hf.InPlaceCache's cache_dtype
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Compile options of every launch: a multiply followed by an add fused into one multiply-add, as the kernels were
# tuned with (the instruction counts in their comments), whatever the process's default (Triton 3.9 warns at its
# first compile that leaves it to TRITON_DEFAULT_FP_FUSION, whose default the next release turns off)
COMPILE_OPTIONS = {"enable_fp_fusion": True}


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
# (read once, as the kernels are defined: Triton's decorators read it then; an environment lookup less in the host work
# of every op call, which made several)
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_interpreter() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1`` when longattn was
    imported)."""
    return _INTERPRETER


def widen_by_asm(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """Whether a decoding kernel widens its e4m3 cache to its bfloat16 queries' dtype by inline PTX (the kernels'
    ``WIDEN_ASM``, see ``flash._widen``): on NVIDIA GPUs, not through the interpreter."""
    return (q_dtype == torch.bfloat16 and cache_dtype == torch.float8_e4m3fn and not is_interpreter()
            and torch.version.hip is None)


@functools.lru_cache(maxsize=None)
def _has_tma(index: Optional[int]) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9


def row_descriptors(x: torch.Tensor, tile: int, widths: Sequence[int], lead: int = 2) -> Optional[list]:
    """TMA descriptors (Hopper's bulk tensor copies) over ``x`` seen as one matrix: its first ``lead`` dims are the
    rows (a cache's pages and their tokens, a batch's sequences and their tokens), the others lie along each row
    (e.g. heads, then head dims). For each width of ``widths``, a descriptor whose tiles are ``tile`` rows of that
    many columns: a kernel loads one with ``desc.load([row, column])``, its columns wholly inside what it reads
    (the matrix holds the other heads' values beside them, not zeros).

    None where a kernel must load by pointers instead: not on an NVIDIA GPU of compute capability 9 or more (the
    interpreter runs descriptors), ``LONGATTN_TMA=0``, rows not evenly strided, a base or row stride not a multiple of
    16 bytes, a width not a power of two, under 16 bytes or over a row, or more rows or columns than 32-bit
    coordinates reach."""
    if os.environ.get("LONGATTN_TMA", "1") == "0" or not x.numel():
        return None
    if not is_interpreter() and (x.device.type != "cuda" or not _has_tma(x.device.index)):
        return None
    size = x.element_size()
    rows, stride = x.shape[lead - 1], x.stride(lead - 1)
    for d in range(lead - 2, -1, -1):  # outer row dims: evenly strided over the inner ones
        if x.shape[d] > 1 and x.stride(d) != rows * stride:
            return None
        rows *= x.shape[d]
    width = 1 + sum((n - 1) * st for n, st in zip(x.shape[lead:], x.stride()[lead:]))
    if x.stride(-1) != 1 or max(rows, width) >= 2 ** 31 or x.data_ptr() % 16 or (stride * size) % 16 or \
            any(w & (w - 1) or w * size < 16 or w > width for w in widths):
        return None
    return [TensorDescriptor(x, [rows, width], [stride, 1], [tile, w]) for w in widths]


def small_tiles() -> bool:
    """True when kernels should use small tiles: under the interpreter (its cost grows with the tile steps
    of the small test shapes), unless ``LONGATTN_INTERPRET_TILES=gpu`` asks for the GPU's tile sizes there
    (tests then run the GPU's configurations, the first autotune candidate, through the interpreter)."""
    return is_interpreter() and os.environ.get("LONGATTN_INTERPRET_TILES", "small") != "gpu"


def public_op(*autocast: str, traced: Optional[Callable] | bool = None, opaque_if: Optional[Callable] = None):
    """Decorator of the public ops. ``autocast`` names the floating-point arguments that must share a dtype:
    inside ``torch.autocast`` they are cast to its dtype, as torch casts SDPA's inputs (transformers layers
    under autocast hand attention float32 q/k, rotated by float32 RoPE tables, and bfloat16 v), and the op
    runs with autocast off (its own float32 work stays float32).

    Triton launches on the current CUDA device: an op on tensors of another GPU (a model spread over several,
    ``device_map="auto"``) runs with that GPU made current.

    Under ``torch.compile`` TorchDynamo traces ``traced`` where the op has one: its form for tracing (same
    arguments), which calls custom ops (the graph runs them as they are), or ``True``: the op itself, made of
    torch operations and such ops. The other ops are opaque to it: it runs them as they are (a graph break) instead
    of tracing their host checks, autotuning and kernel launches, and so is a call for which ``opaque_if(*args,
    **kwargs)`` holds. Either way a compiled model gives the eager results."""
    def decorate(fn):
        signature = inspect.signature(fn)
        params = list(signature.parameters)
        positions = [(params.index(name), name) for name in autocast]
        # the keyword flags (annotated bool: causal, return_lse, validate, ...): a bool each, not any value taken by
        # its truth (validate=None would turn the host checks off)
        flags = [name for name, p in signature.parameters.items()
                 if p.kind == p.KEYWORD_ONLY and p.annotation in (bool, "bool")]

        def check_flags(kwargs):
            for name in flags:
                if name in kwargs:
                    check_bool(kwargs[name], name)

        def autocast_args(args, kwargs):
            """The arguments cast to the autocast dtype, and the device type it is on for (None when off)."""
            first = _first_tensor(args)
            if not positions or first is None or first.device.type not in ("cuda", "cpu") or \
                    not torch.is_autocast_enabled(first.device.type):
                return args, kwargs, None
            device = first.device.type
            dtype = torch.get_autocast_dtype(device)
            args, kwargs = list(args), dict(kwargs)
            for i, name in positions:
                if i < len(args):
                    args[i] = _autocast_to(args[i], dtype)
                elif name in kwargs:
                    kwargs[name] = _autocast_to(kwargs[name], dtype)
            return args, kwargs, device

        def call(f, args, kwargs):
            """f on the arguments cast for autocast, with autocast off inside (when it is on)."""
            args, kwargs, device = autocast_args(args, kwargs)
            if device is None:
                return f(*args, **kwargs)
            with torch.autocast(device, enabled=False):
                return f(*args, **kwargs)

        @functools.wraps(fn)
        def op(*args, **kwargs):
            check_flags(kwargs)
            first = _first_tensor(args)
            if first is not None and first.is_cuda and first.device.index != torch.cuda.current_device():
                with torch.cuda.device(first.device):
                    return op(*args, **kwargs)
            return call(fn, args, kwargs)

        eager = torch.compiler.disable(op)
        if traced is None:
            return eager
        body = fn if traced is True else traced

        @functools.wraps(fn)
        def entry(*args, **kwargs):
            if not torch.compiler.is_compiling() or (opaque_if is not None and opaque_if(*args, **kwargs)):
                return eager(*args, **kwargs)  # (which checks the flags)
            check_flags(kwargs)
            return call(body, args, kwargs)
        return entry
    return decorate


class _NoSecondDerivative(torch.autograd.Function):
    """Passes a backward's first ``n`` gradients on (copies), attached to the tensors that follow (what they
    depend on: the backward's inputs needing gradients); a backward through them raises."""

    @staticmethod
    def forward(ctx, op: str, n: int, *tensors: torch.Tensor):
        ctx.op = op
        return tuple(g.clone() for g in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"{ctx.op} has no second derivative (its backward runs Triton kernels): differentiating "
                           "its gradients (create_graph=True, e.g. a gradient penalty) is not supported")


def first_order_backward(op: str):
    """Decorator of an autograd.Function's backward computed by kernels, which autograd cannot differentiate; the
    backward is called as ``backward(ctx, saved, *grad_outputs)``, ``saved`` the ctx's saved tensors (read once
    here: non-reentrant checkpointing unpacks each once). Under ``create_graph=True`` (grad mode on in the
    backward), where the saved tensors or the output gradients need gradients, the gradients it returns come
    attached to them through a node whose backward raises RuntimeError, instead of without history, which a second
    backward would take for constants (a gradient penalty silently missing its terms through ``op``)."""
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            saved = ctx.saved_tensors
            if not torch.is_grad_enabled():
                return backward(ctx, saved, *grad_outputs)
            with torch.no_grad():
                grads = backward(ctx, saved, *grad_outputs)
            grads = list(grads) if isinstance(grads, tuple) else [grads]
            sources = [t for t in (*saved, *grad_outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
            at = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
            if sources and at:
                for i, g in zip(at, _NoSecondDerivative.apply(op, len(at), *(grads[i] for i in at), *sources)):
                    grads[i] = g
            return tuple(grads)
        return wrapper
    return decorate


def check_bool(value, name: str, allow_none: bool = False) -> None:
    """A flag must be a bool (or None with ``allow_none``), not any value taken by its truth."""
    if not isinstance(value, bool) and not (allow_none and value is None):
        raise TypeError(f"{name} must be a bool{' or None' if allow_none else ''}, got {type(value).__name__}")


def _first_tensor(args):
    """The op's first argument (the first of merge_attention's list of parts) if it is a tensor."""
    first = args[0] if args else None
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    return first if isinstance(first, torch.Tensor) else None


def eager_context(t: torch.Tensor) -> contextlib.ExitStack:
    """How a custom op's implementation runs the eager code on ``t``'s device: that GPU current (Triton launches
    there), no autograd recording (the op's own formula differentiates it), autocast off (the traced call cast its
    inputs)."""
    stack = contextlib.ExitStack()
    if t.is_cuda:
        stack.enter_context(torch.cuda.device(t.device))
    stack.enter_context(torch.no_grad())
    if t.device.type in ("cuda", "cpu"):
        stack.enter_context(torch.autocast(t.device.type, enabled=False))
    return stack


def _autocast_to(x, dtype: torch.dtype):
    """x in the autocast dtype (a float8 cache stays as it is: a storage format the op reads as it is)."""
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype \
        and x.dtype not in FLOAT8_DTYPES else x


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1). Host code uses these plain-int helpers: triton's own are
    constexpr functions costing microseconds a call, paid at every decoding step."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


SPLIT_UNIT = 64  # tokens: split-KV splits are multiples of every decode tile size (tiles never straddle a page)


def split_context(groups: int, max_len: int, slots: int):
    """Split-KV sizing: how many splits of a context of ``max_len`` keys (and keys per split) when each split
    runs ``groups`` programs and the GPU holds ``slots`` programs at once.

    Picks the count with the least modelled time: waves of programs over the slots times the tiles a program
    streams plus one for its prologue and epilogue (loading q, writing its partial output); ties go to fewer
    splits (less to merge). A batch that already fills the GPU keeps its context whole; batch 1 spreads it over
    every slot.
    """
    units = cdiv(max(max_len, 1), SPLIT_UNIT)
    best = None
    for n in range(1, min(units, cdiv(2 * slots, groups)) + 1):
        per = cdiv(units, n)
        cost = cdiv(groups * cdiv(units, per), slots) * (per + 1)
        if best is None or cost < best[0]:
            best = (cost, per)
    per_split = best[1] * SPLIT_UNIT
    return cdiv(max(max_len, 1), per_split), per_split


def split_dim(d: int) -> tuple:
    """A head dim as two power-of-two tile widths ``(a, b)`` (``b`` may be 0) covering it with less padding
    than one power of two: 192 -> (128, 64), 576 -> (512, 64), 80 -> (64, 16), 128 -> (128, 0). Kernels
    then run two matmuls over the two parts instead of one over ``next_pow2(d)`` columns."""
    whole = max(16, next_pow2(d))
    a = 1 << (max(int(d), 1).bit_length() - 1)
    if a == d or a < 16:
        return whole, 0
    b = max(16, next_pow2(d - a))
    return (a, b) if a + b < whole else (whole, 0)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 under the interpreter): sizes split-KV grids."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def autotune_enabled() -> bool:
    """False when ``LONGATTN_AUTOTUNE=0``: autotuned kernels then take the first tile that fits instead of
    timing every candidate (test runs on a GPU compile far fewer kernels; timings are not their point).
    Always False under the interpreter (nothing to time)."""
    return not is_interpreter() and os.environ.get("LONGATTN_AUTOTUNE", "1") != "0"


def _untimed(kernel_call, quantiles):
    return [0.0] * len(quantiles)


# triton.autotune's ``do_bench``: under the interpreter nothing is timed (some Triton versions time even a
# single remaining candidate, which needs a GPU driver)
AUTOTUNE_BENCH = _untimed if is_interpreter() else None


def autotune(configs: list, key: list, prune, **options):
    """``triton.autotune`` for longattn's kernels: candidates ``configs`` timed per value of ``key``, pruned by
    ``prune(configs, named_args, **kwargs)`` (Triton's ``early_config_prune``), nothing timed under the
    interpreter, and the candidates left after pruning compiled side by side before they are timed (see
    ``compile_candidates``); a single candidate (no autotuning) that ptxas fails on gives way to the next the prune
    keeps (see ``_assembles``). ``options``: other ``triton.autotune`` arguments (``restore_value``)."""
    def decorate(fn):
        def early_prune(configs, named_args, **kwargs):
            keep = prune(configs, named_args, **kwargs)
            if len(keep) > 1:
                compile_candidates(fn, keep, {**named_args, **kwargs})
                return keep
            # one candidate (no autotuning): where ptxas fails on it, what ``prune`` keeps of the others (a prune
            # that picks from the ``configs`` it is given: the flash kernels'); autotuning, Triton skips it itself
            left = list(configs)
            while keep[0] in left and not _assembles(fn, keep[0], {**named_args, **kwargs}):
                left.remove(keep[0])
                if not left:
                    break
                keep = prune(left, named_args, **kwargs)
            return keep

        early_prune.compiles_ahead = True  # (python -m bench compiles other autotuners' candidates ahead too)
        return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": early_prune},
                               do_bench=AUTOTUNE_BENCH, **options)(fn)
    return decorate


def _assembles(fn, config, args: dict) -> bool:
    """False where compiling the launch ``fn(**args)`` under ``config`` for this GPU fails in ptxas (which
    Triton 3.6's PTX of some flash forward TMA tiles crashes, e.g. head dim 128 with left padding, sm_90), with a
    warning naming the tile; True otherwise (other errors are the launch's to raise; nothing to compile under
    the interpreter). A warm-up compiles what the launch then finds in the JIT's cache."""
    if is_interpreter() or not torch.cuda.is_available():
        return True
    from triton.runtime.errors import PTXASError

    try:
        fn.warmup(grid=(1,), **{k: v for k, v in args.items() if k in fn.arg_names}, **config.all_kwargs(),
                  **COMPILE_OPTIONS)
    except PTXASError as e:
        warnings.warn(f"{fn.__name__}: ptxas failed on {config} ({str(e).splitlines()[0][:80]}); "
                      f"the next tile that fits is used", RuntimeWarning, stacklevel=2)
        return False
    except Exception:  # noqa: BLE001 - raised again by the launch, where it belongs
        return True
    return True


def compile_candidates(fn, configs: list, args: dict) -> None:
    """Compile the launch ``fn(**args)`` under each of ``configs``, side by side (``args``: what Triton's
    autotuner holds of a launch, whose keywords also carry the grid and the warm-up flag; only ``fn``'s parameters
    are used): the autotuner compiles each candidate only when it comes to time it, one after the other, most of
    a first call's tuning time (eleven flash dK/dV tiles took 33-41 s on a 16-core H100 machine; compiled ahead,
    0.5-8.7 s per key). Triton's compiler releases the GIL (threads compile in parallel: 1.7-1.9x on 2 cores,
    Triton 3.6 and 3.9), and a JIT warm-up compiles exactly what the
    launch looks up, so the autotuner finds each in the kernel cache. A candidate that fails to compile here fails
    again when timed, where the autotuner skips it as before. ``LONGATTN_COMPILE_THREADS`` sets the threads
    (default: the CPU count, at most 16; 1: none, the autotuner compiles as it times)."""
    threads = compile_threads()
    if threads <= 1 or not torch.cuda.is_available():
        return
    from concurrent.futures import ThreadPoolExecutor

    device = torch.cuda.current_device()
    # the JIT's per-device kernel cache (a defaultdict in Triton 3.6-3.9) is created here, not by several threads
    # at once (the last one's would replace the others', whose kernels would then be compiled again)
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        caches[device]

    launch = {k: v for k, v in args.items() if k in fn.arg_names}

    def compile_one(config):
        torch.cuda.set_device(device)  # a new thread starts on device 0
        try:
            fn.warmup(grid=(1,), **launch, **config.all_kwargs(), **COMPILE_OPTIONS)
        except Exception:  # noqa: BLE001 - reported by the autotuner when it compiles the candidate again
            pass

    with ThreadPoolExecutor(min(len(configs), threads)) as pool:
        list(pool.map(compile_one, configs))


def compile_threads() -> int:
    """Threads that compile autotune candidates ahead (``compile_candidates``): ``LONGATTN_COMPILE_THREADS``, or
    the CPU count up to 16."""
    value = os.environ.get("LONGATTN_COMPILE_THREADS")
    if value is None:
        return min(os.cpu_count() or 1, 16)
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"LONGATTN_COMPILE_THREADS must be a positive integer (1: no compiling ahead), got {value!r}")
    return threads


def autotune_configs(gpu: Iterable[dict], interpreter: dict, *, num_warps: int = 4,
                     num_stages: int = 2) -> list:
    """Autotune configs: the full ``gpu`` list on a GPU, the single ``interpreter`` config otherwise.

    Each entry of ``gpu`` is a dict of meta-parameters that may also hold ``num_warps`` and
    ``num_stages``. Autotuning under the interpreter would only multiply the (slow) CPU run time (with
    ``LONGATTN_INTERPRET_TILES=gpu`` the interpreter gets the GPU list and, never autotuning, takes the first
    candidate that the kernel's pruning keeps).
    """
    def make(d: dict) -> triton.Config:
        d = dict(d)
        w = d.pop("num_warps", num_warps)
        s = d.pop("num_stages", num_stages)
        return triton.Config(d, num_warps=w, num_stages=s)

    if small_tiles():
        return [make(interpreter)]
    return [make(d) for d in gpu]


def poison_outputs() -> bool:
    """True when ``LONGATTN_POISON_OUTPUTS=1``: fresh kernel outputs are then filled with NaN (floats) or
    the most negative value (integers) before the kernel runs, so any element a kernel forgets to write
    shows up in tests instead of passing by luck with whatever memory held."""
    return os.environ.get("LONGATTN_POISON_OUTPUTS", "0") == "1"


def empty(*shape, device, dtype) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (poisoned when :func:`poison_outputs`)."""
    t = torch.empty(*shape, device=device, dtype=dtype)
    if poison_outputs():
        t.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min)
    return t


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, device=t.device, dtype=t.dtype)


@triton.jit
def _bf16_probe_kernel(A, C, D, E):
    r = tl.arange(0, 16)
    tile = r[:, None] * 16 + r[None, :]
    a = tl.load(A + tile)
    tl.store(C + tile, tl.dot(a, a))
    tl.store(D + tile, a * a - a)
    tl.store(E + tile, (a > 0).to(tl.int32) + (a < -1).to(tl.int32))


@functools.lru_cache(maxsize=None)
def interpreter_bf16_exact() -> bool:
    """Whether Triton's interpreter computes bfloat16 correctly (matmul, arithmetic, comparisons). Stock
    interpreters compute on the raw 16-bit patterns; longattn's test harness makes them compute in float32."""
    a = torch.linspace(-2, 2, 256).reshape(16, 16).to(torch.bfloat16)
    c = torch.zeros(16, 16)
    d = torch.zeros(16, 16, dtype=torch.bfloat16)
    e = torch.zeros(16, 16, dtype=torch.int32)
    _bf16_probe_kernel[(1,)](a, c, d, e, **COMPILE_OPTIONS)
    x = a.float()
    return bool(torch.allclose(c, x @ x, rtol=1e-3, atol=1e-3)
                and torch.allclose(d.float(), x * x - x, rtol=2e-2, atol=2e-2)
                and torch.equal(e, (x > 0).int() + (x < -1).int()))


@torch.compiler.disable  # TorchDynamo cannot trace pin_memory; the values change per step anyway
def device_tensor(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host list (or CPU tensor) as a tensor on ``device``, copied from pinned memory asynchronously:
    ``torch.tensor(values, device=cuda)`` waits for the GPU to finish its queued work (a blocking copy), and even
    a non-blocking copy from pageable memory may (the driver stages it), which a decoding step would pay per
    layer."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@torch.compiler.disable  # as device_tensor: pinned memory and events
def read_back_later(*tensors: torch.Tensor):
    """Start copying small device tensors to the host without waiting: returns a function that waits for those
    copies alone (not for the work queued after them, e.g. a kernel launched meanwhile) and gives them as CPU
    tensors. A plain ``.cpu()`` later would wait for everything queued before it."""
    if tensors[0].device.type != "cuda":
        return lambda: [t.cpu() for t in tensors]
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, t in zip(hosts, tensors):
        host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list:
        copied.synchronize()
        return hosts
    return wait


def kernel_inputs(*tensors: Optional[torch.Tensor]):
    """Tensors as the kernels should see them.

    A stock Triton interpreter computes bfloat16 on the raw bit patterns (``tl.dot`` multiplies them), so
    there bfloat16 tensors are upcast to float32 (callers cast results back to the input dtype). On a GPU,
    and under an interpreter that computes bfloat16 correctly, this is the identity.
    """
    if not is_interpreter() or interpreter_bf16_exact():
        return tensors
    return tuple(t.float() if (t is not None and t.dtype == torch.bfloat16) else t for t in tensors)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def check_tensor(x, name: str, *, ndim: Optional[int | Sequence[int]] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = SUPPORTED_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")


def check_device(tensors: dict) -> torch.device:
    """All tensors on one device, and a device the kernels can run on."""
    devices = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n} is on {d} but {first_name} is on {first}: all inputs must share a device")
    if first.type != "cuda" and not is_interpreter():
        raise ValueError(
            f"{first_name} is on {first}: longattn kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 to run them on the CPU through Triton's interpreter)")
    if first.type != "cuda" and _interpreter_refusal():
        raise RuntimeError(_interpreter_refusal())
    return first


@torch.compiler.assume_constant_result  # TorchDynamo calls it once while tracing (the packages do not change)
def _interpreter_refusal() -> Optional[str]:
    return interpreter_problem()


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> Optional[str]:
    """Why Triton's interpreter cannot run the kernels with the installed packages, or None. Triton's interpreter
    before 3.7 turns one-element arrays into loop bounds with ``int(array)``, which numpy 2.4 refuses
    (triton-lang/triton#9171): every kernel with a loop would fail deep inside the interpreter."""
    import numpy as np

    if (tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)
            and np.lib.NumpyVersion(np.__version__) >= "2.4.0"):
        return (f"triton {triton.__version__}'s interpreter (the CPU path) needs numpy < 2.4, found numpy "
                f"{np.__version__}: pip install 'numpy<2.4' (or triton >= 3.7)")
    return None


def check_same_dtype(tensors: dict) -> torch.dtype:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {first_name} has {first.dtype}: they must match")
    return first.dtype


def check_cu_seqlens(cu: torch.Tensor, total: int, name: str = "cu_seqlens") -> list[int]:
    """Validate a ``cu_seqlens`` tensor and return it as a Python list.

    Requirements: int32, 1-D with at least 2 entries, starts at 0, non-decreasing, last == ``total``.
    """
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {str(cu.dtype).replace('torch.', '')}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with N+1 >= 2 entries, got shape {tuple(cu.shape)}")
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    for i in range(1, len(vals)):
        if vals[i] < vals[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i}]={vals[i]} < {name}[{i-1}]={vals[i-1]}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens ({total}), got {vals[-1]}")
    return vals


def check_decode_inputs(q, k_cache, v_cache, others: dict, lengths: dict, cache_batch: Optional[int] = None,
                        float8_caches: bool = False) -> tuple:
    """One new token per query row against a batched cache: q ``(B, Hq, Dqk)``, k_cache/v_cache ``(Bc, L, Hkv, Dqk)``
    / ``(Bc, L, Hkv, Dv)`` (``Bc = cache_batch``, default B: one row per sequence) and the op's other 4-D tensors
    (``others``, None allowed): dtypes, one dtype (with ``float8_caches`` the caches may share a float8 one: a
    quantised cache), one device (``lengths``' tensors too), contiguous last dims, shapes. Returns
    ``(B, Hq, Dqk, L, Hkv, Dv)``."""
    named = {"q": q, "k_cache": k_cache, "v_cache": v_cache, **others}
    caches = ("k_cache", "v_cache")
    for name, t in named.items():
        if t is not None or name in ("q", "k_cache", "v_cache"):  # the others may be None
            check_tensor(t, name, ndim=3 if name == "q" else 4,
                         dtypes=SUPPORTED_DTYPES + FLOAT8_DTYPES if float8_caches and name in caches else
                         SUPPORTED_DTYPES)
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last dimension")
    if k_cache.dtype in FLOAT8_DTYPES or v_cache.dtype in FLOAT8_DTYPES:
        if k_cache.dtype != v_cache.dtype:
            raise TypeError(f"k_cache and v_cache must share one dtype, got {k_cache.dtype} and {v_cache.dtype}")
        named = {n: t for n, t in named.items() if n not in caches}
    check_same_dtype(named)
    check_device({**named, **lengths})
    B, hq, dk = q.shape
    bc = B if cache_batch is None else cache_batch
    L, hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != bc or k_cache.shape[-1] != dk:
        raise ValueError(f"k_cache must be (B, L, Hkv, Dqk) = ({bc}, L, Hkv, {dk}), got {tuple(k_cache.shape)}")
    if tuple(v_cache.shape[:3]) != (bc, L, hkv):
        raise ValueError(f"v_cache must be (B, L, Hkv, Dv) = ({bc}, {L}, {hkv}, Dv), got {tuple(v_cache.shape)}")
    dv = v_cache.shape[-1]
    if hq == 0 or hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a positive multiple of the KV heads ({hkv})")
    if min(dk, dv) == 0 or max(dk, dv) > 1024:
        raise ValueError(f"head dims must lie in [1, 1024], got q/k {dk} and v {dv}")
    return B, hq, dk, L, hkv, dv


def check_cache_rows(cache_rows, k_cache) -> Optional[int]:
    """The type of a decode op's ``cache_rows`` (int32 1-D: the cache row each query row reads); returns the number
    of cache rows to check the caches against (None without cache_rows: one per query row)."""
    if cache_rows is None:
        return None
    if not isinstance(cache_rows, torch.Tensor) or cache_rows.dtype != torch.int32 or cache_rows.dim() != 1:
        raise TypeError("cache_rows must be an int32 tensor of shape (B,) (one per query row)")
    return k_cache.shape[0] if isinstance(k_cache, torch.Tensor) else None


def validate_cache_rows(cache_rows, batch: int, cache_batch: int, validate: bool, shared_offsets=None):
    """``cache_rows`` as the kernels read it (contiguous), one per query row and, with ``validate`` (a host
    synchronisation), each in [0, cache_batch); with ``shared_offsets`` (the query rows' cache offsets, for an op
    that takes one offset per cache row) the query rows of one cache row must have the same offset."""
    if cache_rows is None:
        return None
    if cache_rows.shape[0] != batch:
        raise ValueError(f"cache_rows must have one entry per query row ({batch}), got {cache_rows.shape[0]}")
    if validate and batch:
        rows, *offsets = (cache_rows[None] if shared_offsets is None else
                          torch.stack([cache_rows, shared_offsets])).tolist()
        if min(rows) < 0 or max(rows) >= cache_batch:
            raise ValueError(f"cache_rows must lie in [0, {cache_batch}) (the caches' rows), got {rows}")
        first = {}
        for r, o in zip(rows, offsets[0] if offsets else ()):
            if first.setdefault(r, o) != o:
                raise ValueError(f"the query rows of cache row {r} must share its cache_offsets, got {first[r]} and "
                                 f"{o}")
    return cache_rows.contiguous()


def check_cache_lengths(cache_seqlens, cache_offsets, batch: int, capacity: int, validate: bool):
    """Decoding against a batched cache of ``capacity`` rows: int32 ``(batch,)`` tokens per sequence and cache row
    of each sequence's first token (default 0). Returns ``(cache_seqlens, cache_offsets, lengths)``: the tensors as
    the kernels read them (contiguous) and the lengths as a host list, read back with ``validate`` (one
    synchronisation) and checked to lie in the cache, else ``capacity`` each."""
    for name, t in (("cache_seqlens", cache_seqlens), ("cache_offsets", cache_offsets)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or tuple(t.shape) != (batch,)):
            raise TypeError(f"{name} must be an int32 tensor of shape ({batch},)")
    if cache_seqlens is None:
        raise TypeError(f"cache_seqlens must be an int32 tensor of shape ({batch},)")
    if cache_offsets is None:
        cache_offsets = torch.zeros(batch, dtype=torch.int32, device=cache_seqlens.device)
    cache_seqlens, cache_offsets = cache_seqlens.contiguous(), cache_offsets.contiguous()  # the kernels index b
    if not validate:
        return cache_seqlens, cache_offsets, [capacity] * batch
    host = torch.cat([cache_seqlens, cache_offsets]).tolist()  # one synchronisation
    for b, (n, o) in enumerate(zip(host[:batch], host[batch:])):
        if n < 1 or o < 0 or o + n > capacity:
            raise ValueError(f"sequence {b}: cache_offsets + cache_seqlens must lie in the cache with at least one "
                             f"token (0 <= offset, 1 <= seqlen, offset + seqlen <= {capacity}), got offset {o}, "
                             f"seqlen {n}")
    return cache_seqlens, cache_offsets, host[:batch]


def check_cache_pages(lens: torch.Tensor, table: Optional[torch.Tensor], S: int, capacity: int, page: int,
                      pages: int, offsets: Optional[torch.Tensor] = None) -> list:
    """Host copies of a decode op's ``cache_seqlens`` (and ``block_table``, ``cache_offsets`` if any) for ``S``
    query tokens per sequence: the lengths as a list, or a ValueError naming the first sequence whose length lies
    outside [S, capacity] (less its offset), or whose block-table entries that its length uses are outside
    [0, pages)."""
    room = capacity - (offsets if offsets is not None else 0)
    bad = (lens < S) | (lens > room)
    if offsets is not None:
        bad |= (offsets < 0) | (offsets > capacity)
    if table is not None:
        used = torch.arange(table.shape[1])[None, :] * page < lens[:, None].long()
        bad |= (used & ((table < 0) | (table >= pages))).any(1)
    if bool(bad.any()):
        b = int(bad.int().argmax())
        n = int(lens[b])
        if offsets is not None and not 0 <= int(offsets[b]) <= capacity:
            raise ValueError(f"cache_offsets[{b}] = {int(offsets[b])} is out of range: it must lie in [0, {capacity}]")
        if n < S or n > int(room if offsets is None else room[b]):
            raise ValueError(f"cache_seqlens[{b}] = {n} is out of range: it must be at least the {S} query "
                             f"token(s) and at most the cache capacity {capacity}"
                             + (f" less its offset {int(offsets[b])}" if offsets is not None else ""))
        u = -(-n // page)
        raise ValueError(f"block_table[{b}] points outside the cache: its first {u} entries must lie in "
                         f"[0, {pages}), got {table[b, :u].tolist()}")
    return lens.tolist()


def check_block_table(block_table, cache_offsets, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: int, *,
                      divides: Optional[int] = None, evenly_strided: bool = False) -> tuple:
    """A decode op's paged KV cache (``(num_pages, page_size, Hkv, D)`` with an int32 ``(rows, max_pages)`` block
    table, one row per cache row): its type and shape, no ``cache_offsets``, at least one page of one token, a page
    size dividing ``divides`` (a block of keys the kernels take page by page) and, with ``evenly_strided``, pages
    one after another (the kernels find token j of page p at row ``p * page_size + j``). Returns (tokens a row
    reaches, page size)."""
    if cache_offsets is not None:
        raise ValueError("cache_offsets applies to contiguous caches; a paged one starts each sequence at its first "
                         "page")
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
            or block_table.shape[0] != rows:
        raise TypeError(f"block_table must be an int32 tensor of shape ({rows}, max_pages) (one row per cache row)")
    page = k_cache.shape[1]
    if k_cache.shape[0] == 0 or page == 0:
        raise ValueError(f"a paged k_cache must hold at least one page of at least one token, got "
                         f"{tuple(k_cache.shape)}")
    if divides is not None and divides % page:
        raise ValueError(f"the page size (k_cache.shape[1] = {page}) must divide block_size ({divides})")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)) if evenly_strided else ():
        if t.stride(0) != page * t.stride(1):
            raise ValueError(f"{name}'s pages must follow one another (stride(0) = page_size * stride(1)), got "
                             f"strides {t.stride()}")
    return block_table.shape[1] * page, page


def validate_pages(block_table: torch.Tensor, cache_rows: Optional[torch.Tensor], lens: list, capacity: int,
                   page: int, pages: int) -> None:
    """The block-table entries that each query row's length uses (its cache row's, ``cache_rows``) lie in [0,
    pages), else a ValueError (a host synchronisation)."""
    if lens:
        table = block_table if cache_rows is None else block_table[cache_rows.long()]
        check_cache_pages(torch.tensor(lens), table.cpu(), 1, capacity, page, pages)


MAX_SCALE = 2.0 ** 60


class Calibration:
    """``every_write``: set (:func:`calibrating_writes`) while every write to a float8 cache with "auto" scales
    (InPlaceCache's layers, PagedLatentCache) calibrates them, writes of one token a sequence too. A class attribute
    (TorchDynamo reads it under a guard) shared by every thread."""
    every_write = False


@contextlib.contextmanager
def calibrating_writes():
    """Within: every write to a float8 cache with "auto" scales calibrates them, writes of one token a sequence too
    (a prefill done one column at a time: :func:`longattn.rollout.generate`'s padded prefill in chunks of fewer
    tokens than prompts), not only the first and those of several tokens a sequence."""
    before, Calibration.every_write = Calibration.every_write, True
    try:
        yield
    finally:
        Calibration.every_write = before


def float8_quantised(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``x / scale`` in float8 ``dtype``, saturated to its finite range (a plain conversion makes NaN of what lies
    beyond); x may be float8 itself (widened first, exactly)."""
    if x.dtype == dtype and scale == 1.0:
        return x
    if x.dtype in FLOAT8_DTYPES:
        x = x.to(torch.bfloat16)
    top = torch.finfo(dtype).max
    return (x if scale == 1.0 else x / scale).clamp(-top, top).to(dtype)


def _largest_magnitude(x: torch.Tensor) -> torch.Tensor:
    """x's largest magnitude, a float32 scalar on its device (without an |x| copy; NaN if x holds one; 0 if empty)."""
    if x.numel() == 0:
        return torch.zeros((), device=x.device)
    if x.dtype in FLOAT8_DTYPES:
        x = x.to(torch.bfloat16)
    return torch.maximum(x.amax(), -x.amin()).float()


def finite_magnitudes(*xs: torch.Tensor) -> list:
    """The largest finite magnitude of each tensor (0 for an empty one), as Python floats: one read back to the
    host, a second only for a tensor holding inf or NaN (its finite values then taken apart, a copy)."""
    found = torch.stack([_largest_magnitude(x) for x in xs]).tolist()
    return [a if math.isfinite(a) else _largest_magnitude(torch.nan_to_num(x.float(), 0.0, 0.0, 0.0)).item()
            for a, x in zip(found, xs)]


def float8_scale_for(amax: float, dtype: torch.dtype) -> float:
    """A float8 cache's dequantisation scale for values of largest magnitude ``amax``: the power of two that brings
    it to at most a quarter of ``dtype``'s range (room for larger later values; a power of two divides exactly, and
    smaller values keep the format's relative precision instead of falling among its subnormals); 1 for 0; at most
    MAX_SCALE, the largest the ops take (larger values saturate)."""
    return min(MAX_SCALE, 2.0 ** math.ceil(math.log2(amax * 4 / torch.finfo(dtype).max))) if amax > 0 else 1.0


def check_scale(scale, default: float, name: str = "scale") -> float:
    if scale is None:
        return float(default)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError:  # an int beyond float range
        value = float("inf")
    if not (value > 0.0) or value > MAX_SCALE:  # (the kernels take it, and products of two, in float32)
        raise ValueError(f"{name} must be a finite positive number at most 2**60, got {scale}")
    return value


def check_softcap(softcap) -> float:
    """A soft cap of the scores: None or 0 (none) or a finite positive number; returns it as a float (0.0: none)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    if softcap == 0:
        return 0.0
    return check_scale(softcap, 0.0, "softcap")


def check_sinks(sinks, heads: int):
    """Attention sinks: None, or one float logit per query head, a ``(heads,)`` tensor."""
    if sinks is None:
        return
    check_tensor(sinks, "sinks", dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if tuple(sinks.shape) != (heads,):
        raise ValueError(f"sinks must have shape ({heads},) (one logit per query head), got {tuple(sinks.shape)}")


def check_positive_int(value, name: str, *, allow_none: bool = False, minimum: int = 1, maximum: int = 2 ** 31 - 1):
    """An int in [minimum, maximum] (kernels take it as a 32-bit integer), or None with ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or value > maximum:
        raise ValueError(f"{name} must lie in [{minimum}, {maximum}], got {value}")
    return value


def resolve_seqlens(cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Fold the shared ``cu_seqlens``/``max_seqlen`` shorthands into their q/k pairs."""
    if cu_seqlens is not None:
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            raise ValueError("pass either cu_seqlens or cu_seqlens_q/cu_seqlens_k, not both")
        cu_seqlens_q = cu_seqlens_k = cu_seqlens
    if max_seqlen is not None:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("pass either max_seqlen or max_seqlen_q/max_seqlen_k, not both")
        max_seqlen_q = max_seqlen_k = max_seqlen
    return cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k


@dataclass
class AttnDims:
    """Sizes of a (q, k, v) attention problem after validation.

    Dense inputs have ``batch`` sequences of ``max_seqlen_q``/``max_seqlen_k`` tokens; varlen inputs
    hold ``batch`` packed sequences described by ``cu_seqlens_q``/``cu_seqlens_k``.
    """
    varlen: bool
    batch: int
    max_seqlen_q: int
    max_seqlen_k: int
    heads_q: int
    heads_kv: int
    dim_qk: int
    dim_v: int
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    seqlens_q: Optional[list] = None  # host copies of the varlen lengths
    seqlens_k: Optional[list] = None

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv


def check_attention_shapes(q, k, v, varlen: bool, v_name: str = "v") -> None:
    """The checks of :func:`check_attention_inputs` that read no tensor's values: types, dtypes and shapes."""
    check_tensor(q, "q", ndim=(3, 4))
    check_tensor(k, "k", ndim=(3, 4))
    check_tensor(v, v_name, ndim=(3, 4))
    check_same_dtype({"q": q, "k": k, v_name: v})
    want = 3 if varlen else 4
    layout = "(total_tokens, heads, head_dim) with cu_seqlens" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), (v_name, v)):
        if t.dim() != want:
            raise ValueError(f"{name} must be {want}-D {layout}, got shape {tuple(t.shape)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and {v_name} must agree on all but the last dimension, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hq == 0 or hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a positive multiple of the number of "
                         f"key/value heads ({hkv})")
    dqk, dv = q.shape[-1], v.shape[-1]
    if dqk == 0 or dv == 0:
        raise ValueError(f"head dims must be positive, got q/k {dqk} and {v_name} {dv}")
    if max(dqk, dv) > 1024:
        raise ValueError(f"head dims above 1024 are not supported, got q/k {dqk} and {v_name} {dv}")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")


def check_attention_inputs(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                           max_seqlen_k=None, v_name: str = "v") -> AttnDims:
    """Validate q/k/v in the dense ``(B, T, H, D)`` or varlen ``(total, H, D)`` layout.

    ``max_seqlen_*`` are optional; when given they must be at least the longest sequence.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    check_attention_shapes(q, k, v, varlen, v_name)
    check_device({"q": q, "k": k, v_name: v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k})
    hq, hkv, dqk, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    if not varlen:
        for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if val is not None:
                raise ValueError(f"{name} is only meaningful with cu_seqlens (varlen layout)")
        return AttnDims(False, q.shape[0], q.shape[1], k.shape[1], hq, hkv, dqk, dv)
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("varlen inputs need both cu_seqlens_q and cu_seqlens_k (or a shared cu_seqlens)")
    cq = check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    ck = check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                         f"got {len(cq) - 1} and {len(ck) - 1}")
    lq = [b - a for a, b in zip(cq[:-1], cq[1:])]
    lk = [b - a for a, b in zip(ck[:-1], ck[1:])]
    mq, mk = max(lq), max(lk)
    for name, val, actual in (("max_seqlen_q", max_seqlen_q, mq), ("max_seqlen_k", max_seqlen_k, mk)):
        if val is not None:
            check_positive_int(val, name, minimum=0)
            if val < actual:
                raise ValueError(f"{name}={val} is smaller than the longest sequence ({actual})")
    # the kernels read entry b at cu + b: a strided view (cu[::2]) is copied
    return AttnDims(True, len(cq) - 1, mq, mk, hq, hkv, dqk, dv, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                    lq, lk)
