"""Loader of the C++/CUDA extension and the Python side of the ``cersa::`` ops.

The extension (built by setup.py from csrc/) defines, through TORCH_LIBRARY::

    cersa::linear_forward(x, U, S, Vh, A?, B?, bias?, scale, save_xv) -> (y, h_k, xv)
    cersa::linear_backward(dy, x?, h_k?, xv?, U, S, Vh, A?, B?, scale, needs[7])
        -> (dx, dU, dS, dVh, dA, dB, dbias)
    cersa::linear(x, U, S, Vh, A?, B?, bias?, scale) -> y
        (differentiable: its autograd, in C++, calls the two kernels above)

with CPU kernels in ``cersa_kernels._C`` and CUDA kernels in ``cersa_kernels._C_cuda``
(DESIGN.md "Forward"/"Backward"; shapes in ``cersa_kernels.backends``' contract).  Outputs an op
does not compute are empty: h_k is (N, 0) without A, xv is (N, 0) unless save_xv, and a gradient
whose ``needs`` flag is false (dA, dB also when A is None) is (0,).

This module registers, from Python, the fake (meta) kernels, so that
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


def _sizes(U, Vh, A):
    m, r = U.shape
    n = Vh.shape[1]
    k = A.shape[0] if A is not None else 0
    return m, r, n, k


if CPU_ERROR is None:

    @torch.library.register_fake("cersa::linear_forward")
    def _linear_forward_fake(x, U, S, Vh, A, B, bias, scale, save_xv):
        m, r, n, k = _sizes(U, Vh, A)
        torch._check(x.dim() == 2 and x.shape[1] == n,
                     lambda: f"cersa: x: expected shape (N, {n}), got {tuple(x.shape)}")
        N = x.shape[0]
        return x.new_empty((N, m)), x.new_empty((N, k)), x.new_empty((N, r if save_xv else 0))

    @torch.library.register_fake("cersa::linear")
    def _linear_fake(x, U, S, Vh, A, B, bias, scale):
        m, _, n, _ = _sizes(U, Vh, A)
        torch._check(x.dim() == 2 and x.shape[1] == n,
                     lambda: f"cersa: x: expected shape (N, {n}), got {tuple(x.shape)}")
        return x.new_empty((x.shape[0], m))

    @torch.library.register_fake("cersa::linear_backward")
    def _linear_backward_fake(dy, x, h_k, xv, U, S, Vh, A, B, scale, needs):
        m, r, n, k = _sizes(U, Vh, A)
        torch._check(dy.dim() == 2 and dy.shape[1] == m,
                     lambda: f"cersa: dy: expected shape (N, {m}), got {tuple(dy.shape)}")
        N = dy.shape[0]
        has = A is not None
        shapes = ((N, n), (m, r), (r,), (r, n), (k, n), (m, k), (m,))
        flags = (needs[0], needs[1], needs[2], needs[3], needs[4] and has, needs[5] and has, needs[6])
        return tuple(dy.new_empty(s if f else (0,)) for s, f in zip(shapes, flags))
