"""Reference backend: ``cersa_linear`` forward and backward in plain PyTorch ops.

This is the ground truth every faster backend is tested against, and the path
used where no extension is built.  It follows docs/design.md "Forward" / "Backward"
exactly (see the contract in ``cersa_kernels.backends``): every product goes
through ``torch.mm``/``torch.addmm`` on the separate factors, so no (m, n)
tensor and no concatenated copy of [Vh; A] or [U | B] is ever made.
It runs on any device PyTorch runs on, and traces under torch.compile.
"""
from __future__ import annotations

import torch
from torch import Tensor


def is_available(device_type: str) -> tuple[bool, str]:
    return True, ""


def forward(x: Tensor, U: Tensor, S: Tensor, Vh: Tensor, A: Tensor | None,
            B: Tensor | None, bias: Tensor | None, scale: float, save_xv: bool):
    xv = torch.mm(x, Vh.t())                       # (N, r)
    h_r = xv * S                                   # (N, r), S applied after the GEMM
    if bias is not None:
        y = torch.addmm(bias, h_r, U.t())          # (N, m)
    else:
        y = torch.mm(h_r, U.t())
    h_k = None
    if A is not None:
        h_k = torch.mm(x, A.t())                   # (N, k)
        if scale != 1.0:
            h_k = h_k.mul_(scale)
        y = y.addmm_(h_k, B.t())
    return y, h_k, (xv if save_xv else None)


def backward(dy: Tensor, x: Tensor, h_k: Tensor | None, xv: Tensor | None, U: Tensor,
             S: Tensor, Vh: Tensor, A: Tensor | None, B: Tensor | None, scale: float,
             needs: tuple[bool, ...]):
    need_x, need_U, need_S, need_Vh, need_A, need_B, need_bias = needs
    dx = dU = dS = dVh = dA = dB = dbias = None
    dh_r = torch.mm(dy, U) if (need_x or need_S or need_Vh) else None        # (N, r)
    dh_k = torch.mm(dy, B) if (A is not None and (need_x or need_A)) else None  # (N, k)
    dh_rS = dh_r * S if (need_x or need_Vh) else None
    if need_x:
        dx = torch.mm(dh_rS, Vh)                                             # (N, n)
        if dh_k is not None:
            dx.addmm_(dh_k, A, alpha=scale)
    if need_U:
        dU = torch.mm(dy.t(), xv * S)                                        # (m, r)
    if need_S:
        dS = (xv * dh_r).sum(0)                                              # (r,)
    if need_Vh:
        dVh = torch.mm(dh_rS.t(), x)                                         # (r, n)
    if need_A and A is not None:
        dA = torch.mm(dh_k.t(), x)                                           # (k, n)
        if scale != 1.0:
            dA.mul_(scale)
    if need_B and B is not None:
        dB = torch.mm(dy.t(), h_k)                                           # (m, k)
    if need_bias:
        dbias = dy.sum(0)                                                    # (m,)
    return dx, dU, dS, dVh, dA, dB, dbias
