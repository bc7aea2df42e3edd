"""longattn: Triton attention kernels for long-context reasoning models.

On a machine without CUDA the Triton kernels run on CPU tensors through Triton's interpreter:
importing longattn sets ``TRITON_INTERPRET=1`` in that case unless the variable is already set.
"""
import os as _os
import sys as _sys

if "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        if "triton.language" in _sys.modules:  # (transformers imports it when installed)
            import warnings as _warnings

            _warnings.warn("triton was imported before longattn, without TRITON_INTERPRET, on a machine without CUDA: "
                           "triton's own functions were made for a GPU then, and longattn's kernels, which run "
                           "through triton's interpreter here, will fail; set TRITON_INTERPRET=1 before importing "
                           "triton (or transformers), or import longattn first", RuntimeWarning, stacklevel=2)
        _os.environ["TRITON_INTERPRET"] = "1"

from .kernels import flash_attention, flash_decode, merge_attention  # noqa: E402
from .moba import moba_attention, moba_decode  # noqa: E402
from .mla import mla_decode, mla_prefill  # noqa: E402
from .nsa import NSAConfig, nsa_attention, nsa_decode  # noqa: E402
from . import hf, rollout  # noqa: E402

try:
    hf.register()
except ImportError:  # transformers missing or too old: the kernels still work
    pass

__version__ = "0.1.0"
__all__ = ["flash_attention", "flash_decode", "merge_attention", "moba_attention", "moba_decode", "mla_prefill",
           "mla_decode", "NSAConfig", "nsa_attention", "nsa_decode", "hf", "rollout", "__version__"]
