"""Loader of the C++/CUDA extension and the Python side of the ``cersa::`` ops.

The extension (built by setup.py from csrc/) defines, through TORCH_LIBRARY::

    cersa::linear_forward(x, U, S, Vh, A?, B?, bias?, scale, save_xv) -> (y, h_k, xv)
    cersa::linear_backward(dy, x?, h_k?, xv?, U, S, Vh, A?, B?, scale, needs[7])
        -> (dx, dU, dS, dVh, dA, dB, dbias)
    cersa::linear(x, U, S, Vh, A?, B?, bias?, scale) -> y
        (differentiable: its autograd, in C++, calls the two kernels above)
    cersa::linear_forward_q(x, U_codes, U_scales, S, Vh_codes, Vh_scales, A?, B?, bias?,
                            out_features, in_features, quant_type, block_size, scale, save_xv)
        -> (y, h_k, xv)
    cersa::linear_backward_q(dy, x?, h_k?, xv?, U_codes, U_scales, S, Vh_codes, Vh_scales, A?, B?,
                             out_features, in_features, quant_type, block_size, scale, needs[5])
        -> (dx, dS, dA, dB, dbias)
        (U and Vh as int8 / NF4 codes with float32 block scales, frozen: docs/design.md
        "Quantized factors")

with CPU kernels in ``cersa_kernels._C`` and CUDA kernels in ``cersa_kernels._C_cuda``
(docs/design.md "Forward"/"Backward"; signatures and output shapes in
``cersa_kernels.backends._catalogue``).

This module registers, from Python, the catalogue's fake (meta) kernels, so that
torch.compile(fullgraph=True, dynamic=True) traces the ops and torch.library.opcheck passes.
``linear_forward`` and ``linear_backward`` are kernels, not differentiable functions;
``cersa::linear`` is the differentiable op, with a C++ autograd kernel (csrc/cersa_autograd.cpp)
rather than a Python formula, which would put the interpreter back into every backward.

If the extension is missing or fails to load, ``CPU_ERROR`` / ``CUDA_ERROR`` hold the reason,
the package warns once and runs on the reference backend.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from . import _catalogue

#: None when cersa_kernels._C (schemas + CPU kernels) loaded, else the reason it did not.
CPU_ERROR: str | None = None
#: None when cersa_kernels._C_cuda (CUDA kernels) loaded, else the reason it did not.
CUDA_ERROR: str | None = None

try:
    importlib.import_module("cersa_kernels._C")
except Exception as exc:  # missing (not built) or broken (ABI mismatch): fall back, say why
    CPU_ERROR = f"cersa_kernels._C failed to load: {type(exc).__name__}: {exc}"
    warnings.warn(f"cersa_kernels: C++ extension unavailable ({CPU_ERROR}); the 'cpp' and 'cuda' "
                  "backends are off and the reference backend is used. Rebuild with "
                  "`pip install -e . --no-build-isolation`.", RuntimeWarning, stacklevel=2)

if CPU_ERROR is not None:
    CUDA_ERROR = CPU_ERROR
elif torch.version.cuda is None:
    CUDA_ERROR = f"torch {torch.__version__} is not a CUDA build"
else:
    try:
        importlib.import_module("cersa_kernels._C_cuda")
    except Exception as exc:
        CUDA_ERROR = f"cersa_kernels._C_cuda failed to load: {type(exc).__name__}: {exc}"
        if torch.cuda.is_available():
            warnings.warn(f"cersa_kernels: CUDA extension unavailable ({CUDA_ERROR}); the 'cuda' "
                          "backend is off.", RuntimeWarning, stacklevel=2)


#: whether the loaded extension defines the quantized-factor ops (one built from older sources does not).
HAS_QUANTIZED: bool = CPU_ERROR is None and hasattr(torch.ops.cersa, "linear_forward_q")

if CPU_ERROR is None:
    torch.library.register_fake("cersa::linear_forward")(_catalogue.forward_fake)
    torch.library.register_fake("cersa::linear")(_catalogue.linear_fake)
    torch.library.register_fake("cersa::linear_backward")(_catalogue.backward_fake)
if HAS_QUANTIZED:
    torch.library.register_fake("cersa::linear_forward_q")(_catalogue.forward_q_fake)
    torch.library.register_fake("cersa::linear_backward_q")(_catalogue.backward_q_fake)
