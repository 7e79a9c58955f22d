"""The op catalogue: what every kernel backend's ops take and return, defined once.

A kernel backend (the C++/CUDA extension's ``cersa::`` ops, the Triton backend's
``cersa_kernels::triton_*`` custom ops) registers two kernel ops with these signatures::

    linear_forward(x, U, S, Vh, A?, B?, bias?, scale, save_xv) -> (y, h_k, xv)
    linear_backward(dy, x?, h_k?, xv?, U, S, Vh, A?, B?, scale, needs[7])
        -> (dx, dU, dS, dVh, dA, dB, dbias)

and, optionally, a differentiable ``linear(x, U, S, Vh, A?, B?, bias?, scale) -> y`` and the two
kernels with quantized frozen factors (docs/design.md "Quantized factors")::

    linear_forward_q(x, U_codes, U_scales, S, Vh_codes, Vh_scales, A?, B?, bias?,
                     out_features, in_features, quant_type, block_size, scale, save_xv) -> (y, h_k, xv)
    linear_backward_q(dy, x?, h_k?, xv?, U_codes, U_scales, S, Vh_codes, Vh_scales, A?, B?,
                      out_features, in_features, quant_type, block_size, scale, needs[5])
        -> (dx, dS, dA, dB, dbias)

(U, Vh frozen: no dU / dVh; needs = (x, S, A, B, bias)).  An op
schema cannot return None, so an output the op does not compute is an empty tensor: h_k is (N, 0)
without a delta, xv is (N, 0) unless save_xv, and a gradient that is not needed is (0,).  This module
holds, once for every backend: the output shapes (the fake kernels torch.compile traces with), the
normalisation of the ``needs`` flags ("no delta means no dA / dB"), and the mapping of the op
results to the backend contract of ``cersa_kernels.backends`` (an empty tensor <-> None).
Shapes and math: docs/design.md "Forward" / "Backward".
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["GRADIENTS", "QUANT_GRADIENTS", "sizes", "effective_needs", "effective_needs_q", "forward_fake",
           "backward_fake", "linear_fake", "forward_q_fake", "backward_q_fake", "kernel_contract",
           "quantized_contract"]

#: the order of the gradients (and of the ``needs`` flags) of linear_backward.
GRADIENTS = ("x", "U", "S", "Vh", "A", "B", "bias")
#: the order of the gradients (and of the ``needs`` flags) of linear_backward_q (U, Vh frozen).
QUANT_GRADIENTS = ("x", "S", "A", "B", "bias")


def sizes(U: Tensor, Vh: Tensor, A: Tensor | None) -> tuple[int, int, int, int]:
    """(m, r, n, k) = (out_features, frozen rank, in_features, delta rank; 0 without a delta)."""
    m, r = U.shape
    return m, r, Vh.shape[1], (A.shape[0] if A is not None else 0)


def _needs(needs: Sequence[bool], names: tuple[str, ...], has_delta: bool) -> tuple[bool, ...]:
    if len(needs) != len(names):
        raise ValueError(f"needs: expected {len(names)} flags {names}, got {len(needs)}")
    flags = [bool(v) for v in needs]
    for i in (names.index("A"), names.index("B")):  # no delta means no dA / dB
        flags[i] = flags[i] and has_delta
    return tuple(flags)


def effective_needs(needs: Sequence[bool], has_delta: bool) -> tuple[bool, ...]:
    """The 7 flags (x, U, S, Vh, A, B, bias) as bools, with dA and dB off when there is no delta.
    Raises ValueError for a sequence that is not of length 7."""
    return _needs(needs, GRADIENTS, has_delta)


def effective_needs_q(needs: Sequence[bool], has_delta: bool) -> tuple[bool, ...]:
    """The 5 flags (x, S, A, B, bias) of linear_backward_q as bools, with dA and dB off when there is
    no delta.  Raises ValueError for a sequence that is not of length 5."""
    return _needs(needs, QUANT_GRADIENTS, has_delta)


def _check_rows(t: Tensor, width: int, name: str) -> None:
    torch._check(t.dim() == 2 and t.shape[1] == width,
                 lambda: f"cersa: {name}: expected shape (N, {width}), got {tuple(t.shape)}")


def forward_fake(x, U, S, Vh, A, B, bias, scale, save_xv):
    """Output shapes of linear_forward: y (N, m), h_k (N, k), xv (N, r) or (N, 0)."""
    m, r, n, k = sizes(U, Vh, A)
    _check_rows(x, n, "x")
    N = x.shape[0]
    return x.new_empty((N, m)), x.new_empty((N, k)), x.new_empty((N, r if save_xv else 0))


def linear_fake(x, U, S, Vh, A, B, bias, scale):
    """Output shape of the differentiable linear: y (N, m)."""
    m, _, n, _ = sizes(U, Vh, A)
    _check_rows(x, n, "x")
    return x.new_empty((x.shape[0], m))


def backward_fake(dy, x, h_k, xv, U, S, Vh, A, B, scale, needs):
    """Output shapes of linear_backward: each gradient has its tensor's shape and dtype, (0,) when
    not needed."""
    m, r, n, k = sizes(U, Vh, A)
    _check_rows(dy, m, "dy")
    flags = effective_needs(needs, A is not None)
    N = dy.shape[0]
    like = (dy, U, S, Vh, A, B, dy)
    shapes = ((N, n), (m, r), (r,), (r, n), (k, n), (m, k), (m,))
    return tuple((dy if t is None else t).new_empty(s if f else (0,)) for t, s, f in zip(like, shapes, flags))


def forward_q_fake(x, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B, bias, out_features, in_features,
                   quant_type, block_size, scale, save_xv):
    """Output shapes of linear_forward_q: y (N, out_features), h_k (N, k), xv (N, r) or (N, 0), with
    r = S.shape[0]."""
    r, k = S.shape[0], (A.shape[0] if A is not None else 0)
    _check_rows(x, in_features, "x")
    N = x.shape[0]
    return x.new_empty((N, out_features)), x.new_empty((N, k)), x.new_empty((N, r if save_xv else 0))


def backward_q_fake(dy, x, h_k, xv, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B, out_features, in_features,
                    quant_type, block_size, scale, needs):
    """Output shapes of linear_backward_q: (dx, dS, dA, dB, dbias), each in its tensor's shape and
    dtype, (0,) when not needed."""
    _check_rows(dy, out_features, "dy")
    r, k = S.shape[0], (A.shape[0] if A is not None else 0)
    flags = effective_needs_q(needs, A is not None)
    N = dy.shape[0]
    like = (dy, S, A, B, dy)
    shapes = ((N, in_features), (r,), (k, in_features), (out_features, k), (out_features,))
    return tuple((dy if t is None else t).new_empty(s if f else (0,)) for t, s, f in zip(like, shapes, flags))


def kernel_contract(forward_op: Callable, backward_op: Callable) -> tuple[Callable, Callable]:
    """The backend contract's ``forward`` and ``backward`` around two kernel ops with the signatures
    above (the op results' empty tensors become None).  Returns (forward, backward)."""

    def forward(x: Tensor, U: Tensor, S: Tensor, Vh: Tensor, A: Tensor | None, B: Tensor | None,
                bias: Tensor | None, scale: float, save_xv: bool):
        """y (N, m), h_k (N, k) or None, xv (N, r) or None: see ``cersa_kernels.backends``."""
        y, h_k, xv = forward_op(x, U, S, Vh, A, B, bias, float(scale), bool(save_xv))
        return y, (h_k if A is not None else None), (xv if save_xv else None)

    def backward(dy: Tensor, x: Tensor | None, h_k: Tensor | None, xv: Tensor | None, U: Tensor, S: Tensor,
                 Vh: Tensor, A: Tensor | None, B: Tensor | None, scale: float, needs: Sequence[bool]):
        """(dx, dU, dS, dVh, dA, dB, dbias) with None where not needed: see ``cersa_kernels.backends``."""
        flags = effective_needs(needs, A is not None)
        grads = backward_op(dy, x, h_k, xv, U, S, Vh, A, B, float(scale), list(flags))
        return tuple(g if f else None for g, f in zip(grads, flags))

    return forward, backward


def quantized_contract(forward_op: Callable, backward_op: Callable) -> tuple[Callable, Callable]:
    """The optional contract functions ``forward_quantized`` and ``backward_quantized`` (see
    ``cersa_kernels.backends``) around the two quantized-factor kernel ops above (their empty
    tensors become None).  Returns (forward_quantized, backward_quantized)."""

    def forward_quantized(x: Tensor, U_codes: Tensor, U_scales: Tensor, S: Tensor, Vh_codes: Tensor,
                          Vh_scales: Tensor, A: Tensor | None, B: Tensor | None, bias: Tensor | None,
                          shape: tuple[int, int], quant_type: str, block_size: int, scale: float, save_xv: bool):
        """y (N, m), h_k (N, k) or None, xv (N, r) or None: see ``cersa_kernels.backends``."""
        m, n = shape
        y, h_k, xv = forward_op(x, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B, bias, int(m), int(n),
                                str(quant_type), int(block_size), float(scale), bool(save_xv))
        return y, (h_k if A is not None else None), (xv if save_xv else None)

    def backward_quantized(dy: Tensor, x: Tensor | None, h_k: Tensor | None, xv: Tensor | None, U_codes: Tensor,
                           U_scales: Tensor, S: Tensor, Vh_codes: Tensor, Vh_scales: Tensor, A: Tensor | None,
                           B: Tensor | None, shape: tuple[int, int], quant_type: str, block_size: int, scale: float,
                           needs: Sequence[bool]):
        """(dx, dS, dA, dB, dbias) with None where not needed: see ``cersa_kernels.backends``."""
        m, n = shape
        flags = effective_needs_q(needs, A is not None)
        grads = backward_op(dy, x, h_k, xv, U_codes, U_scales, S, Vh_codes, Vh_scales, A, B, int(m), int(n),
                            str(quant_type), int(block_size), float(scale), list(flags))
        return tuple(g if f else None for g, f in zip(grads, flags))

    return forward_quantized, backward_quantized
