"""Backends "cpp" (the C++ extension's CPU kernels) and "cuda" (its CUDA kernels).

Both call the ``cersa::`` ops defined by the extension built from csrc/ (loaded, with their fake
kernels registered, by ``cersa_kernels.backends._cpp_ops``; signatures in
``cersa_kernels.backends._catalogue``).  They follow the backend contract of
``cersa_kernels.backends``: 2-D tensors, one dtype and device, forward -> (y, h_k, xv), backward ->
(dx, dU, dS, dVh, dA, dB, dbias) with None where not needed, plus the differentiable ``linear``
whose autograd is C++ (csrc/cersa_autograd.cpp), and the optional ``forward_quantized`` /
``backward_quantized`` (U and Vh as int8 / NF4 codes with block scales, decoded panel by panel
inside the kernels' schedules: csrc/cpu/cersa_cpu_quant.cpp, csrc/cuda/cersa_cuda_ops.cpp) with
``has_quantized_kernels(device_type)`` saying where they run.

Math: docs/design.md "Forward" / "Backward" / "Quantized factors"; schedules: docs/design.md
"C++ CPU kernels" and "CUDA kernels".
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
if _cpp_ops.HAS_QUANTIZED:
    forward_quantized, backward_quantized = _catalogue.quantized_contract(
        torch.ops.cersa.linear_forward_q.default, torch.ops.cersa.linear_backward_q.default)


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


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@torch.compiler.assume_constant_result
def has_quantized_kernels(device_type: str) -> bool:
    """Whether ``forward_quantized`` / ``backward_quantized`` have kernels for ``device_type``
    tensors in the loaded extensions (CPU: csrc/cpu/cersa_cpu_quant.cpp in cersa_kernels._C;
    CUDA: csrc/cuda/cersa_cuda_ops.cpp in cersa_kernels._C_cuda, when it is loaded); the caller
    decodes the factors and uses forward / backward otherwise."""
    key = _DISPATCH_KEYS.get(device_type)
    return bool(_cpp_ops.HAS_QUANTIZED and key is not None and
                torch._C._dispatch_has_kernel_for_dispatch_key("cersa::linear_forward_q", key))
