"""Test harness.

Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET is
set here, before anything imports triton (the kernels' @triton.jit decorators read it). Kernel outputs
are poisoned with NaN before every launch (LONGATTN_POISON_OUTPUTS), so unwritten elements fail, and a
launch with a keyword argument the kernel does not declare fails (the interpreter drops it silently, a GPU
launch rejects it), as does a longattn launch without the compile options all of them pass. The interpreter is
made to compute bfloat16 as the GPU does, so every dtype, bf16 included, is tested on the CPU too, and to swap
triton.language for its interpreted functions once per launch (not again at every call of a helper: the same
result, in two thirds of the time), to keep its Triton-to-numpy dtype answers (another tenth of the time), and
to skip front-end bookkeeping whose outcome is known (another 40%: ``_lighter_interpreted_semantics``).
"""
import contextlib
import inspect
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["LONGATTN_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion"}


def _strict_interpreter_launches():
    """Launches through the interpreter fail where a GPU's would compile differently or not at all: an argument
    the kernel does not declare (the interpreter drops it), or a longattn kernel launched without the compile
    options every launch passes (``longattn.kernels.utils.COMPILE_OPTIONS``)."""
    from triton.runtime import interpreter

    from longattn.kernels.utils import COMPILE_OPTIONS

    launch = interpreter.GridExecutor.__call__

    def strict(self, *args, **kwargs):
        spec = inspect.getfullargspec(self.fn)
        unknown = set(kwargs) - set(spec.args) - set(spec.kwonlyargs) - LAUNCH_OPTIONS
        if unknown:
            raise TypeError(f"{self.fn.__name__} launched with undeclared arguments {sorted(unknown)}")
        if self.fn.__module__.startswith("longattn.") and any(kwargs.get(k) != v for k, v in COMPILE_OPTIONS.items()):
            raise TypeError(f"{self.fn.__name__} launched without longattn.kernels.utils.COMPILE_OPTIONS")
        return launch(self, *args, **kwargs)
    interpreter.GridExecutor.__call__ = strict


def _exact_bfloat16_interpreter():
    """Triton's interpreter keeps bfloat16 as raw 16-bit patterns and computes on the patterns (tl.dot,
    arithmetic, comparisons): the kernels would see nonsense. Here every bfloat16 operation computes in
    float32 and rounds its result back to bfloat16, as the GPU does, so bf16 runs through the same kernels
    and roundings as on a GPU (longattn.kernels.utils probes this and then stops upcasting bf16 inputs)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if not all(hasattr(builder, n) for n in ("cast_impl", "create_dot", "binary_op", "unary_op", "create_fma")):
        return  # another interpreter: bf16 inputs are then upcast (test_bfloat16_is_correct_on_every_backend says so)

    def bf16(h):
        return h.dtype.scalar == tl.bfloat16

    cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        """float32 -> bfloat16 rounds to nearest even, as the GPU does (the interpreter truncates)."""
        if dst_type.scalar != tl.bfloat16 or src.data.dtype != np.float32:
            return cast(self, src, dst_type)
        bits = src.data.view(np.uint32).astype(np.uint64)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        out = np.where(np.isnan(src.data), np.uint16(0x7FC0), out)
        return interpreter.TensorHandle(out, tl.bfloat16)
    builder.cast_impl = cast_impl

    def up(h):
        return interpreter.interpreter_builder.cast_impl(h, tl.float32) if bf16(h) else h

    def down(h):
        return interpreter.interpreter_builder.cast_impl(h, tl.bfloat16) if h.data.dtype == np.float32 else h

    # comparisons give what they give on float32 (a mask), arithmetic rounds back to bfloat16
    compare = (np.less, np.less_equal, np.greater, np.greater_equal, np.equal, np.not_equal)

    def wrap(name, rounds):
        orig = getattr(builder, name)

        def patched(self, *args):
            for a in args:  # (a loop, not any() over a generator: this runs at every operation of every kernel)
                if isinstance(a, interpreter.TensorHandle) and a.dtype.scalar == tl.bfloat16:
                    break
            else:
                return orig(self, *args)
            out = orig(self, *(up(a) if isinstance(a, interpreter.TensorHandle) else a for a in args))
            return down(out) if rounds and args[-1] not in compare else out
        setattr(builder, name, patched)

    wrap("create_dot", False)  # float32 accumulator
    for name in ("binary_op", "unary_op", "create_fma"):
        wrap(name, True)


def _patch_language_once_per_launch():
    """The interpreter swaps triton.language's functions for interpreted ones at each launch and undoes it after;
    it also redoes the swap at every call of a @triton.jit helper inside the kernel (about 1 ms each: a scan of
    every member of the language, more than half the time of kernels with helpers in loops). Within a launch the
    helpers' language modules (the same ``triton.language`` / ``triton.language.core`` objects) are already
    swapped, so the redo is skipped; a helper seeing a module the launch did not swap still gets it swapped (as
    before, for good: the interpreter does not undo a helper's swap)."""
    import triton.language as tl
    from triton.runtime import interpreter

    if not callable(getattr(interpreter, "_patch_lang", None)) or not hasattr(interpreter, "_LangPatchScope"):
        return
    patch = interpreter._patch_lang
    launch = []  # the language modules swapped by the launch in progress
    kept = set()  # those a helper's call swapped (triton.language.core, seen by its own helpers): never undone

    found = {}  # each helper's language modules, found once

    def langs(fn):
        if fn not in found:
            found[fn] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        return found[fn]

    class LaunchScope:
        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            self.scope.restore()
            launch.clear()

    def patch_lang(fn):
        need = langs(fn)
        if not launch:
            scope = patch(fn)
            launch.append(need)
            return LaunchScope(scope)
        if need <= launch[0] | kept:  # a helper inside the launch, its modules swapped already
            return interpreter._LangPatchScope()
        kept.update(need - launch[0])
        return patch(fn)
    interpreter._patch_lang = patch_lang


def _memoised_numpy_dtypes():
    """The interpreter maps a Triton dtype to its numpy one in every operation, building the table anew each time
    (about 5% of a kernel's interpreted time): the answers are kept."""
    import triton.language as tl
    from triton.runtime import interpreter

    lookup = getattr(interpreter, "_get_np_dtype", None)
    if lookup is None:
        return
    known = {}

    def memoised(tt_dtype):
        key = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(key, tl.pointer_type):  # (blocks and pointers are unhashable; pointers are 64-bit integers)
            return lookup(key)
        found = known.get(key)
        if found is None:
            found = known[key] = lookup(key)
        return found
    interpreter._get_np_dtype = memoised


def _lighter_interpreted_semantics():
    """Triton's front end, which the interpreter runs at every operation of every kernel, spends most of its time on
    bookkeeping whose outcome is known here (together about 40% of the kernels' interpreted time; the values
    computed are unchanged):
    - block types and tensors derive their shapes and element counts anew at each construction (the shape checked
      for powers of two each time): kept per shape once checked;
    - an arithmetic operation on two tensors of one type still works out their common type and broadcasts each to
      the shape they share: both are skipped where that type is its own computation type (float32, int32 and int64;
      float16 and bfloat16 but in a division or remainder, which computes in float32);
    - each int32 addition, subtraction and multiplication also computes its result in int64 to assert it fits,
      an assertion Triton drops unless the kernel is compiled with ``debug`` (the interpreter's default is off):
      skipped where it would be dropped."""
    import math

    import triton.language as tl
    from triton.language import core, semantic

    semantics = getattr(semantic, "TritonSemantic", None)
    needed = ("binary_op_type_checking_impl", "binary_op_sanitize_overflow_impl")
    if semantics is None or not all(hasattr(semantics, n) for n in needed):
        return  # another front end

    make_block_type = core.block_type.__init__
    block_shapes = {}  # shape -> (its ints, element count), once checked

    def block_type_init(self, element_ty, shape):
        try:
            known = block_shapes.get(tuple(shape))
        except TypeError:  # (an unhashable element: left to Triton's checks)
            known = None
        if known is None:
            make_block_type(self, element_ty, shape)
            block_shapes[tuple(shape)] = (self.shape, self.numel)
            return
        self.element_ty = element_ty
        self.shape, self.numel = known
        self.name = f"<{self.shape}, {element_ty}>"
    core.block_type.__init__ = block_type_init

    tensor_shapes = {(): ((), core.constexpr(1))}  # a block type's shape -> the tensor's shape and element count

    def tensor_init(self, handle, type):
        self.handle = handle
        self.type = type
        self.dtype = type.scalar
        shape = type.shape if type.is_block() else ()
        known = tensor_shapes.get(shape)
        if known is None:
            known = tensor_shapes[shape] = (tuple(core.constexpr(n) for n in shape), core.constexpr(math.prod(shape)))
        self.shape, self.numel = known
    core.tensor.__init__ = tensor_init

    type_check = semantics.binary_op_type_checking_impl
    own_type = {tl.float32, tl.int32, tl.int64}
    own_type_but_division = {tl.float16, tl.bfloat16}

    def binary_op_type_checking_impl(self, lhs, rhs, allow_lhs_ptr=False, allow_rhs_ptr=False,
                                     arithmetic_check=True, div_or_mod=False):
        if isinstance(lhs, self.tensor) and isinstance(rhs, self.tensor) and lhs.type == rhs.type:
            scalar = lhs.dtype
            if scalar in own_type or (scalar in own_type_but_division and not div_or_mod):
                return lhs, rhs
        return type_check(self, lhs, rhs, allow_lhs_ptr, allow_rhs_ptr, arithmetic_check, div_or_mod)
    semantics.binary_op_type_checking_impl = binary_op_type_checking_impl

    overflow_check = semantics.binary_op_sanitize_overflow_impl

    def binary_op_sanitize_overflow_impl(self, lhs, rhs, binary_op):
        if self.builder.options.debug:
            return overflow_check(self, lhs, rhs, binary_op)
    semantics.binary_op_sanitize_overflow_impl = binary_op_sanitize_overflow_impl


def _record_launches(path: str) -> None:
    """LONGATTN_RECORD_LAUNCHES=path: every distinct kernel launch through the interpreter is appended to ``path``
    as one JSON line (the kernel, each argument's dtype and 16-byte alignment or value, the launch options), for
    ``tests/compile_launches.py`` to compile for a GPU as Triton's JIT would specialise it (what the GPU runs of
    the same tests compile). Integers that are not constexprs are kept only as what specialises a launch: 1, a
    multiple of 16, another 32-bit value or a 64-bit one."""
    import json

    from triton.runtime import interpreter
    from triton.tools.tensor_descriptor import TensorDescriptor

    run = interpreter.InterpretedFunction.run
    seen = set()

    def encode(value, constexpr: bool):
        if isinstance(value, torch.Tensor):
            return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
        if isinstance(value, TensorDescriptor):
            return {"desc": str(value.base.dtype).removeprefix("torch."),
                    "shape": [encode(n, False) for n in value.shape],
                    "strides": [encode(n, False) for n in value.strides], "block": list(value.block_shape),
                    "aligned": value.base.data_ptr() % 16 == 0}
        if isinstance(value, int) and not isinstance(value, bool) and not constexpr:
            return 1 if value == 1 else 16 if value % 16 == 0 else 3 if -2 ** 31 <= value < 2 ** 31 else 2 ** 40 + 3
        if isinstance(value, float) and not constexpr:
            return 0.5
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(type(value).__name__)

    def recording(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        constexpr = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        try:
            line = json.dumps({"kernel": f"{self.fn.__module__}:{self.fn.__name__}",
                               "args": [encode(a, n in constexpr) for a, n in zip(args, params)],
                               "kwargs": {k: encode(v, k in constexpr or k in LAUNCH_OPTIONS)
                                          for k, v in sorted(kwargs.items())}})
        except TypeError as e:  # an argument of a kind no launch of ours passed so far: listed as not compiled
            line = json.dumps({"kernel": f"{self.fn.__module__}:{self.fn.__name__}", "unrecorded": str(e)})
        if line not in seen:
            seen.add(line)
            with open(path, "a") as f:  # one write per line: the xdist workers' lines do not interleave
                f.write(line + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    interpreter.InterpretedFunction.run = recording


if not HAS_CUDA:
    _strict_interpreter_launches()
    _exact_bfloat16_interpreter()
    _patch_language_once_per_launch()
    _memoised_numpy_dtypes()
    _lighter_interpreted_semantics()
    if os.environ.get("LONGATTN_RECORD_LAUNCHES"):
        _record_launches(os.environ["LONGATTN_RECORD_LAUNCHES"])
DTYPES = [torch.float16, torch.float32, torch.bfloat16]


def pytest_configure(config):
    from longattn.kernels.utils import interpreter_problem

    if not HAS_CUDA and interpreter_problem():  # stop at once, not in every kernel test
        pytest.exit(interpreter_problem(), returncode=4)


def _gpu_run_order(item) -> int:
    """On a GPU the GPU-only tests run first (nothing else runs them), then the bfloat16 and dtype-less ones (only
    the GPU computes bfloat16 natively), then the float16 / float32 ones (the CPU suite runs those too): a run cut
    short by a time limit (bench/gpu_suite.sh) has done what matters most. Names are matched as ``-k`` would:
    "float16" is in "bfloat16"."""
    if "gpu" in item.keywords:
        return 0
    name = item.nodeid
    return 1 if "bfloat16" in name or not ("float16" in name or "float32" in name) else 2


def _past_durations() -> dict:
    """Seconds each test took in earlier runs, from the files LONGATTN_TEST_DURATIONS lists (separated by
    ``os.pathsep``, the latest run last: its times win), each the LONGATTN_TEST_LOG of a run (one "outcome seconds
    nodeid (phase)" line per test). Files that cannot be read are passed over."""
    seconds = {}
    for path in filter(None, os.environ.get("LONGATTN_TEST_DURATIONS", "").split(os.pathsep)):
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[1].endswith("s") and parts[-1] == "(call)":
                    with contextlib.suppress(ValueError):
                        seconds[" ".join(parts[2:-1])] = float(parts[1][:-1])
    return seconds


def _sort_for_gpu(items) -> None:
    """The GPU run's order: the groups of ``_gpu_run_order``, each the longest first as an earlier GPU run timed
    them (gpu_suite.sh): xdist hands the tests out in this order, so no worker is still running a long one, with
    short ones queued behind it, when the time limit comes. Tests that no run timed (new ones, those a run did not
    reach) go first in their group, in their collected order, as if long: they may be (a first compile of their
    kernels, too), and one of them last would hold its worker past the others. (xdist's default hand-out sends each
    worker a run of consecutive tests, len/n/4 of them at first, then up to len/n/2: on the H100 one worker got the
    nine longest GPU-only tests, and the run's time limit came before it was done; gpu_suite.sh sends them one by
    one.)"""
    past = _past_durations()
    items.sort(key=lambda item: (_gpu_run_order(item), -past.get(item.nodeid, float("inf"))))
    # xdist's first hand-out (--maxschedchunk 1, as gpu_suite.sh runs it) gives each of its n workers two
    # consecutive tests: the longest goes with the shortest of the first 2n, the second with the second shortest...
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if 0 < n and 2 * n <= len(items):
        head = items[:2 * n]
        items[:2 * n] = [t for i in range(n) for t in (head[i], head[2 * n - 1 - i])]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        _sort_for_gpu(items)
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With LONGATTN_TEST_LOG=path, every test's outcome and duration, and each failure's traceback, are
    appended to that file as they come (a run cut short by a time limit still leaves them). Written by the
    xdist controller only (workers forward their reports to it)."""
    path = os.environ.get("LONGATTN_TEST_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER") or (report.when != "call" and not report.failed):
        return
    with open(path, "a") as f:
        f.write(f"{report.outcome:8s} {report.duration:7.2f}s {report.nodeid} ({report.when})\n")
        if report.failed:
            f.write(report.longreprtext[-6000:] + "\n\n")


def pytest_generate_tests(metafunc):
    if "dtype" in metafunc.fixturenames and not any(
            m.name == "parametrize" and "dtype" in m.args[0] for m in metafunc.definition.iter_markers()):
        metafunc.parametrize("dtype", DTYPES, ids=[str(d).replace("torch.", "") for d in DTYPES])


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
