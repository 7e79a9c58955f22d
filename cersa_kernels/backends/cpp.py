"""Backends "cpp" (the C++ extension's CPU kernels) and "cuda" (its CUDA kernels).

Both call the ``cersa::`` ops defined by the extension built from csrc/ (see
``cersa_kernels.backends._cpp_ops`` for the schemas, fake kernels and loading).  They follow the
backend contract of ``cersa_kernels.backends``: 2-D tensors, one dtype and device, forward ->
(y, h_k, xv), backward -> (dx, dU, dS, dVh, dA, dB, dbias) with None where not needed.

Math: DESIGN.md "Forward" / "Backward".  CPU kernels: csrc/cpu/cersa_cpu.cpp (GEMMs into strided
blocks of one (rows, r + k) buffer, fp32/fp64 ones straight to the BLAS torch links, others through
ATen; epilogues with at::parallel_for, fused dS/dbias reductions);
CUDA: csrc/cuda/ (cuBLAS through ATen, raw kernels for scale/bias/reductions).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _cpp_ops

# The op overloads, looked up once (None when the extension did not load).
_FWD = torch.ops.cersa.linear_forward.default if _cpp_ops.CPU_ERROR is None else None
_BWD = torch.ops.cersa.linear_backward.default if _cpp_ops.CPU_ERROR is None else None
_LINEAR = torch.ops.cersa.linear.default if _cpp_ops.CPU_ERROR is None else None


def is_available(device_type: str) -> tuple[bool, str]:
    """(True, "") when the extension's kernels for ``device_type`` are loaded, else (False, why)."""
    if device_type == "cpu":
        if _cpp_ops.CPU_ERROR is not None:
            return False, _cpp_ops.CPU_ERROR
        return True, ""
    if device_type == "cuda":
        if _cpp_ops.CUDA_ERROR is not None:
            return False, _cpp_ops.CUDA_ERROR
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        return True, ""
    return False, f"the C++ extension has no kernels for {device_type!r} tensors"


def forward(x: Tensor, U: Tensor, S: Tensor, Vh: Tensor, A: Tensor | None, B: Tensor | None,
            bias: Tensor | None, scale: float, save_xv: bool):
    """y (N, m), h_k (N, k) or None, xv (N, r) or None: see ``cersa_kernels.backends``."""
    y, h_k, xv = _FWD(x, U, S, Vh, A, B, bias, float(scale), bool(save_xv))
    return y, (h_k if A is not None else None), (xv if save_xv else None)


def linear(x: Tensor, U: Tensor, S: Tensor, Vh: Tensor, A: Tensor | None, B: Tensor | None,
           bias: Tensor | None, scale: float) -> Tensor:
    """y (N, m), differentiable through the C++ autograd of ``cersa::linear``: see
    ``cersa_kernels.backends`` (its optional ``linear``)."""
    return _LINEAR(x, U, S, Vh, A, B, bias, scale)


def backward(dy: Tensor, x: Tensor | None, h_k: Tensor | None, xv: Tensor | None, U: Tensor,
             S: Tensor, Vh: Tensor, A: Tensor | None, B: Tensor | None, scale: float,
             needs: tuple[bool, ...]):
    """(dx, dU, dS, dVh, dA, dB, dbias) with None where not needed: see ``cersa_kernels.backends``."""
    has = A is not None
    flags = [bool(needs[0]), bool(needs[1]), bool(needs[2]), bool(needs[3]),
             bool(needs[4]) and has, bool(needs[5]) and has, bool(needs[6])]
    grads = _BWD(dy, x, h_k, xv, U, S, Vh, A, B, float(scale), flags)
    return tuple(g if f else None for g, f in zip(grads, flags))
