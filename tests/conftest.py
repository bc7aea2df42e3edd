"""Test harness.

Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET is
set here, before anything imports triton (the kernels' @triton.jit decorators read it). Kernel outputs
are poisoned with NaN before every launch (LONGATTN_POISON_OUTPUTS), so unwritten elements fail, and a
launch with a keyword argument the kernel does not declare fails (the interpreter drops it silently, a GPU
launch rejects it).
"""
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
    from triton.runtime import interpreter

    launch = interpreter.GridExecutor.__call__

    def strict(self, *args, **kwargs):
        spec = inspect.getfullargspec(self.fn)
        unknown = set(kwargs) - set(spec.args) - set(spec.kwonlyargs) - LAUNCH_OPTIONS
        if unknown:
            raise TypeError(f"{self.fn.__name__} launched with undeclared arguments {sorted(unknown)}")
        return launch(self, *args, **kwargs)
    interpreter.GridExecutor.__call__ = strict


if not HAS_CUDA:
    _strict_interpreter_launches()
# The interpreter's tl.dot multiplies the raw bits of bfloat16: bf16 is tested on the GPU only.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
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
