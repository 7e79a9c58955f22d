"""Backends "cpp" (the C++ extension's CPU kernels) and "cuda" (its CUDA kernels).

Both call the ``cersa::`` ops defined by the extension built from csrc/ (loaded, with their fake
kernels registered, by ``cersa_kernels.backends._cpp_ops``; signatures in
``cersa_kernels.backends._catalogue``).  They follow the backend contract of
``cersa_kernels.backends``: 2-D tensors, one dtype and device, forward -> (y, h_k, xv), backward ->
(dx, dU, dS, dVh, dA, dB, dbias) with None where not needed, plus the differentiable ``linear``
whose autograd is C++ (csrc/cersa_autograd.cpp).

Math: docs/design.md "Forward" / "Backward"; schedules: docs/design.md "C++ CPU kernels" and
"CUDA kernels".
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _catalogue, _cpp_ops

_LOADED = _cpp_ops.CPU_ERROR is None
if _LOADED:
    forward, backward = _catalogue.kernel_contract(torch.ops.cersa.linear_forward.default,
                                                   torch.ops.cersa.linear_backward.default)
    _LINEAR = torch.ops.cersa.linear.default


def is_available(device_type: str) -> tuple[bool, str]:
    """(True, "") when the extension's kernels for ``device_type`` are loaded, else (False, why)."""
    if device_type == "cpu":
        return (True, "") if _LOADED else (False, _cpp_ops.CPU_ERROR)
    if device_type == "cuda":
        if _cpp_ops.CUDA_ERROR is not None:
            return False, _cpp_ops.CUDA_ERROR
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        return True, ""
    return False, f"the C++ extension has no kernels for {device_type!r} tensors"


def linear(x: Tensor, U: Tensor, S: Tensor, Vh: Tensor, A: Tensor | None, B: Tensor | None,
           bias: Tensor | None, scale: float) -> Tensor:
    """y (N, m), differentiable through the C++ autograd of ``cersa::linear``: see
    ``cersa_kernels.backends`` (its optional ``linear``)."""
    return _LINEAR(x, U, S, Vh, A, B, bias, scale)
